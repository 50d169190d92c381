"""The loop's metrics per logging window: loss, lr, throughput, MFU, compute, the step-time breakdown, and each
epoch's data counts.

Rank 0 prints the progress line (`step N/M epoch E loss ... img/s ETA ...`) and logs the window's metrics;
time spent evaluating is taken out of the window, so img/s is training throughput. The step timer's figures
(perf/*, orchestrator/observe/step_timer.py) are reduced over the ranks at every window end: every rank calls
step_done at every step, so they all reach that collective together.
"""

from __future__ import annotations

import time
from typing import Any

from orchestrator.observe.step_timer import StepTimer
from orchestrator.train.compute import ComputeClock
from orchestrator.train.data_counts import DataCounts
from orchestrator.train.plan import RunPlan
from orchestrator.train.step import StepResult
from pipelines.cli import say


class StepLogger:
    def __init__(self, plan: RunPlan, clock: ComputeClock, every: int, rank: int, world: int, tracker,
                 first_step: int, peak_tflops: float | None, timer: StepTimer | None = None):
        self.plan, self.clock, self.every = plan, clock, every
        self.rank, self.world, self.tracker = rank, world, tracker
        self.first_step, self.peak = first_step, peak_tflops
        self.timer = timer or StepTimer(enabled=False)
        self.window_t = self.run_t0 = time.perf_counter()
        self.window_images = 0

    def exclude(self, seconds: float) -> None:
        """Time that is not training throughput (evaluation)."""
        self.window_t += seconds

    def step_done(self, step: int, result: StepResult, epoch: int) -> dict[str, Any] | None:
        """Count the step's images; at the end of a window return (and on rank 0 print and log) its metrics.
        Every rank, every step: the window's step-time breakdown is a collective."""
        self.window_images += self.plan.global_batch_size
        self.timer.step_done()
        if step % self.every != 0 and step != self.plan.total_steps:
            return None
        now = time.perf_counter()
        elapsed = now - self.window_t
        img_s = self.window_images / elapsed if elapsed > 0 else 0.0
        metrics = {
            "train/loss": result.loss.item(),
            "train/lr": result.lr,
            "train/grad_norm": float(result.grad_norm),
            "train/img_per_s": img_s,
            "train/img_per_s_per_device": img_s / self.world,
            "compute/flops": self.plan.train_flops_per_step * step,
            **self.clock.metrics(),
            "train/epoch": epoch,
        }
        if self.peak:
            metrics["train/mfu"] = img_s / self.world * self.plan.train_gflops_per_image * 1e9 / (self.peak * 1e12)
        metrics.update(self.timer.window_metrics())  # perf/*, reduced over the ranks
        if self.rank == 0:
            eta = (self.plan.total_steps - step) * (now - self.run_t0) / max(step - self.first_step, 1)
            say(
                f"step {step}/{self.plan.total_steps} epoch {epoch} loss {metrics['train/loss']:.4f} "
                f"lr {result.lr:.2e} {img_s:.0f} img/s ETA {eta:.0f}s",
            )
            if self.tracker:
                self.tracker.log_metrics(metrics, step)
        self.window_t, self.window_images = time.perf_counter(), 0
        return metrics

    def run_figures(self, step: int) -> dict[str, float]:
        """This attempt's data-wait fraction (its windows, weighted by wall time) and the run's MFU (the FLOPs of
        `step` steps over the productive accelerator-time, checkpointed across restarts), where known: the end
        summary's and `orchestrator.report`'s per-run figures."""
        out = {}
        fraction = self.timer.run_data_wait_fraction()
        if fraction is not None:
            out["perf/run_data_wait_fraction"] = fraction
        seconds = self.clock.productive_hours() * 3600
        if self.peak and seconds > 0:
            out["train/run_mfu"] = self.plan.train_flops_per_step * step / seconds / (self.peak * 1e12)
        return out

    def epoch_counts(self, epoch: int, counts: DataCounts, step: int) -> None:
        """An epoch's bad/padded/dropped samples (all ranks) at the step that took its last batch."""
        if not self.tracker:
            return
        self.tracker.log_metrics({**counts.metrics(), "data/epoch": epoch}, step)
        worst = counts.worst_shards_tag(epoch)
        if worst:
            self.tracker.set_tags(worst)
