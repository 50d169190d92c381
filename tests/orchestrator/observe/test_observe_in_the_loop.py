"""observe.* wired into the training loop, run without Ray (LocalSession, rank 0 logging itself to a sqlite
MLflow store): the step-time breakdown at every logging window, the data-wait fraction rising when the loader is
slowed on purpose, the profiler's artifacts, and GPU system metrics from a pynvml faked at its boundary.
The same on a 2-node Ray cluster through the real entry point: tests/cluster/test_observe_on_cluster.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_system_metrics import FakeNvml

from orchestrator.observe.step_timer import OTHER, PHASES

STEPS, EVERY = 8, 2
WINDOWS = list(range(EVERY, STEPS + 1, EVERY))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from orchestrator.train.launch import resolve_data

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXER_HOME", str(home))
        cfg = _config(home)
        data = resolve_data(cfg)
    return home, data


def _config(home: Path, *overrides: str):
    from orchestrator.config.load import load_config

    return load_config("digits", [
        f"run.storage_path={home / 'runs'}", "scaling.num_workers=1", "data.loader_workers=0",
        "optim.global_batch_size=64", f"train.max_steps={STEPS}", f"train.log_every_steps={EVERY}",
        "schedule.warmup_steps=1", "eval.every_steps=4", "checkpoint.every_steps=4", *overrides,
    ])


def _run(digits, tmp_path, *overrides: str, run_id=None, uri=None) -> dict:
    from orchestrator.train.loop import Job, run_training
    from orchestrator.train.session import LocalSession

    home, data = digits
    cfg = _config(home, *overrides)
    job = Job(data.url, data.num_classes, data.train_samples, run_id, uri, data.storage_options)
    return run_training(cfg, LocalSession(str(tmp_path / "ckpt"), device="cpu"), job)


def test_tracked_run_logs_breakdown_gpu_system_metrics_and_the_profile(digits, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from orchestrator.tracking.tracker import RunTracker

    FakeNvml(monkeypatch)  # two GPUs behind pynvml's functions
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(uri, "observe", "observed")
    run_id = tracker.start()
    final = _run(digits, tmp_path, "observe.profile_steps=[2,4]", "observe.system_metrics_interval_s=0.2",
                 run_id=run_id, uri=uri)
    tracker.end("FINISHED")
    client = MlflowClient(uri)
    metrics = client.get_run(run_id).data.metrics

    def steps(key):
        return sorted(m.step for m in client.get_metric_history(run_id, key))

    for name in (*PHASES, OTHER):  # the breakdown, mean and max over ranks, at every logging window
        for stat in ("mean", "max"):
            assert steps(f"perf/{name}_seconds_{stat}") == WINDOWS, (name, stat)
    fractions = client.get_metric_history(run_id, "perf/data_wait_fraction")
    assert sorted(m.step for m in fractions) == WINDOWS and all(0 <= m.value <= 1 for m in fractions)
    # an evaluation and a checkpoint at step 4 fall in the window that ends at step 6
    eval_s = {m.step: m.value for m in client.get_metric_history(run_id, "perf/eval_seconds_max")}
    ckpt_s = {m.step: m.value for m in client.get_metric_history(run_id, "perf/checkpoint_seconds_max")}
    assert eval_s[6] > 0 and ckpt_s[6] > 0 and eval_s[2] == ckpt_s[2] == 0
    assert 0 <= final["perf/run_data_wait_fraction"] <= 1 and "train/run_mfu" not in final  # no known CPU peak
    assert metrics["perf/run_data_wait_fraction"] == pytest.approx(final["perf/run_data_wait_fraction"])

    # system metrics of node 0, the faked GPUs' included, sent from the loop's thread
    gpu = {k for k in metrics if k.startswith("system/node0/gpu_")}
    assert {"system/node0/gpu_0_utilization_percentage", "system/node0/gpu_0_memory_usage_megabytes",
            "system/node0/gpu_0_power_usage_watts", "system/node0/gpu_1_temperature_celsius"} <= gpu
    assert metrics["system/node0/gpu_0_utilization_percentage"] == 87.0
    assert "system/node0/cpu_utilization_percentage" in metrics
    assert steps("system/node0/gpu_0_memory_total_megabytes")[-1] == STEPS  # the last sample, at the loop's end

    # the profiler window: its Chrome trace (JSON, with the profiled steps' spans) and the operators' table
    names = {a.path for a in client.list_artifacts(run_id, "profile")}
    assert {"profile/trace.json", "profile/key_averages.txt"} <= names
    trace = json.loads(Path(client.download_artifacts(run_id, "profile/trace.json", str(tmp_path))).read_text())
    spans = {e.get("name") for e in trace["traceEvents"]}
    assert {"ProfilerStep#3", "ProfilerStep#4"} <= spans and "ProfilerStep#5" not in spans


def test_data_wait_fraction_rises_when_the_loader_is_slowed(digits, tmp_path):
    short = ["tracking.enabled=false", "train.max_steps=4"]
    plain = _run(digits, tmp_path / "plain", *short)
    slowed = _run(digits, tmp_path / "slowed", *short, "observe.data_delay_s=0.3")
    assert 0 <= plain["perf/run_data_wait_fraction"] < slowed["perf/run_data_wait_fraction"] <= 1
    assert slowed["perf/run_data_wait_fraction"] > 0.5  # 0.3 s per batch against a digits step of ~0.1 s


def test_off_costs_nothing(digits, tmp_path):
    """observe.step_breakdown=false: no perf/* figures; system metrics off: no sampler."""
    final = _run(digits, tmp_path, "tracking.enabled=false", "train.max_steps=2", "observe.step_breakdown=false",
                 "observe.system_metrics=false")
    assert not [k for k in final if k.startswith("perf/")]
