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
                 missing: tuple[int, ...] = (), split: str = "train") -> Manifest:
    """Shards ``root/train/train-NNNNNN.tar`` with the given sample counts (labels i % 10).

    ``bad[j]`` replaces shard j's members (its manifest count stays sizes[j]); ``missing`` shards are listed
    in the manifest but not written.
    """
    bad = bad or {}
    shards = []
    for j, n in enumerate(sizes):
        path = os.path.join(root, split, f"{split}-{j:06d}.tar")
        if j not in missing:
            write_tar(path, bad.get(j) or good_members(j, n))
        shards.append(ShardInfo(path, n))
    m = Manifest(FORMAT_VERSION, [str(i) for i in range(10)], {split: shards}, root=root, image_format="png")
    write_manifest(m, root)
    return m
