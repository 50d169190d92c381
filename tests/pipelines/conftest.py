"""Fixtures for the pipelines tests: synthetic shard sets (helpers in shard_samples.py), digits, digits on loopback S3
and moto's request recorder (the witness of what the shard cache fetched)."""

from __future__ import annotations

import json
import os

import pytest
import requests
from shard_samples import make_dataset

from pipelines.manifest import load_manifest
from pipelines.storage import get_fs


@pytest.fixture
def make_shards(tmp_path):
    def _make(sizes, **kw):
        root = str(tmp_path / f"ds{len(os.listdir(tmp_path))}")
        make_dataset(root, list(sizes), **kw)
        return root

    return _make


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    from pipelines.write_shards import write_dataset

    root = str(tmp_path_factory.mktemp("digits") / "digits")
    write_dataset("digits", root, progress=False)
    return root


@pytest.fixture
def s3_digits(s3_server, s3_bucket, digits_root, monkeypatch):
    """The digits dataset copied to a fresh bucket; yields (dataset URL, its manifest)."""
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_server)
    url = f"s3://{s3_bucket}/digits"
    fs, path = get_fs(url)
    fs.put(digits_root + "/", path, recursive=True)
    fs.invalidate_cache()
    return url, load_manifest(url)


class Recording:
    """moto's request recorder; the log file goes to the server process's working directory (here: tmp)."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def __enter__(self) -> Recording:
        requests.post(f"{self.endpoint}/moto-api/recorder/reset-recording", timeout=10).raise_for_status()
        requests.post(f"{self.endpoint}/moto-api/recorder/start-recording", timeout=10).raise_for_status()
        return self

    def __exit__(self, *exc) -> None:
        requests.post(f"{self.endpoint}/moto-api/recorder/stop-recording", timeout=10).raise_for_status()

    def shard_gets(self) -> dict[str, int]:
        """Shard key -> GET requests for it (ranged or not)."""
        text = requests.get(f"{self.endpoint}/moto-api/recorder/download-recording", timeout=10).text
        out: dict[str, int] = {}
        for line in filter(None, text.splitlines()):
            e = json.loads(line)
            path = e["url"].split("://", 1)[-1].split("/", 1)[-1].split("?")[0]  # bucket/key
            if e["method"] == "GET" and path.endswith(".tar"):
                out[path] = out.get(path, 0) + 1
        return out


@pytest.fixture
def recorder(s3_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # moto writes its log relative to the working directory
    return Recording(s3_server)
