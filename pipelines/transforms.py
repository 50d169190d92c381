"""Decoding and augmentation with torchvision.transforms.v2 (the paper's recipe, big_vision's i1k config).

- train, ``preset='inception'``: RandomResizedCrop(input_size) + horizontal flip + RandAugment(2, m)
  (skipped when m is None or 0) + scale to [-1, 1] (mean = std = 0.5);
- eval: resize the short side to input_size / crop_pct, centre crop input_size, scale to [-1, 1];
- ``preset='digits'``: resize the 8x8 digits to input_size; training adds a small random affine
  (rotation, translation, scale); no flip, since digits are not flip-invariant.

Transforms take a uint8 CHW tensor (what :func:`decode_image` returns) and give float32 CHW.
Decoding uses ``torchvision.io.decode_image`` on the raw bytes (libjpeg-turbo / libpng, straight into a
tensor); ``python -m orchestrator.benchmark data`` compares it with PIL.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as _tv_decode
from torchvision.transforms import InterpolationMode, v2

_INTERP = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


def decode_image(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Raw encoded bytes (JPEG/PNG/...) -> uint8 RGB CHW tensor. Raises on corrupt data."""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec (not a dependency here); they
    # are still the fastest decode path we have (see orchestrator/benchmark/data.py), so the per-call warning is muted.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _tv_decode(buf, mode=ImageReadMode.RGB)


def decode_image_pil(data: bytes) -> torch.Tensor:
    """PIL decode path (for comparison in the benchmark)."""
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        a = np.asarray(im.convert("RGB"))
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def make_transform(
    training: bool,
    *,
    input_size: int,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    randaug_num_ops: int = 2,
    randaug_magnitude: int | None = None,
    preset: str = "inception",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A uint8 CHW -> float32 CHW transform. See the module docstring for the recipe."""
    if interpolation not in _INTERP:
        raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {interpolation!r}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    interp = _INTERP[interpolation]
    if preset == "digits":
        ops: list = [v2.Resize((input_size, input_size), interpolation=interp, antialias=True)]
        if training:
            ops.append(v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), interpolation=InterpolationMode.BILINEAR))
        return v2.Compose(ops + _normalize(mean, std))
    if preset != "inception":
        raise ValueError(f"preset must be 'inception' or 'digits', got {preset!r}")
    if training:
        ops = [
            v2.RandomResizedCrop(input_size, interpolation=interp, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if randaug_magnitude:
            ops.append(v2.RandAugment(num_ops=randaug_num_ops, magnitude=int(randaug_magnitude), interpolation=InterpolationMode.BILINEAR))
    else:
        ops = [
            v2.Resize(int(round(input_size / crop_pct)), interpolation=interp, antialias=True),
            v2.CenterCrop(input_size),
        ]
    return v2.Compose(ops + _normalize(mean, std))


def eval_transform(data_config: Mapping[str, Any], *, input_size: int, preset: str = "inception"):
    """The evaluation transform for a model whose preprocessing is ``data_config`` (timm's shape: mean, std,
    interpolation, crop_pct), at ``input_size``. Training's validation and stand-alone evaluation both use it."""
    return make_transform(
        False, input_size=input_size, mean=data_config["mean"], std=data_config["std"],
        interpolation=data_config["interpolation"], crop_pct=data_config["crop_pct"], preset=preset,
    )


def default_transform(mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)):
    """No geometry: uint8 -> float32 scaled with mean/std (images must already share one size)."""
    return v2.Compose(_normalize(mean, std))
