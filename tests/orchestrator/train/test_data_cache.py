"""The node-local shard cache in a training run: a 2-epoch digits run over loopback S3 logs each epoch's
data/bytes_from_storage and data/bytes_from_cache (a sqlite MLflow store). Bad data.cache_* values are cases
of tests/orchestrator/test_bad_inputs.py."""

from __future__ import annotations


def test_two_epoch_run_logs_bytes_from_storage_and_cache(s3_server, s3_bucket, tmp_path, monkeypatch):
    """Epoch 1 reads every training shard from S3 once; epoch 2 reads none from S3 and all from the cache."""
    from mlflow.tracking import MlflowClient

    from orchestrator.config.load import load_config
    from orchestrator.tracking.tracker import RunTracker
    from orchestrator.train.launch import resolve_data
    from orchestrator.train.loop import Job, run_training
    from orchestrator.train.session import LocalSession
    from pipelines.manifest import load_manifest
    from pipelines.storage import get_fs
    from pipelines.write_shards import write_dataset

    monkeypatch.setenv("MIXER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_server)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    url = f"s3://{s3_bucket}/digits"
    write_dataset("digits", str(tmp_path / "digits"), progress=False)
    fs, path = get_fs(url)
    fs.put(str(tmp_path / "digits") + "/", path, recursive=True)
    total = sum(s.size for s in load_manifest(url).shards("train"))
    cache = tmp_path / "node-cache"
    cfg = load_config("digits", [
        "run.name=cached", f"data.url={url}", "schedule.epochs=2", "schedule.warmup_steps=2",
        "scaling.num_workers=1", "data.loader_workers=0", "eval.every_steps=100000", "train.log_every_steps=50",
        f"data.cache_dir={cache}", "data.cache_max_gb=1",
    ])
    data = resolve_data(cfg)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(uri, cfg.tracking.experiment, cfg.run.name)
    run_id = tracker.start()
    job = Job(data.url, data.num_classes, data.train_samples, run_id, uri, data.storage_options)
    run_training(cfg, LocalSession(str(tmp_path / "runs" / "cached"), device="cpu"), job)
    tracker.end("FINISHED")
    client = MlflowClient(uri)
    storage = [m.value for m in sorted(client.get_metric_history(run_id, "data/bytes_from_storage"),
                                       key=lambda m: m.step)]
    cached = [m.value for m in sorted(client.get_metric_history(run_id, "data/bytes_from_cache"),
                                      key=lambda m: m.step)]
    assert storage[:2] == [total, 0], storage  # epoch 1: each shard once from S3; epoch 2: none
    assert cached[1] >= 0.9 * total, cached  # epoch 2 read locally
    assert any(n.endswith(".tar") for n in (p.name for p in cache.iterdir()))
