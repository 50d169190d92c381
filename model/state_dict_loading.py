"""Load a state dict (e.g. a timm MlpMixer checkpoint) with errors that name the key and the shapes."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn


def load_state_dict_checked(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], allow_missing: Collection[str] = ()
) -> None:
    """Copy ``state_dict`` into ``model``; every key must exist with the same shape.

    Keys in ``allow_missing`` may be absent (their current values are kept). Raises ValueError naming the first
    missing key, unexpected key or shape mismatch, with the expected and found shapes.
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
    model.load_state_dict(dict(state_dict), strict=not allow_missing)
