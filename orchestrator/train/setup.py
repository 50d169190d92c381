"""Everything a worker builds before its first step: model, data, optimizer, restored state, components.

`build_run` returns a `Run` holding the loop's components (train/loop.py reads as the loop over them):
the training state (train/state.py), the batch fetcher (train/batches.py), the step logger
(train/step_log.py), the evaluator and checkpointer (train/periodic.py), the group's events
(train/group_events.py), the step timer they all time their phases with (observe/step_timer.py), the
observers (train/observers.py: system metrics, profiler) and rank 0's tracker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from model import create_model
from orchestrator.config.checks import selection_split
from orchestrator.config.tree import Config, model_overrides
from orchestrator.observe.step_timer import StepTimer
from orchestrator.train.batches import (
    BatchFetcher,
    KeyTrace,
    build_eval_sets,
    build_loaders,
    build_probe_loaders,
    input_permutation,
    permuted,
    time_device_stage,
)
from orchestrator.train.compute import ComputeClock
from orchestrator.train.ema import WeightEma
from orchestrator.train.fewshot_probe import FewShotProbe
from orchestrator.train.group_events import GroupEvents
from orchestrator.train.observers import Observers, build_observers
from orchestrator.train.optim import build_optimizer, build_scheduler
from orchestrator.train.periodic import Checkpointer, Evaluator
from orchestrator.train.plan import RunPlan, accelerators, make_plan, peak_tflops
from orchestrator.train.state import TrainingState
from orchestrator.train.step_log import StepLogger
from pipelines.cli import say


@dataclass
class Run:
    cfg: Config
    plan: RunPlan
    state: TrainingState
    train_model: torch.nn.Module  # the model as trained: DDP-wrapped, compiled (state.model is the plain one)
    batches: BatchFetcher
    log: StepLogger
    evaluator: Evaluator
    fewshot: FewShotProbe
    checkpointer: Checkpointer
    group: GroupEvents
    tracker: Any  # rank 0's RunTracker / RelayedTracker, else None
    autocast: torch.dtype | None
    world: int
    timer: StepTimer
    observers: Observers

    def step_kwargs(self, micro_batches) -> dict[str, Any]:
        """train_step's settings; ranks may hold unequal shares: weights make the update the global batch's mean."""
        return dict(loss_kind=self.cfg.reg.loss, clip_norm=self.cfg.optim.clip_norm, autocast_dtype=self.autocast,
                    weights=[len(mb[1]) / self.plan.global_batch_size * self.world for mb in micro_batches],
                    timer=self.timer)


def build_run(cfg: Config, session, job, entered: float | None = None) -> Run:
    rank, world = session.world_rank, session.world_size
    device = session.device
    clock = ComputeClock(accelerators(cfg, world))  # held from here: the worker group's start
    torch.manual_seed(cfg.run.seed * 1000 + rank)

    model = create_model(cfg.model.name, **model_overrides(cfg, job.num_classes))
    train_loader, eval_sets = build_loaders(cfg, job, model.cfg, rank, world, device)
    permute = input_permutation(cfg, model.cfg)  # eval.sets see data.permute's permutation too, as val does
    eval_sets.update({name: permuted(s, permute, device)  # + eval.sets, after val (and minival)
                      for name, s in build_eval_sets(cfg, job, model.cfg, rank, world).items()})
    plan = make_plan(cfg, job.num_classes, job.train_samples, train_loader.steps_per_epoch)
    model.to(device)
    optimizer = build_optimizer(model, cfg.optim)
    ema = WeightEma(model, cfg.train.ema_decay) if cfg.train.ema_decay else None  # of the plain model
    state = TrainingState(model, optimizer, build_scheduler(optimizer, plan.total_steps, cfg.schedule),
                          train_loader, clock, job.mlflow_run_id, ema=ema)
    restored = state.restore(session, rank, world, log=_print_on_rank0(rank))  # one checkpoint for all ranks
    if not restored and job.init_weights_url:
        state.load_init_weights(job.init_weights_url, job.storage_options)
    group = GroupEvents(session, job, rank, world, state.step, restored, entered,
                        on_sigterm=cfg.checkpoint.on_sigterm, sigterm_grace_s=cfg.checkpoint.sigterm_grace_s)

    train_model = session.prepare_model(model)
    if ema is not None and not ema.restored:  # from the weights every rank now holds (DDP broadcast rank 0's)
        ema.reset()
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    group.ready()
    autocast = torch.bfloat16 if (cfg.train.bf16 and device.type == "cuda") else None
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    tracker = start_tracker(cfg, job, state.run_id) if rank == 0 else None
    if tracker:
        accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        tracker.log_params({"compute.accelerator": accelerator, "compute.peak_tflops": peak or "unknown"})
    trace = KeyTrace(cfg.data.trace_keys_dir, rank, world) if cfg.data.trace_keys_dir else None
    permutation = input_permutation(cfg, model.cfg)  # build_loaders applied the same one to the evaluation sets
    if permutation and rank == 0:
        say(f"[data] {permutation.describe()}")
    observers = build_observers(cfg, session, job, state.run_id, device, tracker, current_step=lambda: state.step)
    probe_loaders = build_probe_loaders(cfg, job, model.cfg) if rank == 0 and cfg.eval.fewshot_every_steps else None
    timer = StepTimer(device, cfg.observe.step_breakdown)  # last: its first window starts with the loop
    time_device_stage(train_loader, timer)
    if ema is not None:
        ema.timer = timer  # its update is optimizer work
    return Run(
        cfg=cfg, plan=plan, state=state, train_model=train_model,
        batches=BatchFetcher(train_loader, device, state.start_epoch, state.resumed, trace, timer,
                             cfg.observe.data_delay_s, permutation),
        log=StepLogger(plan, clock, cfg.train.log_every_steps, rank, world, tracker, state.step, peak, timer),
        evaluator=Evaluator(model, eval_sets, device, autocast, plan.eval_every_steps, plan.total_steps, rank,
                            tracker, compute=lambda step: {"compute/flops": plan.train_flops_per_step * step,
                                                           **clock.metrics()}, timer=timer,
                            select_on=selection_split(cfg), ema=ema.module if ema is not None else None),
        fewshot=FewShotProbe(model, probe_loaders, device, autocast, cfg.eval.fewshot_every_steps, plan.total_steps,
                             rank, tracker, session, job.num_classes, cfg.eval.fewshot_shots, timer),
        checkpointer=Checkpointer(session, state, plan.checkpoint_every_steps, plan.total_steps, rank, world,
                                  cfg.to_dict(), timer),
        group=group, tracker=tracker, autocast=autocast, world=world, timer=timer, observers=observers,
    )


def _print_on_rank0(rank: int):
    return say if rank == 0 else (lambda message: None)


def start_tracker(cfg: Config, job, run_id: str | None):
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


