"""Crop-aware decoding: decode only as much of an image as a RandomResizedCrop needs.

RandomResizedCrop(224) usually keeps part of a photo and then shrinks it, so decoding the whole JPEG at full
resolution wastes host CPU. FFCV decodes the crop's region at a reduced DCT scale with libjpeg-turbo; here:

- :func:`draw_crop` draws the crop with exactly the algorithm and torch global-RNG draws of
  ``torchvision.transforms.v2.RandomResizedCrop`` (only the image size is needed, see :func:`image_size`);
- :func:`decode_resized_crop` (host): when the crop will be shrunk at least 2x, a JPEG is decoded by Pillow
  (which bundles libjpeg-turbo) with ``Image.draft`` at the largest DCT scale 1/2, 1/4 or 1/8 that keeps the crop
  at >= ``size`` pixels on both sides (never upsampling because of the reduction), then resized by torch's uint8
  antialiased kernel from the crop box at the reduced scale, rounded to whole reduced pixels (off by at most half
  a reduced pixel, under half an output pixel); ``exact_box=True`` resizes with Pillow from the float box instead
  (exact geometry, but Pillow's resize measured ~8x slower than torch's, more than the reduction saves).
  Otherwise it is the reference itself: torchvision's decode + ``v2.functional.resized_crop``.
  Measured at one thread on noisy q90 photo-like JPEGs, a 1/2..1/4 DCT scale cuts Pillow's decode by only ~20%
  (entropy decoding dominates), and Pillow's full decode is no faster than torchvision's;
- :func:`decode_resized_crop_on_device`: a batch of JPEGs decoded by ``torchvision.io.decode_jpeg`` on the
  device (nvJPEG on CUDA) and cropped/resized there.

Library choice: checked Pillow 13 (``draft``: reduced DCT scale, no region decode), simplejpeg 1.9.0 (bundles
libjpeg-turbo; ``min_height``/``min_width`` reduced scale only, no region decode) and PyTurboJPEG 2.6.1 (lossless
``crop`` plus scaled decode, but a pure-Python wheel that needs a system libturbojpeg); none gives region decode
from a self-contained wheel, so this uses Pillow's draft (no new dependency) and decodes the whole image at the
reduced scale.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

_PIL_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
_TV_INTERP = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}
_DCT_SCALES = (8, 4, 2, 1)


def is_jpeg(data: bytes) -> bool:
    """True when data starts with the JPEG SOI marker (FF D8 FF)."""
    return bytes(data[:3]) == b"\xff\xd8\xff"


def image_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the header only (PIL's lazy open, no pixel decode); None when unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception:
        return None
    return (h, w) if h > 0 and w > 0 else None


def draw_crop(
    height: int, width: int, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(top, left, h, w): the crop v2.RandomResizedCrop(scale=scale, ratio=ratio) picks on a height x width
    image, with the same draws from torch's global RNG (a copy of its ``make_params``)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()  # type: ignore[arg-type]
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,)).item())
            j = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return i, j, h, w
    # Fallback to a central crop, as RandomResizedCrop does.
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _wanted_scale(crop: tuple[int, int, int, int], size: int) -> int:
    """Largest DCT reduction (8, 4, 2, 1) that keeps the crop at >= size pixels on both sides."""
    s_max = min(crop[2], crop[3]) // size
    return next(s for s in _DCT_SCALES if s <= max(s_max, 1))


def _open(data: bytes, crop: tuple[int, int, int, int], size: int) -> tuple[Image.Image, int]:
    """The image opened (not yet loaded) with a JPEG draft set up for the crop, and the actual reduction."""
    im = Image.open(io.BytesIO(data))
    if im.format != "JPEG":
        return im, 1
    k = _wanted_scale(crop, size)
    if k == 1:
        return im, 1
    w, h = im.size
    drafted = im.draft("RGB", (w // k, h // k))
    if drafted is None:  # several tiles: no draft
        return im, 1
    scale = round(w / drafted[1][2])
    if scale > k:  # Pillow chose more reduction than the crop allows: decode at full scale instead
        im.close()
        return Image.open(io.BytesIO(data)), 1
    return im, scale


def _draft_scale(data: bytes, crop: tuple[int, int, int, int], size: int) -> int:
    """The DCT reduction :func:`decode_resized_crop` decodes this crop at (1 = full resolution)."""
    im, scale = _open(data, crop, size)
    im.close()
    return scale


def _is_png(data: bytes) -> bool:
    return bytes(data[:8]) == b"\x89PNG\r\n\x1a\n"


def _tv_decode(data: bytes) -> torch.Tensor:
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.zeros(1, dtype=torch.uint8)
    # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec (see pipelines/transforms.py).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(buf, mode=ImageReadMode.RGB)


def decode_resized_crop(
    data: bytes, crop: tuple[int, int, int, int], size: int, interpolation: str = "bicubic", *, exact_box: bool = False
) -> torch.Tensor:
    """uint8 (3, size, size) RGB: crop = (top, left, h, w) in full-resolution pixels, resized to size x size.

    A JPEG whose crop allows a DCT reduction is decoded by Pillow at that reduction and resized by torch from the
    crop box rounded to whole reduced pixels (by Pillow from the float box with ``exact_box=True``). Otherwise (no reduction possible, or PNG) it is exactly the reference: torchvision's
    ``decode_image`` + ``v2.functional.resized_crop(antialias=True)``, whose resize is several times faster than
    Pillow's; other formats are decoded fully by Pillow and resized the same way.

    The pixels are fully decoded here, so corrupt data raises here: ``RuntimeError`` (torchvision's decoder) or
    ``OSError`` (Pillow: ``UnidentifiedImageError``, "image file is truncated", ...); for headers Pillow rejects,
    possibly ``ValueError``/``SyntaxError``/``Image.DecompressionBombError``. Callers should catch ``Exception``.
    """
    top, left, ch, cw = crop
    if is_jpeg(data) and _wanted_scale(crop, size) > 1:
        im, s = _open(data, crop, size)
        with im:
            if s > 1:
                im.load()
                if im.mode != "RGB":
                    im = im.convert("RGB")
                if exact_box:
                    box = (left / s, top / s, (left + cw) / s, (top + ch) / s)
                    out = im.resize((size, size), _PIL_RESAMPLE[interpolation], box=box)
                    return torch.from_numpy(np.array(out)).permute(2, 0, 1).contiguous()
                # an HWC array viewed as CHW: torch's uint8 resize is fastest on this channels-last layout
                x = torch.from_numpy(np.array(im)).permute(2, 0, 1)
                t, lf = round(top / s), round(left / s)
                h, w = round((top + ch) / s) - t, round((left + cw) / s) - lf
                out = F.resized_crop(x, t, lf, h, w, [size, size], interpolation=_TV_INTERP[interpolation],
                                     antialias=True)
                return out.contiguous()
    if is_jpeg(data) or _is_png(data) or not data:
        x = _tv_decode(data)
    else:
        with Image.open(io.BytesIO(data)) as im:
            x = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    return F.resized_crop(x, top, left, ch, cw, [size, size], interpolation=_TV_INTERP[interpolation], antialias=True)


def _decode_one(buf: torch.Tensor, device: torch.device) -> torch.Tensor:
    return decode_jpeg(buf, device=device, mode=ImageReadMode.RGB)


def decode_resized_crop_on_device(
    datas: list[bytes],
    crops: list[tuple[int, int, int, int]],
    size: int,
    device: torch.device | str,
    interpolation: str = "bicubic",
) -> tuple[torch.Tensor, list[int]]:
    """Batched decode on the device: JPEGs through ``torchvision.io.decode_jpeg(list, device=device)`` (nvJPEG on
    CUDA), non-JPEG entries through ``torchvision.io.decode_image`` on the host and moved over; then per image
    ``v2.functional.resized_crop(..., antialias=True)`` on the device.

    Returns (uint8 (n_ok, 3, size, size) on ``device``, in input order; the indices into datas that failed to
    decode). If the batched call raises, the JPEGs are decoded one at a time so a corrupt one costs only itself.
    """
    if len(datas) != len(crops):
        raise ValueError(f"{len(datas)} images but {len(crops)} crops")
    device = torch.device(device)
    interp = _TV_INTERP[interpolation]
    bufs = [torch.frombuffer(bytearray(d), dtype=torch.uint8) if len(d) else torch.empty(0, dtype=torch.uint8)
            for d in datas]
    images: dict[int, torch.Tensor] = {}
    failed: list[int] = []
    jpeg_idx = [i for i, d in enumerate(datas) if is_jpeg(d)]
    jpeg_set = set(jpeg_idx)
    # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec (see pipelines/transforms.py).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if jpeg_idx:
            try:
                decoded = decode_jpeg([bufs[i] for i in jpeg_idx], device=device, mode=ImageReadMode.RGB)
                images.update(zip(jpeg_idx, decoded, strict=True))
            except Exception:
                for i in jpeg_idx:
                    try:
                        images[i] = _decode_one(bufs[i], device)
                    except Exception:
                        failed.append(i)
        for i in range(len(datas)):
            if i in images or i in jpeg_set:
                continue
            try:
                images[i] = decode_image(bufs[i], mode=ImageReadMode.RGB).to(device)
            except Exception:
                failed.append(i)
    out = []
    for i in sorted(images):
        top, left, h, w = crops[i]
        out.append(F.resized_crop(images[i], top, left, h, w, [size, size], interpolation=interp, antialias=True))
    batch = torch.stack(out) if out else torch.empty((0, 3, size, size), dtype=torch.uint8, device=device)
    return batch, sorted(failed)
