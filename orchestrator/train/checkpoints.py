"""What a checkpoint holds and how it is written and read.

A checkpoint is a directory with one file, ``state.pt``: model, optimizer, schedule, step, data-stream
position, every rank's RNG state, the MLflow run id and the resolved config. It holds only tensors and
plain Python values, so it loads with ``torch.load(weights_only=True)`` and never executes pickled code.
It never holds secrets: the resolved config carries no credentials (they come from the environment).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from pipelines.storage import atomic_write

STATE_FILE = "state.pt"
FORMAT_VERSION = 1


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` into `directory` (created); the file appears whole or not at all."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_write(directory / STATE_FILE) as f:
        torch.save({"format_version": FORMAT_VERSION, **state}, f)
    return directory / STATE_FILE


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a checkpoint of this project: it has no {STATE_FILE}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # an unpickling refusal or a truncated file: name the file, not the payload
        raise ValueError(f"checkpoint {path} cannot be loaded safely (weights_only=True): {type(e).__name__}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has an unknown format; expected format_version {FORMAT_VERSION}")
    return state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class LocalCheckpointStore:
    """Checkpoints of a run without Ray: <root>/checkpoint_<step>, newest `num_to_keep` kept."""

    def __init__(self, root: str | os.PathLike, num_to_keep: int):
        self.root = Path(root)
        self.num_to_keep = num_to_keep

    def latest(self) -> Path | None:
        done = sorted(
            (p for p in self.root.glob("checkpoint_*") if (p / STATE_FILE).exists()),
            key=lambda p: int(p.name.split("_")[1]),
        )
        return done[-1] if done else None

    def commit(self, staged: Path, step: int) -> Path:
        target = self.root / f"checkpoint_{step:08d}"
        if target.exists():
            shutil.rmtree(target)
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), target)
        kept = sorted(self.root.glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[1]))
        for old in kept[: -self.num_to_keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target
