"""Honest figures of a run: held vs productive accelerator-hours, and bad/padded/dropped samples per epoch."""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from orchestrator.train.compute import ComputeClock
from orchestrator.train.data_counts import DataCounts
from orchestrator.train.driver import figures_lines


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_held_and_productive_hours_across_a_restart():
    t = FakeClock()
    first = ComputeClock(accelerators=4, clock=t)
    t.now += 600  # start-up, restore: held, not productive
    with first.step():
        t.now += 1800  # training steps
    t.now += 600  # evaluation and a checkpoint: held, not productive
    assert first.held_hours() == pytest.approx(3000 * 4 / 3600)
    assert first.productive_hours() == pytest.approx(1800 * 4 / 3600)
    saved = first.state()
    assert saved == pytest.approx({"accelerator_hours": 10 / 3, "productive_hours": 2.0})

    t.now += 5000  # the attempt dies after its checkpoint: that time is lost with it
    second = ComputeClock(accelerators=4, clock=t)  # the restarted worker group
    second.resume(saved)
    t.now += 360
    with second.step():
        t.now += 1440
    m = second.metrics()
    assert m["compute/accelerator_hours"] == pytest.approx((3000 + 1800) * 4 / 3600)
    assert m["compute/productive_hours"] == pytest.approx((1800 + 1440) * 4 / 3600)
    assert m["compute/goodput"] == pytest.approx(3240 / 4800)
    # a step that raises still counts; a checkpoint from before productive hours existed resumes from 0
    third = ComputeClock(accelerators=1, clock=t)
    third.resume({"accelerator_hours": 1.0})
    with pytest.raises(RuntimeError), third.step():
        t.now += 3600
        raise RuntimeError
    assert third.metrics() == pytest.approx({"compute/accelerator_hours": 2.0, "compute/productive_hours": 1.0,
                                             "compute/goodput": 0.5})
    assert ComputeClock(2, clock=t).metrics()["compute/goodput"] == 0.0  # nothing held yet


def test_accelerators_held():
    from orchestrator.config.load import load_config
    from orchestrator.train.plan import accelerators

    cpu = load_config("digits", ["scaling.num_workers=4"])
    gpu = load_config("digits", ["scaling.num_workers=4", "scaling.use_gpu=true"])
    assert accelerators(cpu, 4) == 4 and accelerators(gpu, 4) == 4


def test_data_counts_metrics_state_and_totals():
    a = DataCounts(Counter({("corrupt_image", "s3://key:secret@b/t-1.tar"): 2, ("missing_label", "/d/t-2.tar"): 1}),
                   padded=3, dropped=5, bytes_from_storage=100)
    b = DataCounts(Counter({("corrupt_image", "s3://key:secret@b/t-1.tar"): 1}), padded=1, dropped=5,
                   bytes_from_cache=100)
    total = a + b
    assert total.metrics() == {"data/bad_samples": 4, "data/bad/corrupt_image": 3, "data/bad/missing_label": 1,
                               "data/padded_samples": 4, "data/dropped_samples": 10,
                               "data/bytes_from_storage": 100, "data/bytes_from_cache": 100}
    assert DataCounts.from_state(json.loads(json.dumps(total.state()))) == total
    assert DataCounts.from_state(None) == DataCounts()
    worst = total.worst_shards()
    assert [w["bad"] for w in worst] == [3, 1] and worst[0]["kinds"] == {"corrupt_image": 3}
    assert worst[0]["shard"] == "s3://key:****@b/t-1.tar"  # URLs redacted
    assert DataCounts().worst_shards_tag(0) == {}


def test_end_summary_lines():
    total = DataCounts(Counter({("corrupt_image", "/d/t-1.tar"): 3, ("missing_label", "/d/t-2.tar"): 1}),
                       padded=4, dropped=10)
    lines = figures_lines({**total.metrics(), "compute/accelerator_hours": 2.0, "compute/productive_hours": 1.5,
                           "compute/goodput": 0.75})
    assert lines[0].split(None, 1)[1] == ("4 bad (corrupt_image 3, missing_label 1), 4 padded, 10 dropped "
                                          "(all epochs, all workers)")
    assert "2 accelerator-hours held, 1.5 in training steps (goodput 75.0%)" in lines[1]
    assert figures_lines({}) == []
    assert figures_lines({"perf/run_data_wait_fraction": 0.8125, "train/run_mfu": 0.066}) == [
        "time            81.2% of the training steps waiting for data (the most starved rank), MFU 6.6%"]
    assert figures_lines({"perf/run_data_wait_fraction": 0.25})[0].endswith(
        "MFU unknown (no peak known for this accelerator)")


# ------------------------------------------------------------------ a short run without Ray, with bad samples

BATCH = 16
TRAIN = [40, 24]  # 64 samples: 4 batches an epoch, none dropped
BAD = 2  # corrupt images in the second shard, every epoch (padded back by re-reading)


def _shard_samples():
    spec = importlib.util.spec_from_file_location(
        "shard_samples", Path(__file__).parents[2] / "pipelines" / "shard_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dataset(root: Path) -> str:
    ss = _shard_samples()
    from pipelines.manifest import FORMAT_VERSION, Manifest, ShardInfo, write_manifest

    splits = {}
    for split, sizes in (("train", TRAIN), ("val", [32])):
        shards = []
        for j, n in enumerate(sizes):
            path = str(root / split / f"{split}-{j:06d}.tar")
            members = ss.good_members(j, n)
            if split == "train" and j == 1:
                members[4] = (members[4][0], b"garbage")  # sample 2's image
                members[10] = (members[10][0], b"\x89PNG\r\n\x1a\nnot a png")  # sample 5's image
            ss.write_tar(path, members)
            shards.append(ShardInfo(path, n))
        splits[split] = shards
    write_manifest(Manifest(FORMAT_VERSION, [str(i) for i in range(10)], splits, root=str(root),
                            image_format="png"), str(root))
    return str(root)


def _run(tmp_path, uri, run_id, url, *overrides):
    from orchestrator.config.load import load_config
    from orchestrator.train.launch import resolve_data
    from orchestrator.train.loop import Job, run_training
    from orchestrator.train.session import LocalSession

    cfg = load_config("digits", [
        "run.name=figures", f"data.url={url}", "data.max_bad_fraction=0.5", "data.loader_workers=0",
        "scaling.num_workers=1", f"optim.global_batch_size={BATCH}", "schedule.epochs=3", "schedule.warmup_steps=1",
        "train.log_every_steps=2",
        "data.minival_fraction=0",  # the counts below are this hand-made split's whole (the preset holds 10% out)
        *overrides,
    ])
    data = resolve_data(cfg)
    job = Job(data.url, data.num_classes, data.train_samples, run_id, uri, data.storage_options)
    session = LocalSession(str(tmp_path / "run"), device="cpu")
    return run_training(cfg, session, job), session


def test_run_logs_data_counts_per_epoch_and_compute(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from orchestrator.tracking.tracker import RunTracker

    monkeypatch.setenv("MIXER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    url = _dataset(tmp_path / "ds")
    bad_shard = os.path.join(url, "train", "train-000001.tar")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(uri, "figures", "figures")
    run_id = tracker.start()

    # 1.5 epochs, then a resume that finishes the 3 epochs (4 steps an epoch): the unfinished epoch 1 is
    # logged at the first attempt's end, and counted once in the run's totals
    first, _ = _run(tmp_path, uri, run_id, url, "train.max_steps=6")
    assert first["step"] == 6
    # epoch 0 whole, and what the first half of epoch 1 met so far
    half = first["data/bad_samples"] - BAD
    assert 0 <= half <= BAD and BAD <= first["data/padded_samples"] <= 2 * BAD
    final, session = _run(tmp_path, uri, run_id, url)
    tracker.end("FINISHED")
    assert final["step"] == 12
    assert final["data/bad_samples"] == final["data/bad/corrupt_image"] == 3 * BAD
    assert final["data/padded_samples"] == 3 * BAD and final["data/dropped_samples"] == 0
    assert 0 < final["compute/productive_hours"] < final["compute/accelerator_hours"]
    assert 0 < final["compute/goodput"] < 1

    client = MlflowClient(uri)

    def hist(key):
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    # epoch 0 ends at step 4, epoch 1 at step 8 (after its half at step 6), epoch 2 at step 12
    assert hist("data/epoch") == [(4, 0), (6, 1), (8, 1), (12, 2)]
    assert hist("data/bad_samples") == [(4, BAD), (6, half), (8, BAD), (12, BAD)]
    assert hist("data/bad/corrupt_image") == hist("data/bad_samples")
    padded = hist("data/padded_samples")
    assert [v for s, v in padded if s != 6] == [BAD] * 3 and padded[1] == (6, first["data/padded_samples"] - BAD)
    assert [v for _, v in hist("data/dropped_samples")] == [0] * 4
    tags = client.get_run(run_id).data.tags
    for epoch in (0, 1, 2):  # epoch 1's tag: the whole epoch's, set when it ended
        worst = json.loads(tags[f"data/worst_shards/epoch_{epoch}"])
        assert worst == [{"shard": bad_shard, "bad": BAD, "kinds": {"corrupt_image": BAD}}]

    held = hist("compute/accelerator_hours")
    assert all(b[1] >= a[1] for a, b in zip(held, held[1:], strict=False))  # accumulated across the resume
    for key in ("compute/accelerator_hours", "compute/productive_hours", "compute/goodput"):
        assert (12, pytest.approx(final[key])) in hist(key), key  # held until the end
    assert session.reports[-1]["compute/accelerator_hours"] <= final["compute/accelerator_hours"]
