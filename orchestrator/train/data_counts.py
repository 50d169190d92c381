"""Bad, padded and dropped samples and bytes read (from storage, from the node-local shard cache) of an epoch
summed over the ranks: what rank 0 logs, and the run's totals.

Every rank's loader counts only the samples it read (pipelines/bad_samples.py). `epoch_counts` sums them with
torch.distributed.all_reduce, a collective: every rank calls it at the same point (the loop does so when an
epoch's last batch has been taken, which happens at the same micro-batch on every rank).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines.loader import ShardLoader
from pipelines.redaction import redact_url
from pipelines.shard_reader import BAD_KINDS

WORST_SHARDS = 5


@dataclass
class DataCounts:
    bad: Counter = field(default_factory=Counter)  # (kind, shard URL) -> samples skipped
    padded: int = 0  # samples a short worker re-read to fill its planned batches
    dropped: int = 0  # samples of the split left out so that every rank gets equal batches
    bytes_from_storage: int = 0  # read from object storage (whole shards fetched into the node-local cache)
    bytes_from_cache: int = 0  # read from the node-local shard cache (data.cache_dir) instead

    def total_bad(self) -> int:
        return sum(self.bad.values())

    def by_kind(self) -> dict[str, int]:
        out: Counter = Counter()
        for (kind, _), n in self.bad.items():
            out[kind] += n
        return dict(sorted(out.items()))

    def worst_shards(self, n: int = WORST_SHARDS) -> list[dict[str, Any]]:
        """The shards with the most bad samples (URLs redacted), with their counts by kind."""
        per_shard: Counter = Counter()
        kinds: dict[str, Counter] = {}
        for (kind, url), c in self.bad.items():
            per_shard[url] += c
            kinds.setdefault(url, Counter())[kind] += c
        return [{"shard": redact_url(url), "bad": c, "kinds": dict(sorted(kinds[url].items()))}
                for url, c in per_shard.most_common(n)]

    def metrics(self) -> dict[str, float]:
        """data/bad_samples, data/bad/<kind> (kinds seen), data/padded_samples, data/dropped_samples,
        data/bytes_from_storage, data/bytes_from_cache."""
        return {
            "data/bad_samples": self.total_bad(),
            **{f"data/bad/{kind}": n for kind, n in self.by_kind().items()},
            "data/padded_samples": self.padded,
            "data/dropped_samples": self.dropped,
            "data/bytes_from_storage": self.bytes_from_storage,
            "data/bytes_from_cache": self.bytes_from_cache,
        }

    def __add__(self, other: DataCounts) -> DataCounts:
        return DataCounts(self.bad + other.bad, self.padded + other.padded, self.dropped + other.dropped,
                          self.bytes_from_storage + other.bytes_from_storage,
                          self.bytes_from_cache + other.bytes_from_cache)

    def state(self) -> dict[str, Any]:
        """For the checkpoint: plain lists and ints (torch.load(weights_only=True) safe)."""
        return {"bad": [[k, u, n] for (k, u), n in self.bad.items()], "padded": self.padded, "dropped": self.dropped,
                "bytes_from_storage": self.bytes_from_storage, "bytes_from_cache": self.bytes_from_cache}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> DataCounts:
        state = state or {}
        return cls(Counter({(k, u): int(n) for k, u, n in state.get("bad", [])}),
                   int(state.get("padded", 0)), int(state.get("dropped", 0)),
                   int(state.get("bytes_from_storage", 0)), int(state.get("bytes_from_cache", 0)))

    def worst_shards_tag(self, epoch: int) -> dict[str, str]:
        """The epoch's worst shards as a tag (JSON), or nothing when it had no bad sample."""
        worst = self.worst_shards()
        return {f"data/worst_shards/epoch_{epoch}": json.dumps(worst)} if worst else {}


def epoch_counts(loader: ShardLoader, device: torch.device) -> DataCounts:
    """This epoch's counts so far, summed over all ranks (a collective when torch.distributed is initialised).

    Read it before the loader moves to the next epoch (set_epoch starts new counts). `device` is where the
    process group's backend wants tensors (the training device: NCCL needs CUDA tensors).
    """
    import torch.distributed as dist

    urls = [s.url for s in loader.shards]
    kinds = list(BAD_KINDS)
    # one vector: (kind, shard) counts in row-major order, then padded, bytes from storage, bytes from cache
    local = torch.zeros(len(kinds) * len(urls) + 3, dtype=torch.int64)
    local[-2:] = torch.tensor(loader.bytes_read(), dtype=torch.int64)
    for kind, per_url in loader.bad_sample_counts().items():
        if kind == "padded":
            local[-3] = per_url[""]
            continue
        for url, n in per_url.items():
            local[kinds.index(kind) * len(urls) + urls.index(url)] += n
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        local = local.to(device)
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
        local = local.cpu()
    counts = local.tolist()
    bad = Counter({(kinds[i // len(urls)], urls[i % len(urls)]): n
                   for i, n in enumerate(counts[:-3]) if n})
    return DataCounts(bad, padded=counts[-3], dropped=loader.dropped_samples, bytes_from_storage=counts[-2],
                      bytes_from_cache=counts[-1])
