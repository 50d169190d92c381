"""Every sample's key and label, shard by shard: what key-chosen subsets (pipelines/subsets.py) and label files
are computed from, without reading the shards again.

A dataset written by ``write_shards`` holds ``<root>/index/<split>.json`` beside its manifest (written before
the manifest, which comes last). For each shard, in manifest order, it lists the keys of its samples in tar
order (every run of members sharing a key: the sample index ``iter_piece`` counts) and their labels (-1 where
the label is missing or unreadable), plus the split's manifest fingerprint, so an index left over from an
earlier version of the dataset is never used. A dataset without one (written by other tools, or a brace
pattern) is indexed by reading its shards once (``load_sample_index`` logs that it does);
``python -m pipelines.sample_index URL [--split S]`` writes the index of an existing dataset.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .cli import InputError, entry_point, say
from .manifest import Manifest, ShardInfo, is_pattern, load_manifest, split_manifest_url
from .redaction import redact_url
from .shard_reader import LABEL_EXTS, tar_samples
from .storage import (
    atomic_write,
    get_fs,
    join_url,
    open_url,
    protocol_of,
    read_bytes,
    resolve_storage_options,
)

log = logging.getLogger(__name__)

INDEX_VERSION = 1


class SampleIndexError(InputError, ValueError):
    """An index file that does not describe the dataset's shards (exit 2: rebuild it)."""


@dataclass(frozen=True)
class ShardKeys:
    keys: tuple[str, ...]  # in tar order
    labels: tuple[int, ...]  # -1: missing or unreadable label


@dataclass(frozen=True)
class SampleIndex:
    split: str
    fingerprint: str  # Manifest.fingerprint(split) of the shards it describes
    shards: tuple[ShardKeys, ...]  # in manifest order

    def key_set(self) -> set[str]:
        return {k for s in self.shards for k in s.keys}

    @property
    def num_samples(self) -> int:
        return sum(len(s.keys) for s in self.shards)

    def to_json(self) -> str:
        return json.dumps({"index_version": INDEX_VERSION, "split": self.split, "fingerprint": self.fingerprint,
                           "shards": [{"keys": list(s.keys), "labels": list(s.labels)} for s in self.shards]})

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> SampleIndex:
        try:
            doc = json.loads(text)
            if int(doc["index_version"]) > INDEX_VERSION:
                raise SampleIndexError(f"sample index {where} is version {doc['index_version']}, newer than this "
                                       f"code understands ({INDEX_VERSION})")
            shards = tuple(ShardKeys(tuple(map(str, s["keys"])), tuple(int(x) for x in s["labels"]))
                           for s in doc["shards"])
            if any(len(s.keys) != len(s.labels) for s in shards):
                raise ValueError("a shard lists a different number of keys and labels")
            return cls(str(doc["split"]), str(doc["fingerprint"]), shards)
        except SampleIndexError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise SampleIndexError(f"sample index {where} is not valid ({exc!r}); rebuild it with "
                                   f"`python -m pipelines.sample_index DATASET_URL`") from None


def index_url(root: str, split: str) -> str:
    return join_url(root, f"index/{split}.json")


def scan_shard(url: str, opts: Mapping[str, Any]) -> ShardKeys:
    """One shard's keys and labels, read once (webdataset's stages, as iter_piece reads it)."""
    keys, labels = [], []
    with open_url(url, "rb", opts) as f:
        for files in tar_samples(f, url):
            keys.append(files["__key__"])
            ext = next((e for e in LABEL_EXTS if e in files), None)
            try:
                labels.append(int(files[ext].decode().strip()) if ext else -1)
            except ValueError:
                labels.append(-1)
    return ShardKeys(tuple(keys), tuple(labels))


def scan_index(manifest: Manifest, split: str, opts: Mapping[str, Any]) -> SampleIndex:
    shards = manifest.shards(split)
    return SampleIndex(split, manifest.fingerprint(split), tuple(scan_shard(s.url, opts) for s in shards))


def write_sample_index(index: SampleIndex, root: str, storage_options: Mapping[str, Any] | None = None) -> str:
    url = index_url(root, index.split)
    if protocol_of(url) in ("file", "local"):
        fs, path = get_fs(url, storage_options or {}, resolved=True)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with atomic_write(url, storage_options) as f:
        f.write(index.to_json().encode())
    return url


def load_sample_index(source: str, split: str, storage_options: Mapping[str, Any] | None = None,
                      manifest: Manifest | None = None) -> SampleIndex:
    """The split's index: the dataset's index file when it matches the manifest, else a scan of the shards."""
    if manifest is None:
        from .manifest import dataset_from_pattern

        opts = resolve_storage_options(source if "://" in source else "file://", storage_options)
        manifest = dataset_from_pattern(source, opts, split) if is_pattern(source) else load_manifest(source, opts)
    root = manifest.root or split_manifest_url(source)[0]
    opts = resolve_storage_options(root if "://" in root else "file://", storage_options)
    if not is_pattern(source):
        url = index_url(root, split)
        try:
            index = SampleIndex.from_json(read_bytes(url, opts), redact_url(url))
        except FileNotFoundError:
            index = None
        if index is not None and index.fingerprint == manifest.fingerprint(split) and index.split == split:
            _check_counts(index, manifest.shards(split), url)
            return index
        if index is not None:
            log.warning("sample index %s is for other shards than the manifest's: reading the shards instead",
                        redact_url(url))
    log.warning("no sample index for split %r of %s: reading its %d shards once for their keys (write one with "
                "`python -m pipelines.sample_index %s`)", split, redact_url(root), len(manifest.shards(split)),
                redact_url(root))
    return scan_index(manifest, split, opts)


def _check_counts(index: SampleIndex, shards: list[ShardInfo], url: str) -> None:
    counts = [len(s.keys) for s in index.shards]
    if counts != [s.num_samples for s in shards]:
        raise SampleIndexError(f"sample index {redact_url(url)} lists {counts} samples per shard, the manifest "
                               f"{[s.num_samples for s in shards]}; rebuild it with `python -m pipelines.sample_index`")


@entry_point
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.sample_index",
                                description="Write the sample index (keys and labels per shard) of a dataset.")
    p.add_argument("url", metavar="DATASET_URL", help="dataset root (with manifest.json): local path or s3://...")
    p.add_argument("--split", action="append", help="split(s) to index (default: every split of the manifest)")
    p.add_argument("--endpoint-url", default=None)
    a = p.parse_args(argv)
    opts = resolve_storage_options(a.url if "://" in a.url else "file://",
                                   {"endpoint_url": a.endpoint_url} if a.endpoint_url else None)
    manifest = load_manifest(a.url, opts)
    for split in a.split or sorted(manifest.splits):
        index = scan_index(manifest, split, opts)
        say(f"{split}: {index.num_samples} samples in {len(index.shards)} shards -> "
            f"{redact_url(write_sample_index(index, manifest.root or a.url, opts))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
