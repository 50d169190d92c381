"""Where searches live and what they are called: one directory per search under run.storage_path (local or
s3://), holding Tune's experiment and our sidecar (what --resume needs to rebuild the trial function)."""

from __future__ import annotations

import json
import re
from typing import Any

from orchestrator.config.tree import Config, ConfigError

SIDECAR = "mixer_search.json"


class SearchStore:
    """The searches' root, read through fsspec like every other path of the project; `tune_path` and
    `tune_filesystem` are the same place as Ray Tune and Train take it (pyarrow for a custom S3 endpoint)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 tune_path: str | None = None, tune_filesystem: Any = None):
        from pipelines.storage import get_fs

        self.url = url.rstrip("/")
        self.fs, self.root = get_fs(self.url, storage_options or {}, resolved=True)
        self.root = self.root.rstrip("/")
        self.tune_path = (tune_path or url).rstrip("/")
        self.tune_filesystem = tune_filesystem

    @property
    def is_local(self) -> bool:
        return "://" not in self.url

    def experiment_url(self, name: str) -> str:
        """The search's directory as a URL (s3://... or a local path), for messages and Train's storage_path."""
        return f"{self.url}/{name}"

    def tune_experiment_path(self, name: str) -> str:
        """The search's directory as Tune takes it, with `tune_filesystem`."""
        return f"{self.tune_path}/{name}"

    def names(self) -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"]

    def write_sidecar(self, name: str, data: dict) -> None:
        self.fs.makedirs(f"{self.root}/{name}", exist_ok=True)
        self.fs.pipe_file(f"{self.root}/{name}/{SIDECAR}", json.dumps(data, indent=1, default=str).encode())

    def read_sidecar(self, name: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(f"{self.root}/{name}/{SIDECAR}"))
        except FileNotFoundError:
            return None


def store_for(cfg: Config) -> SearchStore:
    """The store at the config's run.storage_path, with the same storage options and Tune target as a Train run."""
    from orchestrator.train.launch import storage_options, storage_target

    url = cfg.resolved_storage_path()
    tune_path, tune_filesystem = storage_target(cfg)
    return SearchStore(url, storage_options(cfg, url), tune_path, tune_filesystem)


def pick_name(store: SearchStore, base: str, resume: bool, explicit: str | None) -> str:
    """A fresh search gets `base`, else base-2, base-3...; --resume takes the newest of those (or --name)."""
    if explicit:
        if not re.fullmatch(r"[A-Za-z0-9_.=-]+", explicit):
            raise ConfigError(f"--name {explicit!r} is not accepted; use letters, digits and _ . = -")
        return explicit
    taken = {n for n in store.names() if n == base or re.fullmatch(re.escape(base) + r"-\d+", n)}
    if resume:
        if not taken:
            raise ConfigError(
                f"--resume: no search named {base} (or {base}-N) under {store.url}; pass --name of the "
                "search to resume (the name printed when it started)"
            )
        return max(taken, key=lambda n: 1 if n == base else int(n.rsplit("-", 1)[1]))
    if base not in taken:
        return base
    i = 2
    while f"{base}-{i}" in taken:
        i += 1
    return f"{base}-{i}"
