"""Checkpoints on disk for tests: a LocalCheckpointStore holding given steps, and a state.pt cut in half (an upload
cut off). Importable from every test module as `from checkpoint_files import ...` (tests/ is on sys.path, see
tests/waiting.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from orchestrator.checkpoint.format import STATE_FILE, save_checkpoint
from orchestrator.train.checkpoints import LocalCheckpointStore


def truncate(checkpoint_dir: Path) -> None:
    state = checkpoint_dir / STATE_FILE
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])


def store_with_steps(root: Path, steps: list[int]) -> LocalCheckpointStore:
    store = LocalCheckpointStore(root, num_to_keep=len(steps))
    for step in steps:
        staged = root.parent / f"staged_{step}"
        save_checkpoint(staged, {"step": step, "model": {"w": torch.full((2,), float(step))}})
        store.commit(staged, step)
    return store
