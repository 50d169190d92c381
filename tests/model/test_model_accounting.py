"""Parameter and FLOP counts from the config alone, against the paper's Table 1 and the built models."""

import pytest

from model import count_params, create_model, forward_flops, forward_macs, get_config, train_flops_per_image

# Table 1, parameters without the head, in millions as computed from the architecture (paper rounds these).
TABLE1_PARAMS_M = {
    "mixer_s32_224": 18.59,
    "mixer_s16_224": 18.02,
    "mixer_b32_224": 59.52,
    "mixer_b16_224": 59.11,
    "mixer_l32_224": 205.91,
    "mixer_l16_224": 207.17,
    "mixer_h14_224": 431.07,
}


@pytest.mark.parametrize("name", sorted(TABLE1_PARAMS_M))
def test_params_without_head_match_table1(name):
    assert round(count_params(get_config(name), include_head=False) / 1e6, 2) == TABLE1_PARAMS_M[name]


def test_b16_with_1000_class_head_and_gmacs():
    cfg = get_config("mixer_b16_224")
    assert count_params(cfg) == 59_880_472
    assert round(forward_macs(cfg) / 1e9, 3) == 12.602
    assert forward_flops(cfg) == 2 * forward_macs(cfg)
    assert train_flops_per_image(cfg) == 3 * forward_flops(cfg)
    assert round(forward_flops(cfg) / 1e9, 1) == 25.2
    assert round(train_flops_per_image(cfg) / 1e9, 1) == 75.6


def test_b16_macs_by_part():
    cfg = get_config("mixer_b16_224")
    stem = 196 * 3 * 16 * 16 * 768
    token_mlp, channel_mlp = 2 * 768 * 196 * 384, 2 * 196 * 768 * 3072
    assert round(stem / 1e6, 1) == 115.6 and round(token_mlp / 1e6, 1) == 115.6 and round(channel_mlp / 1e6, 1) == 924.8
    assert forward_macs(cfg) == stem + 12 * (token_mlp + channel_mlp) + 768 * 1000


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("mixer_digits", {}),
        ("mixer_tiny", {}),
        ("mixer_tiny", dict(in_chans=1, num_classes=3)),
        ("mixer_s32_224", dict(depth=1, hidden_dim=64, channels_mlp_dim=96)),
        ("mixer_h14_224", dict(img_size=28, depth=1, hidden_dim=40, channels_mlp_dim=60)),
        ("mixer_b16_224", dict(img_size=64, depth=1, hidden_dim=64, num_classes=21843)),
    ],
)
def test_count_params_equals_built_model(name, overrides):
    model = create_model(name, **overrides)
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert count_params(model.cfg) == total
    assert count_params(model.cfg, include_head=False) == total - head
