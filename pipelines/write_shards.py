"""Write an image dataset as WebDataset shards plus a manifest (written last).

    python -m pipelines.write_shards digits /tmp/digits-wds
    python -m pipelines.write_shards /data/imagenet s3://bucket/imagenet-wds --maxcount 1000 --format jpg
    FSSPEC_S3_ENDPOINT_URL=http://127.0.0.1:9000 python -m pipelines.write_shards digits s3://bucket/digits

SOURCE is ``digits`` (scikit-learn's bundled 8x8 handwritten digits, written as RGB images) or an image
folder tree with one sub-folder per class. If the folder holds ``train/`` and ``val/`` sub-trees (the
ImageNet layout) those are the splits; otherwise a seeded stratified split with ``--val-fraction`` is made.
DEST is any fsspec URL. Each sample is ``<key>.<png|jpg>`` + ``<key>.cls`` (the class index as text). The
manifest lists each shard's sample count, size in bytes and SHA-256 (what a node-local cached copy is checked
against, pipelines/shard_cache.py); ``index/<split>.json`` lists every sample's key and label (pipelines/sample_index.py).
Unreadable inputs are reported with their paths (stderr and the manifest's ``unreadable`` list) and the
command exits with status 2 when there were any. Bad arguments (a missing SOURCE, a DEST that cannot be
written, --maxcount/--maxsize < 1, --val-fraction outside [0, 1)) exit 2 before anything is written.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .cli import InputError, entry_point
from .manifest import FORMAT_VERSION, Manifest, ShardInfo, write_manifest
from .sample_index import SampleIndex, ShardKeys, write_sample_index
from .storage import (
    atomic_write,
    check_writable_target,
    get_fs,
    join_url,
    protocol_of,
    resolve_storage_options,
)

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
DEFAULT_MAXSIZE = 1 << 30


@dataclass
class _Item:
    label: int
    array: np.ndarray | None = None  # HxWx3 uint8
    path: str | None = None  # file on disk


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,8,8] scaled 0..16 -> 0..255, labels int64 [N]) from scikit-learn's digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


def digits_split(val_fraction: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded stratified split of the digits: split name -> indices into digits_arrays(), in write order."""
    from sklearn.model_selection import train_test_split

    _, labels = digits_arrays()
    idx = np.arange(len(labels))
    if val_fraction <= 0:
        rng = np.random.default_rng(seed)
        return {"train": rng.permutation(idx)}
    tr, va = train_test_split(idx, test_size=val_fraction, stratify=labels, random_state=seed, shuffle=True)
    return {"train": np.asarray(tr), "val": np.asarray(va)}


def _digits_source(val_fraction: float, seed: int) -> tuple[list[str], dict[str, list[_Item]]]:
    images, labels = digits_arrays()
    splits = {}
    for name, idx in digits_split(val_fraction, seed).items():
        splits[name] = [
            _Item(int(labels[i]), array=np.repeat(images[i][:, :, None], 3, axis=2)) for i in idx
        ]
    return [str(i) for i in range(10)], splits


def _class_tree(root: str) -> dict[str, list[str]]:
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    out = {}
    for c in classes:
        files = []
        for dp, _, fns in os.walk(os.path.join(root, c)):
            files += [os.path.join(dp, f) for f in fns if os.path.splitext(f)[1].lower() in IMAGE_EXTS]
        out[c] = sorted(files)
    return out


def _folder_source(root: str, val_fraction: float | None, seed: int) -> tuple[list[str], dict[str, list[_Item]]]:
    rng = np.random.default_rng(seed)
    has_splits = all(os.path.isdir(os.path.join(root, s)) for s in ("train", "val"))
    if has_splits:
        trees = {s: _class_tree(os.path.join(root, s)) for s in ("train", "val")}
        class_names = sorted(set(trees["train"]) | set(trees["val"]))
        splits = {}
        for s, tree in trees.items():
            items = [_Item(class_names.index(c), path=p) for c, ps in tree.items() for p in ps]
            splits[s] = [items[i] for i in rng.permutation(len(items))]
        return class_names, splits
    tree = _class_tree(root)
    class_names = sorted(tree)
    vf = 0.1 if val_fraction is None else val_fraction
    train, val = [], []
    for ci, c in enumerate(class_names):
        ps = [tree[c][i] for i in rng.permutation(len(tree[c]))]
        nv = int(round(len(ps) * vf))
        val += [_Item(ci, path=p) for p in ps[:nv]]
        train += [_Item(ci, path=p) for p in ps[nv:]]
    splits = {"train": [train[i] for i in rng.permutation(len(train))]}
    if val:
        splits["val"] = [val[i] for i in rng.permutation(len(val))]
    return class_names, splits


def _encode(item: _Item, fmt: str) -> bytes:
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


class _ShardSink:
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


def write_dataset(
    source: str,
    dest: str,
    *,
    maxcount: int | None = None,
    maxsize: int | None = None,
    val_fraction: float | None = None,
    fmt: str = "png",
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Manifest:
    """Write ``source`` (``"digits"`` or a class-folder tree) to ``dest`` as shards + manifest (last).

    Defaults: digits -> maxcount 256, val_fraction 0.2; folders -> maxcount 10000, val_fraction 0.1 (only
    used without train/ and val/ sub-trees). ``maxsize`` (bytes per shard) defaults to 1 GiB.
    """
    fmt = {"jpeg": "jpg"}.get(fmt.lower(), fmt.lower())
    check_inputs(source, dest, maxcount=maxcount, maxsize=maxsize, val_fraction=val_fraction, fmt=fmt, seed=seed,
                 storage_options=storage_options)
    if "://" not in str(dest):
        dest = os.path.abspath(dest)
    dest = str(dest).rstrip("/")
    if source == "digits":
        class_names, splits = _digits_source(0.2 if val_fraction is None else val_fraction, seed)
        maxcount = maxcount or 256
    else:
        class_names, splits = _folder_source(source, val_fraction, seed)
        maxcount = maxcount or 10000
    maxsize = maxsize or DEFAULT_MAXSIZE
    opts = resolve_storage_options(dest, storage_options)

    from tqdm import tqdm

    total = sum(len(v) for v in splits.values())
    bar = tqdm(total=total, desc=f"writing {dest}", unit="img", disable=not progress, file=sys.stderr)
    unreadable: list[dict[str, str]] = []
    out: dict[str, list[ShardInfo]] = {}
    indexes: dict[str, list[ShardKeys]] = {}
    for split, items in splits.items():
        sink = _ShardSink(dest, split, maxcount, maxsize, opts)
        n = 0
        for item in items:
            bar.update(1)
            try:
                data = _encode(item, fmt)
            except Exception as exc:
                unreadable.append({"path": str(item.path), "error": f"{type(exc).__name__}: {exc}"})
                log.error("unreadable input %s: %s", item.path, exc)
                continue
            sink.write(f"{split}-{n:08d}", fmt, data, item.label)
            n += 1
        out[split] = sink.close()
        indexes[split] = sink.index
    bar.close()
    manifest = Manifest(
        FORMAT_VERSION,
        class_names,
        out,
        root=dest,
        image_format=fmt,
        extra={"source": source if source == "digits" else os.path.abspath(source), "seed": seed,
               "unreadable": unreadable},
    )
    for split, shards in indexes.items():  # before the manifest, which comes last
        write_sample_index(SampleIndex(split, manifest.fingerprint(split), tuple(shards)), dest, opts)
    write_manifest(manifest, dest, opts)
    return manifest


class ShardInputError(InputError, ValueError):
    """An argument of write_dataset that cannot be used; the message names it, its value and what is accepted."""


def check_inputs(source: str, dest: str, *, maxcount: int | None, maxsize: int | None, val_fraction: float | None,
                 fmt: str, seed: int, storage_options: Mapping[str, Any] | None) -> None:
    """Every argument checked before anything is read or written (StorageError for an unusable DEST)."""
    for flag, value in (("--maxcount", maxcount), ("--maxsize", maxsize)):
        if value is not None and value < 1:
            raise ShardInputError(f"{flag}={value} is not accepted; expected an integer >= 1 (or leave it unset)")
    if seed < 0:
        raise ShardInputError(f"--seed={seed} is not accepted; expected an integer >= 0")
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise ShardInputError(f"--val-fraction={val_fraction} is not accepted; expected a number in [0, 1)")
    if fmt not in ("png", "jpg"):
        raise ShardInputError(f"--format={fmt!r} is not accepted; expected 'png' or 'jpg'")
    if source != "digits":
        if not os.path.isdir(source):
            raise ShardInputError(f"SOURCE={source!r} is not accepted: no such directory; expected 'digits' or a "
                                  "folder with one sub-folder of images per class")
        roots = [os.path.join(source, s) for s in ("train", "val")]
        if not all(os.path.isdir(r) for r in roots):
            roots = [source]
        for root in roots:
            if not any(files for files in _class_tree(root).values()):
                raise ShardInputError(f"SOURCE={source!r} is not accepted: {root} has no class sub-folders with "
                                      f"images ({', '.join(sorted(IMAGE_EXTS))}); expected one sub-folder per class")
    check_writable_target(str(dest), storage_options, what="DEST")


def _iter_lines(manifest: Manifest) -> Iterator[str]:
    for split, shards in manifest.splits.items():
        yield f"{split}: {len(shards)} shards, {sum(s.num_samples for s in shards)} samples"


@entry_point
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.write_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("source", metavar="SOURCE", help="'digits' or an image folder tree (one sub-folder per class)")
    p.add_argument("dest", metavar="DEST", help="fsspec URL: local path, s3://bucket/prefix, ...")
    p.add_argument("--maxcount", type=int, default=None, help="samples per shard (digits 256, folders 10000)")
    p.add_argument("--maxsize", type=int, default=None, help="bytes per shard (default 1 GiB)")
    p.add_argument("--val-fraction", type=float, default=None, help="validation share (digits 0.2, folders 0.1)")
    p.add_argument("--format", dest="fmt", choices=["png", "jpg"], default="png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (else FSSPEC_S3_ENDPOINT_URL/AWS_ENDPOINT_URL)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    opts = {"endpoint_url": a.endpoint_url} if a.endpoint_url else None
    m = write_dataset(
        a.source, a.dest, maxcount=a.maxcount, maxsize=a.maxsize, val_fraction=a.val_fraction, fmt=a.fmt,
        seed=a.seed, storage_options=opts, progress=not a.no_progress,
    )
    for line in _iter_lines(m):
        print(line)
    print(f"manifest: {join_url(m.root, 'manifest.json')}")
    bad = m.extra.get("unreadable") or []
    for b in bad:
        print(f"UNREADABLE {b['path']}: {b['error']}", file=sys.stderr)
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
