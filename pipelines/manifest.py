"""The dataset manifest: shard URLs, sample counts (and, since the shard cache, byte sizes and SHA-256
digests), class names, format version.

A dataset is a directory (local or object storage) holding ``manifest.json`` and shard tars::

    <root>/manifest.json
    <root>/train/train-000000.tar ...
    <root>/val/val-000000.tar ...

The manifest is written last, so a half-written dataset has no manifest and is never taken for a whole
one. ``size``/``sha256`` per shard are optional (older manifests lack them; the dataset's fingerprint does
not include them): the node-local shard cache checks its copies against them. Shard URLs are stored
relative to the root, so a dataset can be copied or moved; ``load_manifest`` resolves them to absolute URLs. ``dataset_from_pattern`` makes a manifest for a brace pattern of shard URLs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .redaction import redact_url, scrub
from .shard_reader import count_samples
from .storage import (
    DatasetNotFoundError,
    StorageError,
    atomic_write,
    join_url,
    read_bytes,
    resolve_storage_options,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """The manifest exists but is not valid."""


class ManifestNotFoundError(DatasetNotFoundError):
    """No manifest at the given URL (the dataset was never written, or not completely)."""


@dataclass(frozen=True)
class ShardInfo:
    url: str
    num_samples: int
    size: int | None = None  # bytes; what a cached copy is checked against (pipelines/shard_cache.py)
    sha256: str | None = None  # hex digest of the shard's bytes; manifests written before it have neither

    def to_doc(self, url: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"url": url, "num_samples": self.num_samples}
        if self.size is not None:
            doc["size"] = self.size
        if self.sha256 is not None:
            doc["sha256"] = self.sha256
        return doc


@dataclass
class Manifest:
    format_version: int
    class_names: list[str]
    splits: dict[str, list[ShardInfo]]
    root: str | None = None
    image_format: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def num_samples(self, split: str) -> int:
        return sum(s.num_samples for s in self.shards(split))

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise KeyError(
                f"split {split!r} not in dataset {redact_url(self.root or '?')}; has {sorted(self.splits)}"
            )
        return self.splits[split]

    def fingerprint(self, split: str) -> str:
        """Identifies a split's shard list (names relative to the root, and sample counts)."""
        h = hashlib.sha256()
        for s in self.shards(split):
            name = s.url[len(self.root) :] if self.root and s.url.startswith(self.root) else s.url
            h.update(f"{name}:{s.num_samples};".encode())
        return h.hexdigest()[:16]

    def to_json(self, *, relative_to: str | None = None) -> str:
        def rel(u: str) -> str:
            if relative_to and u.startswith(relative_to.rstrip("/") + "/"):
                return u[len(relative_to.rstrip("/")) + 1 :]
            return u

        doc = {
            "format_version": self.format_version,
            "class_names": list(self.class_names),
            "image_format": self.image_format,
            "splits": {
                k: [s.to_doc(rel(s.url)) for s in v] for k, v in self.splits.items()
            },
            **self.extra,
        }
        return json.dumps(doc, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, root: str | None = None) -> Manifest:
        try:
            doc = json.loads(text)
            version = int(doc["format_version"])
            if version > FORMAT_VERSION:
                raise ManifestError(
                    f"manifest format_version {version} is newer than this code understands ({FORMAT_VERSION})"
                )
            splits = {}
            for name, shards in doc["splits"].items():
                splits[name] = [
                    ShardInfo(_resolve(root, s["url"]), int(s["num_samples"]),
                              int(s["size"]) if s.get("size") is not None else None, s.get("sha256"))
                    for s in shards
                ]
            extra = {
                k: v for k, v in doc.items() if k not in ("format_version", "class_names", "splits", "image_format")
            }
            return cls(version, list(doc["class_names"]), splits, root, doc.get("image_format"), extra)
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"invalid manifest at {redact_url(root or '?')}: {exc!r}") from None


def _resolve(root: str | None, url: str) -> str:
    if root is None or "://" in url or url.startswith("/"):
        return url
    return join_url(root, url)


def split_manifest_url(url_or_dir: str) -> tuple[str, str]:
    """(dataset root, manifest URL) for either form."""
    u = str(url_or_dir).rstrip("/")
    if u.endswith(".json"):
        return u.rsplit("/", 1)[0] if "/" in u else ".", u
    return u, join_url(u, MANIFEST_NAME)


def load_manifest(url_or_dir: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Load a manifest from a dataset root URL or the manifest's own URL; shard URLs come back absolute."""
    root, murl = split_manifest_url(url_or_dir)
    if "://" not in root:
        import os

        root = os.path.abspath(root)
        murl = os.path.abspath(murl)
    opts = resolve_storage_options(murl, storage_options)
    try:
        text = read_bytes(murl, opts)
    except FileNotFoundError:
        raise ManifestNotFoundError(
            f"no dataset manifest at {redact_url(murl)}: the dataset is missing or was not completely written "
            f"(the manifest is written last). Write one with `python -m pipelines.write_shards SOURCE "
            f"{redact_url(root)}`."
        ) from None
    except Exception as exc:
        raise StorageError(
            f"cannot read dataset manifest {redact_url(murl)}: {type(exc).__name__}: {scrub(str(exc), opts)}"
        ) from None
    return Manifest.from_json(text, root=root)


def write_manifest(manifest: Manifest, root: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``root/manifest.json`` atomically (see storage.atomic_write)."""
    murl = join_url(root, MANIFEST_NAME)
    with atomic_write(murl, storage_options) as f:
        f.write(manifest.to_json(relative_to=root).encode())
    return murl


def is_pattern(source: str) -> bool:
    """A brace pattern or a single tar URL (rather than a dataset root or manifest URL)."""
    s = str(source)
    return ("{" in s and ".." in s) or s.endswith((".tar", ".tgz", ".tar.gz"))


def dataset_from_pattern(
    pattern: str, storage_options: Mapping[str, Any] | None = None, split: str = "train"
) -> Manifest:
    """A Manifest for a brace-pattern URL. Sample counts come from a ``manifest.json`` in the shards' folder
    or its parent when it lists these shards; otherwise each shard is read once to count its samples."""
    import braceexpand

    urls = list(braceexpand.braceexpand(str(pattern)))
    opts = resolve_storage_options(urls[0], storage_options)
    folder = urls[0].rsplit("/", 1)[0]
    for root in (folder, folder.rsplit("/", 1)[0]):
        try:
            m = load_manifest(root, opts)
        except Exception:
            continue
        known = {s.url: s for shards in m.splits.values() for s in shards}
        if all(u in known for u in urls):
            return Manifest(m.format_version, m.class_names, {split: [known[u] for u in urls]}, root)
    log.warning("no manifest lists %s: counting samples by reading %d shards", redact_url(pattern), len(urls))
    shards = []
    for u in urls:
        try:
            shards.append(ShardInfo(u, count_samples(u, opts)))
        except FileNotFoundError:
            raise DatasetNotFoundError(f"shard not found: {redact_url(u)} (from pattern {redact_url(pattern)})") from None
    return Manifest(FORMAT_VERSION, [], {split: shards}, folder)
