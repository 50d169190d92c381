"""The compute a run held and the part of it that trained: the one place accelerator-hours are computed.

- held (``compute/accelerator_hours``): wall time x accelerators, from the start of each attempt's worker loop
  to now. It includes start-up, restore, evaluation, checkpointing and logging: what the run kept busy.
- productive (``compute/productive_hours``): time inside training steps (fetching the step's batches and the
  forward/backward/optimizer step) x accelerators.
- goodput (``compute/goodput``): productive / held.

Both totals are accumulated across restarts through the checkpoint (``state()`` / ``resume()``). What an
attempt did after its last checkpoint is lost with it, held time included: the figures count from checkpoints.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any


class ComputeClock:
    """Held and productive accelerator-hours of a run; one per worker loop, started with the loop."""

    def __init__(self, accelerators: int, clock: Callable[[], float] = time.perf_counter):
        self.accelerators = accelerators
        self._clock = clock
        self._start = clock()
        self._step_seconds = 0.0
        self._earlier_held = 0.0  # accelerator-hours of the attempts before this one (from the checkpoint)
        self._earlier_productive = 0.0

    def resume(self, state: Mapping[str, Any]) -> None:
        """Continue the totals a checkpoint saved (see `state`); absent keys count as 0."""
        self._earlier_held = float(state.get("accelerator_hours", 0.0))
        self._earlier_productive = float(state.get("productive_hours", 0.0))

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Time one training step as productive."""
        t0 = self._clock()
        try:
            yield
        finally:
            self._step_seconds += self._clock() - t0

    def held_hours(self) -> float:
        return self._earlier_held + (self._clock() - self._start) * self.accelerators / 3600

    def productive_hours(self) -> float:
        return self._earlier_productive + self._step_seconds * self.accelerators / 3600

    def metrics(self) -> dict[str, float]:
        held, productive = self.held_hours(), self.productive_hours()
        return {
            "compute/accelerator_hours": held,
            "compute/productive_hours": productive,
            "compute/goodput": productive / held if held > 0 else 0.0,
        }

    def state(self) -> dict[str, float]:
        """The checkpoint's entries (plain floats)."""
        return {"accelerator_hours": self.held_hours(), "productive_hours": self.productive_hours()}
