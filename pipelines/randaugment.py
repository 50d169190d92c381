"""RandAugment as the MLP-Mixer paper ran it: big_vision's ``pp/autoaugment.py`` (a fork of
tensorflow/tpu's EfficientNet autoaugment), batched over images on any torch device. Every op
gives that code's pixels (tests/pipelines/bigvision_reference.py transliterates it) except Sharpness, whose
smoothing takes the exact quotient where TF's float32 filter is one level lower on a few pixels (:func:`sharpness`).

Per image and per layer, one of 16 ops is drawn uniformly and always applied (no probability gate) at the
fixed magnitude; signed ops negate their argument with probability 1/2. The random draws are made up front
on a CPU generator (:func:`draw`), so a batch can be augmented anywhere (:func:`apply`) reproducibly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd",
)  # fmt: skip
SIGNED: frozenset[str] = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})

_MAX_LEVEL = 10.0
_TRANSLATE_CONST = 100.0  # big_vision's randaugment hparams
_CUTOUT_CONST = 40
_FILL = 128  # replace value for geometric ops and cutout, all channels
# TF's nearest sampling rounds with std::round (ties away from zero), grid_sample with nearbyint (ties to
# even). Reads are shifted by this many pixels so that exact .5 ties, frequent for shears (0.45 * 10 = 4.5),
# round up as in TF; it is far larger than float32 coordinate noise and far smaller than a pixel.
_TIE_NUDGE = 1.0 / 2048


def level_to_arg(op: str, magnitude: float) -> float | int | None:
    """The unsigned argument of ``op`` at ``magnitude`` (big_vision's level_to_arg; None: no argument)."""
    r = magnitude / _MAX_LEVEL
    if op in ("AutoContrast", "Equalize", "Invert"):
        return None
    if op == "Rotate":
        return r * 30.0
    if op in ("ShearX", "ShearY"):
        return r * 0.3
    if op in ("TranslateX", "TranslateY"):
        return r * _TRANSLATE_CONST
    if op in ("Color", "Contrast", "Brightness", "Sharpness"):
        return r * 1.8 + 0.1
    if op == "Posterize":
        return int(r * 4)  # can be 0 or > 8: the op reproduces TF's uint8 shift there
    if op == "Solarize":
        return int(r * 256)  # can be >= 256: the op wraps it modulo 256 as TF's uint8 conversion does
    if op == "SolarizeAdd":
        return int(r * 110)
    if op == "Cutout":
        return int(r * _CUTOUT_CONST)
    raise KeyError(f"unknown RandAugment op {op!r}")


@dataclass
class RandAugmentDraws:
    """The random choices for a batch: one row per image, one column per layer."""

    ops: torch.Tensor  # (N, L) int64 indices into OPS
    signs: torch.Tensor  # (N, L) float32, +1.0 or -1.0 (used by the SIGNED ops)
    centers: torch.Tensor  # (N, L, 2) int64 cutout centre (y, x), drawn for every layer

    def to(self, device) -> RandAugmentDraws:
        return RandAugmentDraws(
            *(t.to(device, non_blocking=True) for t in (self.ops, self.signs, self.centers))
        )

    def select(self, index) -> RandAugmentDraws:
        """Rows ``index``; an int keeps the batch dimension (one row), so the result still fits ``apply``."""
        if isinstance(index, int):
            index = [index]
        elif isinstance(index, torch.Tensor):
            index = index.to(self.ops.device)
        return RandAugmentDraws(self.ops[index], self.signs[index], self.centers[index])

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"ops": self.ops, "signs": self.signs, "centers": self.centers}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> RandAugmentDraws:
        return cls(ops=d["ops"], signs=d["signs"], centers=d["centers"])


def draw(generator: torch.Generator, n: int, num_layers: int, height: int, width: int) -> RandAugmentDraws:
    """Draws for ``n`` images from a CPU generator, always in this order: ops, signs, centres (y then x)."""
    if generator.device.type != "cpu":
        raise ValueError("draw needs a CPU torch.Generator")
    shape = (n, num_layers)
    ops = torch.randint(len(OPS), shape, generator=generator)
    # TF keeps the sign when floor(u + 0.5) == 1, i.e. u >= 0.5.
    signs = (torch.rand(shape, generator=generator) >= 0.5).float() * 2.0 - 1.0
    cy = torch.randint(height, shape, generator=generator)
    cx = torch.randint(width, shape, generator=generator)
    return RandAugmentDraws(ops, signs, torch.stack([cy, cx], dim=-1))


# ---- helpers ----


def _col(t: torch.Tensor) -> torch.Tensor:
    """(G,) -> (G, 1, 1, 1), per-image values broadcast against (G, C, H, W)."""
    return t.view(-1, 1, 1, 1)


def _blend(image1: torch.Tensor, image2: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """big_vision's blend: image1 + factor * (image2 - image1) in float32, clipped to [0, 255], truncated.
    (Factor 0 or 1 gives image1 or image2 exactly, as the official special cases do.)"""
    a, b = image1.float(), image2.float()
    return (a + _col(factor.float()) * (b - a)).clamp_(0.0, 255.0).to(torch.uint8)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """tf.image.rgb_to_grayscale on uint8: x / 255, weights (0.2989, 0.5870, 0.1140), back to uint8 the
    way convert_image_dtype does (x 255.5, truncated). (G, 1, H, W) uint8."""
    f = images.float() * (1.0 / 255.0)
    gray = f[:, 0:1] * 0.2989 + f[:, 1:2] * 0.5870 + f[:, 2:3] * 0.1140
    return (gray * 255.5).to(torch.uint8)


def _affine(images: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """Nearest resampling where output pixel (x, y) reads input ``mats @ (x, y, 1)`` (pixel indices,
    mats (G, 2, 3)); reads from outside the image give 128 (big_vision's wrap/unwrap with a ones channel)."""
    g, c, h, w = images.shape
    dev = images.device
    full = torch.cat([mats.float(), torch.tensor([[[0.0, 0.0, 1.0]]], device=dev).expand(g, 1, 3)], 1)
    full[:, :2, 2] += _TIE_NUDGE
    # align_corners=True: normalised n = p * 2 / (size - 1) - 1, so -1 / +1 are the first / last pixel index.
    sx, sy = (w - 1) / 2.0, (h - 1) / 2.0
    to_norm = torch.tensor([[1 / sx, 0.0, -1.0], [0.0, 1 / sy, -1.0], [0.0, 0.0, 1.0]], device=dev)
    to_pix = torch.tensor([[sx, 0.0, sx], [0.0, sy, sy], [0.0, 0.0, 1.0]], device=dev)
    theta = (to_norm @ full @ to_pix)[:, :2]
    grid = F.affine_grid(theta, [g, c + 1, h, w], align_corners=True)
    x = torch.cat([images.float(), torch.ones(g, 1, h, w, device=dev)], 1)
    y = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return torch.where(y[:, c:] == 0, float(_FILL), y[:, :c]).to(torch.uint8)


def _mats(a, b, c, d, e, f) -> torch.Tensor:
    """Per-image (G, 2, 3) matrices [[a, b, c], [d, e, f]] from per-image tensors or Python numbers."""
    ref = next(t for t in (a, b, c, d, e, f) if isinstance(t, torch.Tensor))
    rows = [t if isinstance(t, torch.Tensor) else torch.full_like(ref, float(t)) for t in (a, b, c, d, e, f)]
    return torch.stack(rows, -1).view(-1, 2, 3)


# ---- the ops: (G, 3, H, W) uint8, per-image args (G,) float or None, centres (G, 2) or None -> uint8 ----


def autocontrast(images, args=None, centers=None):
    # Per channel: stretch [lo, hi] to [0, 255] in float32; a constant channel stays as is.
    x = images.float()
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    scale = x.new_full((), 255.0) / (hi - lo).clamp(min=1.0)  # true division (not reciprocal * 255)
    offset = -lo * scale
    y = (x * scale + offset).clamp_(0.0, 255.0).to(torch.uint8)
    return torch.where(hi > lo, y, images)


def equalize(images, args=None, centers=None):
    # PIL-style per channel: step = (pixels - count of the last non-empty bin) // 255; step 0 -> unchanged.
    g, c, h, w = images.shape
    x = images.reshape(g * c, h * w).long()
    offsets = torch.arange(g * c, device=x.device).unsqueeze(1) * 256
    hist = torch.bincount((x + offsets).flatten(), minlength=g * c * 256).view(g * c, 256)
    last = hist.gather(1, x.amax(1, keepdim=True))
    step = (h * w - last) // 255
    lut = (hist.cumsum(1) + step // 2) // step.clamp(min=1)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], 1).clamp(0, 255)
    return torch.where(step == 0, x, lut.gather(1, x)).to(torch.uint8).view(g, c, h, w)


def invert(images, args=None, centers=None):
    return 255 - images


def posterize(images, args, centers=None):
    # big_vision: (x >> s) << s on uint8 with s = 8 - bits, i.e. x & mask. TF converts s to uint8 (modulo
    # 256) and clamps a uint8 shift to [0, 7], so 0 bits (s = 8) and more than 8 bits (s < 0, i.e. >= 248)
    # both shift by 7: only the top bit survives, x & 128. Only 1..8 bits posterize as the name says.
    shift = ((8 - args.round().long()) % 256).clamp(0, 7)
    mask = torch.bitwise_left_shift(torch.full_like(shift, 255), shift) & 255
    return images & _col(mask.to(torch.uint8))


def solarize(images, args, centers=None):
    # big_vision compares the uint8 image with int(m / 10 * 256), which TF converts to uint8: the threshold
    # wraps modulo 256 (big_vision issue #110). m = 10 or 20 give 0, so no pixel is below it and all invert;
    # m = 15 gives 384 -> 128. That is what the paper's runs did, not "a threshold >= 256 changes nothing".
    threshold = (args.round().long() % 256).to(torch.uint8)
    # 255 - x == x ^ 255 on uint8: XOR with 255 where x >= threshold (branch-free; ~6x torch.where on CPU)
    return images ^ (images >= _col(threshold)).to(torch.uint8).mul_(255)


def solarize_add(images, args, centers=None):
    added = (images.long() + _col(args.round().long())).clamp(0, 255).to(torch.uint8)
    return torch.where(images < 128, added, images)


def color(images, args, centers=None):
    return _blend(_grayscale(images).expand_as(images), images, args)


def contrast(images, args, centers=None):
    # Faithful to the official code's quirk: it takes sum(histogram of the grayscale) / 256, i.e. the
    # NUMBER OF PIXELS / 256, not the mean intensity, as the grey to blend with (clipped, truncated).
    h, w = images.shape[-2:]
    grey = int(min(max(h * w / 256.0, 0.0), 255.0))
    return _blend(torch.full_like(images, grey), images, args)


def brightness(images, args, centers=None):
    return _blend(torch.zeros_like(images), images, args)


def sharpness(images, args, centers=None):
    # Smoothing kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 over the interior (VALID), truncated; the
    # 1-px border keeps the original. This takes the exact quotient (integer sum // 13). TF's float32 conv
    # (weights rounded to float32, FMA taps in row-major order) lands just below k on some pixels whose sum
    # is 13k, so its smoothed image is one level lower there: 0.3-0.5% of pixels on the photo-like and noise
    # images tried against TF 2.21's CPU kernel (1.6% on a smooth gradient); after the blend ~0.3% of output
    # values differ, by up to |factor - 1| levels.
    # Not matched: emulating it (float64 per tap) made this op ~6x slower on the host, and the rounding
    # depends on TF's build (without FMA it differs again). tests/pipelines/bigvision_reference.py emulates it.
    h, w = images.shape[-2:]
    x = images.int()
    s = 4 * x[:, :, 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            s = s + x[:, :, dy : dy + h - 2, dx : dx + w - 2]
    degenerate = images.clone()
    degenerate[:, :, 1:-1, 1:-1] = (s // 13).clamp(0, 255).to(torch.uint8)
    return _blend(degenerate, images, args)


def rotate(images, args, centers=None):
    # tfa rotate: about the centre ((W-1)/2, (H-1)/2); output (x, y) reads R(angle) (x - c) + c.
    h, w = images.shape[-2:]
    rad = args.float() * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
    y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
    return _affine(images, _mats(cos, -sin, x_off, sin, cos, y_off))


def shear_x(images, args, centers=None):
    return _affine(images, _mats(1, args, 0, 0, 1, 0))  # reads (x + level * y, y): about the top-left


def shear_y(images, args, centers=None):
    return _affine(images, _mats(1, 0, 0, args, 1, 0))  # reads (x, level * x + y)


def translate_x(images, args, centers=None):
    return _affine(images, _mats(1, 0, args, 0, 1, 0))  # tfa translate(image, [-pixels, 0])


def translate_y(images, args, centers=None):
    return _affine(images, _mats(1, 0, 0, 0, 1, args))


def cutout(images, args, centers):
    # Rows [cy - pad, cy + pad) x cols [cx - pad, cx + pad), clipped to the image, set to 128.
    h, w = images.shape[-2:]
    pad = args.round().long().unsqueeze(1)
    cy, cx = centers[:, 0:1].long(), centers[:, 1:2].long()
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    in_r = (rows >= cy - pad) & (rows < cy + pad)
    in_c = (cols >= cx - pad) & (cols < cx + pad)
    return images.masked_fill((in_r[:, :, None] & in_c[:, None, :]).unsqueeze(1), _FILL)


# Looked up by name at call time, so tests may wrap entries.
OP_FUNCS = {
    "AutoContrast": autocontrast, "Equalize": equalize, "Invert": invert, "Rotate": rotate,
    "Posterize": posterize, "Solarize": solarize, "Color": color, "Contrast": contrast,
    "Brightness": brightness, "Sharpness": sharpness, "ShearX": shear_x, "ShearY": shear_y,
    "TranslateX": translate_x, "TranslateY": translate_y, "Cutout": cutout, "SolarizeAdd": solarize_add,
}  # fmt: skip


def apply(images: torch.Tensor, draws: RandAugmentDraws, magnitude: float) -> torch.Tensor:
    """RandAugment a uint8 (N, 3, H, W) batch on its own device with per-image ``draws``; a new tensor.

    Per layer, images are grouped by drawn op and each op runs once on its group, with per-image
    arguments (sign * level, cutout centre) as tensors: no Python loop over images."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise TypeError(f"expected uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    n, _, h, w = images.shape
    if h < 2 or w < 2:
        raise ValueError(f"images must be at least 2x2, got {h}x{w}")
    if draws.ops.dim() != 2 or draws.ops.shape[0] != n:
        raise ValueError(f"draws for {tuple(draws.ops.shape)} (N, layers) do not fit {n} images")
    dev = images.device
    ops_cpu = draws.ops.cpu()  # grouping is decided on the host
    d = draws.to(dev)
    out = images.clone()
    for layer in range(ops_cpu.shape[1]):
        column = ops_cpu[:, layer]
        for k in column.unique().tolist():
            name = OPS[k]
            idx = (column == k).nonzero().squeeze(1).to(dev, non_blocking=True)
            level = level_to_arg(name, magnitude)
            args = None
            if level is not None:
                args = torch.full((idx.numel(),), float(level), dtype=torch.float32, device=dev)
                if name in SIGNED:
                    args = args * d.signs[idx, layer]
            centers = d.centers[idx, layer] if name == "Cutout" else None
            out.index_copy_(0, idx, OP_FUNCS[name](out.index_select(0, idx), args, centers))
    return out


class BigVisionRandAugment:
    """RandAugment(num_layers, magnitude) as big_vision's ``randaug(2, 15)``; picklable (plain attributes)."""

    def __init__(self, num_layers: int = 2, magnitude: float = 15):
        if num_layers < 0 or magnitude < 0:
            raise ValueError(f"num_layers and magnitude must be >= 0, got {num_layers}, {magnitude}")
        self.num_layers = int(num_layers)
        self.magnitude = magnitude

    def draw(self, generator: torch.Generator, n: int, height: int, width: int) -> RandAugmentDraws:
        return draw(generator, n, self.num_layers, height, width)

    def __call__(self, images: torch.Tensor, draws: RandAugmentDraws) -> torch.Tensor:
        if draws.ops.shape[-1] != self.num_layers:
            raise ValueError(f"draws have {draws.ops.shape[-1]} layers, expected {self.num_layers}")
        return apply(images, draws, self.magnitude)

    def __repr__(self) -> str:
        return f"BigVisionRandAugment(num_layers={self.num_layers}, magnitude={self.magnitude})"
