"""A checkpoint of timm's MlpMixer loads with strict=True and gives timm's logits (fixture made by timm 1.0.31)."""

from pathlib import Path

import pytest
import torch

from model import MixerConfig, MlpMixer, load_state_dict_checked

FIXTURE = Path(__file__).parents[1] / "data" / "timm_mixer_fixture.pt"  # made by tests/data/make_timm_fixture.py


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, weights_only=True)


def test_timm_state_dict_has_exactly_our_keys_and_shapes(fixture):
    model = MlpMixer(MixerConfig(**fixture["config"]))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in fixture["state_dict"].items()}
    assert ours == theirs


@pytest.mark.parametrize("loader", ["torch_strict", "checked"])
def test_timm_checkpoint_gives_timm_logits(fixture, loader):
    model = MlpMixer(MixerConfig(**fixture["config"])).eval()
    if loader == "torch_strict":
        model.load_state_dict(fixture["state_dict"], strict=True)
    else:
        load_state_dict_checked(model, fixture["state_dict"])
    with torch.no_grad():
        tokens = model.forward_features(fixture["input"])
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), fixture["pre_logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model(fixture["input"]), fixture["logits"], atol=1e-5, rtol=0)


def test_checked_loader_names_bad_key_and_shapes(fixture):
    model = MlpMixer(MixerConfig(**{**fixture["config"], "channels_mlp_dim": 48}))
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp_channels\.fc1\.weight.*\(64, 32\).*\(48, 32\)"):
        load_state_dict_checked(model, fixture["state_dict"])
    model = MlpMixer(MixerConfig(**fixture["config"]))
    missing = dict(fixture["state_dict"])
    del missing["norm.bias"]
    with pytest.raises(ValueError, match=r"'norm\.bias' is missing.*\(32,\)"):
        load_state_dict_checked(model, missing)
    extra = {**fixture["state_dict"], "blocks.2.norm1.weight": torch.ones(32)}
    with pytest.raises(ValueError, match=r"'blocks\.2\.norm1\.weight'.*unexpected"):
        load_state_dict_checked(model, extra)
