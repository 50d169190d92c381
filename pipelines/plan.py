"""The epoch plan: which samples each slot reads, as a pure function.

Training reads ``K`` canonical slots (``plan_canonical_epoch``): the plan below with world_size=K, one worker
and batch_size = the chunk c, so it does not depend on how many ranks read it; rank r of W owns the slots
``k % W == r`` (``owned_slots``). Evaluation splits the split over ranks x loader workers.

Inputs: shard sample counts (in manifest order), seed, epoch, world size, loader workers per rank
(``num_workers``; 0 means the rank reads in its own process, i.e. one slot) and per-rank batch size.

Training plan (``training=True``; the loader uses it through plan_canonical_epoch, ranks = canonical slots
with one worker each, so every slot gets the same number of batches):

- every rank gets ``B = N // (world_size * batch_size)`` batches; ``N - world_size*B*batch_size`` samples
  are dropped (reported as ``dropped``; fewer than ``world_size * batch_size``);
- inside a rank, worker ``w`` of ``W`` yields ``B // W + (w < B % W)`` full batches. torch's DataLoader
  interleaves IterableDataset workers round-robin, so the rank's batch ``i`` is worker ``i % W``'s batch
  ``i // W``: the position of every worker follows from the number of batches the rank consumed;
- shards are shuffled with ``(seed, epoch)``; each shard goes whole to the slot with most room left if it
  fits, otherwise it is split by sample index ranges (a slot reads the shard and keeps its range) over the
  slots with room. So datasets with fewer shards than slots work, and slots are exactly filled. The
  unassigned tail of the shuffled order is what gets dropped, so it changes from epoch to epoch.

Evaluation plan (``training=False``): shards in manifest order, cut into ``world_size * W`` contiguous
ranges differing by at most one sample; every sample is read exactly once; the last batch of a slot may
be short and per-rank batch counts may differ by one or two (evaluation must not rely on equal counts).
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Samples ``start <= i < stop`` (index within the shard, in tar order) of shard ``shard``."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class SlotPlan:
    rank: int
    worker: int
    pieces: tuple[Piece, ...]
    num_batches: int
    num_samples: int


@dataclass(frozen=True)
class EpochPlan:
    world_size: int
    num_workers: int  # slots per rank (max(1, loader workers))
    batch_size: int
    training: bool
    slots: tuple[SlotPlan, ...]  # index rank * num_workers + worker
    total_samples: int
    dropped: int

    def rank_slots(self, rank: int) -> tuple[SlotPlan, ...]:
        return self.slots[rank * self.num_workers : (rank + 1) * self.num_workers]

    def batches_per_rank(self, rank: int) -> int:
        return sum(s.num_batches for s in self.rank_slots(rank))

    def samples_per_rank(self, rank: int) -> int:
        return sum(s.num_samples for s in self.rank_slots(rank))


def epoch_rng(seed: int, epoch: int, *salt: object) -> random.Random:
    """A random.Random seeded by a stable hash (independent of PYTHONHASHSEED)."""
    h = hashlib.sha256(repr((int(seed), int(epoch), *salt)).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def derive_seed(seed: int, epoch: int, *salt: object) -> int:
    h = hashlib.sha256(repr((int(seed), int(epoch), *salt)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def worker_batches(rank_batches: int, num_workers: int) -> list[int]:
    w = max(1, num_workers)
    return [rank_batches // w + (1 if i < rank_batches % w else 0) for i in range(w)]


def worker_position(batches_consumed: int, worker: int, num_workers: int) -> int:
    """Chunks of a rank's stream ``worker`` (of its ``num_workers`` owned slots) consumed after the rank
    consumed ``batches_consumed`` items round-robin: where each slot continues, even mid-step."""
    w = max(1, num_workers)
    return max(0, -(-(batches_consumed - worker) // w))


def owned_slots(rank: int, world_size: int, slots: int) -> tuple[int, ...]:
    """The canonical slots rank ``rank`` of ``world_size`` reads: ``k % world_size == rank``."""
    return tuple(range(rank, slots, world_size))


def plan_canonical_epoch(shard_sizes: Sequence[int], *, seed: int, epoch: int, slots: int, chunk: int) -> EpochPlan:
    """The training plan of ``slots`` canonical slots of ``chunk`` samples per step (slot k = ``plan.slots[k]``).

    Every slot gets the same number of chunks: the epoch's steps."""
    return plan_epoch(shard_sizes, seed=seed, epoch=epoch, world_size=slots, num_workers=1, batch_size=chunk)


def plan_epoch(
    shard_sizes: Sequence[int],
    *,
    seed: int,
    epoch: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    training: bool = True,
) -> EpochPlan:
    if world_size < 1 or batch_size < 1 or num_workers < 0:
        raise ValueError(f"bad plan inputs: world_size={world_size}, num_workers={num_workers}, batch_size={batch_size}")
    sizes = [int(s) for s in shard_sizes]
    if any(s < 0 for s in sizes):
        raise ValueError("shard sizes must be >= 0")
    W = max(1, num_workers)
    S = world_size * W
    N = sum(sizes)
    if not training:
        return _eval_plan(sizes, world_size, W, batch_size)
    B = N // (world_size * batch_size)
    if B == 0:
        raise ValueError(
            f"dataset too small: {N} samples cannot give one batch of {batch_size} to each of {world_size} "
            f"ranks (training: canonical slots); lower the batch size or the number of slots"
        )
    per_worker = worker_batches(B, W)
    caps = [per_worker[j % W] * batch_size for j in range(S)]
    order = list(range(len(sizes)))
    epoch_rng(seed, epoch, "shards").shuffle(order)

    pieces: list[list[Piece]] = [[] for _ in range(S)]
    room = list(caps)
    heap = [(-room[j], j) for j in range(S) if room[j] > 0]
    heapq.heapify(heap)
    deferred = []
    for sh in order:
        n = sizes[sh]
        if n == 0:
            continue
        if heap and -heap[0][0] >= n:
            r, j = heapq.heappop(heap)
            pieces[j].append(Piece(sh, 0, n))
            room[j] -= n
            if room[j] > 0:
                heapq.heappush(heap, (-room[j], j))
        else:
            deferred.append(sh)
    for sh in deferred:
        start, n = 0, sizes[sh]
        while start < n and heap:
            _, j = heapq.heappop(heap)
            k = min(room[j], n - start)
            pieces[j].append(Piece(sh, start, start + k))
            room[j] -= k
            start += k
            if room[j] > 0:
                heapq.heappush(heap, (-room[j], j))
    assert all(r == 0 for r in room), room
    slots = tuple(
        SlotPlan(j // W, j % W, tuple(pieces[j]), per_worker[j % W], caps[j]) for j in range(S)
    )
    used = sum(caps)
    return EpochPlan(world_size, W, batch_size, True, slots, N, N - used)


def _eval_plan(sizes: list[int], world_size: int, W: int, batch_size: int) -> EpochPlan:
    S = world_size * W
    N = sum(sizes)
    quotas = [N // S + (1 if j < N % S else 0) for j in range(S)]
    pieces: list[list[Piece]] = [[] for _ in range(S)]
    j, room = 0, quotas[0] if S else 0
    for sh, n in enumerate(sizes):
        start = 0
        while start < n:
            while room == 0:
                j += 1
                room = quotas[j]
            k = min(room, n - start)
            pieces[j].append(Piece(sh, start, start + k))
            room -= k
            start += k
    slots = tuple(
        SlotPlan(j // W, j % W, tuple(pieces[j]), -(-quotas[j] // batch_size), quotas[j]) for j in range(S)
    )
    return EpochPlan(world_size, W, batch_size, False, slots, N, 0)
