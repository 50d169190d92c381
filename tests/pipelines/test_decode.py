"""pipelines.decode: RandomResizedCrop's draws, reduced-scale JPEG decode vs the full-decode reference, fallbacks,
corrupt data, and the batched device decode (CPU here; CUDA where present)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from pipelines import decode as D

# Bounds for "same picture": mean absolute difference in uint8 levels and PSNR (dB) against the reference.
MAD_REDUCED, PSNR_REDUCED = 3.0, 35.0  # decoded at 1/2..1/8 DCT scale, then resized


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients + noise (like orchestrator/benchmark/data.synthetic_jpegs), HxWx3 uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(0.01, 0.06, 3)
    img = np.stack([127 + 100 * np.sin(xx * f[k] + yy * f[(k + 1) % 3] + rng.uniform(0, 6)) for k in range(3)], 2)
    return (img + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)


def _encode(a: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, fmt, **kw)
    return b.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> dict[tuple[int, int], bytes]:
    return {(h, w): _encode(_photo(h, w, seed=h), quality=90) for h, w in [(480, 640), (768, 1024)]}


def _reference(data: bytes, crop, size: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        full = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return F.resized_crop(full, *crop, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)


def _mad_psnr(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    d = a.float() - b.float()
    mse = max((d**2).mean().item(), 1e-10)
    return d.abs().mean().item(), 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize("hw", [(375, 500), (768, 1024), (224, 224), (20, 2000), (2000, 30)])
def test_draw_crop_matches_random_resized_crop(hw):
    h, w = hw
    rrc = v2.RandomResizedCrop(224)
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    for seed in range(25):
        torch.manual_seed(seed)
        p = rrc.make_params([img])
        torch.manual_seed(seed)
        assert D.draw_crop(h, w) == (p["top"], p["left"], p["height"], p["width"]), seed


def test_draw_crop_matches_rrc_forward():
    """Through the transform itself: pixels encode their coordinates, so the output's corners give the crop."""
    h, w = 300, 400
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = torch.stack([yy, xx, torch.zeros_like(yy)]).to(torch.int32)
    for seed in range(10):
        torch.manual_seed(seed)
        top, left, ch, cw = D.draw_crop(h, w)
        torch.manual_seed(seed)
        out = v2.RandomResizedCrop((ch, cw), interpolation=InterpolationMode.NEAREST)(img)
        assert out[0, 0, 0].item() == top and out[1, 0, 0].item() == left
        assert out[0, -1, -1].item() == top + ch - 1 and out[1, -1, -1].item() == left + cw - 1


@pytest.mark.parametrize("hw", [(480, 640), (768, 1024)])
def test_big_crop_decodes_reduced_and_matches_reference(jpegs, hw):
    data = jpegs[hw]
    h, w = hw
    for crop, size, want_scale in [((0, 0, h, w), 64, 4 if h == 480 else 8), ((0, 0, h, w), 224, 2),
                                   ((h // 4, w // 4, h // 2 + 3, w // 2 + 5), 64, 2 if h == 480 else 4)]:
        assert D._draft_scale(data, crop, size) == want_scale, crop
        for exact in (False, True):
            out = D.decode_resized_crop(data, crop, size, exact_box=exact)
            assert out.shape == (3, size, size) and out.dtype == torch.uint8
            mad, psnr = _mad_psnr(out, _reference(data, crop, size))
            assert mad < MAD_REDUCED and psnr > PSNR_REDUCED, (crop, size, exact, mad, psnr)


@pytest.mark.parametrize("hw", [(480, 640), (768, 1024)])
def test_small_crop_decodes_full_scale_and_matches_reference(jpegs, hw):
    data = jpegs[hw]
    for crop in [(10, 20, 100, 120), (37, 51, 300, 250), (0, 0, 447, 447)]:
        assert D._draft_scale(data, crop, 224) == 1, crop
        # no reduction possible: the reference path itself, bit for bit
        assert torch.equal(D.decode_resized_crop(data, crop, 224), _reference(data, crop, 224)), crop


def test_draft_really_reduces(jpegs, monkeypatch):
    """The image Pillow decodes and resizes is the reduced one; a small crop does not go through Pillow."""
    seen = []
    real = Image.Image.resize

    def spy(self, *a, **kw):
        seen.append(self.size)
        return real(self, *a, **kw)

    monkeypatch.setattr(Image.Image, "resize", spy)
    data = jpegs[(768, 1024)]
    D.decode_resized_crop(data, (0, 0, 768, 1024), 64, exact_box=True)
    D.decode_resized_crop(data, (0, 0, 100, 100), 64, exact_box=True)
    assert seen == [(128, 96)]


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("size", [32, 64])
def test_geometry_exact_under_reduction(size, exact):
    a = np.zeros((512, 768, 3), np.uint8)
    a[:, 384:] = 255
    data = _encode(a, quality=95)
    # the crops start/end on the step at column 384 (a whole reduced pixel at the 1/4 and 1/8 scales used here)
    left = D.decode_resized_crop(data, (0, 0, 512, 384), size, exact_box=exact)
    right = D.decode_resized_crop(data, (0, 384, 512, 384), size, exact_box=exact)
    assert D._draft_scale(data, (0, 0, 512, 384), size) > 1
    # a column or two of ringing at the edge next to the step is allowed; the rest is pure black/white
    assert left[..., : size - 2].float().mean() < 3 and right[..., 2:].float().mean() > 252
    assert left.float().mean() < 8 and right.float().mean() > 247


def test_png_fallback():
    a = _photo(200, 300, seed=3)
    data = _encode(a, "PNG")
    crop = (20, 30, 150, 200)
    out = D.decode_resized_crop(data, crop, 64)
    ref = F.resized_crop(torch.from_numpy(a).permute(2, 0, 1), *crop, [64, 64],
                         interpolation=InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(out, ref)
    # a format torchvision does not decode goes through Pillow
    bmp = D.decode_resized_crop(_encode(a, "BMP"), crop, 64)
    assert torch.equal(bmp, ref)
    # grayscale and palette images come out RGB too
    assert D.decode_resized_crop(_encode(a[..., 0], "PNG"), crop, 32).shape == (3, 32, 32)
    assert D.decode_resized_crop(_encode(a[..., 0], "JPEG"), (0, 0, 200, 300), 32).shape == (3, 32, 32)


def test_corrupt_raises(jpegs):
    data = jpegs[(480, 640)]
    # Pillow (reduced scale) raises OSError, torchvision (full scale) RuntimeError
    cases = [b"", b"not an image at all", b"\xff\xd8\xff" + b"\x00" * 100, data[:300], data[: len(data) // 2]]
    for bad in cases:
        for crop in [(0, 0, 100, 100), (0, 0, 480, 640)]:
            with pytest.raises((OSError, RuntimeError)):
                D.decode_resized_crop(bad, crop, 32)


def test_image_size_and_is_jpeg(jpegs):
    data = jpegs[(480, 640)]
    png = _encode(_photo(50, 70), "PNG")
    assert D.is_jpeg(data) and not D.is_jpeg(png) and not D.is_jpeg(b"xx") and not D.is_jpeg(b"")
    assert D.image_size(data) == (480, 640)
    assert D.image_size(png) == (50, 70)
    assert D.image_size(b"garbage bytes") is None and D.image_size(b"") is None


def _device_check(jpegs, device):
    datas = [jpegs[(480, 640)], jpegs[(768, 1024)], b"\xff\xd8\xff corrupt", jpegs[(480, 640)],
             _encode(_photo(100, 120), "PNG")]
    crops = [(0, 0, 480, 640), (100, 200, 300, 400), (0, 0, 10, 10), (50, 60, 200, 180), (10, 10, 80, 90)]
    out, failed = D.decode_resized_crop_on_device(datas, crops, 64, device)
    assert failed == [2]
    assert out.shape == (4, 3, 64, 64) and out.dtype == torch.uint8 and out.device.type == torch.device(device).type
    for o, i in zip(out.cpu(), [0, 1, 3, 4], strict=True):
        mad, psnr = _mad_psnr(o, D.decode_resized_crop(datas[i], crops[i], 64))
        assert mad < MAD_REDUCED and psnr > PSNR_REDUCED, (i, mad, psnr)
    # all good: one batched call; all bad: an empty batch
    out, failed = D.decode_resized_crop_on_device(datas[:2], crops[:2], 32, device)
    assert out.shape == (2, 3, 32, 32) and failed == []
    out, failed = D.decode_resized_crop_on_device([b"x", b"\xff\xd8\xff"], crops[:2], 32, device)
    assert out.shape == (0, 3, 32, 32) and failed == [0, 1]


def test_on_device_cpu(jpegs):
    _device_check(jpegs, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_device_cuda(jpegs):
    _device_check(jpegs, "cuda")
