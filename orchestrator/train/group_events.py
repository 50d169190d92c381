"""What the loop tells the driver about its worker group: start-up phases, restarts, preemption notices.

- start-up: the marks from the driver's submit to the group's first step, printed once and logged
  (train/startup.py); a restarted group's phases start at its own entry;
- restarts and resizes: rank 0 reports each finished step to the driver's progress ledger
  (train/progress.py) and, after a restart's first step, prints and logs what the restarts cost;
- preemption: every rank asks the session every step (a barrier) whether a node of the group is being
  reclaimed; the first notice asks for a checkpoint now, so at most this step is redone.
"""

from __future__ import annotations

import time

from orchestrator.train.progress import begin_group, log_restart
from orchestrator.train.startup import describe, mark, phases
from pipelines.cli import say


class GroupEvents:
    def __init__(self, session, job, rank: int, world: int, step: int, restored: bool, entered: float | None):
        self.session, self.rank, self.first_step = session, rank, step
        # a restart, with or without a checkpoint to restore (the ledger knows; without one, a restored checkpoint)
        self.ledger, self.restarted = (begin_group(job.progress_actor, step, world, restored) if rank == 0
                                       else (None, restored))
        # a restarted group's phases start at its own entry: the driver's marks describe the first group only
        self.marks = {**((job.startup or {}) if not self.restarted else {}), "worker": entered or time.time()}
        self.noticed = False

    def ready(self) -> None:
        mark(self.marks, "ready")

    def batch_fetched(self, step: int) -> None:
        """`step`: the step the batch is for (1-based)."""
        if step == self.first_step + 1:
            mark(self.marks, "first_batch")

    def step_done(self, step: int, tracker) -> None:
        if self.ledger is not None:
            self.ledger.step_done.remote(step)
        if step == self.first_step + 1 and self.rank == 0:
            mark(self.marks, "first_step")
            startup = phases(self.marks)
            say(describe(startup))
            if tracker:
                tracker.log_metrics(startup, step)

    def after_window(self, step: int, tracker) -> None:
        if self.ledger is not None and step == self.first_step + 1 and self.restarted:
            log_restart(self.ledger, tracker, step)

    def preempted(self, step: int) -> bool:
        """True once, at the first preemption notice: checkpoint now. A barrier: every rank, every step."""
        notice = self.session.preemption_notice()
        first = notice is not None and not self.noticed
        if first and self.rank == 0:
            say(f"[preemption] {notice}: checkpoint at step {step}")
        self.noticed = self.noticed or first
        return first
