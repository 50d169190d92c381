"""Fine-tuning at a higher resolution (paper, App. C): grow the image side by an integer factor K.

The patch size stays, so S' = K^2 S and the token-MLP width becomes K^2 D_S. The image is split into K x K parts
of S tokens each; the new token-mixing weights are block-diagonal with K^2 copies of the old ones, placed on the
permuted token order (tokens are row-major over the whole grid): part (pi, pj), local token (r, c) ->
token (pi*g + r) * K*g + (pj*g + c), with g the grid side of one part. At initialisation each part is mixed by
the pretrained MLP on its own, so a K x K tiling of an image gives the original model's logits.
"""

from __future__ import annotations

import dataclasses

import torch

from model.mixer import MlpMixer


def part_major_token_order(grid: int, factor: int) -> torch.Tensor:
    """order[p * S + l] = token index (row-major over the K*g grid) of local token l of part p = pi*K + pj."""
    part_i, part_j, row, col = torch.meshgrid(
        torch.arange(factor), torch.arange(factor), torch.arange(grid), torch.arange(grid), indexing="ij"
    )
    return ((part_i * grid + row) * factor * grid + (part_j * grid + col)).flatten()


def adapt_resolution(model: MlpMixer, new_img_size: int) -> MlpMixer:
    """A new MlpMixer for images ``new_img_size`` wide; ``model`` is left unchanged."""
    cfg = model.cfg
    if isinstance(new_img_size, bool) or not isinstance(new_img_size, int) or new_img_size <= 0:
        raise ValueError(f"new_img_size={new_img_size!r} is invalid: expected a positive integer")
    if new_img_size % cfg.img_size:
        raise ValueError(
            f"resolution factor new_img_size/img_size = {new_img_size}/{cfg.img_size} = "
            f"{new_img_size / cfg.img_size:.4g} is not an integer: expected an integer factor K >= 1, i.e. "
            f"new_img_size in {[cfg.img_size * k for k in (1, 2, 3, 4)]}..."
        )
    factor = new_img_size // cfg.img_size
    parts = factor * factor
    new_cfg = dataclasses.replace(cfg, img_size=new_img_size, tokens_mlp_dim=parts * cfg.tokens_mlp_dim)
    ref = next(model.parameters())
    with torch.device(ref.device):
        new_model = MlpMixer(new_cfg).to(ref.dtype)
    new_model.train(model.training)

    order = part_major_token_order(cfg.grid_size, factor).to(ref.device)
    state = model.state_dict()
    for i in range(cfg.depth):
        prefix = f"blocks.{i}.mlp_tokens"
        w1, b1 = state[f"{prefix}.fc1.weight"], state[f"{prefix}.fc1.bias"]  # (D_S, S), (D_S,)
        w2, b2 = state[f"{prefix}.fc2.weight"], state[f"{prefix}.fc2.bias"]  # (S, D_S), (S,)
        new_w1 = torch.zeros(parts * w1.shape[0], parts * w1.shape[1], dtype=w1.dtype, device=w1.device)
        new_w1[:, order] = torch.block_diag(*[w1] * parts)
        new_w2 = torch.zeros(parts * w2.shape[0], parts * w2.shape[1], dtype=w2.dtype, device=w2.device)
        new_w2[order, :] = torch.block_diag(*[w2] * parts)
        new_b2 = torch.empty(parts * b2.shape[0], dtype=b2.dtype, device=b2.device)
        new_b2[order] = b2.repeat(parts)
        state[f"{prefix}.fc1.weight"], state[f"{prefix}.fc1.bias"] = new_w1, b1.repeat(parts)
        state[f"{prefix}.fc2.weight"], state[f"{prefix}.fc2.bias"] = new_w2, new_b2
    new_model.load_state_dict(state, strict=True)
    return new_model
