"""One fixed permutation of every input image: the paper's invariance study (its Fig. 4, `data.permute`).

    perm = InputPermutation.make("patch_pixel", seed=0, height=224, width=224, patch_size=16)
    x = perm(x)                      # (..., H, W) on any device: the same permutation for every image

Modes:
- ``patch_pixel``: the order of the P x P patches is permuted (``token_perm``) and, with ONE permutation shared
  by all patches (``pixel_perm``), the pixels inside each patch. Output patch t is input patch token_perm[t],
  and its pixel q (row-major inside the patch) is that patch's pixel pixel_perm[q]. A Mixer trained on such
  inputs is the same function class as one trained on the originals: permuting the stem's kernel by
  pixel_perm and the token-mixing MLPs' token axis by token_perm gives exactly the same outputs (tested).
- ``global``: one permutation of all H x W pixel positions (the channels of a pixel move together).

The permutation is a function of (mode, seed, H, W, P) only: drawn once from a CPU ``torch.Generator`` seeded
with ``seed``, never from the global RNG, so every rank, every restart and every evaluation of a run applies
the same one. It is applied on the training device to whole batches, after augmentation and normalisation
(a permutation of positions commutes with every per-pixel operation, mixup included).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MODES = ("none", "patch_pixel", "global")


@dataclass(frozen=True)
class InputPermutation:
    mode: str
    seed: int
    height: int
    width: int
    patch_size: int
    index: torch.Tensor  # (H*W,) int64: output position i takes input position index[i] (row-major pixels)
    token_perm: torch.Tensor | None = None  # patch_pixel: output patch t is input patch token_perm[t]
    pixel_perm: torch.Tensor | None = None  # patch_pixel: output pixel q of a patch is its input pixel pixel_perm[q]
    _on_device: dict = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def make(mode: str, seed: int, height: int, width: int, patch_size: int) -> InputPermutation | None:
        """The permutation of `mode` drawn from `seed`; None for mode 'none'."""
        if mode not in MODES:
            raise ValueError(f"permutation mode {mode!r} is not accepted; expected one of {list(MODES)}")
        if mode == "none":
            return None
        if height % patch_size or width % patch_size:
            raise ValueError(f"a {height}x{width} image does not split into {patch_size}x{patch_size} patches")
        gen = torch.Generator().manual_seed(int(seed))
        if mode == "global":
            index = torch.randperm(height * width, generator=gen)
            return InputPermutation(mode, int(seed), height, width, patch_size, index)
        token_perm = torch.randperm((height // patch_size) * (width // patch_size), generator=gen)
        pixel_perm = torch.randperm(patch_size * patch_size, generator=gen)
        where = patch_positions(height, width, patch_size)  # (S, P*P): flat image position of (patch, pixel)
        index = torch.empty(height * width, dtype=torch.int64)
        index[where.reshape(-1)] = where[token_perm][:, pixel_perm].reshape(-1)
        return InputPermutation(mode, int(seed), height, width, patch_size, index, token_perm, pixel_perm)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H, W) -> the same shape with every image's pixels moved; on x's device."""
        if tuple(x.shape[-2:]) != (self.height, self.width):
            raise ValueError(f"input of size {tuple(x.shape[-2:])} for a {self.height}x{self.width} permutation")
        index = self._on_device.get(x.device)
        if index is None:
            index = self._on_device[x.device] = self.index.to(x.device)
        return x.flatten(-2).index_select(-1, index).view(x.shape)

    def describe(self) -> str:
        what = (f"{len(self.token_perm)} patches of {self.patch_size}x{self.patch_size} and the pixels within "
                "them" if self.mode == "patch_pixel" else f"all {self.height * self.width} pixel positions")
        return f"data.permute={self.mode}: one fixed permutation of {what} (data.permute_seed={self.seed})"


def patch_positions(height: int, width: int, patch_size: int) -> torch.Tensor:
    """(S, P*P): the row-major flat image position of pixel q of patch t, patches row-major over the grid
    (the stem's token order)."""
    p, gw = patch_size, width // patch_size
    rows = torch.arange(height).view(height // p, p, 1, 1)
    cols = torch.arange(width).view(1, 1, gw, p)
    flat = rows * width + cols  # (gh, p, gw, p)
    return flat.permute(0, 2, 1, 3).reshape(-1, p * p)
