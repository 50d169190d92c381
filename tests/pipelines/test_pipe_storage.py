"""Writing and reading through S3 (moto on 127.0.0.1 via s3fs), the digits round trip, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest

from pipelines.digits import ensure_digits_dataset
from pipelines.loader import ShardLoader
from pipelines.manifest import ManifestNotFoundError, load_manifest
from pipelines.redaction import redacted_options
from pipelines.shard_reader import iter_piece
from pipelines.storage import (
    PROBE_RETRIES,
    READ_RETRIES,
    DatasetNotFoundError,
    StorageUnreachableError,
    _quick_options,
    atomic_write,
    check_dataset_reachable,
    get_fs,
)
from pipelines.transforms import decode_image
from pipelines.write_shards import digits_arrays, digits_split, main, write_dataset


def _decoded(manifest, split):
    out = {}
    for s in manifest.shards(split):
        for r in iter_piece(s.url, 0, s.num_samples, {}, lambda *a: pytest.fail(f"bad sample {a}")):
            out[r.key] = (decode_image(r.image).numpy(), r.label)
    return out


def test_digits_round_trip(digits_root):
    m = load_manifest(digits_root)
    assert m.num_classes == 10 and m.num_samples("train") + m.num_samples("val") == 1797
    images, labels = digits_arrays()
    for split, idx in digits_split(0.2, 0).items():
        got = _decoded(m, split)
        assert len(got) == len(idx) == m.num_samples(split)
        for n, i in enumerate(idx):
            pix, lab = got[f"{split}-{n:08d}"]
            assert lab == labels[i]
            assert pix.shape == (3, 8, 8)
            assert (pix == images[i][None]).all()
    assert np.bincount(labels[digits_split(0.2, 0)["val"]]).min() >= 35  # stratified


def test_shards_are_plain_ustar_without_pax_headers(digits_root):
    """Each member is one 512-byte header + data: no PAX extended header for readers to parse per sample."""
    import tarfile

    url = load_manifest(digits_root).shards("train")[0].url
    with tarfile.open(url) as tar:
        members = tar.getmembers()
    assert members and all(not m.pax_headers and m.mtime == 0 for m in members)
    with open(url, "rb") as f:
        assert b"PaxHeader" not in f.read()


def test_manifest_relative_urls_and_move(digits_root, tmp_path):
    doc = json.load(open(os.path.join(digits_root, "manifest.json")))
    assert doc["splits"]["train"][0]["url"] == "train/train-000000.tar"
    moved = str(tmp_path / "moved")
    shutil.copytree(digits_root, moved)
    m = load_manifest(os.path.join(moved, "manifest.json"))
    assert m.shards("train")[0].url == os.path.join(moved, "train", "train-000000.tar")
    assert len(list(ShardLoader(moved, batch_size=64, num_workers=0))) == 1437 // 64


def test_missing_manifest_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_manifest(str(tmp_path / "nope"))
    assert isinstance(e.value, ManifestNotFoundError)
    assert "nope/manifest.json" in str(e.value) and "python -m pipelines.write_shards" in str(e.value)


def test_ensure_digits_idempotent(tmp_path):
    root = ensure_digits_dataset(str(tmp_path / "d"))
    t = os.path.getmtime(os.path.join(root, "manifest.json"))
    assert ensure_digits_dataset(str(tmp_path / "d")) == root
    assert os.path.getmtime(os.path.join(root, "manifest.json")) == t


def test_cli_folder_source_reports_unreadable(tmp_path, capsys):
    from shard_samples import png_bytes

    src = tmp_path / "src"
    for c in ("cat", "dog"):
        (src / c).mkdir(parents=True)
        for i in range(3):
            (src / c / f"{i}.png").write_bytes(png_bytes(i, size=6))
    (src / "dog" / "broken.png").write_bytes(b"not an image")
    rc = main([str(src), str(tmp_path / "out"), "--val-fraction", "0", "--format", "jpg", "--no-progress"])
    assert rc == 2
    assert "broken.png" in capsys.readouterr().err
    m = load_manifest(str(tmp_path / "out"))
    assert m.class_names == ["cat", "dog"] and m.num_samples("train") == 6 and m.image_format == "jpg"
    assert m.extra["unreadable"][0]["path"].endswith("broken.png")


def test_write_and_read_s3(s3_server, s3_bucket, digits_root, monkeypatch):
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_server)  # the way a user points at their store
    url = f"s3://{s3_bucket}/datasets/digits"
    m = write_dataset("digits", url, progress=False)
    assert m.shards("train")[0].url == f"{url}/train/train-000000.tar"
    kw = dict(batch_size=32, rank=1, world_size=2, num_workers=2, seed=5, return_keys=True)
    remote = [(k, x) for x, _, ks in ShardLoader(url, **kw) for k in ks for _ in [0]]
    local = [(k, x) for x, _, ks in ShardLoader(digits_root, **kw) for k in ks for _ in [0]]
    assert [k for k, _ in remote] == [k for k, _ in local]
    # a brace pattern: counts come from the manifest next to the shards
    pat = f"{url}/train/train-{{000000..000005}}.tar"
    ld = ShardLoader(pat, batch_size=32, num_workers=0)
    assert sum(1 for _ in ld) == 1437 // 32


def test_missing_bucket_and_prefix_clear_errors(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    t = time.monotonic()
    with pytest.raises(DatasetNotFoundError, match="bucket 'no-such-bucket'") as e:
        ShardLoader("s3://no-such-bucket/ds", batch_size=8)
    assert "testing-secret-key" not in str(e.value)
    with pytest.raises(DatasetNotFoundError, match=f"{s3_bucket}/missing/manifest.json"):
        ShardLoader(f"s3://{s3_bucket}/missing", batch_size=8)
    assert time.monotonic() - t < 10


def test_unreachable_endpoint_fast_and_secret_free(monkeypatch):
    secret = "super-secret-value-123"
    opts = {"endpoint_url": "http://127.0.0.1:9", "key": "AKIDEXAMPLE", "secret": secret}
    t = time.monotonic()
    with pytest.raises(StorageUnreachableError) as e:
        check_dataset_reachable("s3://bucket/ds", opts, want_file="manifest.json")
    assert time.monotonic() - t < 15
    msg = str(e.value) + repr(e.value)
    assert "127.0.0.1:9" in msg and secret not in msg and "AKIDEXAMPLE" not in msg
    assert redacted_options(opts)["secret"] == "****"


def test_atomic_write_local_whole_or_nothing(tmp_path):
    target = tmp_path / "token"
    with atomic_write(target, mode=0o600) as f:
        f.write(b"first")
        assert not target.exists()  # not visible while being written
    assert target.read_bytes() == b"first" and (target.stat().st_mode & 0o777) == 0o600
    with pytest.raises(RuntimeError, match="writer died"), atomic_write(str(target)) as f:  # the writer's own error
        f.write(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"first"  # the old content stays, and no temporary file is left
    assert os.listdir(tmp_path) == ["token"]
    with atomic_write(f"file://{target}") as f:
        f.write(b"second")
    assert target.read_bytes() == b"second" and (target.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_s3_publishes_on_success_only(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_server)
    url = f"s3://{s3_bucket}/runs/weights.bin"
    with pytest.raises(RuntimeError, match="writer died"), atomic_write(url) as f:  # the writer's own error
        f.write(b"partial")
        raise RuntimeError("writer died")
    fs, path = get_fs(url)
    assert not fs.exists(path)
    with atomic_write(url) as f:
        f.write(b"x" * 1000)
        assert not fs.exists(path)
    fs.invalidate_cache()
    assert fs.cat_file(path) == b"x" * 1000


def test_s3_retry_policy_is_the_clients(monkeypatch):
    """Transient S3 errors are retried by botocore (standard mode) as configured in storage.get_fs; the
    options or botocore's own environment settings take precedence; the reachability probe retries less."""
    for name in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    opts = {"endpoint_url": "http://127.0.0.1:9"}
    fs, _ = get_fs("s3://bucket/ds/manifest.json", opts)
    assert fs.config_kwargs["retries"] == READ_RETRIES == {"mode": "standard", "total_max_attempts": 5}
    assert fs.s3.meta.config.retries == {"mode": "standard", "total_max_attempts": 5}  # what botocore got
    own = {**opts, "config_kwargs": {"retries": {"max_attempts": 9}}}
    assert get_fs("s3://bucket/ds", own)[0].config_kwargs["retries"] == {"max_attempts": 9}
    assert _quick_options("s3://bucket/ds", opts)["config_kwargs"]["retries"] == PROBE_RETRIES
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    assert "retries" not in get_fs("s3://bucket/other", opts)[0].config_kwargs
