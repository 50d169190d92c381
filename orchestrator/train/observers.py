"""The loop's observers: the node's system-metrics sampler and rank 0's profiler window (orchestrator/observe/).

    with run.observers:                  # starts the sampler; whatever ends the loop, stops it and the profiler
        while ...:
            run.observers.before_step(step)
            ... the step ...
            run.observers.after_step(step + 1)

- System metrics (observe.system_metrics): one sampler per node, on the node's local rank 0, when the run is
  tracked. Under Ray every node's sampler sends through the driver's relay actor (orchestrator/tracking/relay.py;
  an outage loses nothing) from its own thread. Where rank 0 logs itself (no relay: a LocalSession run) the
  sampler keeps its samples and after_step sends them from the loop's thread, as RunTracker is single-threaded.
  Samples carry the run's global step of the moment.
- Profiler (observe.profile_steps): rank 0 only; when the window closes its files are logged under profile/
  (through the relay they travel as bytes: the actor is on the driver's node). Off, nothing is made.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from orchestrator.config.tree import Config
from orchestrator.observe.profiler import ProfileWindow, profile_window
from orchestrator.observe.system_metrics import SystemMetricsSampler
from pipelines.cli import first_line, say

PROFILE_ARTIFACT_DIR = "profile"

logger = logging.getLogger(__name__)


class Observers:
    def __init__(self, sampler: SystemMetricsSampler | None, window: ProfileWindow | None, tracker,
                 relay=None):
        self.sampler, self.window, self.tracker = sampler, window, tracker
        self.relay = relay  # the sampler's RelayedTracker, when it sends through the driver's actor

    def __enter__(self) -> Observers:
        if self.sampler:
            self.sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.window:
                self._log_profile(self.window.close())  # the loop stopped inside the window: what it profiled
        finally:
            if self.sampler:
                self.sampler.stop()  # joins the thread; one last sample
                self._send_kept()
            if self.relay:
                self.relay.sync()  # the actor has every sample before the worker returns

    def before_step(self, step: int) -> None:
        """`step`: the steps completed so far."""
        if self.window:
            self._profiling(self.window.before_step, step)

    def after_step(self, step: int) -> None:
        """`step`: the steps completed now."""
        if self.window and (files := self._profiling(self.window.after_step, step)):
            self._profiling(self._log_profile, files)
        self._send_kept()

    def _profiling(self, fn, arg):
        """A diagnostic must not end the run (rank 0 alone would fail, the others wait in a collective): a
        profiler that cannot start, write (a full disk) or hand over its files is a warning, and is switched off."""
        try:
            return fn(arg)
        except Exception as e:  # noqa: BLE001
            logger.warning("[profile] switched off: %s: %s", type(e).__name__, first_line(e))
            self.window = None
            return None

    def _send_kept(self) -> None:
        if self.sampler and self.sampler.sink is None:
            for metrics, step in self.sampler.take_samples():
                self.tracker.log_metrics(metrics, step)

    def _log_profile(self, files: list[Path]) -> None:
        if not files:
            return
        where = f"logged to MLflow under {PROFILE_ARTIFACT_DIR}/" if self.tracker else "not logged (no tracking)"
        say(f"[profile] steps {self.window.start_step + 1}-{self.window.stop_step}: "
            f"{', '.join(f.name for f in files)} in {files[0].parent}, {where}")
        for f in files if self.tracker else []:
            self.tracker.log_artifact(str(f), PROFILE_ARTIFACT_DIR)


def build_observers(cfg: Config, session, job, run_id: str | None, device: torch.device, tracker,
                    current_step: Callable[[], int]) -> Observers:
    """The sampler of this worker's node (its local rank 0, when the run is tracked) and, on rank 0, the profiler
    window; `tracker` is rank 0's (None elsewhere)."""
    ob = cfg.observe
    sampler, relay = None, None
    tracked = cfg.tracking.enabled and run_id is not None
    if ob.system_metrics and tracked and session.local_rank == 0:
        if job.tracker_actor:
            from orchestrator.tracking.relay import RelayedTracker

            relay = tracker if tracker is not None else RelayedTracker(job.tracker_actor)
            sampler = SystemMetricsSampler(session.node_rank, relay.log_metrics, current_step,
                                           ob.system_metrics_interval_s)
        elif tracker is not None:  # rank 0 logs itself: the loop's thread sends the kept samples
            sampler = SystemMetricsSampler(session.node_rank, None, current_step, ob.system_metrics_interval_s)
    window = None
    if session.world_rank == 0:  # the directory is made only when the window writes its files
        out_dir = Path(tempfile.gettempdir()) / f"mixer-profile-{run_id or cfg.run.name}-{os.getpid()}"
        window = profile_window(ob.profile_steps, out_dir, device)
    return Observers(sampler, window, tracker, relay)
