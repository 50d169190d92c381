"""Top-1 / top-5 evaluation over a loader; sums are all-reduced when torch.distributed is initialised."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


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
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, count
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = top == y[:, None]
        sums[0] += hit[:, 0].sum()
        sums[1] += hit.any(dim=-1).sum()
        sums[2] += F.cross_entropy(logits, y, reduction="sum")
        sums[3] += y.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    count = max(sums[3].item(), 1.0)
    return {
        "top1": sums[0].item() / count,
        "top5": sums[1].item() / count,
        "loss": sums[2].item() / count,
        "count": int(sums[3].item()),
    }
