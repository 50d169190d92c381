"""The batch stage: what is done to a whole batch of uint8 crops at once, in the loader's worker
(``augment_on='host'``) or on the training device (``augment_on='device'``).

In order: big_vision's RandAugment with every image drawing its own ops, signs and cutout centres
(pipelines/randaugment.py), float conversion and normalisation. Mixup follows in the loader, on the same
device (it needs the rank's batch index for its seed). The draws are made on the host by the loader's worker
from a generator seeded by (seed, epoch, rank, slot, batch), and travel with the batch, so both placements
produce the same pixels and a resumed run sees the same ones as an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .randaugment import BigVisionRandAugment, RandAugmentDraws


@dataclass(frozen=True)
class BatchStage:
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    randaug: BigVisionRandAugment | None = None  # None: no RandAugment in the batch stage

    def draw(self, generator: torch.Generator, n: int, height: int, width: int) -> dict[str, torch.Tensor] | None:
        """The batch's random draws (plain tensors, so they pass through a DataLoader and pin_memory)."""
        if self.randaug is None:
            return None
        return self.randaug.draw(generator, n, height, width).as_dict()

    def __call__(self, images: torch.Tensor, draws: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """uint8 (N, 3, H, W) on any device -> float32 normalised, on the same device."""
        if images.dtype != torch.uint8:
            raise TypeError(f"the batch stage takes uint8 images, got {images.dtype}")
        if self.randaug is not None:
            if draws is None:
                raise ValueError("RandAugment needs the batch's draws (BatchStage.draw)")
            images = self.randaug(images, RandAugmentDraws.from_dict(draws))
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        return images.float().div_(255.0).sub_(mean).div_(std)
