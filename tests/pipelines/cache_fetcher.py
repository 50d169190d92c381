"""A process that opens one shard through a shard cache after a barrier (test_pipe_shard_cache's race).

Its own small module: a spawned process imports the module of its target, and this one does not import torch.
"""

from __future__ import annotations

from pipelines.shard_cache import CacheConfig, ShardSource
from pipelines.storage import resolve_storage_options


def fetch_after_barrier(url, size, directory, barrier, out):
    src = ShardSource(resolve_storage_options(url), CacheConfig(directory, 2**30))
    barrier.wait()
    with src.open(url, size=size) as f:
        n = len(f.read())
    out.put((src.take_counts(), n))
