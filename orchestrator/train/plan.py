"""Derived quantities of a run: model, batches, accumulation, steps, FLOPs. Printed by --dry-run and at start.

Every quantity derived from the config is computed here and nowhere else, except what the config's own
validation needs: the worker range, the stream slots and the batch split are orchestrator/config/checks.py's
(imported here; the config never imports the plan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from model import MixerConfig, count_params, forward_flops, get_config, train_flops_per_image
from orchestrator.config.checks import check_profile_steps, stream_slots, worker_range
from orchestrator.config.tree import Config, ConfigError, model_overrides

# Dense bf16 peak per accelerator (TFLOP/s), for MFU. 1,979 is H100's sparse figure, not used.
# Checked in order: the more specific names first (an H100 PCIe has a lower peak than the SXM part).
PEAK_BF16_TFLOPS = {"H100 PCIE": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name.upper():
            return value
    return None


def chunk_size(cfg: Config) -> int:
    """Samples each stream slot gives every step: the global batch over the slots."""
    return cfg.optim.global_batch_size // stream_slots(cfg)


def micro_batch_size(cfg: Config) -> int:
    """Samples per worker per forward/backward: optim.micro_batch_size, else the global batch over max workers."""
    return cfg.optim.micro_batch_size or cfg.optim.global_batch_size // worker_range(cfg)[1]


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one Ray Train worker reserves: scaling.cpus_per_worker CPUs, plus one GPU with scaling.use_gpu."""
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1.0
    return resources


def worker_group_resources(cfg: Config) -> dict[str, float]:
    """What the whole worker group reserves at its largest: max workers x worker_resources (a tune trial's needs)."""
    return {k: v * worker_range(cfg)[1] for k, v in worker_resources(cfg).items()}


def accelerators(cfg: Config, workers: int) -> int:
    """Accelerators `workers` hold: their GPUs with scaling.use_gpu, else one per (CPU) worker."""
    return workers * int(worker_resources(cfg).get("GPU", 1))


@dataclass
class RunPlan:
    model_cfg: MixerConfig  # the architecture, with the dataset's class count
    min_workers: int
    max_workers: int  # == min_workers unless the run is elastic
    stream_slots: int  # the data's canonical slots (pipelines/plan.py); each gives chunk_size samples a step
    chunk_size: int
    micro_batch_size: int  # the most samples one forward/backward takes
    global_batch_size: int
    train_samples: int
    steps_per_epoch: int  # the same at every world size
    total_steps: int
    epochs: float
    eval_every_steps: int
    checkpoint_every_steps: int
    num_params: int
    fwd_gflops_per_image: float
    train_gflops_per_image: float
    train_flops_per_step: float
    train_flops_total: float
    minival_samples: int = 0  # held out of the training split (pipelines/subsets.py)
    minival_fraction: float = 0.0
    train_fraction: float = 1.0

    @property
    def num_workers(self) -> int:
        return self.max_workers

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches of the busiest rank at the largest world size."""
        return self.micro_batches(self.max_workers, 0)

    def rank_samples(self, world_size: int, rank: int) -> int:
        return len(range(rank, self.stream_slots, world_size)) * self.chunk_size

    def micro_batches(self, world_size: int, rank: int) -> int:
        return -(-self.rank_samples(world_size, rank) // self.micro_batch_size)

    def world_sizes(self) -> str:
        """One line per world size of the range: what each rank trains on per step."""
        lines = []
        for w in range(self.min_workers, self.max_workers + 1):
            shares = sorted({(self.rank_samples(w, r), self.micro_batches(w, r)) for r in range(w)}, reverse=True)
            per_rank = " or ".join(f"{n} samples in {k} micro-batch{'es' if k > 1 else ''}" for n, k in shares)
            lines.append(f"  {w} worker{'s' if w > 1 else ' '}: {per_rank} per rank" +
                         (" (unequal shares, weighted so the update is the global-batch mean)" if len(shares) > 1 else ""))
        return "\n".join(lines)

    def describe(self) -> str:
        workers = (f"{self.max_workers}" if self.min_workers == self.max_workers
                   else f"{self.min_workers}-{self.max_workers} (elastic)")
        lines = [
            f"workers              {workers}",
            f"batch                {self.global_batch_size} global = {self.stream_slots} stream slots x "
            f"{self.chunk_size}; micro-batches of at most {self.micro_batch_size}",
            self.world_sizes(),
            f"train samples        {self.train_samples:,}" + (
                f" (data.train_fraction={self.train_fraction:g}: a nested subset chosen by sample key)"
                if self.train_fraction < 1 else ""),
            *([f"minival              {self.minival_samples:,} samples held out of the training split "
               f"(data.minival_fraction={self.minival_fraction:g}, class-stratified, chosen by key): never trained "
               "on; every choice (Tune, early stopping, best checkpoint) is made on minival/top1, val is reported"]
              if self.minival_fraction > 0 else []),
            f"steps                {self.total_steps:,} ({self.steps_per_epoch:,} per epoch x {self.epochs:g} epochs)",
            f"eval / checkpoint    every {self.eval_every_steps:,} / {self.checkpoint_every_steps:,} steps",
            f"parameters           {self.num_params:,}",
            f"FLOPs per image      {self.fwd_gflops_per_image:.3f} G forward, {self.train_gflops_per_image:.3f} G training",
            f"FLOPs per step       {self.train_flops_per_step:.4g}",
            f"FLOPs for the run    {self.train_flops_total:.4g}",
        ]
        return "\n".join(lines)


def make_plan(cfg: Config, num_classes: int, train_samples: int, steps_per_epoch: int | None = None,
              minival_samples: int = 0) -> RunPlan:
    """`steps_per_epoch` is the data plan's exact figure (ShardLoader.steps_per_epoch); without it, the even split
    of the samples over the global batch is assumed."""
    model_cfg = get_config(cfg.model.name, **model_overrides(cfg, num_classes))
    low, high = worker_range(cfg)
    if steps_per_epoch is None:
        steps_per_epoch = train_samples // cfg.optim.global_batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"optim.global_batch_size={cfg.optim.global_batch_size} is larger than one epoch of the training "
            f"split ({train_samples} samples); use a smaller global batch"
        )
    total = math.ceil(steps_per_epoch * cfg.schedule.epochs)
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    check_profile_steps(cfg, total)
    eval_every = cfg.eval.every_steps or steps_per_epoch
    ckpt_every = cfg.checkpoint.every_steps or steps_per_epoch
    per_image = train_flops_per_image(model_cfg)
    return RunPlan(
        model_cfg=model_cfg,
        min_workers=low,
        max_workers=high,
        stream_slots=stream_slots(cfg),
        chunk_size=chunk_size(cfg),
        micro_batch_size=micro_batch_size(cfg),
        global_batch_size=cfg.optim.global_batch_size,
        train_samples=train_samples,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        epochs=cfg.schedule.epochs,
        eval_every_steps=eval_every,
        checkpoint_every_steps=ckpt_every,
        num_params=count_params(model_cfg),
        fwd_gflops_per_image=forward_flops(model_cfg) / 1e9,
        train_gflops_per_image=per_image / 1e9,
        train_flops_per_step=per_image * cfg.optim.global_batch_size,
        train_flops_total=per_image * cfg.optim.global_batch_size * total,
        minival_samples=minival_samples,
        minival_fraction=cfg.data.minival_fraction,
        train_fraction=cfg.data.train_fraction,
    )
