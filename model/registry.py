"""Named Mixer variants: the paper's Table 1 plus small CPU presets, each with its data config.

    from model import create_model
    model = create_model("mixer_b16_224", num_classes=10, drop_path_rate=0.1)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from model.config import MixerConfig
from model.mixer import MlpMixer

_OFFICIAL_DATA = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=0.875)
_SMALL_DATA = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", crop_pct=1.0)


def _table1(patch: int, depth: int, hidden: int, tokens_mlp: int, channels_mlp: int) -> dict[str, int]:
    return dict(
        img_size=224,
        patch_size=patch,
        depth=depth,
        hidden_dim=hidden,
        tokens_mlp_dim=tokens_mlp,
        channels_mlp_dim=channels_mlp,
        num_classes=1000,
    )


# name -> (size fields of MixerConfig, data config). Table 1 of the paper: patch, layers, C, D_S, D_C.
_VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "mixer_s32_224": (_table1(32, 8, 512, 256, 2048), _OFFICIAL_DATA),
    "mixer_s16_224": (_table1(16, 8, 512, 256, 2048), _OFFICIAL_DATA),
    "mixer_b32_224": (_table1(32, 12, 768, 384, 3072), _OFFICIAL_DATA),
    "mixer_b16_224": (_table1(16, 12, 768, 384, 3072), _OFFICIAL_DATA),
    "mixer_l32_224": (_table1(32, 24, 1024, 512, 4096), _OFFICIAL_DATA),
    "mixer_l16_224": (_table1(16, 24, 1024, 512, 4096), _OFFICIAL_DATA),
    "mixer_h14_224": (_table1(14, 32, 1280, 640, 5120), _OFFICIAL_DATA),
    # scikit-learn's 8x8 digits, upsampled to 16x16 and replicated to 3 channels: 16 tokens of 4x4.
    "mixer_digits": (
        dict(img_size=16, patch_size=4, depth=4, hidden_dim=128, tokens_mlp_dim=64, channels_mlp_dim=256,
             num_classes=10),
        _SMALL_DATA,
    ),
    # CIFAR-sized inputs: 64 tokens of 4x4.
    "mixer_tiny": (
        dict(img_size=32, patch_size=4, depth=2, hidden_dim=64, tokens_mlp_dim=32, channels_mlp_dim=256,
             num_classes=10),
        _SMALL_DATA,
    ),
}

_ACCEPTED_KEYS = tuple(f.name for f in dataclasses.fields(MixerConfig))


def list_models() -> list[str]:
    return list(_VARIANTS)


def _variant(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if name not in _VARIANTS:
        raise ValueError(f"model name {name!r} is unknown: expected one of {list_models()}")
    return _VARIANTS[name]


def get_config(name: str, **overrides: Any) -> MixerConfig:
    """The validated config of variant ``name`` with ``overrides`` applied (no model is built)."""
    sizes, _ = _variant(name)
    unknown = sorted(set(overrides) - set(_ACCEPTED_KEYS))
    if unknown:
        raise ValueError(
            f"override {unknown[0]!r} (value {overrides[unknown[0]]!r}) for model {name!r} is unknown: "
            f"expected keys among {list(_ACCEPTED_KEYS)}"
        )
    return MixerConfig(**{**sizes, **overrides}).validate()


def create_model(name: str, **overrides: Any) -> MlpMixer:
    return MlpMixer(get_config(name, **overrides))


def official_data_config() -> dict[str, Any]:
    """Preprocessing of the paper's released weights (JAX .npz, and timm's copies of them): every Table 1 variant's."""
    return dict(_OFFICIAL_DATA)


def pretrained_data_config(name: str) -> dict[str, Any]:
    """Input size (3, H, W) and preprocessing of variant ``name``, in the shape of timm's default_cfg."""
    sizes, data = _variant(name)
    side = sizes["img_size"]
    return dict(input_size=(sizes.get("in_chans", 3), side, side), **data)
