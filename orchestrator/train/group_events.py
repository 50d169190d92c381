"""What the loop tells the driver about its worker group: start-up phases, restarts, preemption notices.

- start-up: the marks from the driver's submit to the group's first step, printed once and logged
  (train/startup.py); a restarted group's phases start at its own entry;
- restarts and resizes: rank 0 reports each finished step to the driver's progress ledger
  (train/progress.py) and, after a restart's first step, prints and logs what the restarts cost;
- preemption: every rank asks the session every step (a barrier) whether a node of the group is being
  reclaimed; the first notice asks for a checkpoint now, so at most this step is redone;
- SIGTERM (checkpoint.on_sigterm, train/sigterm.py): a worker's SIGTERM or the driver's (read from the reply to
  rank 0's step_done) is agreed on by every rank at the step boundary; after the checkpoint, `leave`.
"""

from __future__ import annotations

import contextlib
import os
import time

from orchestrator.train.progress import begin_group, log_restart
from orchestrator.train.sigterm import END, GO_ON, RESTART, SigtermRestart
from orchestrator.train.startup import describe, mark, phases
from pipelines.cli import say


class GroupEvents:
    def __init__(self, session, job, rank: int, world: int, step: int, restored: bool, entered: float | None,
                 on_sigterm: bool = False, sigterm_grace_s: float = 0.0):
        self.session, self.rank, self.first_step = session, rank, step
        # a restart, with or without a checkpoint to restore (the ledger knows; without one, a restored checkpoint)
        self.ledger, self.restarted = (begin_group(job.progress_actor, step, world, restored) if rank == 0
                                       else (None, restored))
        # a restarted group's phases start at its own entry: the driver's marks describe the first group only
        self.marks = {**((job.startup or {}) if not self.restarted else {}), "worker": entered or time.time()}
        self.noticed = False
        # the same on every rank (a config value): whether each step boundary agrees on a SIGTERM
        self.on_sigterm = on_sigterm
        self.sigterm = session.sigterm_notice(sigterm_grace_s) if on_sigterm else None
        self.stopping = GO_ON  # what the ranks agreed on: RESTART (a worker's SIGTERM) or END (the driver's)
        self._said_sigterm = False
        self._stop_reply = None  # rank 0: a step_done reply not yet read (whether the driver asks to stop)

    def ready(self) -> None:
        mark(self.marks, "ready")

    def batch_fetched(self, step: int) -> None:
        """`step`: the step the batch is for (1-based)."""
        if step == self.first_step + 1:
            mark(self.marks, "first_batch")

    def step_done(self, step: int, tracker) -> None:
        if self.ledger is not None:
            reply = self.ledger.step_done.remote(step)
            self._stop_reply = self._stop_reply or reply  # one watched at a time: read when it is there
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
        if first and self.ledger is not None:
            self.ledger.preempted.remote(step, "drain notice")
        if self.on_sigterm and self.stopping == GO_ON:
            self.stopping = self.session.agree_max(self._local_stop())
            if self.stopping != GO_ON and self.rank == 0:
                who, then = (("the driver", "the run stops") if self.stopping == END
                             else ("a worker", "the group restarts from it"))
                say(f"[preemption] SIGTERM to {who}: checkpoint at step {step}, then {then}")
        return first or self.stopping != GO_ON

    def _local_stop(self) -> int:
        """This rank's view: END when the driver asks to stop (rank 0), RESTART after a SIGTERM here."""
        value = GO_ON
        if self.sigterm is not None and self.sigterm.pending():
            value = RESTART
            if not self._said_sigterm:
                say(f"[preemption] rank {self.rank} (pid {os.getpid()}) got SIGTERM")
                self._said_sigterm = True
        if self._stop_reply is not None:
            import ray

            if ray.wait([self._stop_reply], timeout=0)[0]:  # never waits: a reply not there yet is read later
                with contextlib.suppress(Exception):
                    value = END if ray.get(self._stop_reply) else value
                self._stop_reply = None
        return value

    def leave(self, step: int) -> None:
        """After a SIGTERM's checkpoint (rank 0 has waited until it is committed): every rank waits for rank 0,
        rank 0 tells the ledger, then every rank raises SigtermRestart (a worker's SIGTERM: Ray Train restarts
        the group, which resumes from the checkpoint) or returns (the driver's: the run ends here)."""
        reason = "SIGTERM to the driver" if self.stopping == END else "SIGTERM to a worker"
        if self.ledger is not None:  # rank 0, before the barrier: once past it, Ray may tear this worker down
            import ray

            with contextlib.suppress(Exception):
                ray.get(self.ledger.preempted.remote(step, reason), timeout=30)
        self.session.agree_max(GO_ON)  # a barrier: nobody leaves before the checkpoint is committed
        if self.stopping == RESTART:
            raise SigtermRestart(f"{reason}: the checkpoint of step {step} is committed; the worker group "
                                 "restarts from it")
