"""Top-1 / top-5 evaluation over a loader; sums are all-reduced when torch.distributed is initialised.

A ReaLSet (orchestrator/eval/real.py) is scored against its label lists: top-1/top-5 over the images with a
non-empty list (`scored`), the loss against the shards' own labels over all images (`count`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from orchestrator.eval.real import ReaLSet, real_hits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Every rank evaluates its own share of the split; counts are summed across ranks."""
    was_training = model.training
    model.eval()
    real = batches.labels if isinstance(batches, ReaLSet) else None  # its batches carry the sample keys
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, count, scored
    for x, y, *keys in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x)
        logits = logits.float()
        if real is None:
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hit = top == y[:, None]
            sums[0] += hit[:, 0].sum()
            sums[1] += hit.any(dim=-1).sum()
            sums[4] += y.numel()
        else:
            hits = real_hits(logits, keys[0], real)
            sums[0:2] += hits[0:2]
            sums[4] += hits[2]
        sums[2] += F.cross_entropy(logits, y, reduction="sum")
        sums[3] += y.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    count, scored = max(sums[3].item(), 1.0), max(sums[4].item(), 1.0)
    return {
        "top1": sums[0].item() / scored,
        "top5": sums[1].item() / scored,
        "loss": sums[2].item() / count,
        "count": int(sums[3].item()),
        "scored": int(sums[4].item()),  # the images top-1/top-5 are over: all, or those with a ReaL list
    }
