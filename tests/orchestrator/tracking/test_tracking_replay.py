"""Nothing tracked is lost or logged twice: steps re-sent after a restart are dropped, what is still unlogged
at the end goes to a replay file that `python -m orchestrator.tracking.replay` logs into the same run, and
through `python -m orchestrator.pretrain` rank 0's points outlive a killed worker while the server is away."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from tracking_server import MlflowServer

from cluster.loopback import free_port
from orchestrator.tracking.replay import REPLAY_FILE, write_unlogged
from orchestrator.tracking.tracker import RunTracker

REPO = Path(__file__).resolve().parents[3]


def _steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _replay(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "orchestrator.tracking.replay", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_steps_resent_after_a_restart_are_not_logged_twice(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = RunTracker(uri, "unit", "resent")
    run_id = t.start()
    for step in range(1, 14):  # a worker logs steps 1-13, then dies; its checkpoint was at step 5
        t.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step)
    for step in range(6, 21):  # the restarted loop continues from step 5 and sends 6-13 again
        t.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step)
    t.log_metrics({"val/top1": 0.5}, 10)  # another key: its own highest step
    t.end()
    client = MlflowClient(uri)
    assert _steps(client, run_id, "train/loss") == list(range(1, 21))
    assert _steps(client, run_id, "train/lr") == list(range(1, 21))
    assert _steps(client, run_id, "val/top1") == [10]
    assert t.unlogged_summary() is None


def test_replay_file_restores_into_the_same_run(tmp_path):
    """A run whose server went away: its leftovers move to the driver's tracker (hand_over/adopt, as from
    the relay actor), are written next to the checkpoints, and the replay command logs them once; a file sent
    as bytes (the profiler's trace, from rank 0's node) goes the same way."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = RunTracker(uri, "unit", "replayed").start()
    dead = f"http://127.0.0.1:{free_port()}"
    relayed = RunTracker(dead, "unit", "replayed", run_id=run_id, retry_seconds=0.5)
    relayed.start()
    for step in range(1, 8):
        relayed.log_metrics({"train/loss": 1.0 / step}, step)
    trace = json.dumps({"traceEvents": [{"name": "ProfilerStep#2", "ph": "X", "ts": 0, "dur": 5}]}).encode()
    relayed.log_artifact_bytes(trace, "profile/trace.json")
    driver = RunTracker(dead, "unit", "replayed", run_id=run_id, retry_seconds=0.5)
    driver.start()
    driver.log_params({"optim.lr": 0.003})
    driver.adopt(*relayed.hand_over())
    driver.set_tags({"model_name": "mixer_digits"})
    driver.end("FINISHED")
    url = write_unlogged(driver, str(tmp_path / "runs" / "replayed"))
    assert url == str(tmp_path / "runs" / "replayed" / REPLAY_FILE)
    summary = driver.unlogged_summary()
    assert "7 metric values (train/loss)" in summary and "1 params" in summary and "1 tags" in summary
    assert "1 artifacts (profile/trace.json)" in summary
    assert f"Kept for replay (7 metric values, 1 params, 1 tags, 1 artifacts, the run status) in {url}" in summary
    assert f"python -m orchestrator.tracking.replay {url}" in summary
    lines = [json.loads(x) for x in Path(url).read_text().splitlines()]
    assert lines[0]["run_id"] == run_id and lines[0]["status"] == "FINISHED" and len(lines) == 1 + 7 + 1 + 1 + 1

    # Still away: nothing is replayed and the file stays as it is.
    out = _replay(str(tmp_path / "runs" / "replayed"), "--tracking-uri", dead)
    assert out.returncode == 1 and f"what is not logged stays in {url}" in out.stderr
    assert len(Path(url).read_text().splitlines()) == len(lines)
    out = _replay(str(tmp_path / "runs" / "replayed"), "--tracking-uri", uri)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "replayed 7 metric values, 1 params, 1 tags, 1 artifacts and the run status" in out.stdout
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert _steps(client, run_id, "train/loss") == list(range(1, 8))
    assert run.data.params["optim.lr"] == "0.003" and run.data.tags["model_name"] == "mixer_digits"
    assert run.info.status == "FINISHED"
    assert json.loads(Path(client.download_artifacts(run_id, "profile/trace.json", str(tmp_path))).read_bytes()) \
        == json.loads(trace)
    assert not Path(url).exists() and list(Path(url).parent.glob("unlogged_tracking.replayed-*.jsonl"))
    assert len(client.search_runs([run.info.experiment_id])) == 1


# ----------------------------------------------------------------------- through the real entry point -----


@pytest.mark.slow  # a 2-worker Ray run with a worker restart, and an `mlflow server`
def test_pretrain_outage_worker_killed_then_replayed(tmp_path):
    """The server dies at step 3 and stays away; rank 0's worker is killed at step 12. Ray restarts the group
    from its latest checkpoint; the points rank 0 sent before dying are held by the driver's actor, the re-sent
    steps are dropped, and at the end the replay file restores every point into the run, exactly once."""
    from mlflow import MlflowClient

    server = MlflowServer(tmp_path / "server")
    server.root.mkdir()
    server.start()
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(MIXER_HOME=str(home), PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token")
    args = [sys.executable, "-m", "orchestrator.pretrain", "run.name=outage", "schedule.epochs=2",
            "schedule.warmup_steps=2", "checkpoint.every_steps=5", "train.log_every_steps=1",
            "eval.every_steps=1000", f"tracking.uri={server.url}"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, killed = [], None
    deadline = time.monotonic() + 400
    try:
        for line in proc.stdout:
            lines.append(line)
            if server.proc is not None and re.search(r"RayTrainWorker pid=\d+\S* step 3/\d+", line):
                server.kill()
            match = re.search(r"RayTrainWorker pid=(\d+)\S* step 12/\d+", line)
            if killed is None and match:
                killed = int(match.group(1))  # the pid Ray prefixes to rank 0's lines
                assert "RayTrainWorker" in " ".join(psutil.Process(killed).cmdline())
                os.kill(killed, signal.SIGKILL)
            assert time.monotonic() < deadline, "".join(lines[-50:])
        proc.wait(timeout=60)
    finally:
        server.kill()
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines)
    assert proc.returncode == 0 and killed is not None, text[-4000:]
    # The group restarted from its latest registered checkpoint (or from scratch if none was registered yet,
    # under load): either way rank 0 printed some steps twice, and sent them twice.
    printed = re.findall(r"RayTrainWorker pid=\d+\S* step (\d+)/", text)
    assert len(printed) > len(set(printed)), text[-4000:]
    total = int(re.search(r"step \d+/(\d+)", text).group(1))
    run_id = re.search(r"MLflow run id\s+(\w+)", text).group(1)
    replay_file = home / "runs" / "outage" / REPLAY_FILE
    kept = re.search(r"Kept for replay \((\d+) metric values, (\d+) params, (\d+) tags, the run status\) in (\S+);",
                     text)
    assert kept and kept.group(4) == str(replay_file), text[-3000:]
    assert f"python -m orchestrator.tracking.replay {replay_file}" in text
    in_file = [json.loads(x) for x in replay_file.read_text().splitlines()[1:]]
    assert int(kept.group(1)) == sum("metric" in x for x in in_file) > 0

    # The server's own store, read directly (a second server start would only cost time).
    store = f"sqlite:///{server.root}/server.db"
    client = MlflowClient(store)
    before = _steps(client, run_id, "train/loss")
    assert before == list(range(1, len(before) + 1)) and len(before) < total  # up to the kill, at most
    out = _replay(str(replay_file.parent), "--tracking-uri", store)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _steps(client, run_id, "train/loss") == list(range(1, total + 1)), before
    assert _steps(client, run_id, "train/lr") == list(range(1, total + 1))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "mixer_digits"
