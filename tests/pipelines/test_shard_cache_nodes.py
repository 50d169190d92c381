"""The node-local shard cache on several nodes: what each node fetches from object storage over epochs.

The data plan reshuffles shards over the stream slots every epoch (pipelines/plan.py), so a node does not read
the same shards twice: with N nodes about 1/N of a node's epoch-2 shards are in its cache, 1-(1-1/N)^(e-1) of
epoch e's, and each node's cache fills toward the whole dataset (object storage serves ~N x the dataset per run,
not epochs x the dataset; pipelines/shard_cache.py, README "Node-local shard cache"). Here two ranks of 2 stand
for two nodes (one slot each, a cache directory each) over 3 epochs of digits on loopback S3: each node fetches
each shard at most once, what it fetches is exactly what the plan gives it and it has not read before, moto's
request log and the data/bytes_from_storage counters agree, and the cache hits grow epoch by epoch.
"""

from __future__ import annotations

import os

from orchestrator.train.data_counts import DataCounts
from pipelines.loader import ShardLoader
from pipelines.plan import owned_slots

NODES, EPOCHS = 2, 3


def test_each_node_fetches_each_shard_at_most_once_and_hits_grow(s3_digits, recorder, tmp_path):
    url, m = s3_digits
    shards = m.shards("train")
    size = {i: s.size for i, s in enumerate(shards)}
    loaders = [ShardLoader(url, "train", batch_size=30, rank=r, world_size=NODES, num_workers=0, slots=NODES,
                           seed=0, cache_dir=str(tmp_path / f"node{r}"), cache_max_gb=1.0)
               for r in range(NODES)]
    seen: list[set[int]] = [set() for _ in range(NODES)]  # shards each node has read in earlier epochs
    fetched: list[set[int]] = [set() for _ in range(NODES)]
    metrics, hit_shards = [], []
    with recorder:
        for epoch in range(EPOCHS):
            counts, hits = DataCounts(), 0
            for r, loader in enumerate(loaders):
                plan = loader.plan(epoch)
                planned = {p.shard for sid in owned_slots(r, NODES, NODES) for p in plan.slots[sid].pieces}
                loader.set_epoch(epoch)
                for _ in loader:
                    pass
                from_storage, from_cache = loader.bytes_read()
                new, cached = planned - seen[r], planned & seen[r]
                # storage: exactly the shards of this epoch the node has not read before, each fetched whole
                assert from_storage == sum(size[i] for i in new), (epoch, r, sorted(new))
                # cache: only copies it fetched earlier (a reader may stop once past its range of a split shard)
                assert (from_cache > 0) == bool(cached) and from_cache <= sum(size[i] for i in cached), (epoch, r)
                assert not new & fetched[r]  # never fetched twice by one node
                fetched[r] |= new
                seen[r] |= planned
                hits += len(cached)
                counts += DataCounts(bytes_from_storage=from_storage, bytes_from_cache=from_cache)
            metrics.append(counts.metrics())  # what rank 0 logs for the epoch (summed over ranks)
            hit_shards.append(hits)
    gets = recorder.shard_gets()
    key = {i: s.url.split("://", 1)[1] for i, s in enumerate(shards)}  # path-style: bucket/key
    fetches = {key[i]: n for i in size if (n := sum(i in f for f in fetched))}
    assert gets == fetches, (gets, fetches)  # moto saw exactly the fetches the plan predicts: <= 1 per node
    assert max(gets.values()) <= NODES
    storage = [e["data/bytes_from_storage"] for e in metrics]
    cache = [e["data/bytes_from_cache"] for e in metrics]
    assert sum(storage) == sum(gets.get(key[i], 0) * size[i] for i in size)  # the counters agree with moto
    for r in range(NODES):  # each node's cache holds what it fetched, once
        on_disk = sorted(n for n in os.listdir(tmp_path / f"node{r}") if n.endswith(".tar"))
        assert len(on_disk) == len(fetched[r]), (r, on_disk)
    # the warm-up: nothing cached in epoch 1, then more hits and less storage every epoch
    assert cache[0] == 0 and hit_shards[0] == 0
    assert hit_shards[0] < hit_shards[1] < hit_shards[2], hit_shards
    assert cache[0] < cache[1] < cache[2], cache
    assert storage[0] > storage[1] > storage[2], storage
    # over the run the two nodes read more than the dataset once from storage: the cost of reshuffled shards
    assert sum(storage) > sum(size.values())
    print(f"per epoch: storage {storage}, cache {cache}, cached shards {hit_shards}; "
          f"fetches per shard {sorted(gets.values())} (dataset {len(shards)} shards)")
