"""Every registered variant builds, runs forward/backward at a small size, and every parameter gets a gradient."""

import pytest
import torch

from model import create_model, get_config, list_models, official_data_config, pretrained_data_config

TABLE1 = {  # name: (patch, layers, C, D_S, D_C), paper Table 1
    "mixer_s32_224": (32, 8, 512, 256, 2048),
    "mixer_s16_224": (16, 8, 512, 256, 2048),
    "mixer_b32_224": (32, 12, 768, 384, 3072),
    "mixer_b16_224": (16, 12, 768, 384, 3072),
    "mixer_l32_224": (32, 24, 1024, 512, 4096),
    "mixer_l16_224": (16, 24, 1024, 512, 4096),
    "mixer_h14_224": (14, 32, 1280, 640, 5120),
}


def test_registry_lists_paper_variants_and_small_presets():
    assert set(TABLE1) | {"mixer_digits", "mixer_tiny"} <= set(list_models())


@pytest.mark.parametrize("name", sorted(TABLE1))
def test_paper_variant_sizes_match_table1(name):
    cfg = get_config(name)
    assert (cfg.patch_size, cfg.depth, cfg.hidden_dim, cfg.tokens_mlp_dim, cfg.channels_mlp_dim) == TABLE1[name]
    assert (cfg.img_size, cfg.in_chans, cfg.num_classes) == (224, 3, 1000)
    data = pretrained_data_config(name)
    assert data == dict(
        input_size=(3, 224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=0.875
    )


def test_official_weights_preprocessing_is_the_table1_variants():
    """What evaluate uses for an official .npz / timm file that names no variant."""
    official = official_data_config()
    assert official == dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=0.875)
    for name in TABLE1:
        assert {k: v for k, v in pretrained_data_config(name).items() if k != "input_size"} == official
    official["crop_pct"] = 1.0  # a copy: the registry's table stays as it is
    assert official_data_config()["crop_pct"] == 0.875


def test_small_presets():
    digits = get_config("mixer_digits")
    assert (digits.img_size, digits.patch_size, digits.in_chans, digits.depth, digits.hidden_dim) == (16, 4, 3, 4, 128)
    assert (digits.tokens_mlp_dim, digits.channels_mlp_dim, digits.num_classes) == (64, 256, 10)
    assert pretrained_data_config("mixer_digits") == dict(
        input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", crop_pct=1.0
    )
    assert pretrained_data_config("mixer_tiny")["input_size"] == (3, 32, 32)


def _shrunk(name):
    """The variant at a small size: image side 2 patches, narrow and shallow (patch size kept)."""
    if name in TABLE1:
        patch = TABLE1[name][0]
        return dict(img_size=2 * patch, depth=2, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32)
    return {}  # the CPU presets are small already


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("init", ["official", "timm"])
def test_variant_forward_backward_every_parameter_gets_gradient(name, init):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, init=init, **_shrunk(name))
    with torch.no_grad():  # the head starts at zero in both schemes, which would stop gradients to the trunk
        model.head.weight.normal_(std=0.1)
    cfg = model.cfg
    x = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    logits = model(x)
    assert logits.shape == (2, 7)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, cfg.num_tokens, cfg.hidden_dim)
    assert model.forward_head(tokens, pre_logits=True).shape == (2, cfg.hidden_dim)
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 3])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname



def test_smoke_demo_prints_config_params_flops_and_forward(capsys):
    from model.__main__ import main

    main(["--name", "mixer_digits", "--batch-size", "2", "depth=1"])
    out = capsys.readouterr().out
    assert "'depth': 1" in out and "params" in out and "GFLOPs/image" in out and "(2, 3, 16, 16) -> (2, 10)" in out
