"""eval.sets in the config tree: a list of small records from a preset's YAML or an override, each field checked
under its own key (eval.sets[1].url), names unique and usable as metric prefixes."""

import pytest

from orchestrator.config.load import load_config
from orchestrator.config.parse import config_from_dict
from orchestrator.config.tree import ConfigError, EvalSetSpec


def test_sets_from_an_override_and_from_yaml(tmp_path):
    cfg = load_config("digits", ["eval.sets=[{name: v2, url: /data/v2, split: test}, "
                                 "{name: real, url: s3://b/in1k, labels: s3://b/real.json}]"])
    assert cfg.eval.sets == [EvalSetSpec("v2", "/data/v2", "test"),
                             EvalSetSpec("real", "s3://b/in1k", "val", "s3://b/real.json")]
    preset = tmp_path / "mine.yaml"
    preset.write_text("eval:\n  sets:\n    - name: v2\n      url: /data/v2\n")
    cfg = load_config(str(preset))
    assert cfg.eval.sets == [EvalSetSpec("v2", "/data/v2")]
    assert config_from_dict(cfg.to_dict()).eval.sets == cfg.eval.sets  # what a worker rebuilds from its payload
    assert load_config("digits").eval.sets == []


@pytest.mark.parametrize("value, words", [
    ("v2", ["eval.sets='v2'", "a list of a mapping {name, url, split (optional), labels (optional)}"]),
    ("[v2]", ["eval.sets[0]='v2'", "a mapping {name, url"]),
    ("[{name: a, url: /a}, {name: b}]", ["eval.sets[1].url is missing"]),
    ("[{name: a, url: /a}, {name: b, url: 3}]", ["eval.sets[1].url=3", "a string"]),
    ("[{name: a, url: /a, labels: [1]}]", ["eval.sets[0].labels=[1]", "a string or null"]),
    ("[{name: a, url: /a, spilt: val}]", ["eval.sets[0].spilt", "accepted keys in eval.sets[0]: name, url, split"]),
    ("[{name: a, url: /a}, {name: a, url: /b}]", ["eval.sets[1].name='a'", "no other set"]),
    ("[{name: val, url: /a}]", ["eval.sets[0].name='val'", "other than train, val, minival"]),
    ("[{name: minival, url: /a}]", ["eval.sets[0].name='minival'"]),
    ("[{name: fewshot, url: /a}]", ["eval.sets[0].name='fewshot'"]),
    ("[{name: 'v2/real', url: /a}]", ["eval.sets[0].name='v2/real'", "letters, digits"]),
    ("[{name: '', url: /a}]", ["eval.sets[0].name=''", "letters, digits"]),
    ("[{name: a, url: ''}]", ["eval.sets[0].url=''", "a dataset root URL"]),
    ("[{name: a, url: /a, split: ''}]", ["eval.sets[0].split=''", "a split name"]),
])
def test_bad_sets_name_the_exact_key(value, words):
    with pytest.raises(ConfigError) as info:
        load_config("digits", [f"eval.sets={value}"])
    for word in words:
        assert word in str(info.value), str(info.value)
