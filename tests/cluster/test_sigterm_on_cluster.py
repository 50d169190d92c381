"""SIGTERM as a preemption notice (checkpoint.on_sigterm), on a real 2-node Ray cluster through `ray job submit`.

A head (0 CPU) and two 1-CPU worker nodes on 127.0.0.1, token auth on, shared by three short digits runs of 2
workers, each with the sample keys of every step traced:

1. a training worker process gets SIGTERM mid-epoch: every rank checkpoints the same step boundary, the group
   restarts and resumes from that checkpoint (no step redone), counted as a preemption; the run completes;
2. the job's driver gets SIGTERM: the workers checkpoint, the driver exits 143 saying the same run.name resumes,
   and a second submission resumes from that checkpoint and completes;
3. rank 1 gets SIGTERM, and rank 0 is SIGKILLed as soon as the checkpoint's upload has started (before Ray Train
   commits it) while rank 1 waits at the barrier after it (ray#66225's case): the run does not hang (bounded),
   resumes from the last committed checkpoint (one every 2 steps) or the killed one if its upload was whole,
   redoing at most those 2 steps, and completes.

In every case every step's samples (as a multiset of keys, in the last attempt at that step) are exactly those the
data plan gives that step.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import psutil
import pytest
from planned_keys import planned_steps

from cluster.local import LocalCluster

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

SEED, SLOTS, CHUNK = 0, 2, 60  # 120 samples a step over 2 stream slots (2 workers x 1 loader worker)
EPOCHS = 2
CASE_TIMEOUT_S = 420  # a hang would run into it; a run takes ~1-2 min on a loaded 2-core box
# Each step slowed on purpose (observe.data_delay_s): the signal is sent when the job's log stream shows step 4,
# and that stream lags the run by 1-3 s (Ray's job log tail polls the file every second, twice); unslowed steps
# are ~0.15-0.45 s, so a fast run could reach its ~20th step before the signal. 0.4 s a step adds ~8 s a run.
DATA_DELAY_S = 0.4
SIGNAL_AT_STEP = 4
KILL_CASE_CHECKPOINT_EVERY = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("sigterm-cluster")
    c = LocalCluster.up(base / "state", token_file=base / "auth_token", workers=2, cpus_per_node=1, head_cpus=0,
                        object_store_mb=200, health_check_period_ms=1000)
    yield c
    c.down(grace_s=2)


@pytest.fixture(scope="module")
def data_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("sigterm-data") / "digits")
    write = subprocess.run([sys.executable, "-m", "pipelines.write_shards", "digits", url, "--no-progress"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert write.returncode == 0, write.stderr
    return url


def _entry(name: str, data_url: str, tmp: Path, checkpoint_every: int = 1000) -> list[str]:
    return ["python", "-m", "orchestrator.pretrain", f"run.name={name}", f"data.url={data_url}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", f"run.storage_path={tmp / 'runs'}",
            "optim.global_batch_size=120", f"schedule.epochs={EPOCHS}", "schedule.warmup_steps=2",
            "eval.every_steps=1000", f"checkpoint.every_steps={checkpoint_every}", "checkpoint.num_to_keep=100",
            "train.log_every_steps=1", f"run.seed={SEED}", "scaling.num_workers=2",
            f"data.trace_keys_dir={tmp / 'trace'}", f"observe.data_delay_s={DATA_DELAY_S}"]


def _of_cluster(proc: psutil.Process, cluster: LocalCluster) -> bool:
    """Whether `proc` runs in this cluster: its working directory (a Train worker's run artifacts, a driver's
    unpacked working_dir) or its stdout log is under the cluster's temp root. Other Ray clusters on a shared
    machine (other people's tests) run RayTrainWorkers and drivers with the same command lines."""
    root = cluster.state["temp_root"].rstrip("/") + "/"
    try:
        return proc.cwd().startswith(root) or any(f.path.startswith(root) for f in proc.open_files())
    except psutil.Error:
        return False


def _train_workers(cluster: LocalCluster) -> list[psutil.Process]:
    """The RayTrainWorker processes of this cluster (not their DataLoader children)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []) and \
                    "RayTrainWorker" not in " ".join(proc.parent().cmdline()) and _of_cluster(proc, cluster):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _driver(cluster: LocalCluster, name: str) -> psutil.Process | None:
    """The job's entrypoint process (the driver), not the `ray job submit` client that names it too."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        args = proc.info["cmdline"] or []
        if args[1:3] == ["-m", "orchestrator.pretrain"] and f"run.name={name}" in args and _of_cluster(proc, cluster):
            return proc
    return None


def _follow(cluster, job, on_line) -> str:
    """Read the job's output to its end, calling on_line(line) for each; the whole text.

    Bounded by CASE_TIMEOUT_S even when no line comes at all (a thread reads, this waits on it with a timeout):
    at the deadline, or when on_line fails, the job is stopped and its client killed, so that a hung run neither
    blocks the test nor keeps the module's cluster busy for the next case."""
    lines: list[str] = []
    got: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in job.stdout:
            got.put(line)
        got.put(None)

    threading.Thread(target=read, name="job-output", daemon=True).start()
    deadline = time.monotonic() + CASE_TIMEOUT_S
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the run hangs (no end after {CASE_TIMEOUT_S}s):\n" + "".join(lines[-80:]))
            try:
                line = got.get(timeout=left)
            except queue.Empty:
                continue  # the deadline check above fails the case
            if line is None:
                break
            lines.append(line)
            on_line(line)
        job.wait(timeout=60)
    except BaseException:
        _stop(cluster, job, "".join(lines))
        raise
    return "".join(lines)


def _stop(cluster, job, text: str) -> None:
    """Stop the job on the cluster (its submission id is in the client's output) and kill the client."""
    submitted = re.search(r"Job '([^']+)' submitted successfully", text)
    if submitted:
        try:
            cluster.api_request(f"/api/jobs/{submitted.group(1)}/stop", method="POST")
        except OSError:
            pass  # the dashboard is gone: the cluster fixture's teardown stops everything
    job.kill()
    job.wait(timeout=30)


def _signal_due(line: str, sent: dict) -> int | None:
    """The step a progress line shows, when the signal is due there: not sent yet, at step SIGNAL_AT_STEP or
    later, and at least 3 steps before the end (a signal at the last steps would not test a resume)."""
    step = re.search(r"\bstep (\d+)/(\d+)", line)
    if sent or not step or not SIGNAL_AT_STEP <= int(step.group(1)) <= int(step.group(2)) - 3:
        return None
    return int(step.group(1))


def _signalled(sent: dict, text: str) -> None:
    assert sent, ("the run ended before the signal was sent (its steps outran the job's log stream; raise "
                  f"DATA_DELAY_S={DATA_DELAY_S}):\n" + text[-4000:])


def _check_keys(trace: Path, data_url: str, total_steps: int) -> None:
    """Every step's samples, in the last attempt at it, are exactly the planned ones."""
    by_step: dict[int, list[dict]] = defaultdict(list)
    for f in trace.glob("rank*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            by_step[rec["step"]].append(rec)
    assert sorted(by_step) == list(range(1, total_steps + 1))
    expected = planned_steps(data_url, epochs=EPOCHS, slots=SLOTS, chunk=CHUNK, seed=SEED)
    for step, recs in by_step.items():
        recs.sort(key=lambda r: r["time"])
        last = recs[-recs[-1]["world"]:]
        assert Counter(k for r in last for k in r["keys"]) == expected[step - 1], f"step {step}: other samples"


def _summary(text: str) -> tuple[int, int]:
    """(restarts, steps redone) from the end summary."""
    m = re.search(r"restarts\s+(\d+) \(\d+ resizes; world sizes [0-9 >-]+\), (\d+) steps redone", text)
    assert m, text[-3000:]
    return int(m.group(1)), int(m.group(2))


def _mlflow_runs(tmp: Path, name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mixer-digits").experiment_id
    return client.search_runs([experiment], filter_string=f"tags.mlflow.runName = '{name}'")


def _planned_total(text: str) -> int:
    return int(re.search(r"step \d+/(\d+)", text).group(1))


def test_sigterm_to_a_worker_checkpoints_and_resumes(cluster, data_url, tmp_path):
    t0, sent = time.monotonic(), {}

    def on_line(line):
        if (step := _signal_due(line, sent)) is not None:
            workers = _train_workers(cluster)
            assert len(workers) == 2, workers
            workers[0].send_signal(signal.SIGTERM)
            sent["pid"], sent["step"], sent["time"] = workers[0].pid, step, time.time()

    job = cluster.submit(_entry("sig-worker", data_url, tmp_path), working_dir=REPO, wait=False)
    text = _follow(cluster, job, on_line)
    (tmp_path / "job.log").write_text(text)
    _signalled(sent, text)
    assert job.returncode == 0, text[-6000:]
    assert re.search(rf"\[preemption\] rank \d \(pid {sent['pid']}\) got SIGTERM", text), text[-4000:]
    notice = int(re.search(r"\[preemption\] SIGTERM to a worker: checkpoint at step (\d+), then the group restarts",
                           text).group(1))
    # the step boundary after the signal: the step in training when it came (the last whose batch was fetched
    # before it, from the trace), or the next one when it came between the fetch and the boundary's agreement
    running = max(r["step"] for f in (tmp_path / "trace").glob("rank*.jsonl")
                  for r in map(json.loads, f.read_text().splitlines()) if r["time"] <= sent["time"])
    assert running <= notice <= running + 1, (running, notice)
    resumes = [int(s) for s in re.findall(r"\[resume\] from checkpoint_\S+: step (\d+),", text)]
    assert resumes == [notice], (resumes, notice)  # the SIGTERM's checkpoint, not an earlier one
    assert re.search(r"\[restart\] world sizes 2 -> 2: 1 restart\(s\), 1 preemption\(s\)", text), text[-4000:]
    assert _summary(text) == (1, 0)  # resumed at the step it stopped: no step redone
    (run,) = _mlflow_runs(tmp_path, "sig-worker")
    assert run.info.status == "FINISHED" and run.data.metrics["goodput/preemptions"] == 1
    _check_keys(tmp_path / "trace", data_url, _planned_total(text))
    print(f"worker SIGTERM case: {time.monotonic() - t0:.0f}s")


def test_sigterm_to_the_driver_stops_and_the_next_submission_resumes(cluster, data_url, tmp_path):
    t0, sent = time.monotonic(), {}

    def on_line(line):
        if (step := _signal_due(line, sent)) is not None:
            driver = _driver(cluster, "sig-driver")
            assert driver is not None
            driver.send_signal(signal.SIGTERM)
            sent["step"] = step

    entry = _entry("sig-driver", data_url, tmp_path)
    job = cluster.submit(entry, working_dir=REPO, wait=False)
    text = _follow(cluster, job, on_line)
    (tmp_path / "job1.log").write_text(text)
    _signalled(sent, text)
    assert job.returncode != 0, text[-4000:]
    notice = int(re.search(r"\[preemption\] SIGTERM to the driver: checkpoint at step (\d+), then the run stops",
                           text).group(1))
    assert notice >= sent["step"]
    assert f"stopped by SIGTERM at step {notice}, after its checkpoint was committed" in text
    assert "submit again with run.name=sig-driver" in text
    (stopped,) = _mlflow_runs(tmp_path, "sig-driver")  # the stop is counted as a preemption restart, not a failure
    assert stopped.info.status == "KILLED"
    assert (stopped.data.metrics["goodput/preemptions"], stopped.data.metrics["goodput/restarts"]) == (1, 1)

    again = cluster.submit(entry, working_dir=REPO, wait=False)
    text2 = _follow(cluster, again, lambda line: None)  # bounded: CASE_TIMEOUT_S
    (tmp_path / "job2.log").write_text(text2)
    assert again.returncode == 0, text2[-6000:]
    assert re.search(rf"\[resume\] from checkpoint_\S+: step {notice},", text2), text2[-4000:]
    assert re.search(rf"after step {_planned_total(text2)}\b", text2)
    _check_keys(tmp_path / "trace", data_url, _planned_total(text2))
    (run,) = _mlflow_runs(tmp_path, "sig-driver")  # the second submission continued the first's MLflow run
    assert run.info.status == "FINISHED"
    # the second submission's ledger counted on from the first's: the whole run had one restart, a preemption
    assert (run.data.metrics["goodput/preemptions"], run.data.metrics["goodput/restarts"]) == (1, 1)
    assert re.search(r"restarts\s+1 \(.*1 of them preemptions", text2), text2[-3000:]
    print(f"driver SIGTERM case: {time.monotonic() - t0:.0f}s")


def _rank0(workers: list[psutil.Process]) -> psutil.Process:
    """The worker holding rank 0's key trace file open (KeyTrace keeps it open for the run)."""
    for proc in workers:
        try:
            if any(f.path.endswith("rank0.jsonl") for f in proc.open_files()):
                return proc
        except psutil.Error:
            continue
    raise AssertionError(f"no rank 0 among {workers}")


def _worker_log(cluster: LocalCluster, pid: int) -> Path:
    """The file Ray writes worker `pid`'s stdout to (<temp dir>/session_*/logs/worker-<id>-<job>-<pid>.out)."""
    found = sorted({p.resolve() for p in Path(cluster.state["temp_root"]).glob(f"*/session_*/logs/worker-*-{pid}.out")})
    assert len(found) == 1, (pid, found)
    return found[0]


SIGTERM_NOTICE = re.compile(r"\[preemption\] SIGTERM to a worker: checkpoint at step (\d+), then the group restarts")


def _kill_when_upload_starts(run_dir: Path, rank0_log: Path, pid: int, sent: dict) -> threading.Thread:
    """SIGKILL rank 0 (`pid`) as soon as the SIGTERM's checkpoint directory appears in the run's storage: its upload
    has started and it is not committed yet (Ray's controller takes a report only when it polls, every 2 s).

    With a checkpoint every 2 steps a periodic one may start between the signal and the step boundary that takes
    it, so the SIGTERM's is told apart: rank 0 says at which step the ranks agreed to checkpoint (in its own log
    file, read here directly: the job's log stream lags seconds behind) before it saves, and its checkpoint is the
    first directory that was not there before that line (a periodic one started at least a step earlier)."""
    def listing() -> set[str]:
        return {p.name for p in run_dir.glob("checkpoint_*")}

    def watch():
        known, said, text = listing(), None, ""
        deadline = time.monotonic() + CASE_TIMEOUT_S
        with open(rank0_log, errors="replace") as log_file:
            while time.monotonic() < deadline:
                if said is None:
                    text = (text + log_file.read())[-2000:]
                    if m := SIGTERM_NOTICE.search(text):
                        said = int(m.group(1))
                now = listing()
                if said is not None and now - known:
                    os.kill(pid, signal.SIGKILL)
                    sent["killed"], sent["checkpoint"], sent["notice"] = time.monotonic(), sorted(now - known), said
                    return
                if said is None:
                    known = now  # frozen once the line is seen: what is new after it is the SIGTERM's
                time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_rank0_killed_while_its_sigterm_checkpoint_uploads_does_not_hang(cluster, data_url, tmp_path):
    t0, sent = time.monotonic(), {}

    def on_line(line):
        if (step := _signal_due(line, sent)) is not None:
            workers = _train_workers(cluster)
            rank0 = _rank0(workers)
            sent["rank0"], sent["step"] = rank0.pid, step
            _kill_when_upload_starts(tmp_path / "runs" / "sig-kill", _worker_log(cluster, rank0.pid), rank0.pid, sent)
            next(p for p in workers if p.pid != rank0.pid).send_signal(signal.SIGTERM)  # rank 1 takes the notice

    # a checkpoint every KILL_CASE_CHECKPOINT_EVERY steps: the killed one is not the run's only one, so the restart
    # shows a resume from a committed checkpoint, not a start from scratch
    entry = _entry("sig-kill", data_url, tmp_path, checkpoint_every=KILL_CASE_CHECKPOINT_EVERY)
    job = cluster.submit(entry, working_dir=REPO, wait=False)
    text = _follow(cluster, job, on_line)  # bounded: CASE_TIMEOUT_S
    (tmp_path / "job.log").write_text(text)
    _signalled(sent, text)
    assert "killed" in sent, text[-4000:]
    # rank 0 was killed before its checkpoint was committed: it never got to leave the loop
    assert not re.search(rf"pid={sent['rank0']}\).*SigtermRestart", text), text[-4000:]
    assert job.returncode == 0, text[-6000:]
    assert re.search(rf"after step {_planned_total(text)}\b", text)
    restarts, redone = _summary(text)
    assert restarts >= 1 and redone <= _planned_total(text)
    # the resume: the killed checkpoint (at the notice's step) if its upload was already whole, else the last one
    # committed before it (the session commits a checkpoint before the next goes out); never from scratch
    notice, every = sent["notice"], KILL_CASE_CHECKPOINT_EVERY
    assert notice >= sent["step"], (notice, sent)
    committed = every * ((notice - 1) // every)  # the last periodic checkpoint before the notice's
    assert committed >= every, (committed, notice)  # a checkpoint before the SIGTERM's: a resume, not a start
    resumes = [int(s) for s in re.findall(r"\[resume\] from checkpoint_\S+: step (\d+),", text)]
    assert resumes and committed <= resumes[0] <= notice, (resumes, committed, notice, text[-4000:])
    assert redone <= every, (redone, every)  # at most the checkpoint gap is done again
    _check_keys(tmp_path / "trace", data_url, _planned_total(text))
    print(f"SIGKILL during the SIGTERM checkpoint's upload ({sent['checkpoint']}, notice at step {notice}, resumed "
          f"at step {resumes[0]}, {redone} redone): {time.monotonic() - t0:.0f}s "
          f"to the end, {time.monotonic() - sent['killed']:.0f}s after the kill")
