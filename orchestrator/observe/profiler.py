"""torch.profiler over a window of training steps, on one rank, writing files to log as MLflow artifacts.

    window = profile_window(cfg.observe.profile_steps, out_dir, device)   # rank 0 only; None when off
    while step < total_steps:
        if window: window.before_step(step)                # `step`: steps completed so far
        ... one training step ...; step += 1
        if window and (files := window.after_step(step)):  # the window closed: log files under profile/
            for f in files: tracker.log_artifact(str(f), "profile")

profile_steps=[start, stop] profiles the steps that take the run from `start` completed steps to `stop`
(stop - start steps; the loop's logged step numbers start+1 .. stop). A run resumed inside the window profiles
what is left of it; one resumed after it profiles nothing. Activities: CPU, plus CUDA on a CUDA device;
record_shapes and profile_memory on. Written into `out_dir` when the window closes:
    trace.json              Chrome trace (chrome://tracing, https://ui.perfetto.dev)
    key_averages.txt        the operators' table, by self time on the device (CUDA) or CPU
    memory_snapshot.pickle  CUDA only: the caching allocator's history over the window, for
                            https://pytorch.org/memory_viz. Taken with torch.cuda.memory._record_memory_history
                            and _dump_snapshot: underscore names, but the way PyTorch's own guide
                            ("Understanding CUDA Memory Usage") documents, and what the deprecation of the public
                            profiler.export_memory_timeline points to. If a PyTorch release drops them, the
                            snapshot is left out with a warning; the trace and table are still written.
Off (profile_steps null): no object is made, the loop's `if window:` is the whole cost.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TRACE_FILE, TABLE_FILE, MEMORY_FILE = "trace.json", "key_averages.txt", "memory_snapshot.pickle"
MEMORY_HISTORY_ENTRIES = 100_000  # allocator events kept for the snapshot (several KB each)
TABLE_ROWS = 60


def profile_window(profile_steps: list[int] | None, out_dir: str | Path,
                   device: torch.device | str) -> ProfileWindow | None:
    """The window `profile_steps` asks for (observe.profile_steps), or None when it is null."""
    if not profile_steps:
        return None
    start, stop = profile_steps
    return ProfileWindow(start, stop, out_dir, device)


class ProfileWindow:
    """Profiles the steps from `start_step` completed steps to `stop_step` (see the module doc)."""

    def __init__(self, start_step: int, stop_step: int, out_dir: str | Path, device: torch.device | str):
        if not 0 <= start_step < stop_step:
            raise ValueError(f"profile window [{start_step}, {stop_step}]: expected 0 <= start < stop")
        self.start_step, self.stop_step = start_step, stop_step
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._profile: torch.profiler.profile | None = None
        self._recording_memory = False
        self._step_span = None  # the current step's record_function, while profiling
        self.files: list[Path] = []  # what the window wrote, once closed
        self.done = False

    @property
    def active(self) -> bool:
        return self._profile is not None

    def before_step(self, step: int) -> None:
        """Call before each step with the number of steps completed so far: starts the profiler when the
        window begins (or, on a run resumed inside the window, at the first step)."""
        if self.done or not self.start_step <= step < self.stop_step:
            return
        if not self.active:
            self._start()
        # the step's span in the trace, named by the step number the loop logs (trace viewers group by it)
        self._step_span = torch.profiler.record_function(f"ProfilerStep#{step + 1}")
        self._step_span.__enter__()

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.on_cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._recording_memory = _record_memory_history(True)
        self._profile = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self._profile.start()

    def after_step(self, step: int) -> list[Path]:
        """Call after each step with the number of steps now completed: when that closes the window, stops the
        profiler, writes the files and returns them (once); otherwise []."""
        if not self.active:
            return []
        self._end_step_span()
        return self.close() if step >= self.stop_step else []

    def _end_step_span(self) -> None:
        if self._step_span is not None:
            self._step_span.__exit__(None, None, None)
            self._step_span = None

    def close(self) -> list[Path]:
        """Stop the profiler now (the window's end, or the run stopping inside it) and write the files."""
        if not self.active:
            return []
        self._end_step_span()
        profile, self._profile = self._profile, None
        if self.on_cuda:
            torch.cuda.synchronize(self.device)  # the window's kernels are in the trace
        profile.stop()
        self.done = True
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace, table = self.out_dir / TRACE_FILE, self.out_dir / TABLE_FILE
        profile.export_chrome_trace(str(trace))
        sort_by = "self_device_time_total" if self.on_cuda else "self_cpu_time_total"
        table.write_text(profile.key_averages().table(sort_by=sort_by, row_limit=TABLE_ROWS) + "\n")
        self.files = [trace, table]
        if self._recording_memory:
            snapshot = self.out_dir / MEMORY_FILE
            try:
                torch.cuda.memory._dump_snapshot(str(snapshot))
                self.files.append(snapshot)
            except Exception as e:
                logger.warning("no CUDA memory snapshot: %s: %s", type(e).__name__, e)
            _record_memory_history(False)
            self._recording_memory = False
        return self.files


def _record_memory_history(on: bool) -> bool:
    """Turn the CUDA allocator's history on (True when it is) or off; a PyTorch without the call warns."""
    try:
        if on:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        else:
            torch.cuda.memory._record_memory_history(enabled=None)
        return on
    except Exception as e:  # AttributeError on a release that removed it
        logger.warning("CUDA memory history not recorded: %s: %s", type(e).__name__, e)
        return False
