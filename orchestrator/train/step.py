"""The training step: forward, loss, backward (with gradient accumulation), clip, optimizer, schedule.

Plain PyTorch with no Ray in it: the same function runs in a Ray Train worker, in a single process, and in
the benchmark. `model` may be wrapped in DistributedDataParallel; gradients are then all-reduced on the
last micro-batch only (no_sync on the others), so the global batch stays fixed whatever the worker count.

Ranks may hold unequal shares of the global batch (an elastic run at a world size that does not divide the
data's stream slots). Each micro-batch's mean loss is then weighted by ``weights[i]`` = its samples / global
batch x world size: DDP averages the ranks' gradients, so the update is the mean over the whole global batch,
exactly what one process would compute on all of it (tests/orchestrator/train/test_train_step.py).

With a ``timer`` (orchestrator/observe/step_timer.py StepTimer, or anything with ``phase(name)`` returning a
context manager), the micro-batches' forward+backward run in its "forward_backward" phase (DDP's gradient
all-reduce overlaps the backward and is inside it) and clipping, the optimizer and the schedule in "optimizer".
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's weighted mean loss over its micro-batches (a tensor: no host sync until read)
    grad_norm: torch.Tensor  # global gradient norm before clipping
    lr: float
    images: int  # images this worker processed in the step


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """softmax: cross-entropy; sigmoid: big_vision's sigmoid_xent (sum over classes, mean over batch).

    targets are class indices (int64) or per-class probabilities (mixup / label smoothing).
    """
    logits = logits.float()
    if kind == "softmax":
        return F.cross_entropy(logits, targets)
    if targets.dtype == torch.long:
        targets = F.one_hot(targets, logits.shape[-1]).to(logits.dtype)
    per_class = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return per_class.sum(-1).mean()


def train_step(
    model: nn.Module,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    loss_kind: str = "softmax",
    clip_norm: float | None = 1.0,
    autocast_dtype: torch.dtype | None = None,
    weights: Sequence[float] | None = None,
    timer=None,
) -> StepResult:
    """``weights``: each micro-batch's loss weight (default 1/n each: equal micro-batches, equal shares).
    ``timer``: times the step's phases (module doc); None: untimed."""
    phase = timer.phase if timer is not None else _untimed
    model.train()
    n = len(micro_batches)
    weights = list(weights) if weights is not None else [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} micro-batches")
    total_loss = torch.zeros((), device=micro_batches[0][0].device)
    images = 0
    with phase("forward_backward"):
        for i, (x, y) in enumerate(micro_batches):
            last = i == n - 1
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = model(x)
                loss = classification_loss(logits, y, loss_kind)
                (loss * weights[i]).backward()
            total_loss += loss.detach() * weights[i]
            images += x.shape[0]
    with phase("optimizer"):
        if clip_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return StepResult(loss=total_loss / sum(weights), grad_norm=grad_norm, lr=lr, images=images)


def _untimed(name: str) -> contextlib.nullcontext:
    return contextlib.nullcontext()
