"""``decode_on='device'``: the host reads tar members and ships the JPEG bytes; the device decodes them in batches.

Per image on the host (in the loader's worker) :class:`ShipJpeg` parses the JPEG header for the image size,
draws the RandomResizedCrop box and the flip from torch's global RNG exactly as the host recipe draws them
(same order, same seed per batch), and passes the encoded bytes on. An image whose header does not parse is
a corrupt sample there and then, counted and skipped as on the host path. A non-JPEG member (PNG, ...) is
decoded, cropped and flipped on the host (pipelines/decode.py) and travels as pixels.

On the device :func:`decode_on_device` decodes the batch's JPEGs with torchvision's batched
``decode_jpeg(list, device=...)`` (nvJPEG; the hardware decoder where present), crops and resizes each on
the device, flips, and puts the host-decoded images back in their places. A JPEG whose header parsed but
whose data the decoder rejects is found there (one bad image costs only itself), reported to the loader,
which counts it as ``corrupt_image`` and drops it from its batch (the host path would have taken the next
sample instead; the header check on the host catches the usual corruptions before that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as F

from .decode import decode_resized_crop, decode_resized_crop_on_device, draw_crop, image_size, is_jpeg


@dataclass
class EncodedJpeg:
    data: bytes
    crop: tuple[int, int, int, int]  # top, left, height, width in the full image
    flip: bool


class ShipJpeg:
    """Host part of a device decode: bytes -> EncodedJpeg (JPEG) or a uint8 crop (anything else)."""

    def __init__(self, size: int, interpolation: str = "bicubic"):
        self.size, self.interpolation = size, interpolation

    def __call__(self, data: bytes) -> EncodedJpeg | torch.Tensor:
        hw = image_size(data)
        if hw is None:
            raise ValueError("unreadable image header")
        crop = draw_crop(*hw)
        flip = bool(torch.rand(1) < 0.5)  # v2.RandomHorizontalFlip's draw, in the host recipe's order
        if is_jpeg(data):
            return EncodedJpeg(bytes(data), crop, flip)
        x = decode_resized_crop(data, crop, self.size, self.interpolation)
        return F.horizontal_flip(x) if flip else x


def collate(items: list[EncodedJpeg | torch.Tensor], size: int) -> dict:
    """One batch of mixed items as plain containers (they cross the DataLoader's process boundary)."""
    jpeg = [(i, it) for i, it in enumerate(items) if isinstance(it, EncodedJpeg)]
    pixels = [(i, it) for i, it in enumerate(items) if not isinstance(it, EncodedJpeg)]
    return {
        "n": len(items),
        "size": size,
        "jpeg": [it.data for _, it in jpeg],
        "jpeg_index": torch.tensor([i for i, _ in jpeg], dtype=torch.int64),
        "crops": torch.tensor([it.crop for _, it in jpeg], dtype=torch.int64).view(-1, 4),
        "flips": torch.tensor([it.flip for _, it in jpeg], dtype=torch.bool),
        "pixels": torch.stack([x for _, x in pixels]) if pixels else torch.zeros(0, 3, size, size, dtype=torch.uint8),
        "pixels_index": torch.tensor([i for i, _ in pixels], dtype=torch.int64),
    }


def decode_on_device(batch: dict, device: torch.device, interpolation: str = "bicubic"):
    """(uint8 (n_ok, 3, size, size) on ``device``, sorted indices into the batch of the images that failed)."""
    n, size = batch["n"], batch["size"]
    out = torch.empty(n, 3, size, size, dtype=torch.uint8, device=device)
    ok = torch.ones(n, dtype=torch.bool)
    if batch["jpeg"]:
        crops = [tuple(c) for c in batch["crops"].tolist()]
        decoded, bad = decode_resized_crop_on_device(batch["jpeg"], crops, size, device, interpolation)
        rejected = set(bad)
        good = [j for j in range(len(batch["jpeg"])) if j not in rejected]
        flips = batch["flips"][good].to(device)
        decoded = torch.where(flips.view(-1, 1, 1, 1), decoded.flip(-1), decoded)
        index = batch["jpeg_index"]
        out[index[good].to(device)] = decoded
        ok[index[bad]] = False
    if len(batch["pixels_index"]):
        out[batch["pixels_index"].to(device)] = batch["pixels"].to(device, non_blocking=True)
    failed = (~ok).nonzero().flatten().tolist()
    return (out[ok.to(device)] if failed else out), failed
