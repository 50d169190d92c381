"""Epoch plan: pure, balanced, equal batches per rank, deterministic per (seed, epoch)."""

from __future__ import annotations

import pytest

from pipelines.loader import ShardLoader
from pipelines.plan import owned_slots, plan_canonical_epoch, plan_epoch, worker_position

UNEVEN = [37, 5, 120, 64, 9, 250, 1, 77, 33]


def _used(plan):
    used = []
    for s in plan.slots:
        for p in s.pieces:
            used += [(p.shard, i) for i in range(p.start, p.stop)]
    return used


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_plan_even_and_exact(world_size, num_workers):
    bs = 8
    plan = plan_epoch(UNEVEN, seed=1, epoch=0, world_size=world_size, num_workers=num_workers, batch_size=bs)
    counts = {plan.batches_per_rank(r) for r in range(world_size)}
    assert len(counts) == 1
    B = counts.pop()
    N = sum(UNEVEN)
    assert B == N // (world_size * bs)
    used = _used(plan)
    assert len(used) == len(set(used)) == world_size * B * bs
    assert plan.dropped == N - len(used) < world_size * bs
    for s in plan.slots:
        assert sum(p.stop - p.start for p in s.pieces) == s.num_samples == s.num_batches * bs
        for p in s.pieces:
            assert 0 <= p.start < p.stop <= UNEVEN[p.shard]


def test_fewer_shards_than_slots_split_by_ranges():
    plan = plan_epoch([100, 30], seed=0, epoch=0, world_size=4, num_workers=2, batch_size=4)
    assert all(s.num_batches == 4 for s in plan.slots)  # 130 // 16 = 8 per rank, 4 per worker
    assert all(s.pieces for s in plan.slots)
    assert any(p.start > 0 for s in plan.slots for p in s.pieces)


def test_plan_pure_and_seeded():
    kw = dict(world_size=2, num_workers=2, batch_size=4)
    a = plan_epoch(UNEVEN, seed=0, epoch=0, **kw)
    assert a == plan_epoch(UNEVEN, seed=0, epoch=0, **kw)
    assert a != plan_epoch(UNEVEN, seed=0, epoch=1, **kw)
    assert a != plan_epoch(UNEVEN, seed=1, epoch=0, **kw)


def test_eval_plan_reads_everything_once():
    plan = plan_epoch(UNEVEN, seed=0, epoch=0, world_size=3, num_workers=2, batch_size=8, training=False)
    used = _used(plan)
    assert sorted(used) == sorted((j, i) for j, n in enumerate(UNEVEN) for i in range(n))
    assert plan.dropped == 0


def test_canonical_plan_equal_slots_and_ownership():
    """K slots with equal chunks whatever the world size; ranks partition them (k % W == r)."""
    plan = plan_canonical_epoch(UNEVEN, seed=1, epoch=0, slots=6, chunk=8)
    assert plan == plan_epoch(UNEVEN, seed=1, epoch=0, world_size=6, num_workers=1, batch_size=8)
    assert {s.num_batches for s in plan.slots} == {sum(UNEVEN) // 48}
    for W in range(1, 7):
        owned = [owned_slots(r, W, 6) for r in range(W)]
        assert sorted(k for ks in owned for k in ks) == list(range(6))
        assert {len(ks) for ks in owned} <= {6 // W, -(-6 // W)}
    assert [owned_slots(r, 4, 6) for r in range(4)] == [(0, 4), (1, 5), (2,), (3,)]


def test_worker_position_round_robin():
    W = 3
    for k in range(12):
        assert sum(worker_position(k, w, W) for w in range(W)) == k
        assert [worker_position(k, w, W) for w in range(W)] == [len(range(w, k, W)) for w in range(W)]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_loader_identical_batch_counts(make_shards, world_size):
    root = make_shards(UNEVEN)
    seen, counts = [], []
    for r in range(world_size):
        ld = ShardLoader(root, batch_size=8, rank=r, world_size=world_size, num_workers=2, return_keys=True)
        n = 0
        for x, y, keys in ld:
            assert x.shape[0] == y.shape[0] == len(keys) == 8
            seen += keys
            n += 1
        assert n == len(ld)
        counts.append(n)
        assert ld.bad_sample_counts() == {}
    assert len(set(counts)) == 1
    assert len(seen) == len(set(seen)) == sum(UNEVEN) - ld.dropped_samples
