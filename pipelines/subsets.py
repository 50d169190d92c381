"""Key-chosen parts of a training split: the minival held out for every choice (``data.minival_fraction``) and
the nested training subsets of ``data.train_fraction``, as functions of the split's sample index
(pipelines/sample_index.py) only, so they are the same at any world size, in every process and after a resume.

Both take, for every class c, ``round(fraction * n_c)`` of its samples in one fixed order: shards ranked by a
hash of (purpose, shard position), the samples of a shard by a hash of (purpose, key). So a selection is

- class-stratified: each class gives its share (classes of one sample and a small fraction may give none);
- nested: a smaller fraction takes a prefix of the same per-class order (the 3% subset lies inside the 10%);
- gathered in few shards: the first shards of the order fill the quotas, so evaluating a 1% minival reads
  about 1% of the split, and a 3% subset streams about 3% of it.

The minival is chosen first, from the whole split (samples with an unreadable label are never chosen); the
``train_fraction`` subset from what is left. Training reads the rest; the minival is never trained on.
A selection is handed to the reader as per-shard sample counts (what the epoch plan splits) and, for the
shards kept in part, the keys kept (``iter_piece(keep=...)`` counts positions among those).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from .sample_index import SampleIndex

PARTS = ("train", "minival")


@dataclass(frozen=True)
class SubsetSpec:
    """Which part of a training split a loader reads."""

    minival_fraction: float = 0.0  # held out of the split; [0, 0.5)
    train_fraction: float = 1.0  # of what is left, the share trained on; (0, 1]
    part: str = "train"  # "train": what is trained on; "minival": the held-out part

    def __post_init__(self):
        if not 0 <= self.minival_fraction < 0.5:
            raise ValueError(f"minival_fraction={self.minival_fraction} must be in [0, 0.5)")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction={self.train_fraction} must be in (0, 1]")
        if self.part not in PARTS:
            raise ValueError(f"part={self.part!r} must be one of {PARTS}")
        if self.part == "minival" and self.minival_fraction == 0:
            raise ValueError("part='minival' needs minival_fraction > 0")

    @property
    def whole_split(self) -> bool:
        return self.part == "train" and self.minival_fraction == 0 and self.train_fraction == 1


@dataclass(frozen=True)
class ShardSelection:
    counts: tuple[int, ...]  # samples read per shard, manifest order (0: the shard is not read)
    keep: Mapping[int, frozenset[str]] = field(default_factory=dict)  # shards read in part -> the keys kept
    fingerprint: str = ""  # identifies the selection (part of the epoch plan's inputs)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def shards_read(self) -> int:
        return sum(1 for c in self.counts if c)


def _rank(purpose: str, *parts: object) -> bytes:
    return hashlib.sha256(repr((purpose, *parts)).encode()).digest()


def _take(index: SampleIndex, fraction: float, purpose: str, allowed: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """(shard, position) of round(fraction * n_c) samples of every class c among `allowed`, in the fixed order."""
    shard_order = sorted(range(len(index.shards)), key=lambda s: _rank(purpose, "shard", s))
    by_class: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for s in shard_order:
        keys, labels = index.shards[s].keys, index.shards[s].labels
        for p in sorted(range(len(keys)), key=lambda i: _rank(purpose, "key", keys[i])):
            if (s, p) in allowed:
                by_class[labels[p]].append((s, p))
    taken: set[tuple[int, int]] = set()
    for members in by_class.values():
        taken.update(members[: round(fraction * len(members))])
    return taken


def select(index: SampleIndex, spec: SubsetSpec) -> ShardSelection | None:
    """The part of the split `spec` names, or None for the whole split (read as it is)."""
    if spec.whole_split:
        return None
    everything = {(s, p) for s, shard in enumerate(index.shards) for p in range(len(shard.keys))}
    labelled = {(s, p) for s, p in everything if index.shards[s].labels[p] >= 0}
    minival = _take(index, spec.minival_fraction, "minival", labelled) if spec.minival_fraction else set()
    if spec.part == "minival":
        chosen = minival
    else:
        rest = everything - minival
        chosen = rest if spec.train_fraction == 1 else _take(index, spec.train_fraction, "train_fraction",
                                                             rest & labelled)
    return _as_selection(index, chosen, spec)


def _as_selection(index: SampleIndex, chosen: set[tuple[int, int]], spec: SubsetSpec) -> ShardSelection:
    counts, keep = [], {}
    for s, shard in enumerate(index.shards):
        kept = frozenset(shard.keys[p] for p in range(len(shard.keys)) if (s, p) in chosen)
        # what the reader counts: every sample of the shard whose key is kept (a repeated key counts twice, and
        # the reader reports the repeat as bad, as it would without a selection)
        n = sum(1 for k in shard.keys if k in kept)
        counts.append(n)
        if 0 < n < len(shard.keys):
            keep[s] = kept
    digest = hashlib.sha256(repr((index.fingerprint, spec.minival_fraction, spec.train_fraction, spec.part,
                                  tuple(counts))).encode()).hexdigest()[:16]
    return ShardSelection(tuple(counts), keep, digest)
