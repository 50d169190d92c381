"""Test-only reference: big_vision's pp/autoaugment.py transliterated into numpy, ONE (H, W, 3) uint8
image at a time, each op with its explicit argument. Written from the TF code, not from
pipelines.randaugment, so the batched implementation can be checked against it."""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32
FILL = 128


MAX_LEVEL = 10.0


def level_to_arg(name, level):
    """big_vision's level_to_arg(hparams) with its randaugment hparams (cutout 40, translate 100); unsigned.
    Written from the TF code, so tests need not take the arguments from pipelines.randaugment."""
    r = level / MAX_LEVEL
    table = {
        "Rotate": r * 30.0, "ShearX": r * 0.3, "ShearY": r * 0.3, "TranslateX": r * 100.0,
        "TranslateY": r * 100.0, "Color": r * 1.8 + 0.1, "Contrast": r * 1.8 + 0.1,
        "Brightness": r * 1.8 + 0.1, "Sharpness": r * 1.8 + 0.1, "Posterize": int(r * 4),
        "Solarize": int(r * 256), "SolarizeAdd": int(r * 110), "Cutout": int(r * 40),
    }  # fmt: skip
    return table.get(name)  # AutoContrast, Equalize, Invert: no argument


def blend(image1, image2, factor):
    if factor == 0.0:
        return image1.copy()
    if factor == 1.0:
        return image2.copy()
    a, b = image1.astype(F32), image2.astype(F32)
    temp = a + F32(factor) * (b - a)
    if 0.0 < factor < 1.0:
        return temp.astype(np.uint8)
    return np.clip(temp, 0.0, 255.0).astype(np.uint8)


def rgb_to_grayscale(image):
    """tf.image.rgb_to_grayscale on uint8 -> (H, W, 1) uint8 (convert_image_dtype both ways)."""
    f = image.astype(F32) * F32(1.0 / 255.0)
    gray = f[..., 0] * F32(0.2989) + f[..., 1] * F32(0.5870) + f[..., 2] * F32(0.1140)
    return (gray * F32(255.5)).astype(np.uint8)[..., None]


def autocontrast(image, _arg=None, _center=None):
    out = image.copy()
    for c in range(3):
        im = image[..., c]
        lo, hi = F32(im.min()), F32(im.max())
        if hi > lo:
            scale = F32(255.0) / (hi - lo)
            offset = -lo * scale
            out[..., c] = np.clip(im.astype(F32) * scale + offset, 0.0, 255.0).astype(np.uint8)
    return out


def equalize(image, _arg=None, _center=None):
    out = image.copy()
    for c in range(3):
        im = image[..., c].astype(np.int64)
        histo = np.histogram(im, bins=256, range=(0, 255))[0].astype(np.int64)
        nonzero = histo[histo != 0]
        step = (nonzero.sum() - nonzero[-1]) // 255
        if step == 0:
            continue
        lut = (np.cumsum(histo) + step // 2) // step
        lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255)
        out[..., c] = lut[im].astype(np.uint8)
    return out


def invert(image, _arg=None, _center=None):
    return 255 - image


def _tf_uint8(value):
    """A Python int converted to a uint8 tensor the way TF does it: wrapped modulo 256 (big_vision #110;
    Solarize and Posterize at m = 0..30 checked against TF 2.21, eager and tf.function, outside this suite)."""
    return np.array(int(value), np.int64).astype(np.uint8)


def posterize(image, bits, _center=None):
    # tf.bitwise.right_shift / left_shift(image, 8 - bits): the shift becomes uint8, and TF's shift kernels
    # clamp it to [0, bit width - 1] = [0, 7] (no undefined C shifts).
    shift = int(min(max(int(_tf_uint8(8 - int(bits))), 0), 7))
    return ((image >> np.uint8(shift)) << np.uint8(shift)).astype(np.uint8)


def solarize(image, threshold, _center=None):
    # tf.where(image < threshold, image, 255 - image) with the threshold as a uint8 tensor.
    return np.where(image < _tf_uint8(threshold), image, 255 - image).astype(np.uint8)


def solarize_add(image, addition, _center=None, threshold=128):
    added = np.clip(image.astype(np.int64) + int(addition), 0, 255).astype(np.uint8)
    return np.where(image < threshold, added, image)


def color(image, factor, _center=None):
    return blend(np.repeat(rgb_to_grayscale(image), 3, axis=-1), image, factor)


def contrast(image, factor, _center=None):
    degenerate = rgb_to_grayscale(image).astype(np.int32)
    hist = np.histogram(degenerate, bins=256, range=(0, 255))[0]
    mean = F32(hist.sum()) / F32(256.0)  # sic: pixel count / 256, as in the TF code
    degenerate = np.clip(np.ones(degenerate.shape, F32) * mean, 0.0, 255.0).astype(np.uint8)
    return blend(np.repeat(degenerate, 3, axis=-1), image, factor)


def brightness(image, factor, _center=None):
    return blend(np.zeros_like(image), image, factor)


def sharpness(image, factor, _center=None):
    h, w = image.shape[:2]
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]])
    x = image.astype(np.int64)
    total = np.zeros((h - 2, w - 2, 3), np.int64)
    for dy in range(3):
        for dx in range(3):
            total += kernel[dy, dx] * x[dy : dy + h - 2, dx : dx + w - 2]
    result = image.copy()  # border: the original pixels
    # The exact quotient, as pipelines.randaugment takes it; TF's float32 conv (tf_float32_smooth) is one
    # level lower on some pixels whose sum is a multiple of 13.
    result[1:-1, 1:-1] = np.clip(total // 13, 0, 255).astype(np.uint8)
    return blend(result, image, factor)


def tf_float32_smooth(image):
    """The interior of big_vision's Sharpness degenerate as TF computes it: float32 weights 1/13 and 5/13,
    taps accumulated in row-major order with a fused multiply-add, truncated to uint8. Bit for bit what
    TF 2.21's CPU depthwise_conv2d gave on x86 (checked outside this suite); a build without FMA rounds
    differently. float64 holds acc + x * w exactly (< 40 significant bits), so one rounding to float32 = FMA."""
    h, w = image.shape[:2]
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], F32) / F32(13.0)
    x = image.astype(np.float64)
    acc = np.zeros((h - 2, w - 2, 3), F32)
    for dy in range(3):
        for dx in range(3):
            tap = x[dy : dy + h - 2, dx : dx + w - 2] * np.float64(kernel[dy, dx])
            acc = (acc.astype(np.float64) + tap).astype(F32)
    return np.clip(acc, 0.0, 255.0).astype(np.uint8)


def _round_half_away(v):
    v = np.round(v, 9)  # exact .5 ties decided as exact arithmetic would, not by float noise
    return (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int64)


def _transform(image, source):
    """out[y, x] = image at the nearest index to source(x, y) (std::round), 128 from outside."""
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sx, sy = source(xs, ys)
    rx, ry = _round_half_away(sx), _round_half_away(sy)
    inside = (rx >= 0) & (rx < w) & (ry >= 0) & (ry < h)
    out = np.full_like(image, FILL)
    out[inside] = image[ry[inside], rx[inside]]
    return out


def rotate(image, degrees, _center=None):
    h, w = image.shape[:2]
    rad = degrees * math.pi / 180.0
    c, s = math.cos(rad), math.sin(rad)
    # tfa angles_to_projective_transforms: [cos, -sin, x_off, sin, cos, y_off, 0, 0]
    x_off = ((w - 1) - (c * (w - 1) - s * (h - 1))) / 2.0
    y_off = ((h - 1) - (s * (w - 1) + c * (h - 1))) / 2.0
    return _transform(image, lambda x, y: (c * x - s * y + x_off, s * x + c * y + y_off))


def shear_x(image, level, _center=None):
    return _transform(image, lambda x, y: (x + level * y, y))  # [1, level, 0, 0, 1, 0, 0, 0]


def shear_y(image, level, _center=None):
    return _transform(image, lambda x, y: (x, level * x + y))  # [1, 0, 0, level, 1, 0, 0, 0]


def translate_x(image, pixels, _center=None):
    return _transform(image, lambda x, y: (x + pixels, y))  # tfa translate(image, [-pixels, 0])


def translate_y(image, pixels, _center=None):
    return _transform(image, lambda x, y: (x, y + pixels))


def cutout(image, pad, center):
    h, w = image.shape[:2]
    cy, cx = int(center[0]), int(center[1])
    pad = int(pad)
    out = image.copy()
    out[max(0, cy - pad) : min(h, cy + pad), max(0, cx - pad) : min(w, cx + pad)] = FILL
    return out


REFERENCE = {
    "AutoContrast": autocontrast, "Equalize": equalize, "Invert": invert, "Rotate": rotate,
    "Posterize": posterize, "Solarize": solarize, "Color": color, "Contrast": contrast,
    "Brightness": brightness, "Sharpness": sharpness, "ShearX": shear_x, "ShearY": shear_y,
    "TranslateX": translate_x, "TranslateY": translate_y, "Cutout": cutout, "SolarizeAdd": solarize_add,
}  # fmt: skip


def apply_one(image, steps):
    """image (H, W, 3) uint8; steps: [(op name, signed argument or None, (cy, cx)), ...] in order."""
    for name, arg, center in steps:
        image = REFERENCE[name](image, arg, center)
    return image
