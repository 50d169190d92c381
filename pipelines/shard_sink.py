"""The pieces every shard writer shares (pipelines/write_shards.py: digits and class-folder trees;
pipelines/write_folder.py: one split of an ImageFolder tree), so neither writer imports the other.

- Item: one image to write, an array in memory or a file on disk; encode(item, fmt) -> the bytes to store
  (a file already in the asked format is stored as it is, after PIL has verified it).
- ShardSink: ``<dest>/<split>/<split>-NNNNNN.tar`` shards through storage.atomic_write, rotating on count/size,
  with each shard's size and SHA-256 (the manifest's) and its keys and labels (the sample index's).
- ShardInputError and check_shard_options: the arguments both writers take, checked before anything is written.
"""

from __future__ import annotations

import hashlib
import io
import os
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .cli import InputError
from .manifest import ShardInfo
from .sample_index import ShardKeys
from .storage import atomic_write, get_fs, join_url, protocol_of

DEFAULT_MAXSIZE = 1 << 30


@dataclass
class Item:
    label: int
    array: np.ndarray | None = None  # HxWx3 uint8
    path: str | None = None  # file on disk


def encode(item: Item, fmt: str) -> bytes:
    if item.array is not None:
        img = Image.fromarray(item.array, mode="RGB")
    else:
        ext = os.path.splitext(item.path)[1].lower()
        with open(item.path, "rb") as f:
            raw = f.read()
        with Image.open(io.BytesIO(raw)) as probe:
            probe.verify()  # raises on a corrupt file
        if (fmt == "jpg" and ext in (".jpg", ".jpeg")) or (fmt == "png" and ext == ".png"):
            return raw  # no re-encode
        img = Image.open(io.BytesIO(raw)).convert("RGB")
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


class _Digest:
    """A write-only file that passes bytes on and keeps their count and SHA-256 (for the manifest)."""

    def __init__(self, f):
        self._f, self.size, self.sha256 = f, 0, hashlib.sha256()

    def write(self, b) -> int:
        self.sha256.update(b)
        self.size += len(b)
        return self._f.write(b)

    def __getattr__(self, name: str):
        return getattr(self._f, name)


class ShardSink:
    """Writes ``<dest>/<split>/<split>-NNNNNN.tar`` with webdataset's TarWriter, rotating on count/size.

    Each shard goes through storage.atomic_write, so a reader (or a racing writer) never sees a partial one.
    """

    def __init__(self, dest: str, split: str, maxcount: int, maxsize: int, opts: dict[str, Any]):
        self.dest, self.split, self.maxcount, self.maxsize, self.opts = dest, split, maxcount, maxsize, opts
        self.fs, _ = get_fs(dest, opts, resolved=True)
        self.local = protocol_of(dest) in ("file", "local")
        self.shards: list[ShardInfo] = []
        self.index: list[ShardKeys] = []  # each shard's keys and labels (pipelines/sample_index.py)
        self._writer = None

    def _open(self) -> None:
        import webdataset as wds

        rel = f"{self.split}/{self.split}-{len(self.shards):06d}.tar"
        self._url = join_url(self.dest, rel)
        if self.local:
            _, path = get_fs(self._url, self.opts, resolved=True)
            self.fs.makedirs(os.path.dirname(path), exist_ok=True)
        self._shard_file = ExitStack()  # the open atomic write: closing it publishes the shard
        file = _Digest(self._shard_file.enter_context(atomic_write(self._url, self.opts)))
        self._digest = file
        # mtime a fixed int: reproducible bytes, and no PAX header per member (a float mtime makes Python's tarfile
        # write one), which would double the header parsing every reader pays per sample
        self._writer = wds.TarWriter(file, mtime=0)
        self._count = 0
        self._size = 0
        self._keys: list[str] = []
        self._labels: list[int] = []

    def write(self, key: str, ext: str, image: bytes, label: int) -> None:
        if self._writer is None:
            self._open()
        self._writer.write({"__key__": key, ext: image, "cls": str(label).encode()})
        self._count += 1
        self._keys.append(key)
        self._labels.append(int(label))
        self._size += len(image) + 1536
        if self._count >= self.maxcount or self._size >= self.maxsize:
            self._close()

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()  # ends the tar; the file it was given stays open
        self._shard_file.close()
        self.shards.append(ShardInfo(self._url, self._count, self._digest.size, self._digest.sha256.hexdigest()))
        self.index.append(ShardKeys(tuple(self._keys), tuple(self._labels)))
        self._writer = None

    def close(self) -> list[ShardInfo]:
        self._close()
        return self.shards


class ShardInputError(InputError, ValueError):
    """An argument of write_dataset that cannot be used; the message names it, its value and what is accepted."""


def check_shard_options(*, maxcount: int | None, maxsize: int | None, fmt: str, seed: int) -> None:
    """The shard options every source takes (ShardInputError naming the flag)."""
    for flag, value in (("--maxcount", maxcount), ("--maxsize", maxsize)):
        if value is not None and value < 1:
            raise ShardInputError(f"{flag}={value} is not accepted; expected an integer >= 1 (or leave it unset)")
    if seed < 0:
        raise ShardInputError(f"--seed={seed} is not accepted; expected an integer >= 0")
    if fmt not in ("png", "jpg"):
        raise ShardInputError(f"--format={fmt!r} is not accepted; expected 'png' or 'jpg'")
