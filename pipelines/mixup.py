"""Batch-level mixup as in big_vision: one lambda ~ Beta(alpha, alpha) per batch, the batch mixed with
itself rolled by one, plus optional label smoothing. Deterministic given a torch.Generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MixupConfig:
    alpha: float = 0.0  # big_vision's ``p``; 0 -> no mixing
    label_smoothing: float = 0.0


def one_hot_smoothed(labels: torch.Tensor, num_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    t = torch.nn.functional.one_hot(labels.long(), num_classes).float()
    if label_smoothing:
        t = t * (1.0 - label_smoothing) + label_smoothing / num_classes
    return t


def sample_lambda(alpha: float, generator: torch.Generator) -> float:
    """lambda ~ Beta(alpha, alpha) drawn from ``generator`` (via two Gamma draws)."""
    a = torch.full((2,), float(alpha))
    g = torch._standard_gamma(a, generator=generator)
    return float(g[0] / (g[0] + g[1]))


def mixup_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    alpha: float,
    generator: torch.Generator,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images, soft targets [N, num_classes]). alpha <= 0: images unchanged, (smoothed) one-hot."""
    targets = one_hot_smoothed(labels, num_classes, label_smoothing)
    if alpha is None or alpha <= 0:
        return images, targets
    lam = sample_lambda(alpha, generator)
    mixed = lam * images + (1.0 - lam) * images.roll(1, dims=0)
    soft = lam * targets + (1.0 - lam) * targets.roll(1, dims=0)
    return mixed, soft
