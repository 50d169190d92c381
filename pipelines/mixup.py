"""Batch-level mixup as in big_vision: one lambda ~ Beta(alpha, alpha) per batch, the batch mixed with
itself rolled by one, plus optional label smoothing. Deterministic given a torch.Generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
    """lambda ~ Beta(alpha, alpha), a function of ``generator``'s state only (the loader seeds it per chunk).

    torch's public sampler, torch.distributions.Beta, takes no generator: it draws from the process-wide one,
    which would have to be re-seeded and restored around the draw (torch.random.fork_rng), touching state that
    the rest of the process (dropout, stochastic depth, a checkpoint's RNG state) shares. So ``generator`` gives
    a seed (one documented draw, torch.randint) and NumPy's seeded Generator.beta draws lambda: public APIs
    only, nothing shared. The values differ from the former torch._standard_gamma draw (a private op); like it,
    the same generator state gives the same lambda, so resumed and re-run streams are pixel-identical.
    """
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


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
