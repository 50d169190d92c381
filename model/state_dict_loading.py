"""State dicts in timm's MlpMixer key layout: the architecture they describe, and a checked load that names
the key and the shapes on any mismatch."""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import nn

from model.config import MixerConfig

_BLOCK = re.compile(r"blocks\.(\d+)\.")
_LAYOUT = "timm's MlpMixer layout: stem.proj, blocks.{i}.mlp_tokens/mlp_channels, norm, head"


def config_from_state_dict(state_dict: Mapping[str, Any], **overrides: Any) -> MixerConfig:
    """The MixerConfig a state dict was written by, read from its shapes (values: tensors or arrays in torch's
    layout). ``overrides`` set what shapes do not show (gelu, init, head_bias). ValueError names the problem."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ValueError(f"key {key!r} is missing (expected {_LAYOUT})")
        return tuple(state_dict[key].shape)

    hidden, in_chans, patch, patch_w = shape("stem.proj.weight")
    tokens_mlp, num_tokens = shape("blocks.0.mlp_tokens.fc1.weight")
    channels_mlp, _ = shape("blocks.0.mlp_channels.fc1.weight")
    num_classes, _ = shape("head.weight")
    depth = len({int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))})
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens or patch != patch_w:
        raise ValueError(
            f"it has {num_tokens} tokens of {patch}x{patch_w} patches: expected a square grid of square patches"
        )
    sizes = dict(
        img_size=grid * patch, patch_size=patch, in_chans=in_chans, num_classes=num_classes, depth=depth,
        hidden_dim=hidden, tokens_mlp_dim=tokens_mlp, channels_mlp_dim=channels_mlp,
    )
    return MixerConfig(**{**sizes, **overrides}).validate()


def check_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], allow_missing: Collection[str] = ()
) -> None:
    """Every key of ``state_dict`` exists in ``model`` with the same shape, and every key of the model is there
    (but those in ``allow_missing``). ``model`` may live on the meta device: nothing is copied.

    Raises ValueError naming the first unexpected key, shape mismatch or missing key, with the shapes.
    """
    expected = model.state_dict()
    for key, value in state_dict.items():
        if key not in expected:
            raise ValueError(
                f"checkpoint key {key!r} (shape {tuple(value.shape)}) is unexpected: the model has no such "
                f"entry; expected keys like {list(expected)[:4]} ... ({len(expected)} in all)"
            )
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"checkpoint key {key!r} has shape {tuple(value.shape)}: expected {tuple(expected[key].shape)}"
            )
    missing = [k for k in expected if k not in state_dict and k not in allow_missing]
    if missing:
        raise ValueError(
            f"checkpoint key {missing[0]!r} is missing: expected shape {tuple(expected[missing[0]].shape)}"
            + (f" ({len(missing)} keys missing in all)" if len(missing) > 1 else "")
        )


def load_state_dict_checked(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], allow_missing: Collection[str] = ()
) -> None:
    """Copy ``state_dict`` into ``model`` after `check_state_dict`; keys in ``allow_missing`` may be absent
    (their current values are kept)."""
    check_state_dict(model, state_dict, allow_missing)
    model.load_state_dict(dict(state_dict), strict=not allow_missing)
