"""Bad-sample accounting of one rank: counts per (kind, shard URL), the budget, the errors that stop a run.

Kinds are shard_reader.BAD_KINDS; ``padded`` counts the samples a short worker re-read to fill its planned
batches. Counts cover the current epoch and travel in the loader's state_dict, so they survive a resume.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .manifest import ShardInfo
from .redaction import redact_url, scrub
from .storage import DatasetNotFoundError, get_fs

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The data cannot give the planned batches (too many bad samples, a worker with no good sample)."""


class TooManyBadSamplesError(DataError):
    pass


class BadSampleTally:
    """This epoch's bad samples on one rank, checked against ``max_bad_fraction`` of its planned samples."""

    def __init__(self, rank: int, max_bad_fraction: float):
        self.rank = rank
        self.max_bad_fraction = max_bad_fraction
        self.counts: Counter = Counter()  # (kind, shard URL) -> samples
        self.padded = 0

    def add(self, bad: Iterable[Sequence[Any]], padded: int = 0) -> None:
        """Add ``(kind, url, n)`` triples and padded samples (a batch's metadata, or a saved state)."""
        for kind, url, n in bad:
            self.counts[(kind, url)] += int(n)
        self.padded += int(padded)

    def total(self) -> int:
        return sum(self.counts.values())

    def by_kind(self) -> dict[str, dict[str, int]]:
        """kind -> {shard URL: count}; plus 'padded' -> {'': n} when samples were padded."""
        out: dict[str, dict[str, int]] = {}
        for (k, u), n in sorted(self.counts.items()):
            out.setdefault(k, {})[u] = n
        if self.padded:
            out["padded"] = {"": self.padded}
        return out

    def triples(self) -> list[list[Any]]:
        return [[k, u, n] for (k, u), n in self.counts.items()]

    def check(self, epoch: int, planned_samples: int) -> None:
        """Raise TooManyBadSamplesError, naming the worst shards, once the budget is exceeded."""
        n = self.total()
        if n <= self.max_bad_fraction * max(1, planned_samples):
            return
        per_shard: Counter = Counter()
        kinds: dict[str, Counter] = {}
        for (k, u), c in self.counts.items():
            per_shard[u] += c
            kinds.setdefault(u, Counter())[k] += c
        worst = ", ".join(f"{redact_url(u)} ({c}: {dict(kinds[u])})" for u, c in per_shard.most_common(5))
        raise TooManyBadSamplesError(
            f"rank {self.rank}: {n} bad samples in epoch {epoch} exceed max_bad_fraction="
            f"{self.max_bad_fraction} of the rank's {planned_samples} planned samples; worst shards: {worst}"
        )


def check_shards_present(
    shards: Sequence[ShardInfo], split: str, opts: Mapping[str, Any], max_bad_fraction: float
) -> None:
    """List the shard folders once; missing shards beyond the bad-sample budget fail here, clearly."""
    by_dir: dict[str, list[ShardInfo]] = {}
    for s in shards:
        by_dir.setdefault(s.url.rsplit("/", 1)[0], []).append(s)
    missing: list[ShardInfo] = []
    for d, in_dir in by_dir.items():
        try:
            fs, path = get_fs(d, opts, resolved=True)
            names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        except FileNotFoundError:
            names = set()
        except Exception as exc:
            log.warning("could not list %s to verify shards: %s", redact_url(d), scrub(str(exc), opts))
            continue
        missing += [s for s in in_dir if s.url.rsplit("/", 1)[-1] not in names]
    if not missing:
        return
    lost = sum(s.num_samples for s in missing)
    total = max(1, sum(s.num_samples for s in shards))
    names = [redact_url(s.url) for s in missing[:10]]
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    msg = f"{len(missing)} shard(s) of split {split!r} missing from storage: {names}{more} ({lost} of {total} samples)"
    if lost > max_bad_fraction * total:
        raise DatasetNotFoundError(msg + f"; more than max_bad_fraction={max_bad_fraction}")
    log.warning(msg + "; they will be skipped and counted as missing_shard")
