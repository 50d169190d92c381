"""The training loop of one worker: build, restore, step, evaluate, checkpoint, track.

`train_worker(config_dict)` is what Ray Train runs on every worker (see orchestrator/train/launch.py);
`run_training(cfg, session, job)` is the same loop with an explicit Session, so it also runs without Ray.
The step itself lives in orchestrator/train/step.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from model import create_model, pretrained_data_config
from orchestrator.checkpoint.format import save_checkpoint
from orchestrator.config.checks import augment_on
from orchestrator.config.tree import Config, config_from_dict, model_overrides
from orchestrator.eval.metrics import evaluate
from orchestrator.train.checkpoints import load_agreed, rng_state, set_rng_state
from orchestrator.train.compute import ComputeClock
from orchestrator.train.data_counts import DataCounts, epoch_counts
from orchestrator.train.optim import build_optimizer, build_scheduler
from orchestrator.train.plan import (
    accelerators,
    chunk_size,
    make_plan,
    micro_batch_size,
    peak_tflops,
    stream_slots,
)
from orchestrator.train.progress import begin_group, log_restart
from orchestrator.train.startup import describe, mark, phases
from orchestrator.train.step import train_step
from pipelines.loader import ShardLoader
from pipelines.mixup import MixupConfig
from pipelines.transforms import eval_transform, train_pipeline


@dataclass
class Job:
    """What the driver resolved before launching: passed to every worker unchanged."""

    dataset_url: str
    num_classes: int
    train_samples: int
    mlflow_run_id: str | None
    tracking_uri: str | None
    storage_options: dict
    # A state_dict file (local path or fsspec URL) to start from when the run has no checkpoint yet:
    # how fine-tuning hands its adapted pretrained weights to every worker.
    init_weights_url: str | None = None
    # The driver's tracking actor (orchestrator/tracking/relay.py) rank 0 sends to; None: rank 0 logs itself.
    tracker_actor: str | None = None
    # The driver's progress ledger (orchestrator/train/progress.py): restarts, resizes, steps redone.
    progress_actor: str | None = None
    # The driver's start-up marks (orchestrator/train/startup.py); rank 0 adds its own and logs the phases.
    startup: dict | None = None


def train_worker(payload: dict[str, Any]) -> None:
    """Entry point on each Ray Train worker."""
    from orchestrator.train.session import RaySession

    entered = time.time()
    cfg = config_from_dict(payload["config"])
    run_training(cfg, RaySession(), Job(**payload["job"]), entered)


def _autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if (cfg.train.bf16 and device.type == "cuda") else None


def build_loaders(cfg: Config, job: Job, model_cfg, rank: int, world_size: int, device=None):
    data_cfg = pretrained_data_config(cfg.model.name)
    pipeline = train_pipeline(
        input_size=model_cfg.img_size, mean=data_cfg["mean"], std=data_cfg["std"],
        interpolation=data_cfg["interpolation"], preset=cfg.data.transform,
        randaug_num_ops=cfg.reg.randaug_num_ops, randaug_magnitude=cfg.reg.randaug_magnitude or None,
        randaug_impl=cfg.reg.randaug_impl, decode_on=cfg.data.decode_on,
    )
    eval_tf = eval_transform(data_cfg, input_size=model_cfg.img_size, preset=cfg.data.transform)
    loader_args = dict(
        rank=rank,
        world_size=world_size,
        num_workers=cfg.data.loader_workers,
        seed=cfg.run.seed,
        storage_options=job.storage_options,
        max_bad_fraction=cfg.data.max_bad_fraction,
        pin_memory=cfg.scaling.use_gpu,
    )
    mixup = None
    if cfg.reg.mixup_alpha > 0 or cfg.reg.label_smoothing > 0:
        mixup = MixupConfig(alpha=cfg.reg.mixup_alpha, label_smoothing=cfg.reg.label_smoothing)
    # one chunk per canonical stream slot and step, the slots shared among the ranks there are (pipelines/plan.py)
    train = ShardLoader(
        job.dataset_url, cfg.data.train_split, batch_size=chunk_size(cfg), slots=stream_slots(cfg), training=True,
        decoder=pipeline.decoder, transform=pipeline.transform, batch_stage=pipeline.batch_stage,
        augment_on=augment_on(cfg), device=device, decode_crop_on_device=pipeline.decode_crop_on_device,
        shuffle_buffer=cfg.data.shuffle_buffer, mixup=mixup, num_classes=job.num_classes,
        return_keys=bool(cfg.data.trace_keys_dir), **loader_args,
    )
    val = ShardLoader(
        job.dataset_url, cfg.data.val_split, batch_size=max(micro_batch_size(cfg), 64), transform=eval_tf,
        training=False,
        **loader_args,
    )
    return train, val


def _stream(loader: ShardLoader, start_epoch: int, resumed: bool) -> Iterator[tuple[int, Any]]:
    """Batches across epoch boundaries; the first epoch continues from the loaded position when resumed."""
    epoch = start_epoch
    while True:
        if not resumed:
            loader.set_epoch(epoch)
        resumed = False
        for batch in loader:
            yield epoch, batch
        epoch += 1


def run_training(cfg: Config, session, job: Job, entered: float | None = None) -> dict[str, Any]:
    rank, world = session.world_rank, session.world_size
    device = session.device
    clock = ComputeClock(accelerators(cfg, world))  # held from here: the worker group's start
    torch.manual_seed(cfg.run.seed * 1000 + rank)

    model = create_model(cfg.model.name, **model_overrides(cfg, job.num_classes))
    model_cfg = model.cfg
    train_loader, val_loader = build_loaders(cfg, job, model_cfg, rank, world, device)
    plan = make_plan(cfg, job.num_classes, job.train_samples, train_loader.steps_per_epoch)
    owned = train_loader.slots_owned  # this rank's stream slots: one chunk each per step

    model.to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, plan.total_steps, cfg.schedule)

    step, start_epoch, resumed, run_id = 0, 0, False, job.mlflow_run_id
    run_counts = DataCounts()  # bad/padded/dropped samples of the finished epochs, all ranks (checkpointed)
    last_epoch_counts = DataCounts()  # the unfinished epoch at the run's end: reported, not checkpointed
    restored = load_agreed(session.restore_candidates, rank, world, warn=_print_on_rank0(rank))  # one for all ranks
    if restored is None and job.init_weights_url:
        model.load_state_dict(_load_init_weights(job.init_weights_url, job.storage_options))
    if restored is not None:
        state, source = restored
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        train_loader.load_state_dict(state["data"])
        start_epoch, resumed = state["data"]["epoch"], True
        run_id = state.get("mlflow_run_id") or run_id
        clock.resume(state)
        run_counts = DataCounts.from_state(state.get("data_counts"))
        rngs = state.get("rng", [])
        if rank < len(rngs):
            set_rng_state(rngs[rank])
        if rank == 0:
            print(f"[resume] from {source.name}: step {step}, data at epoch {start_epoch} batch "
                  f"{train_loader.batches_consumed}", flush=True)
    # a restart, with or without a checkpoint to restore (the ledger knows; without one, a restored checkpoint)
    ledger, restarted = (begin_group(job.progress_actor, step, world, restored is not None) if rank == 0
                         else (None, restored is not None))

    train_model = session.prepare_model(model)
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    # a restarted group's phases start at its own entry: the driver's marks describe the first group only
    marks = {**((job.startup or {}) if not restarted else {}), "worker": entered or time.time()}
    mark(marks, "ready")
    autocast = _autocast_dtype(cfg, device)
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    tracker = _start_tracker(cfg, job, run_id) if rank == 0 else None
    if tracker:
        accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        tracker.log_params({"compute.accelerator": accelerator, "compute.peak_tflops": peak or "unknown"})
    stream = _stream(train_loader, start_epoch, resumed)
    trace = _KeyTrace(cfg.data.trace_keys_dir, rank, world) if cfg.data.trace_keys_dir else None
    final: dict[str, Any] = {}
    window_t, window_images, run_t0 = time.perf_counter(), 0, time.perf_counter()
    best_top1 = 0.0

    first_step = step
    saved_for_notice = False

    while step < plan.total_steps:
        ended: list[tuple[int, DataCounts]] = []  # epochs whose last batch this step took, with their counts
        with clock.step():
            chunks = []
            for _i in range(owned):
                epoch, batch = next(stream)
                chunks.append(batch)
                if train_loader.batches_consumed == len(train_loader):
                    # read now: the next batch's set_epoch starts new counts (a collective: all ranks are here)
                    ended.append((epoch, epoch_counts(train_loader, device)))
            if step == first_step:
                mark(marks, "first_batch")
            x = torch.cat([c[0] for c in chunks]).to(device, non_blocking=True)
            y = torch.cat([c[1] for c in chunks]).to(device, non_blocking=True)
            if trace:
                trace.write(step + 1, epoch, [k for c in chunks for k in c[2]], x)
            micro_batches = list(zip(x.split(plan.micro_batch_size), y.split(plan.micro_batch_size), strict=True))
            result = train_step(
                train_model, micro_batches, optimizer, scheduler,
                loss_kind=cfg.reg.loss, clip_norm=cfg.optim.clip_norm, autocast_dtype=autocast,
                # ranks may hold unequal shares: weights make the update the global batch's mean (step.py)
                weights=[len(mb[1]) / plan.global_batch_size * world for mb in micro_batches],
            )
        step += 1
        if ledger is not None:
            ledger.step_done.remote(step)
        if step == first_step + 1 and rank == 0:
            mark(marks, "first_step")
            startup = phases(marks)
            print(describe(startup), flush=True)
            if tracker:
                tracker.log_metrics(startup, step)
        window_images += plan.global_batch_size
        for ended_epoch, counts in ended:
            run_counts += counts
            if tracker:
                _log_epoch_counts(tracker, ended_epoch, counts, step)
        if step == plan.total_steps and 0 < train_loader.batches_consumed < len(train_loader):
            # a resume continues this epoch and counts it whole when it ends, so it stays out of run_counts
            last_epoch_counts = epoch_counts(train_loader, device)
            if tracker:
                _log_epoch_counts(tracker, epoch, last_epoch_counts, step)

        if step % cfg.train.log_every_steps == 0 or step == plan.total_steps:
            now = time.perf_counter()
            elapsed = now - window_t
            img_s = window_images / elapsed if elapsed > 0 else 0.0
            metrics = {
                "train/loss": result.loss.item(),
                "train/lr": result.lr,
                "train/grad_norm": float(result.grad_norm),
                "train/img_per_s": img_s,
                "train/img_per_s_per_device": img_s / world,
                "compute/flops": plan.train_flops_per_step * step,
                **clock.metrics(),
                "train/epoch": epoch,
            }
            if peak:
                metrics["train/mfu"] = img_s / world * plan.train_gflops_per_image * 1e9 / (peak * 1e12)
            if rank == 0:
                eta = (plan.total_steps - step) * (now - run_t0) / max(step - first_step, 1)
                print(
                    f"step {step}/{plan.total_steps} epoch {epoch} loss {metrics['train/loss']:.4f} "
                    f"lr {result.lr:.2e} {img_s:.0f} img/s ETA {eta:.0f}s",
                    flush=True,
                )
                if tracker:
                    tracker.log_metrics(metrics, step)
            window_t, window_images = time.perf_counter(), 0

        if ledger is not None and step == first_step + 1 and restarted:
            log_restart(ledger, tracker, step)
        # a node of this group is being reclaimed (a drain with reason PREEMPTION): checkpoint now, so at most
        # this step is redone. A barrier: every rank asks, every step.
        notice = session.preemption_notice()
        preempted = notice is not None and not saved_for_notice
        if preempted and rank == 0:
            print(f"[preemption] {notice}: checkpoint at step {step}", flush=True)
        saved_for_notice = saved_for_notice or preempted
        eval_due = step % plan.eval_every_steps == 0 or step == plan.total_steps
        ckpt_due = step % plan.checkpoint_every_steps == 0 or step == plan.total_steps or preempted
        if eval_due or ckpt_due:
            # the run's figures so far (data counts summed over ranks and epochs): the driver's end summary
            report: dict[str, Any] = {
                "step": step, "epoch": epoch, **clock.metrics(), **(run_counts + last_epoch_counts).metrics(),
            }
            if eval_due:
                t0 = time.perf_counter()
                val = evaluate(model, val_loader, device, autocast)
                window_t += time.perf_counter() - t0  # evaluation time is not training throughput
                best_top1 = max(best_top1, val["top1"])
                report.update({"val/top1": val["top1"], "val/top5": val["top5"], "val/loss": val["loss"]})
                if rank == 0:
                    print(f"eval step {step}: top-1 {val['top1']:.4f} top-5 {val['top5']:.4f} "
                          f"loss {val['loss']:.4f} ({val['count']} images)", flush=True)
                    if tracker:
                        tracker.log_metrics({
                            **{k: v for k, v in report.items() if k.startswith("val/")},
                            "compute/flops": plan.train_flops_per_step * step,
                            **clock.metrics(),
                        }, step)
            ckpt_dir = None
            if ckpt_due:
                rngs, data_states = _gather((rng_state(), train_loader.state_dict()), world)
                if rank == 0:
                    ckpt_dir = session.staging_dir()
                    save_checkpoint(ckpt_dir, {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "step": step,
                        # every rank's stream position, so a resume skips read samples without decoding them
                        "data": ShardLoader.merge_state_dicts(data_states),
                        "rng": rngs,
                        "mlflow_run_id": run_id,
                        **clock.state(),  # accelerator_hours (held), productive_hours
                        "data_counts": run_counts.state(),
                        "config": cfg.to_dict(),
                    })
            session.report(report, ckpt_dir)
            if preempted:
                session.wait_for_checkpoints()  # uploaded and registered before the node can go
            final.update(report)

    final["best_top1"] = best_top1
    compute = clock.metrics()
    final.update(compute)
    if tracker and step > first_step:
        tracker.log_metrics(compute, step)  # held until the end, the last checkpoint's save included
    if tracker and not job.tracker_actor:  # a relay's leftovers are collected by the driver
        tracker.flush(force=True)  # what an outage buffered; the driver ends the run
        missing = tracker.unlogged_summary()
        if missing:
            print(f"[tracking] {missing}", flush=True)
    return final


def _log_epoch_counts(tracker, epoch: int, counts: DataCounts, step: int) -> None:
    """An epoch's bad/padded/dropped samples (all ranks) at the step that took its last batch."""
    tracker.log_metrics({**counts.metrics(), "data/epoch": epoch}, step)
    worst = counts.worst_shards_tag(epoch)
    if worst:
        tracker.set_tags(worst)


def _print_on_rank0(rank: int):
    return (lambda message: print(message, flush=True)) if rank == 0 else (lambda message: None)


def _load_init_weights(url: str, storage_options: dict) -> dict:
    import io

    from pipelines.storage import read_bytes

    return torch.load(io.BytesIO(read_bytes(url, storage_options)), map_location="cpu", weights_only=True)


class _KeyTrace:
    """Debug aid (data.trace_keys_dir): each rank appends the sample keys of every batch it trains on."""

    def __init__(self, directory: str, rank: int, world: int):
        from pathlib import Path

        Path(directory).mkdir(parents=True, exist_ok=True)
        self.world = world
        self.file = open(Path(directory) / f"rank{rank}.jsonl", "a", buffering=1)  # noqa: SIM115

    def write(self, step: int, epoch: int, keys: list[str], images: torch.Tensor) -> None:
        import hashlib
        import json

        pixels = hashlib.sha1(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()  # augmented pixels
        self.file.write(json.dumps({"step": step, "epoch": epoch, "keys": list(keys), "pixels": pixels,
                                    "world": self.world, "time": time.time()}) + "\n")


def _gather(mine: tuple, world: int) -> tuple[list, list]:
    """Every rank's (rng state, data position), transposed into two lists indexed by rank."""
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        gathered = [mine]
    else:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    return [g[0] for g in gathered], [g[1] for g in gathered]


def _start_tracker(cfg: Config, job: Job, run_id: str | None):
    """Rank 0 logs metrics into the run the driver created (or the one the checkpoint names): through the
    driver's actor when there is one, so what an outage buffers outlives this worker."""
    if not cfg.tracking.enabled or run_id is None:
        return None
    if job.tracker_actor:
        from orchestrator.tracking.relay import RelayedTracker

        return RelayedTracker(job.tracker_actor)
    from orchestrator.tracking.tracker import RunTracker

    tracker = RunTracker(job.tracking_uri, cfg.tracking.experiment, cfg.run.name, run_id=run_id)
    tracker.start()
    return tracker
