"""Config parsing and validation: every failure names the key, the bad value and what is accepted."""

import pytest

from orchestrator.config.load import load_config
from orchestrator.config.parse import list_presets
from orchestrator.config.tree import ConfigError


def test_presets_load_and_validate():
    assert {"digits", "imagenet1k_b16", "imagenet21k_l16", "jft_b16"} <= set(list_presets())
    for name in list_presets():
        cfg = load_config(name)
        assert cfg.run.name


def test_imagenet_preset_is_the_paper_recipe():
    cfg = load_config("imagenet1k_b16")
    assert cfg.model.name == "mixer_b16_224"
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay) == (1e-3, [0.9, 0.999], 0.1)
    assert (cfg.optim.global_batch_size, cfg.optim.clip_norm) == (4096, 1.0)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_steps, cfg.schedule.decay) == (300, 10_000, "linear")
    assert (cfg.reg.randaug_num_ops, cfg.reg.randaug_magnitude) == (2, 15)
    assert (cfg.reg.mixup_alpha, cfg.reg.stochastic_depth) == (0.5, 0.1)


def test_overrides_are_typed():
    cfg = load_config("digits", ["optim.lr=3e-3", "scaling.use_gpu=true", "optim.betas=[0.8, 0.9]",
                                 "model.head_bias=null", "schedule.epochs=2"])
    assert cfg.optim.lr == 3e-3 and cfg.scaling.use_gpu is True
    assert cfg.optim.betas == [0.8, 0.9] and cfg.schedule.epochs == 2.0


@pytest.mark.parametrize(
    "override, names",
    [
        (["optim.lrr=1"], ["optim.lrr", "lr"]),
        (["optimizer.lr=1"], ["optimizer", "optim"]),
        (["optim.lr=-1"], ["optim.lr", "-1", "positive"]),
        (["optim.lr=fast"], ["optim.lr", "fast", "a number"]),
        (["schedule.decay=step"], ["schedule.decay", "step", "cosine"]),
        (["scaling.num_workers=0"], ["scaling.num_workers", "0"]),
        (["optim.global_batch_size=100", "scaling.num_workers=3"], ["optim.global_batch_size", "100", "multiple"]),
        (["model.patch_size=5"], ["patch_size", "5"]),
        (["model.name=mixer_x99"], ["mixer_x99", "mixer_b16_224"]),
        (["reg.stochastic_depth=1.5"], ["reg.stochastic_depth", "1.5"]),
        (["lr=1"], ["lr", "section"]),
        (["noequals"], ["noequals", "section.key=value"]),
    ],
)
def test_bad_values_name_key_value_and_accepted(override, names):
    with pytest.raises(ConfigError) as e:
        load_config("digits", override)
    for name in names:
        assert name in str(e.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="digits"):
        load_config("no_such_preset")


def test_yaml_is_parsed_safely(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("run: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
