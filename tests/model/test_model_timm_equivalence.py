"""Parity with timm's MlpMixer: a timm checkpoint loads with strict=True and gives timm's outputs (fixture made by
timm 1.0.31), and the same weights in timm's model and ours give the same token map, pre-logits, logits and
reset_classifier behaviour (timm, a dev dependency, used directly)."""

from pathlib import Path

import pytest
import torch
from timm.models.mlp_mixer import MlpMixer as TimmMixer
from torch import nn

from model import MixerConfig, MlpMixer, create_model, load_state_dict_checked
from orchestrator.benchmark.model import timm_twin

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


def twins(dtype=torch.float32, **overrides):
    """Our model with random weights everywhere (head and LayerNorm affine included) and timm's with the same."""
    torch.manual_seed(0)
    ours = create_model(
        "mixer_tiny", img_size=24, patch_size=4, depth=2, hidden_dim=16, tokens_mlp_dim=12, channels_mlp_dim=40,
        num_classes=7, **overrides,
    )
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(std=0.3)
    theirs = timm_twin(ours, TimmMixer)
    return ours.to(dtype).eval(), theirs.to(dtype).eval()


def test_same_weights_give_timms_token_map_pre_logits_and_logits():
    ours, theirs = twins()
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        tokens = ours.forward_features(x)
        assert tokens.shape == (3, 36, 16)  # (B, S, C), normalised as timm's
        torch.testing.assert_close(tokens, theirs.forward_features(x), atol=1e-5, rtol=1e-5)
        pre_logits = ours.forward_head(tokens, pre_logits=True)
        assert pre_logits.shape == (3, 16)
        torch.testing.assert_close(pre_logits, theirs.forward_head(tokens, pre_logits=True), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pre_logits, tokens.mean(dim=1))
        logits = ours.forward_head(tokens)
        assert logits.shape == (3, 7)
        torch.testing.assert_close(logits, theirs.forward_head(tokens), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_pre_logits_are_taken_after_head_dropout_as_timms():
    ours, theirs = twins(head_drop_rate=0.5)
    theirs.head_drop.p = 0.5  # timm's drop_rate; timm_twin builds without regularisation
    ours.train()
    theirs.train()
    tokens = torch.randn(4, 36, 16)
    for pre_logits in (True, False):
        torch.manual_seed(1)
        expected = theirs.forward_head(tokens, pre_logits=pre_logits)
        torch.manual_seed(1)
        got = ours.forward_head(tokens, pre_logits=pre_logits)
        torch.testing.assert_close(got, expected)
    assert (ours.forward_head(tokens, pre_logits=True) == 0).any()  # dropout was active


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("global_pool", [None, "avg", ""])
def test_reset_classifier_leaves_timms_head(global_pool, dtype):
    ours, theirs = twins(dtype)
    ours.reset_classifier(5, global_pool)
    theirs.reset_classifier(5, global_pool)
    assert ours.num_classes == theirs.num_classes == ours.cfg.num_classes == 5
    assert ours.global_pool == theirs.global_pool == (global_pool if global_pool is not None else "avg")
    for model in (ours, theirs):
        assert type(model.head) is nn.Linear and model.head.in_features == 16
        assert model.head.weight.shape == (5, 16) and model.head.weight.dtype == dtype
        assert not model.head.training  # follows the model (eval), as timm's
    # the one deliberate difference: our new head starts as the paper's (zero weight, cfg's head bias)
    assert torch.count_nonzero(ours.head.weight) == 0 and torch.count_nonzero(ours.head.bias) == 0
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 3, 24, 24, dtype=dtype)
    pooled = global_pool != ""
    with torch.no_grad():
        tokens = ours.forward_features(x)
        pre_logits, logits = ours.forward_head(tokens, pre_logits=True), ours(x)
        assert pre_logits.shape == ((3, 16) if pooled else (3, 36, 16))
        assert logits.shape == ((3, 5) if pooled else (3, 36, 5))
        torch.testing.assert_close(pre_logits, theirs.forward_head(tokens, pre_logits=True), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, theirs(x), atol=1e-5, rtol=1e-5)


def test_reset_classifier_refuses_what_timm_refuses_and_leaves_the_model_as_it_was():
    ours, theirs = twins()
    with pytest.raises(AssertionError):
        theirs.reset_classifier(5, "max")
    with pytest.raises(ValueError, match=r"global_pool='max' is invalid: expected one of \['avg', ''\]"):
        ours.reset_classifier(5, "max")
    with pytest.raises(ValueError, match=r"num_classes=0 is invalid"):  # timm would make an Identity head
        ours.reset_classifier(0, "")
    assert ours.num_classes == 7 and ours.head.weight.shape == (7, 16) and ours.global_pool == "avg"
