"""The run's progress ledger: a Ray actor owned by the driver that outlives every worker group.

Rank 0 tells it when a worker group starts (the step it restored, its world size) and when each step completes.
From that it counts what elastic, preemptible training costs, which no single worker group can see:

- restarts (a new worker group after a failure, a preemption or a resize) and resizes (the world size changed),
  with the world sizes in order;
- steps redone: the steps completed before a restart that the new group trains again from its checkpoint;
- recovery time: from the last step completed before a restart to the first step completed after it;
- preemptions: restarts the run announced (a drain's notice or a SIGTERM, checkpointed first), not failures.

It also carries the driver's SIGTERM to the workers (train/sigterm.py): `request_stop` sets a flag that the
reply to rank 0's next `step_done` returns. Such a stop ends the submission, not the run: `stop_for_resubmission`
counts it as a preemption restart, the driver logs the totals, and the next submission of the run starts its
ledger from them (`carried_totals`), so goodput/* covers every submission.

Productive step time over held time (goodput) is the ComputeClock's (orchestrator/train/compute.py); these
counts complete it. The driver reads the summary for the end summary and MLflow; rank 0 logs it after each
restart's first step.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pipelines.cli import say

NAMESPACE = "mixer-progress"


@dataclass
class Ledger:
    """The ledger's state (plain Python: the actor is this class; tests drive it directly)."""

    last_step: int | None = None
    last_step_time: float | None = None
    world_sizes: list[int] = field(default_factory=list)
    restarts: int = 0
    resizes: int = 0
    steps_redone: int = 0
    recovery_s: float = 0.0
    preemptions: int = 0
    stop_requested: bool = False
    earlier_world_sizes: str = ""  # earlier submissions of this run (SIGTERM to the driver, then resubmitted)
    _announced: str | None = None  # a preemption rank 0 announced: the next group start is its restart
    _recovering_since: float | None = None

    def begin(self, restored_step: int, world_size: int) -> bool:
        """A worker group starts from ``restored_step`` (0: from scratch) with ``world_size`` workers; whether it
        is a restart (not the run's first group), with or without a checkpoint to restore."""
        restart = bool(self.world_sizes)
        if restart:
            self.restarts += 1
            self.preemptions += int(self._announced is not None)
            self.resizes += int(world_size != self.world_sizes[-1])
            if self.last_step is not None:
                self.steps_redone += max(0, self.last_step - restored_step)
                self._recovering_since = self.last_step_time
        self._announced = None
        self.world_sizes.append(int(world_size))
        return restart

    def step_done(self, step: int, when: float | None = None) -> bool:
        """Rank 0 finished `step`; whether the driver asks the run to stop (its SIGTERM)."""
        now = time.time() if when is None else when
        if self._recovering_since is not None:
            self.recovery_s += now - self._recovering_since
            self._recovering_since = None
        self.last_step, self.last_step_time = int(step), now
        return self.stop_requested

    def preempted(self, step: int, reason: str) -> None:
        """Rank 0: a preemption (drain notice or SIGTERM) was checkpointed at `step`; the restart that follows is
        counted as a preemption, not a failure."""
        self._announced = f"{reason} at step {step}"

    def request_stop(self) -> None:
        """The driver got SIGTERM: the workers checkpoint at their next step boundary and end."""
        self.stop_requested = True

    def stop_for_resubmission(self) -> dict[str, Any]:
        """The driver's SIGTERM stopped the run after its checkpoint: the next submission resumes from it, a restart
        that the run announced (a preemption, not a failure). The summary the driver logs before it exits."""
        self.restarts += 1
        self.preemptions += 1
        self._announced = None
        return self.summary()

    def summary(self) -> dict[str, Any]:
        sizes = " -> ".join(map(str, self.world_sizes))
        return {
            "goodput/restarts": self.restarts,
            "goodput/resizes": self.resizes,
            "goodput/preemptions": self.preemptions,
            "goodput/steps_redone": self.steps_redone,
            "goodput/recovery_s": round(self.recovery_s, 3),
            "goodput/world_size": self.world_sizes[-1] if self.world_sizes else 0,
            "world_sizes": " | ".join(filter(None, (self.earlier_world_sizes, sizes))),
        }


def carried_totals(logged: dict[str, Any]) -> dict[str, Any]:
    """The Ledger fields a resubmitted run starts from: the goodput/* totals (and world_sizes) its earlier
    submissions logged, keys of :meth:`Ledger.summary` (absent keys count 0)."""
    return {
        "restarts": int(logged.get("goodput/restarts", 0)), "resizes": int(logged.get("goodput/resizes", 0)),
        "preemptions": int(logged.get("goodput/preemptions", 0)),
        "steps_redone": int(logged.get("goodput/steps_redone", 0)),
        "recovery_s": float(logged.get("goodput/recovery_s", 0.0)),
        "earlier_world_sizes": str(logged.get("world_sizes", "")),
    }


def start_ledger(logged: dict[str, Any] | None = None):
    """(name, handle) of a new ledger actor; hold the handle for as long as the run goes. `logged`: the goodput/*
    totals (and world_sizes) earlier submissions of this run logged, counted on from (:func:`carried_totals`)."""
    import ray

    from orchestrator.tracking.relay import on_this_node

    name = f"progress-{uuid.uuid4().hex[:12]}"
    # num_cpus=0: the workers get every CPU; max_restarts=0: a restarted ledger would have forgotten the run;
    # on the driver's node: a lost worker node must not take the ledger with it
    handle = ray.remote(Ledger).options(name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=0,
                                        scheduling_strategy=on_this_node()).remote(**carried_totals(logged or {}))
    return name, handle


def ledger_handle(name: str):
    import ray

    return ray.get_actor(name, namespace=NAMESPACE)


def begin_group(name: str | None, restored_step: int, world_size: int, restored: bool):
    """Rank 0: tell the ledger ``name`` that a worker group starts. (its handle, whether this group is a restart);
    the handle is None when there is no ledger or it is gone (the ledger counts restarts, and losing it must not
    stop the training): a restart is then known only by a restored checkpoint."""
    if not name:
        return None, restored
    import ray

    try:
        ledger = ledger_handle(name)
        restart = ray.get(ledger.begin.remote(restored_step, world_size))
    except Exception as e:
        say(f"[restart] the progress ledger is gone ({type(e).__name__}); restarts are not counted")
        return None, restored
    return ledger, restart


def log_restart(ledger, tracker, step: int) -> None:
    """Rank 0, after a restart's first step: what the restarts cost so far, printed and logged."""
    import ray

    try:
        summary = ray.get(ledger.summary.remote())
    except Exception:
        return
    say(f"[restart] world sizes {summary.pop('world_sizes')}: {summary['goodput/restarts']} restart(s), "
        f"{summary['goodput/preemptions']} preemption(s), {summary['goodput/resizes']} resize(s), {summary['goodput/steps_redone']} step(s) redone, "
        f"{summary['goodput/recovery_s']:.1f}s from the last step before to the first after")
    if tracker:
        tracker.log_metrics(summary, step)
