"""The built-in small real dataset: scikit-learn's handwritten digits as WebDataset shards.

``ensure_digits_dataset(dest)`` writes it on first use and returns the dataset root URL. Safe when several
processes race: shard bytes are deterministic, each shard becomes visible atomically (temp + rename on
local disk, a single PUT on object storage) and the manifest is written last, atomically; a reader only
trusts a dataset with a manifest, and both writers produce identical files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .manifest import MANIFEST_NAME
from .storage import get_fs, join_url, resolve_storage_options


def ensure_digits_dataset(
    dest: str, storage_options: Mapping[str, Any] | None = None, *, maxcount: int = 256, seed: int = 0
) -> str:
    """Write the digits dataset to ``dest`` unless a manifest is already there; return the root URL."""
    from .write_shards import write_dataset

    root = str(dest).rstrip("/")
    if "://" not in root:
        root = os.path.abspath(root)
    opts = resolve_storage_options(root, storage_options)
    fs, path = get_fs(join_url(root, MANIFEST_NAME), opts, resolved=True)
    if not fs.exists(path):
        write_dataset("digits", root, maxcount=maxcount, seed=seed, storage_options=opts, progress=False)
    return root
