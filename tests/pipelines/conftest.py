"""Fixtures for the pipelines tests: synthetic shard sets (helpers in shard_samples.py) and digits."""

from __future__ import annotations

import os

import pytest
from shard_samples import make_dataset


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
