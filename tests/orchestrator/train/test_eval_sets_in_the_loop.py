"""eval.sets through the driver's checks (resolve_data) into the training loop, without Ray (LocalSession): every set
is evaluated at every evaluation beside val, logged and reported as <name>/top1|top5|loss; a set with a label file is scored
ReaL-style. Each set's URL reaches the run's params (flatten_config), where the tracker redacts it."""

from __future__ import annotations

import json

import pytest


def test_every_set_is_evaluated_logged_and_reported(digits_slice, memory_tracker, tmp_path, monkeypatch):
    from orchestrator.config.load import load_config
    from orchestrator.eval.sets import sample_keys
    from orchestrator.train import setup
    from orchestrator.train.launch import resolve_data
    from orchestrator.train.loop import Job, run_training
    from orchestrator.train.session import LocalSession

    url = digits_slice
    # a ReaL file whose list for every image is its own label: the ReaL figures must equal the plain ones
    from pipelines.loader import ShardLoader

    own = {k: [int(y)] for _, ys, keys in ShardLoader(url, "val", batch_size=256, training=False, num_workers=0,
                                                       return_keys=True) for k, y in zip(keys, ys, strict=True)}
    assert set(own) == sample_keys(url, "val", {})
    labels = tmp_path / "own.json"
    labels.write_text(json.dumps(own))
    cfg = load_config("digits", [
        f"data.url={url}", "scaling.num_workers=1", "data.loader_workers=0", "optim.global_batch_size=64",
        "train.max_steps=2", "eval.every_steps=2", "schedule.warmup_steps=1", "tracking.enabled=false",
        "data.minival_fraction=0",
        f"eval.sets=[{{name: again, url: '{url}'}}, {{name: real, url: '{url}', labels: '{labels}'}}]",
    ])
    data = resolve_data(cfg)
    assert [(s["name"], s["labels"]) for s in data.eval_sets] == [("again", None), ("real", str(labels))]
    job = Job(data.url, data.num_classes, data.train_samples, None, None, data.storage_options,
              eval_sets=data.eval_sets)
    session = LocalSession(str(tmp_path / "run"), device="cpu")
    tracker = memory_tracker()
    monkeypatch.setattr(setup, "start_tracker", lambda cfg, job, run_id: tracker)  # rank 0's tracker, in memory
    final = run_training(cfg, session, job)
    (logged,) = [m for m, step in tracker.metrics if "val/top1" in m and step == 2]
    (report,) = [r for r in session.reports if "val/top1" in r]
    for name in ("val", "again", "real"):
        keys = {f"{name}/{m}" for m in ("top1", "top5", "loss")}
        assert keys <= set(report) and {k: logged[k] for k in keys} == {k: report[k] for k in keys}, name
    assert report["again/top1"] == report["val/top1"] and report["again/loss"] == report["val/loss"]
    assert report["real/top1"] == pytest.approx(report["val/top1"]) and report["real/top5"] == pytest.approx(
        report["val/top5"])
    assert final["real/loss"] == report["real/loss"]


def test_set_urls_are_run_params():
    from orchestrator.config.load import load_config
    from orchestrator.tracking.run import flatten_config

    cfg = load_config("digits", ["eval.sets=[{name: v2, url: 's3://user:hunter22@b/v2', labels: /l.json}]"])
    params = flatten_config(cfg.to_dict())
    assert params["eval.sets.v2.url"] == "s3://user:hunter22@b/v2"  # the tracker redacts it (next assert)
    assert params["eval.sets.v2.split"] == "val" and params["eval.sets.v2.labels"] == "/l.json"
    from pipelines.redaction import filter_secrets

    assert filter_secrets(params)[0]["eval.sets.v2.url"] == "s3://user:****@b/v2"
    assert flatten_config(load_config("digits").to_dict())["eval.sets"] == "[]"
