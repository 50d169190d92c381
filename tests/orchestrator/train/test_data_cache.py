"""data.cache_dir / data.cache_max_gb: bad values exit 2 before anything starts (in the style of
test_bad_inputs.py), and a 2-epoch digits run over loopback S3 logs each epoch's data/bytes_from_storage and
data/bytes_from_cache (a sqlite MLflow store)."""

from __future__ import annotations

import pytest

from orchestrator import pretrain


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    home, ray_tmp = tmp_path / "home", tmp_path / "ray"
    monkeypatch.setenv("MIXER_HOME", str(home))
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    regular = tmp_path / "a_regular_file"
    regular.write_text("not a directory")
    return {"home": home, "ray": ray_tmp, "file": str(regular)}


BAD = [
    ("max-gb-0", ["data.cache_max_gb=0"], ["data.cache_max_gb=0", "> 0"]),
    ("max-gb-negative", ["data.cache_max_gb=-5"], ["data.cache_max_gb=-5", "> 0"]),
    ("dir-on-s3", ["data.cache_dir=s3://bucket/cache"], ["data.cache_dir='s3://bucket/cache'", "node-local directory"]),
    ("dir-under-a-file", ["data.cache_dir={file}/cache"], ["data.cache_dir", "{file}/cache", "regular file"]),
    ("dir-is-a-file", ["data.cache_dir={file}"], ["data.cache_dir", "is a regular file", "null (no cache)"]),
]


@pytest.mark.parametrize("case_id, argv, words", BAD, ids=[c[0] for c in BAD])
def test_bad_cache_settings_exit_2(case_id, argv, words, isolated, capsys):
    import ray

    argv = [a.format(**isolated) for a in argv]
    try:
        code = pretrain.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\n{out}\n{err}"
    message = [line for line in err.splitlines() if "error: " in line]
    assert len(message) == 1, err
    for word in words:
        assert word.format(**isolated) in message[0], message[0]
    assert "Traceback" not in out + err
    assert not ray.is_initialized()
    assert not isolated["home"].exists()  # nothing written: no store, no runs, no data
    assert not isolated["ray"].exists()


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
