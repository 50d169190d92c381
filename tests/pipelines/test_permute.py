"""data.permute's input permutation (pipelines/permute.py): a bijection, a function of the seed only, the structure
of each mode, and the paper's argument as a test: Mixer is exactly invariant to patch_pixel once the stem's kernel
and the token-mixing weights are permuted to match."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pipelines.permute import InputPermutation, patch_positions


@pytest.mark.parametrize("mode", ["patch_pixel", "global"])
@pytest.mark.parametrize("size, patch", [(16, 4), (12, 3), (32, 8)])
def test_the_permutation_is_a_bijection_of_the_pixel_positions(mode, size, patch):
    perm = InputPermutation.make(mode, 7, size, size, patch)
    assert sorted(perm.index.tolist()) == list(range(size * size))
    x = torch.arange(2 * 3 * size * size, dtype=torch.float64).view(2, 3, size, size)
    y = perm(x)
    assert y.shape == x.shape and not torch.equal(y, x)
    for img_x, img_y in zip(x, y, strict=True):  # every image keeps its own values, each exactly once
        assert torch.equal(img_y.flatten().sort().values, img_x.flatten().sort().values)
    inverse = torch.empty_like(perm.index)
    inverse[perm.index] = torch.arange(size * size)
    assert torch.equal(y.flatten(-2)[..., inverse].view(x.shape), x)


def test_none_is_no_permutation_and_an_unknown_mode_names_the_accepted_ones():
    assert InputPermutation.make("none", 0, 16, 16, 4) is None
    with pytest.raises(ValueError, match=r"'pixels'.*\['none', 'patch_pixel', 'global'\]"):
        InputPermutation.make("pixels", 0, 16, 16, 4)


@pytest.mark.parametrize("mode", ["patch_pixel", "global"])
def test_a_function_of_the_seed_only_whatever_the_global_rng(mode):
    """What every rank and every restart computes: the global RNG (seeded per rank in build_run, restored from a
    checkpoint on resume) plays no part."""
    torch.manual_seed(0)
    a = InputPermutation.make(mode, 3, 16, 16, 4)
    torch.manual_seed(1234)  # another rank's seed
    torch.rand(100)
    b = InputPermutation.make(mode, 3, 16, 16, 4)
    assert torch.equal(a.index, b.index)
    assert not torch.equal(a.index, InputPermutation.make(mode, 4, 16, 16, 4).index)


def test_the_same_permutation_in_another_process():
    """A fresh process (another rank, a resumed run) draws the very same permutation from the seed."""
    here = InputPermutation.make("patch_pixel", 11, 16, 16, 4).index.tolist()
    code = ("import torch; from pipelines.permute import InputPermutation; torch.manual_seed(99); "
            "print(InputPermutation.make('patch_pixel', 11, 16, 16, 4).index.tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == str(here)


def test_patch_pixel_moves_whole_patches_with_one_pixel_order():
    size, p = 16, 4
    perm = InputPermutation.make("patch_pixel", 5, size, size, p)
    x = torch.randn(1, 3, size, size)
    y = perm(x)
    where = patch_positions(size, size, p)
    xs, ys = x.flatten(-2)[..., where], y.flatten(-2)[..., where]  # (1, 3, S, P*P): patches in token order
    for t in range(where.shape[0]):
        assert torch.equal(ys[:, :, t], xs[:, :, perm.token_perm[t]][..., perm.pixel_perm])
    assert not torch.equal(perm.token_perm, torch.arange(len(perm.token_perm)))
    assert not torch.equal(perm.pixel_perm, torch.arange(p * p))


def test_global_keeps_the_channels_of_a_pixel_together():
    perm = InputPermutation.make("global", 0, 8, 8, 4)
    x = torch.randn(4, 3, 8, 8)
    y = perm(x)
    for i, src in enumerate(perm.index.tolist()):
        assert torch.equal(y[:, :, i // 8, i % 8], x[:, :, src // 8, src % 8])


def test_applied_on_the_inputs_device_and_dtype():
    perm = InputPermutation.make("global", 0, 16, 16, 4)
    x = torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)
    assert perm(x).dtype == torch.uint8 and perm(x).device == x.device
    with pytest.raises(ValueError, match="16x16"):
        perm(torch.zeros(1, 3, 32, 32))


def _random_mixer():
    from model import create_model

    torch.manual_seed(0)
    model = create_model("mixer_digits", num_classes=10).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # no zero head, no zero biases: every weight takes part
            p.normal_(0, 0.5 / max(1, p.shape[-1]) ** 0.5)
    return model


def test_mixer_is_exactly_invariant_to_patch_pixel_with_its_weights_permuted_to_match():
    """The paper's argument (Sec. 3.4): the stem sees a patch's pixels through one kernel, so a fixed pixel order
    is undone by permuting the kernel's inputs; tokens are then permuted, which the token-mixing MLPs (the only
    layers that see the token axis; LayerNorm, the channel MLPs and the mean pool do not) undo when their token
    axis is permuted alike. Float64: equal to rounding."""
    model = _random_mixer()
    cfg = model.cfg
    perm = InputPermutation.make("patch_pixel", 3, cfg.img_size, cfg.img_size, cfg.patch_size)
    x = torch.randn(5, 3, cfg.img_size, cfg.img_size, dtype=torch.float64)

    matched = _random_mixer()
    tokens, pixels = perm.token_perm, perm.pixel_perm
    with torch.no_grad():
        w = matched.stem.proj.weight  # (C, 3, P, P): its P*P inputs in the patch's row-major pixel order
        w.copy_(w.flatten(2)[..., pixels].view_as(w))
        for block in matched.blocks:
            fc1, fc2 = block.mlp_tokens.fc1, block.mlp_tokens.fc2  # fc1: (D_S, S) reads tokens, fc2: (S, D_S) writes them
            fc1.weight.copy_(fc1.weight[:, tokens])
            fc2.weight.copy_(fc2.weight[tokens])
            fc2.bias.copy_(fc2.bias[tokens])

    with torch.no_grad():
        original = model(x)
        permuted_in = matched(perm(x))
        unmatched = model(perm(x))
    assert original.abs().max() > 0.1  # a non-trivial function
    torch.testing.assert_close(permuted_in, original, rtol=0, atol=1e-10)
    assert (unmatched - original).abs().max() > 1e-3  # the unmatched model does see the permutation
    # the token map itself is the original's with its tokens permuted
    with torch.no_grad():
        torch.testing.assert_close(matched.forward_features(perm(x)), model.forward_features(x)[:, tokens],
                                   rtol=0, atol=1e-10)
