"""The progress ledger's restart accounting and the start-up phases, as plain Python (the ledger's actor is this
class; the end-to-end elastic test drives it through Ray)."""

from __future__ import annotations

from orchestrator.train.progress import Ledger, carried_totals
from orchestrator.train.startup import describe, phases


def test_ledger_counts_restarts_resizes_redone_steps_and_recovery():
    ledger = Ledger()
    assert ledger.begin(0, 3) is False  # the run's first group
    for step in range(1, 13):
        ledger.step_done(step, when=100.0 + step)
    assert ledger.summary()["goodput/restarts"] == 0
    assert ledger.begin(10, 2) is True  # a node lost after step 12; the checkpoint of step 10 restored on 2 workers
    ledger.step_done(11, when=140.0)
    ledger.begin(11, 2)  # a plain failure: same world size, nothing redone
    ledger.step_done(12, when=150.0)
    ledger.begin(12, 3)  # grown back to 3 (a resize restarts from the latest checkpoint)
    ledger.step_done(13, when=170.0)
    s = ledger.summary()
    assert s["goodput/restarts"] == 3 and s["goodput/resizes"] == 2
    assert s["goodput/steps_redone"] == 2  # steps 11 and 12 after the first restart
    assert s["goodput/recovery_s"] == (140.0 - 112.0) + (150.0 - 140.0) + (170.0 - 150.0)
    assert s["world_sizes"] == "3 -> 2 -> 2 -> 3" and s["goodput/world_size"] == 3


def test_startup_phases_follow_the_marks_present():
    marks = {"process": 10.0, "main": 11.5, "checks": 13.0, "ray": 20.0, "run_setup": 21.0, "fit": 21.2,
             "worker": 30.0, "ready": 33.0, "first_batch": 34.0, "first_step": 34.5}
    p = phases(marks)
    assert p["startup/driver_imports_s"] == 1.5 and p["startup/ray_connect_s"] == 7.0
    assert p["startup/worker_group_start_s"] == 8.8 and p["startup/first_step_s"] == 0.5
    assert p["startup/total_s"] == 24.5
    assert sum(v for k, v in p.items() if k != "startup/total_s") == 24.5
    # a restarted group: its own marks only
    restarted = phases({"worker": 50.0, "ready": 52.0, "first_batch": 52.5, "first_step": 53.0})
    assert set(restarted) == {"startup/worker_setup_s", "startup/first_batch_s", "startup/first_step_s",
                              "startup/total_s"}
    assert describe(p).startswith("[startup] 24.5s to the first step: driver_imports 1.5s")


def test_a_restart_before_the_first_checkpoint_is_a_restart():
    """A group lost before any checkpoint restarts from scratch: still a restart (printed, its steps redone)."""
    ledger = Ledger()
    ledger.begin(0, 3)
    for step in range(1, 7):
        ledger.step_done(step, when=float(step))
    assert ledger.begin(0, 2) is True
    ledger.step_done(1, when=20.0)
    s = ledger.summary()
    assert s["goodput/restarts"] == 1 and s["goodput/steps_redone"] == 6 and s["goodput/recovery_s"] == 14.0


def test_a_driver_sigterm_is_a_preemption_counted_across_submissions():
    """SIGTERM to the driver: the run stops after its checkpoint and the next submission resumes it. The stop is a
    preemption restart in what the first driver logs, and the second driver's ledger counts on from those totals."""
    first = Ledger()
    first.begin(0, 2)
    for step in range(1, 9):
        first.step_done(step, when=float(step))
    first.begin(6, 2)  # a failure on the way: one restart, two steps redone
    first.step_done(7, when=20.0)
    first.preempted(7, "SIGTERM")
    first.request_stop()
    assert first.step_done(8, when=21.0) is True  # the stop reaches rank 0
    logged = first.stop_for_resubmission()
    assert logged["goodput/restarts"] == 2 and logged["goodput/preemptions"] == 1
    assert logged["world_sizes"] == "2 -> 2"

    second = Ledger(**carried_totals(logged))
    assert second.begin(8, 3) is False  # this submission's first group: the restart was counted by the stop
    second.step_done(9, when=30.0)
    s = second.summary()
    assert (s["goodput/restarts"], s["goodput/preemptions"], s["goodput/steps_redone"]) == (2, 1, 2)
    assert s["goodput/recovery_s"] == logged["goodput/recovery_s"] == 12.0
    assert s["world_sizes"] == "2 -> 2 | 3" and s["goodput/world_size"] == 3
    assert carried_totals({}) == {"restarts": 0, "resizes": 0, "preemptions": 0, "steps_redone": 0,
                                  "recovery_s": 0.0, "earlier_world_sizes": ""}
