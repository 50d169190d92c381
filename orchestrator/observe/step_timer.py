"""Where a training step's time goes, per logging window, over all ranks: data wait, forward+backward, optimizer,
device augmentation, evaluation, checkpoint; and the headline, the fraction of the window spent waiting for data.

    timer = StepTimer(device, enabled=cfg.observe.step_breakdown)   # just before the loop
    with timer.phase("data_wait"):           # fetching the batch and its host->device copy
        batch = next(stream); x = x.to(device, non_blocking=True)
    train_step(..., timer=timer)             # forward_backward, then optimizer (orchestrator/train/step.py)
    timer.step_done()
    ...
    metrics.update(timer.window_metrics())   # every rank, at every logging window: a collective

How time is taken. On CUDA each phase records a pair of torch.cuda.Event on the current stream and nothing
waits; window_metrics() synchronises once, on the window's last event, and reads the pairs. An event pair times
the stream, not the host: for `data_wait` it is the time the GPU sat between finishing the previous work and the
batch's copy, i.e. how long the accelerator was starved, not how long the host call took (the host usually runs
ahead of the GPU, and a slow fetch that the GPU never waits for costs nothing). Elsewhere, time.perf_counter().
A phase opened inside another is subtracted from the outer one (a loader's device stage inside data_wait counts
as device_augment only), so the phases and `other` add up to the step time.

Figures (keys under perf/), each in seconds per training step averaged over the window: the window's total
for the phase divided by its steps. Evaluation and checkpoints, which happen every N steps, are thus their cost
spread over the steps of the window they fell in.
    perf/<phase>_seconds_mean, perf/<phase>_seconds_max   the mean and the max over ranks, for every phase in
                                                          PHASES and `other` (the loop's remaining time)
    perf/step_seconds                                     window wall time / steps (max over ranks)
    perf/data_wait_fraction                               data wait / window wall time, in [0, 1]; the max
                                                          over ranks: in data-parallel training every rank
                                                          waits for the slowest one, so the most starved rank
                                                          sets the pace. perf/data_wait_fraction_mean: mean.

The gradient all-reduce is not a phase of its own: DistributedDataParallel runs it on its own stream during
backward, bucket by bucket, and the backward waits for the last bucket before it returns, so forward_backward
holds the compute plus whatever communication backward could not hide (the exposed part). Separating it would
mean no_sync on every step and an explicit all-reduce (which changes what is measured), or a comm hook timing
buckets on the communication stream (events there time the bucket, not the wait): neither says more than
forward_backward at world size N vs world size 1, which is how the README reads it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

PHASES = ("data_wait", "forward_backward", "optimizer", "device_augment", "eval", "checkpoint")
OTHER = "other"  # the window's time in no phase: the loop's own work (logging, barriers, bookkeeping)


class _NoPhase:
    """The disabled timer's phase: does nothing (one shared instance)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_NO_PHASE = _NoPhase()


class _Phase:
    """`with timer.phase(name):` — reusable: the open intervals live on the timer's stack."""

    __slots__ = ("timer", "name")

    def __init__(self, timer: StepTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.timer._open(self.name)

    def __exit__(self, *exc: Any) -> None:
        self.timer._close(self.name)


class StepTimer:
    """Named phases of each training step, reduced over ranks once per logging window (see the module doc).

    With enabled=False every call is a cheap no-op and window_metrics() returns {}.
    """

    def __init__(self, device: torch.device | str = "cpu", enabled: bool = True):
        self.device = torch.device(device)
        self.enabled = enabled
        self.on_cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._phases = {name: _Phase(self, name) for name in PHASES}
        self._open_phases: list[tuple[str, Any]] = []  # (name, start): perf_counter() or a recorded event
        self._totals = dict.fromkeys(PHASES, 0.0)  # host timing: seconds, settled at each close
        self._recorded: list[tuple[str, str | None, Any, Any]] = []  # CUDA: (name, parent, start, end) events
        self._free_events: list = []
        self._steps = 0
        self._run_wait = 0.0  # over the run's windows: seconds of data wait (most starved rank) and wall time
        self._run_wall = 0.0
        if enabled:
            self._window_start = self._now()

    # ------------------------------------------------------------------ the hot path

    def phase(self, name: str):
        """A context manager timing `name` (one of PHASES) on this rank."""
        if not self.enabled:
            return _NO_PHASE
        try:
            return self._phases[name]
        except KeyError:
            raise ValueError(f"unknown step phase {name!r}; phases: {', '.join(PHASES)}") from None

    def timed(self, name: str, fn: Callable) -> Callable:
        """`fn` wrapped in phase `name` (e.g. a loader's device stage); `fn` itself when disabled."""
        if not self.enabled:
            return fn
        phase = self.phase(name)

        def timed_fn(*args, **kwargs):
            with phase:
                return fn(*args, **kwargs)

        return timed_fn

    def step_done(self) -> None:
        """Count one training step of the current window."""
        self._steps += 1

    def _now(self):
        if not self.on_cuda:
            return time.perf_counter()
        event = self._free_events.pop() if self._free_events else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _open(self, name: str) -> None:
        self._open_phases.append((name, self._now()))

    def _close(self, name: str) -> None:
        end = self._now()
        opened, start = self._open_phases.pop()
        if opened != name:  # pragma: no cover - a with-block cannot interleave; guards a manual misuse
            raise RuntimeError(f"step phase {name!r} closed while {opened!r} was open")
        parent = self._open_phases[-1][0] if self._open_phases else None
        if self.on_cuda:
            self._recorded.append((name, parent, start, end))
            return
        seconds = end - start
        self._totals[name] += seconds
        if parent is not None:
            self._totals[parent] -= seconds

    # ------------------------------------------------------------------ once per logging window

    def window_metrics(self) -> dict[str, float]:
        """The window's figures (module doc), reduced over ranks, then a new window starts. A collective when
        torch.distributed is initialised: every rank calls it at the same steps."""
        if not self.enabled:
            return {}
        end = self._now()
        if self.on_cuda:
            end.synchronize()  # the one wait of the window: every event before it has completed
            wall = self._window_start.elapsed_time(end) / 1000
            for name, parent, start, stop in self._recorded:
                seconds = start.elapsed_time(stop) / 1000
                self._totals[name] += seconds
                if parent is not None:
                    self._totals[parent] -= seconds
                self._free_events += [start, stop]
            self._recorded.clear()
            self._free_events.append(self._window_start)
        else:
            wall = end - self._window_start
        steps = max(self._steps, 1)
        per_step = [max(self._totals[p], 0.0) / steps for p in PHASES]
        step_seconds = wall / steps
        other = max(step_seconds - sum(per_step), 0.0)
        fraction = min(max(self._totals["data_wait"] / wall, 0.0), 1.0) if wall > 0 else 0.0
        local = per_step + [other, step_seconds, fraction]
        mean, top = self._reduce(local)
        names = [*PHASES, OTHER]
        out = {f"perf/{n}_seconds_mean": mean[i] for i, n in enumerate(names)}
        out.update({f"perf/{n}_seconds_max": top[i] for i, n in enumerate(names)})
        out["perf/step_seconds"] = top[len(names)]
        out["perf/data_wait_fraction"] = top[len(names) + 1]
        out["perf/data_wait_fraction_mean"] = mean[len(names) + 1]
        window_wall = top[len(names)] * steps
        self._run_wait += out["perf/data_wait_fraction"] * window_wall
        self._run_wall += window_wall
        self._totals = dict.fromkeys(PHASES, 0.0)
        self._steps = 0
        self._window_start = end  # the next window starts where this one ended: no time falls between
        return out

    def _reduce(self, values: list[float]) -> tuple[list[float], list[float]]:
        """(mean, max) of each value over the ranks (this rank's values when not distributed)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return values, values
        device = self.device if self.on_cuda else torch.device("cpu")  # NCCL reduces CUDA tensors only
        total = torch.tensor(values, dtype=torch.float64, device=device)
        top = total.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        world = dist.get_world_size()
        return (total / world).tolist(), top.tolist()

    def run_data_wait_fraction(self) -> float | None:
        """The run's data-wait fraction so far (windows weighted by their wall time, most starved rank), for
        the end summary; None before the first window."""
        return self._run_wait / self._run_wall if self._run_wall > 0 else None


def delayed(batches: Iterator, seconds: float) -> Iterator:
    """observe.data_delay_s: each item of `batches` `seconds` later, a loader slowed on purpose (how the tests
    show that perf/data_wait_fraction rises when the input is the bottleneck). `batches` itself when 0."""
    if seconds <= 0:
        return batches
    return _delayed(batches, seconds)


def _delayed(batches: Iterator, seconds: float) -> Iterator:
    for item in batches:
        time.sleep(seconds)
        yield item
