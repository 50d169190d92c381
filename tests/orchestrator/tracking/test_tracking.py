"""RunTracker against real MLflow: a sqlite store, and a real `mlflow server` process that is killed and
restarted mid-run (the server start is the slow part: one per module)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from tracking_server import MlflowServer

from cluster.loopback import free_port
from orchestrator.tracking import limits
from orchestrator.tracking import tracker as tracking
from orchestrator.tracking.run import flatten_config
from orchestrator.tracking.store import (
    TrackingUnreachableError,
    check_tracking_reachable,
    resolve_tracking_uri,
)
from orchestrator.tracking.tracker import RunTracker

FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzTESTKEY1"


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ------------------------------------------------------------------------------------ pure helpers -----


def test_flatten_config_dotted_and_stringified():
    flat = flatten_config({"model": {"name": "mixer_s16_224", "depth": 8, "extra": {}},
                           "optim": {"betas": [0.9, 0.999], "micro_batch_size": None}, "seed": 0})
    assert flat == {"model.name": "mixer_s16_224", "model.depth": "8", "model.extra": "{}",
                    "optim.betas": "[0.9, 0.999]", "optim.micro_batch_size": "None", "seed": "0"}


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, str(tmp_path)) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None, str(tmp_path)) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("http://h:1", str(tmp_path)) == "http://h:1"
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///rel/m.db", "x") == f"sqlite:///{tmp_path.resolve()}/rel/m.db"
    assert resolve_tracking_uri("store", "x") == f"sqlite:///{tmp_path.resolve()}/store/mlflow.db"


def test_check_reachable_sqlite_and_dead_http(tmp_path):
    check_tracking_reachable(f"sqlite:///{tmp_path}/new/dir/mlflow.db")
    assert (tmp_path / "new" / "dir").is_dir()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):  # root can write anyway
        with pytest.raises(TrackingUnreachableError, match="not writable"):
            check_tracking_reachable(f"sqlite:///{ro}/mlflow.db")
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(TrackingUnreachableError) as e:
        check_tracking_reachable(f"http://user:s3cretpw@127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5
    assert f"127.0.0.1:{port}" in str(e.value) and "s3cretpw" not in str(e.value)


# ------------------------------------------------------------------------------------ sqlite store -----


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def test_run_params_tags_metrics_and_resume(sqlite_uri, monkeypatch, caplog):
    from mlflow import MlflowClient

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    caplog.set_level(logging.INFO, logger="orchestrator.tracking.tracker")
    t = RunTracker(sqlite_uri, "unit", "run-a", tags={"model_name": "mixer_s16_224", "world_size": 2,
                                                      "api_token": "tok-123456789"})
    run_id = t.start()
    params = {f"p{i:03d}": i for i in range(150)}  # more than one log_batch
    params.update(flatten_config({"model": {"tokens_mlp_dim": 64},
                                  "data": {"url": "s3://b/x", "storage": {"key": "AKIAIOSFODNN7EXAMPLE"}}}))
    params["long"] = "x" * 1000
    params["data.endpoint"] = f"http://u:{FAKE_SECRET}@127.0.0.1:9"
    t.log_params(params)
    for step in range(0, 50, 10):
        t.log_metrics({"train/loss": 2.0 / (step + 1), "train/lr": 1e-3}, step)
    t.end("FINISHED")
    assert t.unlogged_summary() is None

    client = MlflowClient(sqlite_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    p = run.data.params
    assert p["p149"] == "149" and p["model.tokens_mlp_dim"] == "64" and p["data.url"] == "s3://b/x"
    assert "data.storage.key" not in p
    assert len(p["long"]) == limits.PARAM_VALUE_LIMIT and p["long"].endswith(limits.TRUNCATION_MARK)
    assert FAKE_SECRET not in p["data.endpoint"]
    assert run.data.tags["model_name"] == "mixer_s16_224" and run.data.tags["world_size"] == "2"
    assert "api_token" not in run.data.tags
    assert _history(client, run_id, "train/loss")[-1] == (40, pytest.approx(2.0 / 41))
    assert FAKE_SECRET not in caplog.text and "AKIAIOSFODNN7EXAMPLE" not in caplog.text

    # A restarted training process continues the same run.
    t2 = RunTracker(sqlite_uri, "unit", "run-a", run_id=run_id)
    assert t2.start() == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    t2.log_metrics({"train/loss": 0.01}, 60)
    t2.end("FINISHED")
    assert [s for s, _ in _history(client, run_id, "train/loss")] == [0, 10, 20, 30, 40, 60]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_mlflow_async_failure_surfaces_through_wait(sqlite_uri):
    """What RunTracker relies on (MLflow 3.17.2): an asynchronous batch that fails raises from
    RunOperations.wait(), and MLflow neither keeps nor retries it (so the tracker must)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    client = MlflowClient(sqlite_uri)
    run_id = RunTracker(sqlite_uri, "unit", "async-contract").start()
    client.delete_run(run_id)  # a deleted run refuses new metrics
    ops = client.log_batch(run_id, metrics=[Metric("m", 1.0, 0, 0)], synchronous=False)
    with pytest.raises(MlflowException):
        ops.wait()
    client.restore_run(run_id)
    client.log_batch(run_id, metrics=[Metric("other", 1.0, 0, 1)], synchronous=False).wait()
    assert client.get_metric_history(run_id, "m") == []


def test_mlflow_async_errors_are_redacted():
    import mlflow.utils.async_logging.async_logging_queue  # noqa: F401  (creates the logger below)

    from orchestrator.tracking.store import ASYNC_QUEUE_LOGGER, use_bounded_http_retries

    use_bounded_http_retries()
    assert ASYNC_QUEUE_LOGGER in logging.Logger.manager.loggerDict  # where MLflow reports failed batches
    record = logging.LogRecord(ASYNC_QUEUE_LOGGER, logging.ERROR, "", 0, "Failed: API request to %s failed",
                               ("http://bob:hunter22@127.0.0.1:9/api",), None)
    assert all(f.filter(record) for f in logging.getLogger(ASYNC_QUEUE_LOGGER).filters)
    assert record.getMessage() == "Failed: API request to http://bob:****@127.0.0.1:9/api failed"


def test_parent_run_and_unknown_resume(sqlite_uri):
    from mlflow import MlflowClient

    parent = RunTracker(sqlite_uri, "unit-tune", "search")
    pid = parent.start()
    child = RunTracker(sqlite_uri, "unit-tune", "trial_0", parent_run_id=pid)
    cid = child.start()
    child.end()
    parent.end()
    assert MlflowClient(sqlite_uri).get_run(cid).data.tags["mlflow.parentRunId"] == pid
    with pytest.raises(TrackingUnreachableError, match="0123abcd"):
        RunTracker(sqlite_uri, "unit", "x", run_id="0123abcd" * 4).start()


def test_artifacts_are_scrubbed_and_model_logged(sqlite_uri, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from mlflow import MlflowClient

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    t = RunTracker(sqlite_uri, "unit", "artifacts")
    run_id = t.start()
    t.log_dict({"data": {"url": "s3://b", "key": "AKIAIOSFODNN7EXAMPLE"}, "note": FAKE_SECRET},
               "config/resolved_config.yaml")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    t.log_figure(fig, "curves.png")
    notes = tmp_path / "notes.txt"
    notes.write_text(f"creds: {FAKE_SECRET}\n")
    t.log_artifact(str(notes), "extra")

    class DataDependent(torch.nn.Module):  # torch.export cannot trace `if` on a tensor value
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) if x.sum().item() > 0 else -self.fc(x)

    model = DataDependent()
    assert t.log_model(model, torch.zeros(1, 4)) == "state_dict"
    t.end()
    assert t.unlogged_summary() is None

    client = MlflowClient(sqlite_uri)
    root = Path(client.download_artifacts(run_id, "", str(tmp_path / "dl")))
    cfg_text = (root / "config" / "resolved_config.yaml").read_text()
    assert "s3://b" in cfg_text and "AKIA" not in cfg_text and FAKE_SECRET not in cfg_text
    assert (root / "curves.png").stat().st_size > 1000
    assert FAKE_SECRET not in (root / "extra" / "notes.txt").read_text()
    state = torch.load(root / "model" / "state_dict.pt", weights_only=True)
    assert torch.equal(state["fc.weight"], model.fc.weight)


def test_log_model_pt2(sqlite_uri):
    import mlflow
    import torch

    t = RunTracker(sqlite_uri, "unit", "model")
    run_id = t.start()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    global_uri = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    assert t.log_model(model, torch.randn(1, 3, 2, 2)) == "pt2"
    assert (mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None) == global_uri  # put back
    t.end()
    models = [m for m in mlflow.MlflowClient(sqlite_uri).search_logged_models([t.experiment_id])
              if m.source_run_id == run_id]
    assert len(models) == 1 and str(models[0].status) == "READY"
    mlflow.set_tracking_uri(sqlite_uri)  # models:/ URIs resolve through the process-wide tracking URI
    try:
        loaded = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
    finally:
        mlflow.set_tracking_uri(global_uri)
    x = torch.randn(5, 3, 2, 2)  # a batch size other than the example's
    assert torch.allclose(loaded(x), model(x), atol=1e-6)


# ------------------------------------------------------------------------------------ a real server -----


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.mark.slow  # starts `mlflow server` twice (~10-15 s each on an idle 2-core machine)
def test_server_outage_buffers_retries_and_reports(mlflow_server, caplog):
    """Killed and restarted mid-run: every point reaches MLflow, once."""
    from mlflow import MlflowClient

    caplog.set_level(logging.WARNING, logger="orchestrator.tracking.tracker")
    check_tracking_reachable(mlflow_server.url)
    t = RunTracker(mlflow_server.url, "outage", "run", retry_seconds=2.0)
    run_id = t.start()
    t.log_params({"model.name": "mixer_s16_224"})
    for step in range(5):
        t.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    assert t.flush(force=True) and not t.is_down
    client = MlflowClient(mlflow_server.url)
    assert len(client.get_metric_history(run_id, "train/loss")) == 5

    mlflow_server.kill()
    slowest, step = 0.0, 5
    t_outage = time.monotonic()
    while step < 55 or time.monotonic() - t_outage < 3:  # long enough for several retry attempts
        t0 = time.monotonic()
        t.log_metrics({"train/loss": 1.0 / (step + 1)}, step)  # must neither raise nor block
        slowest = max(slowest, time.monotonic() - t0)
        step += 1
        time.sleep(0.02)  # deliberate: a training loop's pace of logging through the outage
    t.log_params({"late.param": 1})
    assert t.is_down
    assert slowest < 2.0, f"a logging call blocked {slowest:.1f} s"
    outage_warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outage_warnings) == 1 and mlflow_server.url in outage_warnings[0].getMessage()
    summary = t.unlogged_summary()
    assert f"{step - 5} metric values" in summary and "1 params" in summary

    mlflow_server.start()
    deadline = time.monotonic() + 60  # a ceiling for loaded CI machines; it takes ~retry_seconds
    while t.is_down and time.monotonic() < deadline:  # the next attempt comes within retry_seconds
        t.log_metrics({"train/loss": 0.001}, step)
        step += 1
        time.sleep(0.2)
    assert not t.is_down
    t.end("FINISHED")

    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(step))  # every point, each once
    run = client.get_run(run_id)
    assert run.data.params["late.param"] == "1" and run.info.status == "FINISHED"
    assert t.unlogged_summary() is None
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_outage_buffer_keeps_the_newest_points(monkeypatch):
    """The buffer is bounded: beyond MAX_BUFFERED_METRICS the oldest points go, counted in the summary."""
    monkeypatch.setattr(tracking, "MAX_BUFFERED_METRICS", 40)
    t = RunTracker(f"http://127.0.0.1:{free_port()}", "x", "bounded", run_id="e" * 32, retry_seconds=60.0)
    t.start()
    for step in range(55):
        t.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    assert "55 metric values (train/loss)" in t.unlogged_summary()
    state, lost, _ = t.hand_over()
    assert [m[3] for m in state["metrics"]] == list(range(15, 55))  # the newest 40
    assert lost.metrics == 15 and lost.metric_keys == {"train/loss"}
    assert t.unlogged_summary() is None  # all handed over
    driver = RunTracker(t.tracking_uri, "x", "bounded", run_id=t.run_id)
    driver.adopt(state, lost, 1)
    summary = driver.unlogged_summary()
    assert "55 metric values (train/loss)" in summary and "(tracking was unreachable)" in summary


def test_server_down_at_end_and_at_start(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingUnreachableError, match="127.0.0.1"):
        RunTracker(dead, "x", "new").start()
    # Continuing a known run while the server is away: buffer, and report it all at the end.
    t = RunTracker(dead, "x", "resumed", run_id="f" * 32, retry_seconds=1.0)
    assert t.start() == "f" * 32
    t.log_params({"a": 1, "b": 2})
    t.log_metrics({"val/top1": 0.5, "val/top5": 0.9}, 10)
    t.log_dict({"a": 1}, "config.json")
    t.end("FINISHED")
    assert time.monotonic() - t0 < 15
    summary = t.unlogged_summary()
    for part in ["2 metric values (val/top1, val/top5)", "2 params", "config.json", "run status FINISHED", dead]:
        assert part in summary, (part, summary)


def test_relayed_artifacts_carry_the_files_bytes_within_a_bound(tmp_path, monkeypatch, caplog):
    """Rank 0's file (the profiler's trace) may be on another node than the driver's actor: its bytes travel
    with the call; a file over the bound is not sent and a warning says where it stays."""
    from types import SimpleNamespace

    from orchestrator.tracking import relay

    sent = []
    relayed = relay.RelayedTracker.__new__(relay.RelayedTracker)  # no Ray: the actor handle is faked
    relayed._actor = SimpleNamespace(log_artifact_bytes=SimpleNamespace(remote=lambda *a: sent.append(a)))
    (tmp_path / "trace.json").write_text('{"traceEvents": []}')
    relayed.log_artifact(str(tmp_path / "trace.json"), "profile")
    assert sent == [(b'{"traceEvents": []}', "profile/trace.json")]
    monkeypatch.setattr(relay, "MAX_RELAYED_ARTIFACT_BYTES", 10)
    with caplog.at_level(logging.WARNING, logger=relay.__name__):
        relayed.log_artifact(str(tmp_path / "trace.json"), "profile")
    assert len(sent) == 1 and "stays on this node" in caplog.text and "trace.json" in caplog.text
