"""Official Flax .npz import: the test writes an .npz in the official layout from known weights, then imports it."""

import io
import logging

import numpy as np
import pytest
import torch

from model import create_model, infer_config_from_npz, load_npz

# Inverse of the documented mapping (reference table), written out here independently of model/jax_checkpoint.py.
BLOCK_PARTS = {
    "norm1": "LayerNorm_0",
    "mlp_tokens.fc1": "token_mixing/Dense_0",
    "mlp_tokens.fc2": "token_mixing/Dense_1",
    "norm2": "LayerNorm_1",
    "mlp_channels.fc1": "channel_mixing/Dense_0",
    "mlp_channels.fc2": "channel_mixing/Dense_1",
}


def to_official_npz(model) -> dict[str, np.ndarray]:
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {"stem/kernel": sd["stem.proj.weight"].transpose(2, 3, 1, 0), "stem/bias": sd["stem.proj.bias"]}
    for i in range(model.cfg.depth):
        for ours, flax in BLOCK_PARTS.items():
            w, b = sd[f"blocks.{i}.{ours}.weight"], sd[f"blocks.{i}.{ours}.bias"]
            leaf = "scale" if "LayerNorm" in flax else "kernel"
            out[f"MixerBlock_{i}/{flax}/{leaf}"] = w if leaf == "scale" else w.T
            out[f"MixerBlock_{i}/{flax}/bias"] = b
    out["pre_head_layer_norm/scale"], out["pre_head_layer_norm/bias"] = sd["norm.weight"], sd["norm.bias"]
    out["head/kernel"], out["head/bias"] = sd["head.weight"].T, sd["head.bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def random_model(**overrides):
    torch.manual_seed(0)
    model = create_model(
        "mixer_tiny", img_size=24, patch_size=4, depth=2, hidden_dim=16, tokens_mlp_dim=12, channels_mlp_dim=20,
        in_chans=3, gelu="tanh", **overrides,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model.eval()


def write_npz(arrays, path=None):
    target = path if path is not None else io.BytesIO()
    np.savez(target, **arrays)
    if path is None:
        target.seek(0)
    return target


def test_infer_config_from_npz_shapes():
    source = random_model(num_classes=21843)
    cfg = infer_config_from_npz(write_npz(to_official_npz(source)))
    assert cfg == source.cfg  # sizes, 21843 classes and the JAX tanh GELU


def test_npz_import_gives_same_logits(tmp_path):
    source = random_model(num_classes=7)
    path = tmp_path / "Mixer-T_4.npz"
    write_npz(to_official_npz(source), path)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        expected = source(x)
    for target in (None, source.cfg, random_model(num_classes=7)):
        result = load_npz(path, target)
        assert not result.head_replaced and result.checkpoint_num_classes == 7
        with torch.no_grad():
            torch.testing.assert_close(result.model.eval()(x), expected, atol=1e-5, rtol=0)


def test_21k_head_replaced_for_new_class_count(caplog):
    source = random_model(num_classes=21843)
    arrays = to_official_npz(source)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        expected_features = source.forward_head(source.forward_features(x), pre_logits=True)
    with caplog.at_level(logging.INFO, logger="model.jax_checkpoint"):
        result = load_npz(write_npz(arrays), num_classes=10)
    assert "head replaced" in caplog.text and "21843" in caplog.text
    assert result.head_replaced and result.checkpoint_num_classes == 21843
    model = result.model.eval()
    assert model.cfg.num_classes == 10 and model.head.weight.shape == (10, 16)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_head(model.forward_features(x), pre_logits=True), expected_features, atol=1e-5, rtol=0
        )
        assert model(x).shape == (2, 10)
    # an existing model with another class count: trunk loaded, head re-initialised per its config
    existing = random_model(num_classes=5, head_bias="neg_log_k")
    result = load_npz(write_npz(arrays), existing)
    assert result.model is existing and result.head_replaced
    assert torch.count_nonzero(existing.head.weight) == 0
    assert torch.allclose(existing.head.bias, torch.full((5,), -np.log(5.0), dtype=torch.float32))


def test_npz_loading_refuses_pickles(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, **{"stem/kernel": np.array([{"a": 1}], dtype=object), "head/kernel": np.zeros((4, 2))})
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npz(path)


def test_shape_mismatch_names_key_expected_and_found():
    arrays = to_official_npz(random_model(num_classes=7))
    target = random_model(num_classes=7).cfg
    bad = dict(arrays)
    bad["MixerBlock_1/channel_mixing/Dense_0/kernel"] = np.zeros((16, 24), np.float32)
    with pytest.raises(ValueError, match=r"MixerBlock_1/channel_mixing/Dense_0/kernel.*\(16, 24\).*expected \(16, 20\)"):
        load_npz(write_npz(bad), target)


def test_missing_and_unexpected_keys_are_named():
    arrays = to_official_npz(random_model(num_classes=7))
    target = random_model(num_classes=7).cfg
    missing = {k: v for k, v in arrays.items() if k != "MixerBlock_0/LayerNorm_1/bias"}
    with pytest.raises(ValueError, match=r"blocks\.0\.norm2\.bias.*missing.*\(16,\)"):
        load_npz(write_npz(missing), target)
    deeper = {**arrays, "MixerBlock_2/LayerNorm_0/scale": np.ones(16, np.float32)}
    with pytest.raises(ValueError, match=r"MixerBlock_2/LayerNorm_0/scale.*depth 2"):
        load_npz(write_npz(deeper), target)
    foreign = {**arrays, "Transformer/encoder_norm/scale": np.ones(16, np.float32)}
    with pytest.raises(ValueError, match=r"Transformer/encoder_norm/scale.*not part of the official Mixer layout"):
        load_npz(write_npz(foreign), target)
    headless = {k: v for k, v in arrays.items() if not k.startswith("head/")}
    with pytest.raises(ValueError, match=r"head/kernel.*missing"):
        load_npz(write_npz(headless), target)
