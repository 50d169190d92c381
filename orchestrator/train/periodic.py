"""The loop's periodic moments: evaluation and checkpoints, each deciding when it is due.

`Evaluator.maybe_run` measures the held-out split on every rank (counts summed across ranks), prints and logs
on rank 0, and keeps the best top-1. `Checkpointer.maybe_save` writes the training state (train/state.py)
on schedule, at the end, or at once when a node of the group is being reclaimed, then hands it to the session
(Ray Train's report, a barrier on every rank); a preemption checkpoint is waited for until it is committed.
Both run in the step timer's phases (`eval`; `checkpoint`: the gather, the save and the report).
`Periodic` is the frame the evaluation and the few-shot probe (train/fewshot_probe.py) share: due every N
steps and at the last, skipped on request, run in the `eval` phase, its wall time kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from orchestrator.eval.metrics import evaluate
from orchestrator.observe.step_timer import StepTimer
from orchestrator.train.state import TrainingState
from pipelines.cli import say


class Periodic:
    """A moment of the loop due every `every` steps and at the last (`total_steps`), run in the step timer's
    `eval` phase; `seconds` is the last run's wall time, 0.0 when it did not run (not training throughput)."""

    def __init__(self, every: int, total_steps: int, timer: StepTimer | None = None):
        self.every, self.total_steps = every, total_steps
        self.timer = timer or StepTimer(enabled=False)
        self.seconds = 0.0

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def run_if_due(self, step: int, skip: bool,
                   body: Callable[[float], dict[str, float]]) -> dict[str, float] | None:
        """`body(t0)` (t0: the perf_counter it started at) in the phase when due and not skipped, timed into
        `seconds`; None when it did not run (every rank decides alike)."""
        self.seconds = 0.0
        if skip or not self.due(step):
            return None
        t0 = time.perf_counter()
        with self.timer.phase("eval"):
            out = body(t0)
        self.seconds = time.perf_counter() - t0
        return out


class Evaluator(Periodic):
    """Evaluates every named set (`val` first; `minival`, the `eval.sets`, ... beside it) when due. `select_on` names
    the set whose top-1 is the run's `best_top1`: the figure choices are made on (minival when the run holds one).
    `ema`: the EMA of the weights (train/ema.py), evaluated on every set after the raw weights as `ema/<set>/*`.
    `seconds`: the last evaluation's wall time (not training throughput)."""

    def __init__(self, model: torch.nn.Module, sets: Mapping[str, Iterable], device: torch.device,
                 autocast: torch.dtype | None, every: int, total_steps: int, rank: int, tracker,
                 compute: Callable[[int], dict[str, float]], timer: StepTimer | None = None, select_on: str = "val",
                 ema: torch.nn.Module | None = None):
        if select_on not in sets:
            raise ValueError(f"select_on={select_on!r} is not among the evaluated sets {list(sets)}")
        super().__init__(every, total_steps, timer)
        self.compute = compute  # the run's compute at a step, logged beside the evaluation
        self.model, self.sets, self.device, self.autocast = model, dict(sets), device, autocast
        self.rank, self.tracker = rank, tracker
        self.select_on = select_on
        self.ema = ema
        self.best_top1 = 0.0

    def maybe_run(self, step: int, skip: bool = False) -> dict[str, float]:
        """`<set>/top1|top5|loss` (and `ema/<set>/...`) of every set when due and not skipped (a collective: every rank decides alike),
        else {}."""
        out = self.run_if_due(step, skip, lambda t0: self._evaluate(step))
        if out is None:
            return {}
        self.best_top1 = max(self.best_top1, out[f"{self.select_on}/top1"])
        if self.rank == 0 and self.tracker:
            self.tracker.log_metrics({**out, **self.compute(step)}, step)
        return out

    def _evaluate(self, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, loader in self.sets.items():
            result = evaluate(self.model, loader, self.device, self.autocast)
            out.update({f"{name}/{k}": result[k] for k in ("top1", "top5", "loss")})
            if self.rank == 0:
                where = "" if name == "val" else f" {name}"  # the val line reads as it always has
                say(f"eval step {step}{where}: top-1 {result['top1']:.4f} top-5 {result['top5']:.4f} "
                    f"loss {result['loss']:.4f} ({result['count']} images)")
            if self.ema is not None:  # best_top1 stays the raw weights'
                ema = evaluate(self.ema, loader, self.device, self.autocast)
                out.update({f"ema/{name}/{k}": ema[k] for k in ("top1", "top5", "loss")})
                if self.rank == 0:
                    say(f"eval step {step} ema {name}: top-1 {ema['top1']:.4f} top-5 {ema['top5']:.4f} "
                        f"loss {ema['loss']:.4f} ({ema['count']} images)")
        return out


class Checkpointer:
    def __init__(self, session, state: TrainingState, every: int, total_steps: int, rank: int, world: int,
                 config: dict[str, Any], timer: StepTimer | None = None):
        self.session, self.state = session, state
        self.every, self.total_steps, self.rank, self.world = every, total_steps, rank, world
        self.config = config
        self.timer = timer or StepTimer(enabled=False)

    def due(self, step: int, preempted: bool) -> bool:
        return step % self.every == 0 or step == self.total_steps or preempted

    def maybe_save(self, step: int, preempted: bool) -> str | None:
        """The checkpoint's staging directory on rank 0 when one was written this step (a collective), else None."""
        if not self.due(step, preempted):
            return None
        with self.timer.phase("checkpoint"):
            directory = self.session.staging_dir() if self.rank == 0 else None
            self.state.save(directory, self.world, self.rank, self.config)
        return directory

    def report(self, report: dict[str, Any], directory, preempted: bool) -> None:
        """Hand the step's figures (and checkpoint) to the session: every rank, the same number of times."""
        with self.timer.phase("checkpoint"):
            self.session.report(report, directory)
            if preempted:
                self.session.wait_for_checkpoints()  # uploaded and registered before the node can go
