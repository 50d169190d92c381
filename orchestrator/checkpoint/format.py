"""What a checkpoint holds and how it is written and read.

A checkpoint is a directory with one file, ``state.pt``: model, optimizer, schedule, step, data-stream
position, every rank's RNG state, the MLflow run id and the resolved config (and "ema", the EMA of the weights
in the model's keys, when the run set train.ema_decay). It holds only tensors and plain Python values, so it
loads with ``torch.load(weights_only=True)`` and never executes pickled code.
It never holds secrets: the resolved config carries no credentials (they come from the environment).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from pipelines.cli import first_line
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


class DamagedCheckpointError(ValueError):
    """A checkpoint's state.pt is missing, truncated or otherwise unreadable (not a safety refusal)."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds pickled objects other than tensors and plain values: refused, never executed."""


def read_weights(file, shown: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(file, weights_only=True)``: how every checkpoint file of ours is read (a run's state.pt,
    fine-tuning's initial weights, a source of evaluate and finetune). `file` is a path or a file object,
    `shown` the name a message gives it. DamagedCheckpointError when it cannot be read, UnsafeCheckpointError
    when weights_only refuses what it holds; torch's error is the __cause__ of either."""
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise DamagedCheckpointError(f"checkpoint {shown} is damaged or truncated: {_first_line(e)}") from e
        # name the file, not the payload
        raise UnsafeCheckpointError(f"checkpoint {shown} cannot be loaded safely (weights_only=True): it holds "
                                    "pickled objects other than tensors and plain values, which are not executed"
                                    ) from e
    except Exception as e:  # a truncated zip, a short read: the file is damaged
        raise DamagedCheckpointError(f"checkpoint {shown} is damaged or truncated: {_first_line(e)}") from e


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a checkpoint of this project: it has no {STATE_FILE}")
    state = read_weights(path, str(path), map_location)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has an unknown format; expected format_version {FORMAT_VERSION}")
    return state


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {first_line(e, 200)}"
