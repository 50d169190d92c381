"""Elastic, preemption-safe training on a real multi-node Ray cluster, through `ray job submit`.

A head (0 CPU) and three 1-CPU worker nodes on 127.0.0.1, token auth on; digits; scaling.num_workers=[1, 3] with
a 5 s resize check; the sample keys of every step traced. In one run:

1. a worker node is SIGKILLed: the run goes on with 2 workers at once (no replacement is waited for);
2. the node is started again: at the next resize check the run grows back to 3 workers;
3. a worker node is drained with reason PREEMPTION and a deadline, then killed once the next step is seen: the
   run checkpoints at the step boundary after the notice, Ray Train has registered that checkpoint before the
   node goes, and the restart resumes from it (or from a periodic checkpoint the run reached after it while the
   test read the line and killed: with uploads off the training path the run does not wait for the kill).

Then: every step's samples (as a multiset of keys) equal those the data plan gives that step at any world size
(the same plan read in-process with 1 rank), no sample of an epoch is used twice or missed beyond the planned
drop; one MLflow run holds the goodput metrics; the checkpoints are on the S3-compatible server (moto on
loopback, through s3fs), as are the shards; a run too big for the cluster even at its minimum fails clearly in
bounded time; and a fixed 3-worker run with the same seed ends with a
validation loss within 0.15 of the elastic run's (same samples per step; dropout and stochastic depth draw
per rank, so the runs are close, not equal).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import psutil
import pytest
import s3fs
from planned_keys import minival_keys, planned_steps

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

SEED, SLOTS, CHUNK = 0, 3, 40  # 120 samples a step over 3 stream slots (max 3 workers x 1 loader worker)


def _train_worker_nodes(cluster) -> dict[int, int]:
    """{RayTrainWorker pid: worker node index} for this cluster's nodes."""
    node_of = {pid: n["index"] for n in cluster.reload()["nodes"] for pid, _ in cluster.recorded_processes(n["index"])}
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if "RayTrainWorker" not in " ".join(proc.info["cmdline"] or []):
            continue
        try:
            if "RayTrainWorker" in " ".join(proc.parent().cmdline()):
                continue  # a DataLoader process of a train worker
            for parent in proc.parents():
                if parent.pid in node_of:
                    found[proc.info["pid"]] = node_of[parent.pid]
                    break
        except psutil.NoSuchProcess:
            continue
    return found


def _drain(cluster, node_index: int, deadline_s: int) -> None:
    cmd = [cluster.reload()["ray"], "drain-node", "--address", cluster.address,
           "--node-id", cluster.node_id(node_index), "--reason", "DRAIN_NODE_REASON_PREEMPTION",
           "--reason-message", "spot reclaim (test)", "--deadline-remaining-seconds", str(deadline_s)]
    out = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _final_attempts(trace: Path) -> dict[int, list[dict]]:
    """step -> the records of the last attempt at that step (one per rank of that attempt's world size)."""
    by_step: dict[int, list[dict]] = defaultdict(list)
    for f in trace.glob("rank*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            by_step[rec["step"]].append(rec)
    out = {}
    for step, recs in by_step.items():
        recs.sort(key=lambda r: r["time"])
        world = recs[-1]["world"]
        out[step] = recs[-world:]
        assert {r["world"] for r in out[step]} == {world}, (step, recs)
    return out


def _events(lines: list[str]) -> str:
    """What Ray Train and the run said about restarts, preemptions and errors: what a failed run's tail hides."""
    pattern = re.compile(r"\[(restart|preemption|resume)\]|Preempt|Error|Traceback|timed out|resiz|[Dd]rain")
    return "".join(line for line in lines if pattern.search(line))[-8000:]


def _final_val_loss(text: str) -> float:
    return float(re.findall(r"eval step \d+: .* loss ([0-9.]+) \(", text)[-1])


def test_elastic_run_shrinks_grows_and_checkpoints_before_a_preemption(
    start_local_ray_cluster, s3_server, s3_bucket, tmp_path, monkeypatch
):
    # Every Ray process of the cluster inherits this environment, as a cluster's nodes would have it.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    data_url, runs_url = f"s3://{s3_bucket}/digits", f"s3://{s3_bucket}/runs"
    write = subprocess.run([sys.executable, "-m", "pipelines.write_shards", "digits", data_url, "--no-progress"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert write.returncode == 0, write.stderr
    cluster = start_local_ray_cluster(workers=3, cpus_per_node=1, head_cpus=0)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trace = tmp_path / "trace"
    common = [
        f"data.url={data_url}", f"tracking.uri={tracking}", f"run.storage_path={runs_url}",
        "optim.global_batch_size=120", "schedule.epochs=8", "schedule.warmup_steps=5", "eval.every_steps=1000",
        "train.log_every_steps=1", f"run.seed={SEED}",
    ]
    entry = ["python", "-m", "orchestrator.pretrain", "run.name=elastic", *common, "scaling.num_workers=[1,3]",
             "scaling.elastic_resize_interval_s=5", "checkpoint.every_steps=4", "checkpoint.num_to_keep=100",
             f"data.trace_keys_dir={trace}",
             # Each step slowed on purpose: the phases wait on wall-clock events (a node starting, a resize check,
             # the drain CLI and the watcher's poll) while steps are ~0.15-0.45 s; unslowed, a slow machine ran
             # the 80 steps out before the drain reached the run (CI: grown back at step 72 of 88, no notice by the end).
             "observe.data_delay_s=0.5"]
    job = cluster.submit(entry, working_dir=REPO, wait=False)
    lines, phase, killed, drained, notice_step = [], 0, None, None, None
    deadline = time.monotonic() + 900
    for line in job.stdout:
        lines.append(line)
        step = re.search(r"\bstep (\d+)/\d+", line)
        if phase == 0 and step and int(step.group(1)) >= 6:
            nodes = _train_worker_nodes(cluster)
            if len(nodes) == 3:
                assert len(set(nodes.values())) == 3, f"two workers on one node: {nodes}"
                killed = sorted(set(nodes.values()))[-1]
                cluster.kill_node(killed)
                phase = 1
        elif phase == 1 and re.search(r"\[restart\] world sizes 3 -> 2\b", line):
            cluster.restart_node(killed)  # back in the cluster: the next resize check grows the run
            phase = 2
        elif phase == 2 and re.search(r"\[restart\] world sizes 3 -> 2( -> \d)* -> 3:", line):
            # three 1-CPU nodes, three workers: every worker node hosts one (a process scan can miss them
            # while Ray renames them); drain one that was not killed before
            drained = next(i for i in (1, 2, 3) if i != killed)
            _drain(cluster, drained, deadline_s=60)
            phase = 3
        elif phase == 3 and (m := re.search(r"\[preemption\] .*checkpoint at step (\d+)", line)):
            notice_step = int(m.group(1))
            phase = 4
        elif phase == 4 and step and int(step.group(1)) == notice_step + 1:
            cluster.kill_node(drained)  # the reclaim: one step after the notice's checkpoint
            phase = 5
        assert time.monotonic() < deadline, "".join(lines[-80:])
    job.wait(timeout=60)
    text = "".join(lines)
    (tmp_path / "job.log").write_text(text)  # the whole output, for a failure seen only in CI's tail
    assert job.returncode == 0, text[-6000:]
    assert phase == 5, f"stopped at phase {phase}; events:\n" + _events(lines) + "\n" + text[-3000:]

    # 3: the notice's checkpoint was taken at that step boundary and registered by Ray Train before the node
    # went; the restart after the reclaim resumed from it, or from a periodic one after it (with the upload off
    # the training path the run gets a few steps further in the time the test takes to see a line and kill)
    from orchestrator.checkpoint.runs import _registered_steps

    s3 = s3fs.S3FileSystem(endpoint_url=s3_server)
    assert notice_step in _registered_steps(s3, f"{s3_bucket}/runs/elastic").values()
    after_notice = text[text.index("[preemption]"):]
    resumes = [int(s) for s in re.findall(r"\[resume\] from checkpoint_\S+: step (\d+),", after_notice)]
    assert resumes and resumes[0] >= notice_step, (resumes, notice_step)
    assert resumes[0] == notice_step or resumes[0] % 4 == 0, (resumes, notice_step)
    summary = re.search(r"restarts\s+(\d+) \((\d+) resizes; world sizes ([0-9 >-]+)\), (\d+) steps redone", text)
    assert summary, text[-3000:]
    # shrunk to 2, grown back to 3 (Ray may restart a group more than once on the way), 2 after the reclaim
    assert re.match(r"3 -> 2( -> \d)* -> 3( -> \d)* -> 2$", summary.group(3).strip()), summary.group(3)
    assert int(summary.group(1)) >= 3 and int(summary.group(2)) >= 2
    planned = int(re.search(r"step \d+/(\d+)", text).group(1))
    assert re.search(rf"after step {planned}\b", text)

    # the data: every step's keys as planned, whatever the world size that trained it
    steps = _final_attempts(trace)
    assert sorted(steps) == list(range(1, planned + 1))
    expected = planned_steps(data_url, epochs=8, slots=SLOTS, chunk=CHUNK, seed=SEED,
                             storage_options={"endpoint_url": s3_server})
    worlds = set()
    for s, recs in steps.items():
        worlds.add(recs[0]["world"])
        got = Counter(k for r in recs for k in r["keys"])
        assert got == expected[s - 1], f"step {s} (world size {recs[0]['world']}) trained other samples"
    assert worlds == {2, 3}
    per_epoch: dict[int, Counter] = defaultdict(Counter)
    for recs in steps.values():
        per_epoch[recs[0]["epoch"]].update(k for r in recs for k in r["keys"])
    held_out = minival_keys(data_url, {"endpoint_url": s3_server})
    assert len(held_out) == 142  # the digits preset's minival: 10% of each class of the 1437 training samples
    for epoch, seen in per_epoch.items():
        assert max(seen.values()) == 1, f"epoch {epoch} used a sample twice"
        assert not set(seen) & held_out, f"epoch {epoch} trained on the minival"
        assert sum(seen.values()) == 10 * 120  # the 1295 the minival leaves: 10 steps of 120, 95 dropped by the plan

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("mixer-digits").experiment_id],
                              filter_string="tags.mlflow.runName = 'elastic'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    m = runs[0].data.metrics
    assert m["goodput/restarts"] >= 3 and m["goodput/resizes"] >= 2 and m["goodput/recovery_s"] > 0
    assert 0 < m["compute/goodput"] < 1
    assert runs[0].data.tags["world_sizes"] == summary.group(3).strip()
    assert [p for p in s3.ls(f"{s3_bucket}/runs/elastic") if "checkpoint_" in p]

    # Too big for the (now two-node) cluster, even at its minimum: a clear error in bounded time, not a hang.
    t0 = time.monotonic()
    too_big = cluster.submit(["python", "-m", "orchestrator.pretrain", "run.name=too-big", f"data.url={data_url}",
                              f"tracking.uri={tracking}", "scaling.num_workers=[4,5]", "optim.global_batch_size=120",
                              "scaling.startup_timeout_s=3"], working_dir=REPO, timeout=300)
    out = too_big.stdout + too_big.stderr
    assert too_big.returncode != 0
    assert "cannot fit scaling.num_workers=[4, 5] (4 workers at the least" in out and "CPU: need 4" in out, out[-3000:]
    assert time.monotonic() - t0 < 240

    cluster.restart_node(drained)  # back to three nodes for the fixed-size run
    cluster.wait_for_alive_nodes(4)

    # the same run on a fixed 3 workers: the same data order, so the losses end close
    fixed = cluster.submit(["python", "-m", "orchestrator.pretrain", "run.name=fixed", *common,
                            "scaling.num_workers=3"], working_dir=REPO, timeout=600)
    assert fixed.returncode == 0, fixed.stdout[-3000:] + fixed.stderr[-3000:]
    assert abs(_final_val_loss(fixed.stdout + fixed.stderr) - _final_val_loss(text)) < 0.15
