"""Write an image dataset as WebDataset shards plus a manifest (written last).

    python -m pipelines.write_shards digits /tmp/digits-wds
    python -m pipelines.write_shards /data/imagenet s3://bucket/imagenet-wds --maxcount 1000 --format jpg
    python -m pipelines.write_shards folder /data/imagenetv2 s3://bucket/imagenet-v2 --split val \
        --class-names-from s3://bucket/imagenet-wds          # one split, the classes of another dataset
    FSSPEC_S3_ENDPOINT_URL=http://127.0.0.1:9000 python -m pipelines.write_shards digits s3://bucket/digits

SOURCE is ``digits`` (scikit-learn's bundled 8x8 handwritten digits, written as RGB images) or an image
folder tree with one sub-folder per class. If the folder holds ``train/`` and ``val/`` sub-trees (the
ImageNet layout) those are the splits; otherwise a seeded stratified split with ``--val-fraction`` is made.
``folder SRC_DIR URL --split S [--class-names-from DATA_URL]`` writes one split of an image folder with keys
from the images' relative paths (pipelines/write_folder.py). DEST is any fsspec URL. Each sample is
``<key>.<png|jpg>`` + ``<key>.cls`` (the class index as text). The manifest lists each shard's sample count,
size in bytes and SHA-256 (what a node-local cached copy is checked against, pipelines/shard_cache.py);
``index/<split>.json`` lists every sample's key and label (pipelines/sample_index.py).
Unreadable inputs are reported with their paths (stderr and the manifest's ``unreadable`` list) and the
command exits with status 2 when there were any. Bad arguments (a missing SOURCE, a DEST that cannot be
written, --maxcount/--maxsize < 1, --val-fraction outside [0, 1)) exit 2 before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .cli import entry_point
from .manifest import FORMAT_VERSION, Manifest, ShardInfo, write_manifest
from .sample_index import SampleIndex, ShardKeys, write_sample_index
from .shard_sink import DEFAULT_MAXSIZE, Item, ShardInputError, ShardSink, check_shard_options, encode
from .storage import check_writable_target, join_url, resolve_storage_options

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


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


def _digits_source(val_fraction: float, seed: int) -> tuple[list[str], dict[str, list[Item]]]:
    images, labels = digits_arrays()
    splits = {}
    for name, idx in digits_split(val_fraction, seed).items():
        splits[name] = [
            Item(int(labels[i]), array=np.repeat(images[i][:, :, None], 3, axis=2)) for i in idx
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


def _folder_source(root: str, val_fraction: float | None, seed: int) -> tuple[list[str], dict[str, list[Item]]]:
    rng = np.random.default_rng(seed)
    has_splits = all(os.path.isdir(os.path.join(root, s)) for s in ("train", "val"))
    if has_splits:
        trees = {s: _class_tree(os.path.join(root, s)) for s in ("train", "val")}
        class_names = sorted(set(trees["train"]) | set(trees["val"]))
        splits = {}
        for s, tree in trees.items():
            items = [Item(class_names.index(c), path=p) for c, ps in tree.items() for p in ps]
            splits[s] = [items[i] for i in rng.permutation(len(items))]
        return class_names, splits
    tree = _class_tree(root)
    class_names = sorted(tree)
    vf = 0.1 if val_fraction is None else val_fraction
    train, val = [], []
    for ci, c in enumerate(class_names):
        ps = [tree[c][i] for i in rng.permutation(len(tree[c]))]
        nv = int(round(len(ps) * vf))
        val += [Item(ci, path=p) for p in ps[:nv]]
        train += [Item(ci, path=p) for p in ps[nv:]]
    splits = {"train": [train[i] for i in rng.permutation(len(train))]}
    if val:
        splits["val"] = [val[i] for i in rng.permutation(len(val))]
    return class_names, splits


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
        sink = ShardSink(dest, split, maxcount, maxsize, opts)
        n = 0
        for item in items:
            bar.update(1)
            try:
                data = encode(item, fmt)
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


def check_inputs(source: str, dest: str, *, maxcount: int | None, maxsize: int | None, val_fraction: float | None,
                 fmt: str, seed: int, storage_options: Mapping[str, Any] | None) -> None:
    """Every argument checked before anything is read or written (StorageError for an unusable DEST)."""
    check_shard_options(maxcount=maxcount, maxsize=maxsize, fmt=fmt, seed=seed)
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise ShardInputError(f"--val-fraction={val_fraction} is not accepted; expected a number in [0, 1)")
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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["folder"]:  # one split of an image folder: pipelines/write_folder.py
        from .write_folder import folder_cli

        return folder_cli(argv[1:])
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
