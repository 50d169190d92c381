"""Write one split of an image folder as shards, e.g. an evaluation set (eval.sets) for a model trained on another
dataset:

    python -m pipelines.write_shards folder /data/imagenetv2 s3://bucket/imagenet-v2 --split val \\
        --class-names-from s3://bucket/imagenet1k

SRC_DIR has torchvision's ImageFolder layout (one sub-folder per class, images anywhere below it; listed with
torchvision.datasets.folder's find_classes / make_dataset).
- Class indices: with ``--class-names-from URL``, the position of each folder's name among the class names of
  the dataset at URL (its manifest), and the written manifest lists that dataset's class names, so both datasets
  mean the same class by the same index; a folder class that is not among them exits 2. Without it, the folders'
  sorted names (torchvision's order).
- Keys: the image's path relative to SRC_DIR without its extension, '/'-separated, dots in the file name as '_'
  (webdataset splits a member name at its first dot): ``n01440764/ILSVRC2012_val_00000293``. The same on every
  write of the same folder, whatever the shard size or order; two images with one key exit 2.
- Samples are written in a seeded order (``--seed``), as ``<key>.<png|jpg>`` + ``<key>.cls`` like write_shards,
  with the split's sample index (``index/<split>.json``, pipelines/sample_index.py).
  A manifest already at URL with the same class names keeps its other splits (write train and val one by one);
  with other class names it exits 2.
Unreadable images are listed (stderr, the manifest's ``unreadable``) and exit 2 after the rest is written; every
other bad argument exits 2 before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from .manifest import FORMAT_VERSION, Manifest, ManifestNotFoundError, load_manifest, write_manifest
from .redaction import redact_url
from .sample_index import SampleIndex, write_sample_index
from .shard_sink import DEFAULT_MAXSIZE, Item, ShardInputError, ShardSink, check_shard_options, encode
from .storage import check_writable_target, join_url, resolve_storage_options


def folder_samples(src: str, class_names: list[str] | None = None) -> tuple[list[str], list[tuple[str, str, int]]]:
    """(class names, [(key, path, class index)]) of an ImageFolder tree; ShardInputError for a folder class that
    is not among `class_names`, no images, or two images with one key."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        folders, own = find_classes(src)
    except FileNotFoundError:
        raise ShardInputError(f"SRC_DIR={src!r} is not accepted: it has no class sub-folders; expected the "
                              "ImageFolder layout (one sub-folder of images per class)") from None
    if class_names is None:
        class_names, index = folders, own
    else:
        strangers = [c for c in folders if c not in class_names]
        if strangers:
            raise ShardInputError(
                f"--class-names-from: class folder {strangers[0]!r} of SRC_DIR={src!r} is not among that dataset's "
                f"{len(class_names)} class names ({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''}); "
                "expected only class folders named like the training dataset's classes")
        index = {c: class_names.index(c) for c in folders}
    items = make_dataset(src, index, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not items:
        raise ShardInputError(f"SRC_DIR={src!r} is not accepted: no images ({', '.join(IMG_EXTENSIONS)}) in its class "
                              "sub-folders")
    out, seen = [], {}
    for path, label in items:
        rel = os.path.relpath(path, src).replace(os.sep, "/")
        key = sample_key(rel)
        if key in seen:
            raise ShardInputError(f"SRC_DIR={src!r}: {seen[key]!r} and {rel!r} would have the same key {key!r} "
                                  "(keys are relative paths without extension, '.' as '_'); rename one of them")
        seen[key] = rel
        out.append((key, path, label))
    return list(class_names), out


def sample_key(relpath: str) -> str:
    """``a/b/img.v1.JPEG`` -> ``a/b/img_v1``: the relative path without extension, '/'-separated."""
    parts = relpath.replace(os.sep, "/").split("/")
    parts[-1] = os.path.splitext(parts[-1])[0].replace(".", "_")
    return "/".join(parts)


def write_folder_split(src: str, dest: str, split: str = "val", *, class_names_from: str | None = None,
                       maxcount: int | None = None, maxsize: int | None = None, fmt: str = "png", seed: int = 0,
                       storage_options: Mapping[str, Any] | None = None, progress: bool = True) -> Manifest:
    """Write `src` (an ImageFolder tree) as split `split` of the dataset at `dest` (see the module docstring)."""
    fmt = {"jpeg": "jpg"}.get(fmt.lower(), fmt.lower())
    check_shard_options(maxcount=maxcount, maxsize=maxsize, fmt=fmt, seed=seed)
    if not split or "/" in split:
        raise ShardInputError(f"--split={split!r} is not accepted; expected a split name without '/', e.g. val")
    if not os.path.isdir(src):
        raise ShardInputError(f"SRC_DIR={src!r} is not accepted: no such directory")
    names = _class_names(class_names_from, storage_options) if class_names_from else None
    class_names, samples = folder_samples(src, names)
    dest = os.path.abspath(dest) if "://" not in str(dest) else str(dest).rstrip("/")
    check_writable_target(dest, storage_options, what="URL")
    opts = resolve_storage_options(dest, storage_options)
    splits = _other_splits(dest, opts, class_names, split)

    from tqdm import tqdm

    order = np.random.default_rng(seed).permutation(len(samples))
    sink = ShardSink(dest, split, maxcount or 10000, maxsize or DEFAULT_MAXSIZE, opts)
    unreadable: list[dict[str, str]] = []
    for i in tqdm(order, desc=f"writing {redact_url(dest)} {split}", unit="img", disable=not progress, file=sys.stderr):
        key, path, label = samples[i]
        try:
            data = encode(Item(label, path=path), fmt)
        except Exception as exc:
            unreadable.append({"path": path, "error": f"{type(exc).__name__}: {exc}"})
            continue
        sink.write(key, fmt, data, label)
    splits[split] = sink.close()
    manifest = Manifest(FORMAT_VERSION, class_names, splits, root=dest, image_format=fmt,
                        extra={"source": os.path.abspath(src), "seed": seed, "unreadable": unreadable,
                               **({"class_names_from": redact_url(class_names_from)} if class_names_from else {})})
    index = SampleIndex(split, manifest.fingerprint(split), tuple(sink.index))
    write_sample_index(index, dest, opts)  # before the manifest, which comes last
    write_manifest(manifest, dest, opts)
    return manifest


def _class_names(url: str, storage_options: Mapping[str, Any] | None) -> list[str]:
    try:
        names = load_manifest(url, resolve_storage_options(url, storage_options)).class_names
    except Exception as e:
        raise ShardInputError(f"--class-names-from={redact_url(url)!r} cannot be used: {e}; expected the URL of a "
                              "dataset with a manifest.json (the training dataset)") from None
    if not names:
        raise ShardInputError(f"--class-names-from={redact_url(url)!r}: its manifest lists no class names")
    return list(names)


def _other_splits(dest: str, opts: dict, class_names: list[str], split: str) -> dict:
    """The splits of a dataset already at `dest` other than `split` (kept in the new manifest)."""
    try:
        old = load_manifest(dest, opts)
    except (ManifestNotFoundError, FileNotFoundError):
        return {}
    if old.class_names != class_names:
        raise ShardInputError(f"URL={redact_url(dest)!r} holds a dataset with other class names ({len(old.class_names)} "
                              f"classes); expected a new URL, or --class-names-from that dataset")
    return {name: shards for name, shards in old.splits.items() if name != split}


def folder_cli(argv: list[str]) -> int:
    """`python -m pipelines.write_shards folder SRC_DIR URL ...` (dispatched by write_shards.main)."""
    p = argparse.ArgumentParser(prog="python -m pipelines.write_shards folder",
                                description="Write one split of an image folder (ImageFolder layout) as shards.")
    p.add_argument("src", metavar="SRC_DIR", help="one sub-folder of images per class")
    p.add_argument("dest", metavar="URL", help="dataset root: local path, s3://bucket/prefix, ...")
    p.add_argument("--split", default="val", help="the split to write (default: val)")
    p.add_argument("--class-names-from", default=None, metavar="DATA_URL",
                   help="take class indices from this dataset's manifest (the training dataset)")
    p.add_argument("--maxcount", type=int, default=None, help="samples per shard (default 10000)")
    p.add_argument("--maxsize", type=int, default=None, help="bytes per shard (default 1 GiB)")
    p.add_argument("--format", dest="fmt", choices=["png", "jpg"], default="png")
    p.add_argument("--seed", type=int, default=0, help="the order samples are written in")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (else FSSPEC_S3_ENDPOINT_URL/AWS_ENDPOINT_URL)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    m = write_folder_split(a.src, a.dest, a.split, class_names_from=a.class_names_from, maxcount=a.maxcount,
                           maxsize=a.maxsize, fmt=a.fmt, seed=a.seed,
                           storage_options={"endpoint_url": a.endpoint_url} if a.endpoint_url else None,
                           progress=not a.no_progress)
    print(f"{a.split}: {len(m.splits[a.split])} shards, {m.num_samples(a.split)} samples, {m.num_classes} classes")
    print(f"manifest: {redact_url(join_url(m.root, 'manifest.json'))}")
    for b in m.extra["unreadable"]:
        print(f"UNREADABLE {b['path']}: {b['error']}", file=sys.stderr)
    return 2 if m.extra["unreadable"] else 0
