"""Decoding and augmentation (the paper's recipe, big_vision's i1k config).

- train, ``preset='inception'``: RandomResizedCrop(input_size) + horizontal flip + RandAugment(2, m)
  (skipped when m is None or 0) + scale to [-1, 1] (mean = std = 0.5). RandAugment is big_vision's 16-op
  version (``randaug_impl='big_vision'``, pipelines/randaugment.py, what the paper ran) or torchvision's
  (``'torchvision'``: 14 ops, 31 magnitude bins; not the paper's);
- eval: resize the short side to input_size / crop_pct, centre crop input_size, scale to [-1, 1];
- ``preset='digits'``: resize the 8x8 digits to input_size; training adds a small random affine
  (rotation, translation, scale); no flip, since digits are not flip-invariant.

:func:`make_transform` gives one image's whole recipe, uint8 CHW in, float32 CHW out (evaluation, single images).
:func:`train_pipeline` splits the training recipe the way the loader runs it: per image on the host a
crop-aware decode fused with RandomResizedCrop (pipelines/decode.py) and the flip, uint8 out; then per batch,
on the host or on the training device, RandAugment and normalisation (pipelines/batch_stage.py).
Decoding uses ``torchvision.io.decode_image`` on the raw bytes (libjpeg-turbo / libpng, straight into a
tensor); ``python -m orchestrator.benchmark data`` compares it with PIL.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as _tv_decode
from torchvision.transforms import InterpolationMode, v2

from .batch_stage import BatchStage
from .decode import decode_resized_crop, draw_crop, image_size
from .device_decode import ShipJpeg
from .randaugment import BigVisionRandAugment

RANDAUG_IMPLS = ("big_vision", "torchvision")

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
    randaug_impl: str = "big_vision",
    preset: str = "inception",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A uint8 CHW -> float32 CHW transform. See the module docstring for the recipe."""
    interp = _check(interpolation, crop_pct, randaug_impl)
    if preset == "digits":
        return v2.Compose(_digits_ops(training, input_size, interp) + _normalize(mean, std))
    if preset != "inception":
        raise ValueError(f"preset must be 'inception' or 'digits', got {preset!r}")
    if training:
        ops = [
            v2.RandomResizedCrop(input_size, interpolation=interp, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if randaug_magnitude and randaug_impl == "torchvision":
            ops.append(_torchvision_randaugment(randaug_num_ops, randaug_magnitude))
        elif randaug_magnitude:
            ops.append(OneImage(BigVisionRandAugment(randaug_num_ops, randaug_magnitude)))
    else:
        ops = [
            v2.Resize(int(round(input_size / crop_pct)), interpolation=interp, antialias=True),
            v2.CenterCrop(input_size),
        ]
    return v2.Compose(ops + _normalize(mean, std))


def identity(x):
    return x


def _digits_ops(training: bool, input_size: int, interp: InterpolationMode) -> list:
    """The digits recipe: resize the 8x8 digits; training adds a small random affine (no flip)."""
    ops: list = [v2.Resize((input_size, input_size), interpolation=interp, antialias=True)]
    if training:
        ops.append(v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), interpolation=InterpolationMode.BILINEAR))
    return ops


def _check(interpolation: str, crop_pct: float, randaug_impl: str) -> InterpolationMode:
    if interpolation not in _INTERP:
        raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {interpolation!r}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if randaug_impl not in RANDAUG_IMPLS:
        raise ValueError(f"randaug_impl must be one of {RANDAUG_IMPLS}, got {randaug_impl!r}")
    return _INTERP[interpolation]


def _torchvision_randaugment(num_ops: int, magnitude: int) -> v2.RandAugment:
    return v2.RandAugment(num_ops=num_ops, magnitude=int(magnitude), interpolation=InterpolationMode.BILINEAR)


class OneImage:
    """big_vision's RandAugment on one CHW image, its draws from torch's global RNG (so a seeded worker repeats
    them). The loader does not use this: it runs the same RandAugment on whole batches (BatchStage)."""

    def __init__(self, randaug: BigVisionRandAugment):
        self.randaug = randaug

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        draws = self.randaug.draw(gen, 1, image.shape[-2], image.shape[-1])
        return self.randaug(image.unsqueeze(0), draws)[0]


class RandomResizedCropDecode:
    """Encoded bytes -> uint8 (3, size, size): RandomResizedCrop fused with a crop-aware decode (the crop drawn from
    the header's image size exactly as torchvision's RandomResizedCrop draws it, then only what the crop needs is
    decoded; pipelines/decode.py). Raises on an unreadable image, like decode_image."""

    def __init__(self, size: int, interpolation: str = "bicubic"):
        self.size, self.interpolation = size, interpolation

    def __call__(self, data: bytes) -> torch.Tensor:
        hw = image_size(data)
        if hw is None:
            raise ValueError("unreadable image header")
        return decode_resized_crop(data, draw_crop(*hw), self.size, self.interpolation)


@dataclass
class ImagePipeline:
    """The training recipe split as the loader runs it (see the module docstring)."""

    decoder: Callable[[bytes], Any]  # bytes -> uint8 CHW (or, decode_on='device', an EncodedJpeg), on the host
    transform: Callable[[torch.Tensor], torch.Tensor]  # uint8 -> uint8 per image, on the host
    batch_stage: BatchStage  # uint8 batch -> float32 batch, on the host or on the device
    decode_crop_on_device: tuple[int, str] | None = None  # (size, interpolation) when JPEGs are decoded on the device


def train_pipeline(
    *,
    input_size: int,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    interpolation: str = "bicubic",
    randaug_num_ops: int = 2,
    randaug_magnitude: int | None = None,
    randaug_impl: str = "big_vision",
    preset: str = "inception",
    decode_on: str = "host",
) -> ImagePipeline:
    """The training recipe of :func:`make_transform`, split into a host part and a batch part."""
    interp = _check(interpolation, 1.0, randaug_impl)
    if preset == "digits":
        return ImagePipeline(decode_image, v2.Compose(_digits_ops(True, input_size, interp)),
                             BatchStage(tuple(mean), tuple(std)))
    if preset != "inception":
        raise ValueError(f"preset must be 'inception' or 'digits', got {preset!r}")
    ops = [v2.RandomHorizontalFlip()]
    randaug = None
    if randaug_magnitude and randaug_impl == "torchvision":
        ops.append(_torchvision_randaugment(randaug_num_ops, randaug_magnitude))  # per image, on the host
    elif randaug_magnitude:
        randaug = BigVisionRandAugment(randaug_num_ops, randaug_magnitude)
    stage = BatchStage(tuple(mean), tuple(std), randaug)
    if decode_on == "device":  # crop and flip drawn on the host, decoded and applied on the device
        if len(ops) > 1:
            raise ValueError("decode_on='device' runs RandAugment in the batch stage: use randaug_impl='big_vision'")
        return ImagePipeline(ShipJpeg(input_size, interpolation), identity, stage, (input_size, interpolation))
    return ImagePipeline(RandomResizedCropDecode(input_size, interpolation), v2.Compose(ops), stage)


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
