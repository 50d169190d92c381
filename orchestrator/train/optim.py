"""Optimizer and learning-rate schedule, as in the paper and big_vision.

Weight decay is decoupled (AdamW / SGD with decoupled decay) and applied to weights (kernels) only: biases
and LayerNorm parameters (all 1-D tensors) are excluded, as big_vision's `wd` on kernels.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from orchestrator.config.tree import OptimSection, ScheduleSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    # SGD's weight_decay is coupled (added to the gradient); the fine-tuning recipe uses none.
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_factor(step: int, total_steps: int, cfg: ScheduleSection) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup, then linear/cosine decay."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return (step + 1) / warmup
    span = max(total_steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    end = cfg.end_lr_factor
    if cfg.decay == "cosine":
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
    return end + (1 - end) * (1 - progress)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: ScheduleSection):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
