"""pipelines.randaugment: big_vision's RandAugment, batched with per-image draws, against a per-image
numpy transliteration of the TF code (bigvision_reference.py), arguments included."""

from __future__ import annotations

import math
import pickle

import bigvision_reference as bv
import numpy as np
import pytest
import torch

from pipelines import randaugment as ra
from pipelines.batch_stage import BatchStage
from pipelines.randaugment import (
    OPS,
    SIGNED,
    BigVisionRandAugment,
    RandAugmentDraws,
    apply,
    draw,
    level_to_arg,
)

H, W = 32, 40  # non-square on purpose: catches H/W mix-ups
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}


def photo_batch(n=12, h=H, w=W, seed=0):
    """Photo-like uint8 images: smooth per-image gradients and waves plus noise, some saturation, one
    constant channel (AutoContrast/Equalize leave it alone)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, h).view(1, 1, h, 1)
    x = torch.linspace(0, 1, w).view(1, 1, 1, w)
    fx, fy, phase = (torch.rand(n, 3, 1, 1, generator=g) * s for s in (3.0, 3.0, 2 * math.pi))
    amp = 30 + 130 * torch.rand(n, 3, 1, 1, generator=g)
    mid = 60 + 130 * torch.rand(n, 3, 1, 1, generator=g)
    base = mid + amp * torch.sin(2 * math.pi * (fx * x + fy * y) + phase) + 40 * (x - y)
    imgs = (base + 10 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 255).to(torch.uint8)
    if n > 5:
        imgs[5, 1] = 77
    return imgs


def forced_draws(ops_per_layer, signs_per_layer, n, seed=1, h=H, w=W):
    """Draws with the given op names / signs per layer (lists of length n), random centres incl. corners."""
    d = draw(torch.Generator().manual_seed(seed), n, len(ops_per_layer), h, w)
    d.ops = torch.tensor([[OPS.index(o) for o in col] for col in ops_per_layer]).T.contiguous()
    d.signs = torch.tensor(signs_per_layer, dtype=torch.float32).T.contiguous()
    d.centers[0, :] = torch.tensor([0, 0])
    if n > 1:
        d.centers[1, :] = torch.tensor([h - 1, w - 1])
    return d


def reference(images, draws, magnitude):
    """The numpy reference, image by image, with its own level_to_arg (not the module's)."""
    out = []
    for i, img in enumerate(images):
        steps = []
        for layer in range(draws.ops.shape[1]):
            name = OPS[int(draws.ops[i, layer])]
            arg = bv.level_to_arg(name, magnitude)
            if name in SIGNED:
                arg = float(draws.signs[i, layer]) * arg
            steps.append((name, arg, draws.centers[i, layer].tolist()))
        out.append(bv.apply_one(img.permute(1, 2, 0).numpy().copy(), steps))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def all_ops_draws(n=32):
    """2 layers; every op with both signs in each layer, different op pairs per image."""
    layer0 = [OPS[i % 16] for i in range(n)]
    layer1 = [OPS[(5 * i + 3) % 16] for i in range(n)]
    s0 = [1.0 if i < n // 2 else -1.0 for i in range(n)]
    return forced_draws([layer0, layer1], [s0, [-s for s in s0]], n)


# ---- 1. the op table and the arguments the ops receive ----

EXPECTED = {  # m -> (Rotate, Shear, Translate, enhance factor, Posterize, Solarize, SolarizeAdd, Cutout)
    0: (0.0, 0.0, 0.0, 0.1, 0, 0, 0, 0),
    10: (30.0, 0.3, 100.0, 1.9, 4, 256, 110, 40),
    15: (45.0, 0.45, 150.0, 2.8, 6, 384, 165, 60),
    20: (60.0, 0.6, 200.0, 3.7, 8, 512, 220, 80),
}


@pytest.mark.parametrize("m", sorted(EXPECTED))
def test_level_to_arg_table(m):
    rot, shear, trans, enh, post, sol, sol_add, cut = EXPECTED[m]
    expected = {
        "AutoContrast": None, "Equalize": None, "Invert": None, "Rotate": rot, "Posterize": post,
        "Solarize": sol, "Color": enh, "Contrast": enh, "Brightness": enh, "Sharpness": enh,
        "ShearX": shear, "ShearY": shear, "TranslateX": trans, "TranslateY": trans, "Cutout": cut,
        "SolarizeAdd": sol_add,
    }  # fmt: skip
    assert tuple(expected) == OPS and len(OPS) == 16
    assert SIGNED == {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}
    for op, want in expected.items():
        got = level_to_arg(op, m)
        if want is None or isinstance(want, int):
            assert got == want and type(got) is type(want), (op, got)
        else:
            assert got == pytest.approx(want, rel=1e-12), (op, got)
    with pytest.raises(KeyError, match="unknown RandAugment op 'Identity'"):
        level_to_arg("Identity", m)


def test_ops_receive_signed_level_and_centres(monkeypatch):
    m = 15
    images = photo_batch(32)
    draws = all_ops_draws(32)
    received = {name: [] for name in OPS}
    for name in OPS:

        def recorder(imgs, args, centers, _name=name, _f=ra.OP_FUNCS[name]):
            received[_name].append((len(imgs), args, centers))
            return _f(imgs, args, centers)

        monkeypatch.setitem(ra.OP_FUNCS, name, recorder)
    apply(images, draws, m)
    for k, name in enumerate(OPS):
        rows, layers = (draws.ops == k).nonzero(as_tuple=True)
        calls = received[name]
        assert sum(c[0] for c in calls) == len(rows) > 0, name
        level = level_to_arg(name, m)
        if level is None:
            assert all(c[1] is None for c in calls), name
            continue
        got = torch.cat([c[1] for c in calls]).double().sort().values
        want = torch.full((len(rows),), float(level), dtype=torch.float64)
        if name in SIGNED:
            want = want * draws.signs[rows, layers].double()
            assert (want > 0).any() and (want < 0).any()
        torch.testing.assert_close(got, want.sort().values, rtol=1e-6, atol=0)
        if name == "Cutout":
            got_c = sorted(map(tuple, torch.cat([c[2] for c in calls]).tolist()))
            assert got_c == sorted(map(tuple, draws.centers[rows, layers].tolist()))


# ---- 2. batched == per-image reference ----


def _compare(got, want, geometric, tol=0.01):
    assert got.dtype == torch.uint8 and got.shape == want.shape
    if geometric:
        frac = (got != want).any(1).float().mean().item()
        assert frac <= tol, f"{frac:.4f} of pixels differ"
    else:
        assert torch.equal(got, want), f"{(got != want).sum().item()} values differ"


@pytest.mark.parametrize("magnitude", [15, 10])
@pytest.mark.parametrize("op", OPS)
def test_each_op_matches_reference(op, magnitude):
    images = photo_batch()
    n = len(images)
    draws = forced_draws([[op] * n], [[(-1.0) ** i for i in range(n)]], n)
    got = apply(images, draws, magnitude)
    want = reference(images, draws, magnitude)
    assert not torch.equal(want, images), "the op should change the batch at this magnitude"
    _compare(got, want, op in GEOMETRIC)
    assert torch.equal(images, photo_batch()), "apply must not modify its input"


def test_two_layers_match_reference():
    images = photo_batch(32, seed=3)
    draws = all_ops_draws(32)
    got = apply(images, draws, 15)
    want = reference(images, draws, 15)
    for i in range(len(images)):
        geometric = any(OPS[k] in GEOMETRIC for k in draws.ops[i].tolist())
        _compare(got[i : i + 1], want[i : i + 1], geometric)


def test_random_draws_match_reference():
    images = photo_batch(24, seed=4)
    draws = draw(torch.Generator().manual_seed(7), 24, 3, H, W)
    got, want = apply(images, draws, 9), reference(images, draws, 9)
    assert (got != want).any(1).float().mean().item() <= 0.01


# ---- 2b. every op at the magnitudes in use, 0..30 (the config allows up to 30) ----

SWEEP = (0, 2, 5, 10, 15, 20, 25, 30)
# By hand from big_vision's level_to_arg and TF's uint8 rules (neither implementation is consulted):
# Solarize compares with int(m / 10 * 256) converted to uint8, i.e. modulo 256; Posterize shifts by
# 8 - int(m / 10 * 4) converted to uint8, and TF clamps a uint8 shift to 7, so 0 or > 8 bits keep x & 128.
SOLARIZE_THRESHOLD = {0: 0, 2: 51, 5: 128, 10: 0, 15: 128, 20: 0, 25: 128, 30: 0}
POSTERIZE_MASK = {0: 0x80, 2: 0x80, 5: 0xC0, 10: 0xF0, 15: 0xFC, 20: 0xFF, 25: 0x80, 30: 0x80}


@pytest.mark.parametrize("m", SWEEP)
def test_solarize_and_posterize_as_tf_uint8_arithmetic(m):
    images = photo_batch(seed=11)
    x = images.numpy()
    solarized = np.where(x < SOLARIZE_THRESHOLD[m], x, 255 - x)
    assert torch.equal(_only("Solarize", images, m), torch.from_numpy(solarized))
    assert torch.equal(_only("Posterize", images, m), torch.from_numpy(x & np.uint8(POSTERIZE_MASK[m])))
    if m in (10, 20):  # the paper's i21k magnitudes: every pixel inverted
        assert torch.equal(_only("Solarize", images, m), 255 - images)
    if m == 15:  # the paper's i1k magnitude: a solarize at 128, neither a no-op nor a full inversion
        out = _only("Solarize", images, m)
        assert not torch.equal(out, images) and not torch.equal(out, 255 - images)


@pytest.mark.parametrize("m", SWEEP)
def test_every_op_at_every_magnitude_matches_reference(m):
    """The batched path (what the batch stage runs, host or device placement) and one image at a time
    (OneImage's path) against the numpy reference, every op, arguments from the reference's own level_to_arg."""
    images = photo_batch(16, seed=10)
    n = len(images)
    for op in OPS:
        draws = forced_draws([[op] * n], [[(-1.0) ** i for i in range(n)]], n)
        got = apply(images, draws, m)
        _compare(got, reference(images, draws, m), op in GEOMETRIC)
        for i in (0, 1, 5):
            assert torch.equal(apply(images[i : i + 1], draws.select(i), m), got[i : i + 1]), (op, i)
    # The batch stage itself on a mixed batch: RandAugment, then [-1, 1].
    draws = forced_draws([[OPS[i] for i in range(n)]], [[(-1.0) ** i for i in range(n)]], n)
    got = BatchStage(randaug=BigVisionRandAugment(1, m))(images, draws.as_dict())
    expected = reference(images, draws, m).float() / 255.0 * 2.0 - 1.0
    rows = [i for i in range(n) if OPS[i] not in GEOMETRIC]
    torch.testing.assert_close(got[rows], expected[rows], rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", SWEEP)
def test_every_op_at_every_magnitude_cuda_matches_cpu(m):
    """The device path: integer-only ops bit for bit; float ops within test_cuda_matches_cpu's tolerance."""
    images = photo_batch(16, seed=10)
    n = len(images)
    for op in OPS:
        draws = forced_draws([[op] * n], [[(-1.0) ** i for i in range(n)]], n)
        cpu, gpu = apply(images, draws, m), apply(images.cuda(), draws, m)
        assert gpu.device.type == "cuda"
        if op in ("Invert", "Posterize", "Solarize", "SolarizeAdd", "Cutout"):
            assert torch.equal(gpu.cpu(), cpu), (op, m)
        else:
            diff = (gpu.cpu().int() - cpu.int()).abs()
            assert diff.max() <= 1 and (diff == 0).float().mean() >= 0.99, (op, m)


def test_sharpness_takes_the_exact_quotient_where_tf_float32_is_one_below():
    """The documented deviation (pipelines.randaugment.sharpness): TF's float32 conv truncates one level
    low on some pixels whose 3x3 sum is a multiple of 13; this module takes the exact floor."""
    images = photo_batch(16, seed=12)
    g, _, h, w = images.shape
    degenerate = ra.sharpness(images, torch.zeros(g))  # blend factor 0: the smoothed image itself
    x = images.permute(0, 2, 3, 1).numpy().astype(np.int64)
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]])
    sums = sum(kernel[dy, dx] * x[:, dy : dy + h - 2, dx : dx + w - 2] for dy in range(3) for dx in range(3))
    ours = degenerate.permute(0, 2, 3, 1).numpy()
    assert np.array_equal(ours[:, 1:-1, 1:-1], sums // 13)
    border = torch.ones(h, w, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert torch.equal(degenerate[..., border], images[..., border])
    tf32 = np.stack([bv.tf_float32_smooth(im) for im in images.permute(0, 2, 3, 1).numpy()]).astype(np.int64)
    diff = tf32 - sums // 13
    assert set(np.unique(diff)) == {-1, 0}  # never above, at most one level below
    assert (sums[diff == -1] % 13 == 0).all()  # only on exact multiples of 13
    assert 0.001 < (diff == -1).mean() < 0.05, (diff == -1).mean()


# ---- 3. op frequencies and independence ----


def test_draw_frequencies_and_independence():
    n, layers = 16000, 2
    d = draw(torch.Generator().manual_seed(0), n, layers, H, W)
    assert d.ops.shape == (n, layers) and d.ops.dtype == torch.int64
    assert d.signs.dtype == torch.float32 and d.centers.shape == (n, layers, 2)
    counts = torch.bincount(d.ops.flatten(), minlength=16).double()
    expected = n * layers / 16
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 37.7, chi2  # 15 dof, p = 0.001
    assert set(d.signs.unique().tolist()) == {-1.0, 1.0}
    assert abs((d.signs > 0).double().mean().item() - 0.5) < 0.012  # ~4 sigma
    # Neighbouring images and the two layers of one image draw independently: P(equal) = 1/16.
    for same in (d.ops[1:, 0] == d.ops[:-1, 0], d.ops[:, 0] == d.ops[:, 1]):
        assert abs(same.double().mean().item() - 1 / 16) < 0.01
    assert abs((d.signs[1:, 0] == d.signs[:-1, 0]).double().mean().item() - 0.5) < 0.02
    cy, cx = d.centers[..., 0], d.centers[..., 1]
    assert cy.min() == 0 and cy.max() == H - 1 and cx.min() == 0 and cx.max() == W - 1
    assert (
        abs(cy.double().mean().item() - (H - 1) / 2) < 0.3
        and abs(cx.double().mean().item() - (W - 1) / 2) < 0.3
    )


# ---- 4. determinism, round trips, select, pickling ----


def test_determinism_dict_round_trip_and_select():
    images = photo_batch(16, seed=5)
    aug = BigVisionRandAugment(2, 15)
    d1 = aug.draw(torch.Generator().manual_seed(42), 16, H, W)
    d2 = aug.draw(torch.Generator().manual_seed(42), 16, H, W)
    d3 = aug.draw(torch.Generator().manual_seed(43), 16, H, W)
    for a, b in zip(d1.as_dict().values(), d2.as_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(d1.ops, d3.ops)
    out = aug(images, d1)
    assert torch.equal(out, aug(images, d2)) and not torch.equal(out, aug(images, d3))

    rt = RandAugmentDraws.from_dict({k: v.clone() for k, v in d1.as_dict().items()})
    assert set(d1.as_dict()) == {"ops", "signs", "centers"}
    assert torch.equal(aug(images, rt), out)

    # Per-image independence of the batching: a subset augments exactly as inside the full batch.
    idx = torch.tensor([3, 0, 11, 7])
    assert torch.equal(apply(images[idx], d1.select(idx), 15), out[idx])
    assert torch.equal(apply(images[2:9], d1.select(slice(2, 9)), 15), out[2:9])
    one = d1.select(-1)
    assert one.ops.shape == (1, 2) and one.centers.shape == (1, 2, 2)
    assert torch.equal(apply(images[-1:], one, 15), out[-1:])

    clone = pickle.loads(pickle.dumps(aug))
    assert (clone.num_layers, clone.magnitude) == (2, 15) and torch.equal(clone(images, d1), out)
    with pytest.raises(ValueError, match="draws have 3 layers, expected 2"):
        aug(images, draw(torch.Generator().manual_seed(0), 16, 3, H, W))
    with pytest.raises(TypeError, match=r"expected uint8 \(N, 3, H, W\) images, got torch\.float32 \(16, 3, 32, 40\)"):
        apply(images.float(), d1, 15)


# ---- 5. device ----


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    images = photo_batch(64, seed=6)
    draws = draw(torch.Generator().manual_seed(8), 64, 2, H, W)
    cpu = apply(images, draws, 15)
    gpu = apply(images.cuda(), draws, 15)  # draws moved inside
    assert gpu.device.type == "cuda" and gpu.dtype == torch.uint8
    diff = (gpu.cpu().int() - cpu.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() >= 0.99
    forced = all_ops_draws(64).to("cuda")
    diff = (apply(images.cuda(), forced, 15).cpu().int() - apply(images, forced.to("cpu"), 15).int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() >= 0.99


# ---- 6. edge cases ----


def _only(op, images, m, seed=1):
    n = len(images)
    return apply(images, forced_draws([[op] * n], [[(-1.0) ** i for i in range(n)]], n, seed=seed), m)


def test_magnitude_zero_and_twenty():
    images = photo_batch()
    for op in ("Cutout", "Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "SolarizeAdd"):
        assert torch.equal(_only(op, images, 0), images), op  # no-op arguments
    assert torch.equal(_only("Posterize", images, 0), images & 128)  # 0 bits: TF's shift clamps 8 to 7
    assert torch.equal(_only("Posterize", images, 20), images)  # 8 bits: shift 0
    for m in (0, 20):  # thresholds 0 and 512 -> 0 as uint8: no pixel is below it, everything inverts
        assert torch.equal(_only("Solarize", images, m), 255 - images), m
    assert torch.equal(_only("Brightness", images, 0), (images.float() * np.float32(0.1)).to(torch.uint8))


def test_single_image_and_full_translation():
    image = photo_batch(1, seed=9)
    d = draw(torch.Generator().manual_seed(2), 1, 2, H, W)
    got = BigVisionRandAugment(2, 15)(image, d)
    assert got.shape == (1, 3, H, W)
    ops = {OPS[k] for k in d.ops[0].tolist()}
    _compare(got, reference(image, d, 15), bool(ops & GEOMETRIC))
    # Translating by 150 px (> W) leaves only the grey fill.
    assert torch.equal(_only("TranslateX", image, 15), torch.full_like(image, 128))
