"""Derived quantities of a run: model, batches, accumulation, steps, FLOPs. Printed by --dry-run and at start.

Every quantity derived from the config is computed here and nowhere else; the config's validation asks
`check_batch_split` (this module imports the config tree, never the reverse at import time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from model import MixerConfig, count_params, forward_flops, get_config, train_flops_per_image
from orchestrator.config.tree import Config, ConfigError, model_overrides, require

# Dense bf16 peak per accelerator (TFLOP/s), for MFU. 1,979 is H100's sparse figure, not used.
# Checked in order: the more specific names first (an H100 PCIe has a lower peak than the SXM part).
PEAK_BF16_TFLOPS = {"H100 PCIE": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name.upper():
            return value
    return None


def micro_batch_size(cfg: Config) -> int:
    """Samples per worker per forward/backward: optim.micro_batch_size, else the global batch over the workers."""
    return cfg.optim.micro_batch_size or cfg.optim.global_batch_size // cfg.scaling.num_workers


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one Ray Train worker reserves: scaling.cpus_per_worker CPUs, plus one GPU with scaling.use_gpu."""
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1.0
    return resources


def worker_group_resources(cfg: Config) -> dict[str, float]:
    """What the whole worker group reserves: scaling.num_workers x worker_resources (a tune trial's needs)."""
    return {k: v * cfg.scaling.num_workers for k, v in worker_resources(cfg).items()}


def accelerators(cfg: Config, workers: int) -> int:
    """Accelerators `workers` hold: their GPUs with scaling.use_gpu, else one per (CPU) worker."""
    return workers * int(worker_resources(cfg).get("GPU", 1))


def check_batch_split(cfg: Config) -> None:
    """The global batch must split into workers x micro batch x accumulation steps exactly (ConfigError)."""
    o, workers = cfg.optim, cfg.scaling.num_workers
    micro = micro_batch_size(cfg)
    require(micro > 0, "optim.micro_batch_size", o.micro_batch_size, "a positive integer")
    per_step = micro * workers
    require(
        o.global_batch_size % per_step == 0,
        "optim.global_batch_size",
        o.global_batch_size,
        f"a multiple of scaling.num_workers x micro batch = {workers} x {micro} = {per_step} "
        "(gradient accumulation keeps the global batch fixed, so it must divide evenly)",
    )


@dataclass
class RunPlan:
    model_cfg: MixerConfig  # the architecture, with the dataset's class count
    num_workers: int
    micro_batch_size: int  # per worker per forward/backward
    grad_accum_steps: int
    global_batch_size: int
    train_samples: int
    batches_per_rank_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    eval_every_steps: int
    checkpoint_every_steps: int
    num_params: int
    fwd_gflops_per_image: float
    train_gflops_per_image: float
    train_flops_per_step: float
    train_flops_total: float

    def describe(self) -> str:
        lines = [
            f"workers              {self.num_workers}",
            f"batch                {self.micro_batch_size} per worker x {self.num_workers} workers x "
            f"{self.grad_accum_steps} accumulation = {self.global_batch_size} global",
            f"train samples        {self.train_samples:,}",
            f"steps                {self.total_steps:,} ({self.steps_per_epoch:,} per epoch x {self.epochs:g} epochs)",
            f"eval / checkpoint    every {self.eval_every_steps:,} / {self.checkpoint_every_steps:,} steps",
            f"parameters           {self.num_params:,}",
            f"FLOPs per image      {self.fwd_gflops_per_image:.3f} G forward, {self.train_gflops_per_image:.3f} G training",
            f"FLOPs per step       {self.train_flops_per_step:.4g}",
            f"FLOPs for the run    {self.train_flops_total:.4g}",
        ]
        return "\n".join(lines)


def make_plan(
    cfg: Config, num_classes: int, train_samples: int, batches_per_rank_per_epoch: int | None = None
) -> RunPlan:
    """`batches_per_rank_per_epoch` is the data plan's exact figure; without it, an even split is assumed."""
    model_cfg = get_config(cfg.model.name, **model_overrides(cfg, num_classes))
    workers = cfg.scaling.num_workers
    micro = micro_batch_size(cfg)
    accum = cfg.optim.global_batch_size // (micro * workers)
    if batches_per_rank_per_epoch is None:
        batches_per_rank_per_epoch = train_samples // (micro * workers)
    steps_per_epoch = batches_per_rank_per_epoch // accum
    if steps_per_epoch < 1:
        raise ConfigError(
            f"optim.global_batch_size={cfg.optim.global_batch_size} is larger than one epoch of the training "
            f"split ({train_samples} samples over {workers} workers); use a smaller global batch"
        )
    total = math.ceil(steps_per_epoch * cfg.schedule.epochs)
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    eval_every = cfg.eval.every_steps or steps_per_epoch
    ckpt_every = cfg.checkpoint.every_steps or steps_per_epoch
    per_image = train_flops_per_image(model_cfg)
    return RunPlan(
        model_cfg=model_cfg,
        num_workers=workers,
        micro_batch_size=micro,
        grad_accum_steps=accum,
        global_batch_size=cfg.optim.global_batch_size,
        train_samples=train_samples,
        batches_per_rank_per_epoch=batches_per_rank_per_epoch,
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
    )
