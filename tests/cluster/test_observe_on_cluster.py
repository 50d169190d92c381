"""observe.* on a real 2-node Ray cluster, through `ray job submit ... python -m orchestrator.pretrain`.

A head (0 CPU) and two 1-CPU worker nodes on 127.0.0.1; a short digits run with one worker per node, tracked in a
sqlite MLflow store, with a profiler window. One run, several checks: every node's sampler (the local rank 0 of
each node) logs its system metrics into the run through the driver's relay actor (system/node0/..., system/node1/
...); the step-time breakdown, reduced over both ranks, is there at every logging window, the data-wait fraction
in [0, 1]; rank 0's profiler files reach the driver's actor as bytes and are logged under profile/ (the Chrome
trace parses as JSON); the end summary prints the run's data-wait fraction.
The LocalSession checks (slowed loader, faked GPUs): tests/orchestrator/observe/test_observe_in_the_loop.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from orchestrator.observe.step_timer import OTHER, PHASES

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

STEPS, EVERY = 12, 3


def test_two_nodes_log_system_metrics_breakdown_and_profile(local_ray_cluster, tmp_path):
    from mlflow import MlflowClient

    from pipelines.digits import ensure_digits_dataset

    data_url = ensure_digits_dataset(str(tmp_path / "digits"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    entry = ["python", "-m", "orchestrator.pretrain", "run.name=observed", f"data.url={data_url}",
             f"tracking.uri={uri}", f"run.storage_path={tmp_path / 'runs'}", "scaling.num_workers=2",
             f"train.max_steps={STEPS}", f"train.log_every_steps={EVERY}", "schedule.warmup_steps=2",
             "observe.system_metrics_interval_s=2", "observe.profile_steps=[3,5]"]
    job = local_ray_cluster.submit(entry, working_dir=REPO, timeout=600)
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-5000:]
    run_id = re.search(r"MLflow run id\s+(\w+)", out).group(1)
    wait = re.search(r"time +([0-9.]+)% of the training steps waiting for data", out)
    assert wait and 0 <= float(wait.group(1)) <= 100, out[-3000:]

    client = MlflowClient(uri)
    metrics = client.get_run(run_id).data.metrics
    for node in (0, 1):  # one sampler per node, both through the driver's relay
        for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "network_receive_megabytes"):
            assert f"system/node{node}/{name}" in metrics, (node, name, sorted(metrics))
    assert not [k for k in metrics if k.startswith("system/node2/")]  # two nodes host workers, not three

    windows = list(range(EVERY, STEPS + 1, EVERY))
    for name in (*PHASES, OTHER):
        for stat in ("mean", "max"):
            steps = sorted(m.step for m in client.get_metric_history(run_id, f"perf/{name}_seconds_{stat}"))
            assert steps == windows, (name, stat, steps)
    fractions = client.get_metric_history(run_id, "perf/data_wait_fraction")
    assert sorted(m.step for m in fractions) == windows and all(0 <= m.value <= 1 for m in fractions)
    assert 0 <= metrics["perf/run_data_wait_fraction"] <= 1

    names = {a.path for a in client.list_artifacts(run_id, "profile")}
    assert {"profile/trace.json", "profile/key_averages.txt"} <= names, names
    trace = json.loads(Path(client.download_artifacts(run_id, "profile/trace.json", str(tmp_path))).read_text())
    assert {"ProfilerStep#4", "ProfilerStep#5"} <= {e.get("name") for e in trace["traceEvents"]}
