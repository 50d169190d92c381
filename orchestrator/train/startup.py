"""Start-up phases: where the time from process start to the first completed step goes.

The driver marks wall-clock times as it goes (``mark``) and hands them to the workers in the Job; rank 0 adds
its own marks and, after the first step of a worker group, prints the phases and logs them as ``startup/*_s``:

    driver_imports       process start -> main()            (Python, torch, the orchestrator)
    checks               main() -> data/tracking/storage checked (manifest read, MLflow reachable)
    ray_connect          -> Ray started or joined
    run_setup            -> MLflow run open, capacity checked, tracking relay and progress ledger up
    trainer_build        -> the TorchTrainer built (storage checked)
    worker_group_start   fit() -> the train function runs on rank 0 (Ray Train's controller, placement group,
                         worker processes, torch.distributed)
    worker_setup         -> model built, loaders planned, checkpoint restored, DDP wrapped
    first_batch          -> the first step's data is in hand (loader processes start, shards open, decode)
    first_step           -> the first optimizer step is done

A restarted group has no driver marks: its phases start at worker_group_start's end. ``ray job submit``'s own
part (working-dir upload, driver start) happens before this process exists: the job's submission time, when
Ray gives it, is the first mark ("submitted").

Also here, as it must run at process start before anything imports Ray: keep_progress_lines_whole, which exempts
the run's progress lines from Ray's log deduplication.
"""

from __future__ import annotations

import os
import time

ORDER = ("submitted", "process", "main", "checks", "ray", "run_setup", "fit", "worker", "ready", "first_batch",
         "first_step")
PHASES = {"process": "job_start", "main": "driver_imports", "checks": "checks", "ray": "ray_connect",
          "run_setup": "run_setup", "fit": "trainer_build", "worker": "worker_group_start", "ready": "worker_setup",
          "first_batch": "first_batch", "first_step": "first_step"}


# Lines the run prints that Ray's log deduplication must pass through whole: progress, evaluation, and the
# bracketed reports ([resume], [restart], [preemption], [startup], [data], ...).
PROGRESS_LINES = r"^(step \d+/\d+ |eval step \d+[: ]|\[[a-z-]+\] )"  # also "eval step N ema val: ..."


def keep_progress_lines_whole() -> None:
    """Exempt the run's own lines from Ray's log deduplication; call before Ray is imported in the driver.

    Ray folds lines that differ only in numbers once two processes printed them within 5 s, then keeps folding
    them for as long as they come: after a worker group restart (the old rank 0's last lines arrive late) every
    progress line became "step 60/88 ... [repeated 16x across cluster]" every 5 s. Ray's own noise is still
    folded. An explicit RAY_DEDUP_LOGS_ALLOW_REGEX (or RAY_DEDUP_LOGS=0) is left as it is.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", PROGRESS_LINES)


def process_start() -> float:
    """This process's start time (wall clock), from the OS."""
    try:
        import psutil

        return psutil.Process(os.getpid()).create_time()
    except Exception:  # psutil missing (the GPU check's minimal environment): the first mark is then main()
        return time.time()


def driver_marks() -> dict[str, float]:
    marks = {"process": process_start(), "main": time.time()}
    submitted = _job_submitted()
    if submitted is not None:
        marks["submitted"] = submitted
    return marks


def _job_submitted() -> float | None:
    """When `ray job submit` accepted this job (Ray sets RAY_JOB_SUBMISSION_ID for a submitted driver)."""
    job_id = os.environ.get("RAY_JOB_SUBMISSION_ID")
    if not job_id:
        return None
    try:
        from ray.job_submission import JobSubmissionClient

        info = JobSubmissionClient().get_job_info(job_id)
        return info.start_time / 1000.0 if info.start_time else None
    except Exception:
        return None


def mark(marks: dict[str, float], name: str) -> None:
    marks[name] = time.time()


def phases(marks: dict[str, float]) -> dict[str, float]:
    """Seconds per phase between consecutive marks present, in ORDER, plus the total."""
    present = [(name, marks[name]) for name in ORDER if name in marks]
    pairs = zip(present, present[1:], strict=False)
    out = {f"startup/{PHASES[b]}_s": round(tb - ta, 3) for (_a, ta), (b, tb) in pairs}
    if len(present) > 1:
        out["startup/total_s"] = round(present[-1][1] - present[0][1], 3)
    return out


def describe(p: dict[str, float]) -> str:
    parts = [f"{k[len('startup/'):-2]} {v:.1f}s" for k, v in p.items() if k != "startup/total_s"]
    return f"[startup] {p.get('startup/total_s', 0):.1f}s to the first step: " + ", ".join(parts)
