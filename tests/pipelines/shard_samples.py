"""Small synthetic shard sets for the pipelines tests (uneven sizes, bad data).

A module with its own name, not conftest: test files import these helpers, and ``from conftest import``
resolves to whichever conftest pytest loaded last when several test folders run together.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

from pipelines.manifest import FORMAT_VERSION, Manifest, ShardInfo, write_manifest


def png_bytes(label: int, size: int = 4) -> bytes:
    a = np.full((size, size, 3), (label * 25) % 256, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


_PNG = {i: png_bytes(i) for i in range(10)}


def jpeg_bytes(seed: int, h: int = 48, w: int = 64) -> bytes:
    """A small photo-like JPEG (smooth gradients + noise), different per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(0.05, 0.3, 3)
    a = np.stack([127 + 100 * np.sin(xx * f[k] + yy * f[(k + 1) % 3] + seed) for k in range(3)], axis=2)
    a += rng.normal(0, 8, a.shape)
    buf = io.BytesIO()
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def jpeg_members(shard: int, n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        key = f"s{shard:03d}-{i:05d}"
        out += [(f"{key}.jpg", jpeg_bytes(shard * 1000 + i)), (f"{key}.cls", str(i % 10).encode())]
    return out


def write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def good_members(shard: int, n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        key = f"s{shard:03d}-{i:05d}"
        out += [(f"{key}.png", _PNG[i % 10]), (f"{key}.cls", str(i % 10).encode())]
    return out


def make_dataset(root: str, sizes: list[int], *, bad: dict[int, list[tuple[str, bytes]]] | None = None,
                 missing: tuple[int, ...] = (), split: str = "train", jpeg: bool = False) -> Manifest:
    """Shards ``root/train/train-NNNNNN.tar`` with the given sample counts (labels i % 10).

    ``jpeg``: photo-like 48x64 JPEGs instead of tiny PNGs. ``bad[j]`` replaces shard j's members (its manifest count stays sizes[j]); ``missing`` shards are listed
    in the manifest but not written.
    """
    bad = bad or {}
    shards = []
    members = jpeg_members if jpeg else good_members
    for j, n in enumerate(sizes):
        path = os.path.join(root, split, f"{split}-{j:06d}.tar")
        if j not in missing:
            write_tar(path, bad.get(j) or members(j, n))
        shards.append(ShardInfo(path, n))
    m = Manifest(FORMAT_VERSION, [str(i) for i in range(10)], {split: shards}, root=root,
                 image_format="jpg" if jpeg else "png")
    write_manifest(m, root)
    return m
