"""The training loop of one worker: build, restore, step, evaluate, checkpoint, track.

`train_worker(config_dict)` is what Ray Train runs on every worker (see orchestrator/train/launch.py);
`run_training(cfg, session, job)` is the same loop with an explicit Session, so it also runs without Ray.
The step itself lives in orchestrator/train/step.py. The loop hands every other concern to a component,
built before the first step by train/setup.py: the batch of each step (batches.py), the training state a
checkpoint holds (state.py; with train.ema_decay the EMA of the weights, ema.py, updated after every step), the
window's metrics and progress line (step_log.py), evaluation and checkpoints (periodic.py), the few-shot probe
(fewshot_probe.py), start-up, restarts, preemption notices and SIGTERM (group_events.py), system metrics and the
profiler (observers.py); the step timer (orchestrator/observe/step_timer.py) is handed to those that time a phase
of the step (the batch fetch, train_step, evaluation, checkpoints) and reduced by the step logger.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from orchestrator.config.parse import config_from_dict
from orchestrator.config.tree import Config
from orchestrator.train.data_counts import DataCounts
from orchestrator.train.setup import build_run
from orchestrator.train.step import train_step
from pipelines.cli import say


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
    # eval.sets as the driver checked them (orchestrator/eval/sets.py ResolvedEvalSet, as dicts)
    eval_sets: list[dict] | None = None


def train_worker(payload: dict[str, Any]) -> None:
    """Entry point on each Ray Train worker."""
    from orchestrator.train.session import RaySession

    entered = time.time()
    cfg = config_from_dict(payload["config"])
    run_training(cfg, RaySession(), Job(**payload["job"]), entered)


def run_training(cfg: Config, session, job: Job, entered: float | None = None) -> dict[str, Any]:
    run = build_run(cfg, session, job, entered)  # model, data, optimizer, restored state, components
    state, plan, tracker = run.state, run.plan, run.tracker
    first_step, final = state.step, {}
    last_epoch_counts = DataCounts()  # the unfinished epoch at the run's end: reported, not checkpointed

    # the loader (and the key trace file), system metrics and the profiler window: closed whatever ends the loop
    with run.batches, run.observers:
        while state.step < plan.total_steps:
            run.observers.before_step(state.step)
            with state.clock.step():
                batch = run.batches.next(state.step + 1)
                run.group.batch_fetched(state.step + 1)
                micro_batches = batch.micro_batches(plan.micro_batch_size)
                result = train_step(run.train_model, micro_batches, state.optimizer, state.scheduler,
                                    **run.step_kwargs(micro_batches))
                if state.ema is not None:  # train.ema_decay: ema = decay * ema + (1 - decay) * w
                    state.ema.update()
            state.step += 1
            step = state.step
            run.observers.after_step(step)
            run.group.step_done(step, tracker)
            for ended_epoch, counts in batch.ended:
                state.run_counts += counts
                run.log.epoch_counts(ended_epoch, counts, step)
            if step == plan.total_steps and (unfinished := run.batches.unfinished_epoch_counts()) is not None:
                # a resume continues this epoch and counts it whole when it ends, so it stays out of run_counts
                last_epoch_counts = unfinished
                run.log.epoch_counts(batch.epoch, unfinished, step)
            run.log.step_done(step, result, batch.epoch)
            run.group.after_window(step, tracker)

            preempted = run.group.preempted(step)  # a node is being reclaimed, or a SIGTERM: checkpoint now
            if run.evaluator.due(step) or run.checkpointer.due(step, preempted):
                # the run's figures so far (data counts summed over ranks and epochs): the driver's end summary
                report = {"step": step, "epoch": batch.epoch, **state.clock.metrics(), **run.log.run_figures(step),
                          **(state.run_counts + last_epoch_counts).metrics()}
                # a preemption's checkpoint first, the grace is short: its step does not evaluate (unless the last)
                report.update(run.evaluator.maybe_run(step, skip=preempted and step < plan.total_steps))
                run.log.exclude(run.evaluator.seconds)  # evaluation time is not training throughput
                directory = run.checkpointer.maybe_save(step, preempted)
                run.checkpointer.report(report, directory, preempted)
                final.update(report)
            final.update(run.fewshot.maybe_run(step, skip=preempted and step < plan.total_steps))  # rank 0 probes
            run.log.exclude(run.fewshot.seconds)
            if run.group.stopping and step < plan.total_steps:  # a SIGTERM: its checkpoint is committed; restart
                run.group.leave(step)  # from it, or end the run here
                break

    final["best_top1"] = run.evaluator.best_top1
    compute = {**state.clock.metrics(), **run.log.run_figures(state.step)}  # + data-wait fraction, MFU
    final.update(compute)
    if tracker and state.step > first_step:
        tracker.log_metrics(compute, state.step)  # held until the end, the last checkpoint's save included
    if tracker and not job.tracker_actor:  # a relay's leftovers are collected by the driver
        tracker.flush(force=True)  # what an outage buffered; the driver ends the run
        missing = tracker.unlogged_summary()
        if missing:
            say(f"[tracking] {missing}")
    return final

