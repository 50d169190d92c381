"""How a training run restores: which checkpoint a restarted worker group resumes from, and where a run
without Ray keeps its checkpoints. The format itself (``state.pt``) is orchestrator/checkpoint/format.py.

A restart resumes from the newest checkpoint of the run that loads (load_newest_complete over the run's
checkpoints as run_checkpoints lists them): a damaged newest one costs the steps since the previous one. Rank 0
chooses it and every other rank of the group restores the same one (load_agreed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.checkpoint.format import DamagedCheckpointError, load_checkpoint
from orchestrator.checkpoint.runs import run_checkpoints
from pipelines.storage import get_fs


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

    def candidates(self) -> list[RestoreCandidate]:
        """The run's checkpoints to restore from, newest first (see run_checkpoints)."""
        if not self.root.is_dir():
            return []
        fs, path = get_fs(str(self.root))
        return [RestoreCandidate(name, step, _local_dir(self.root / name)) for name, step in run_checkpoints(fs, path)]

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


def _local_dir(path: Path) -> Callable[[], contextlib.AbstractContextManager[Path]]:
    return lambda: contextlib.nullcontext(path)


# -------------------------------------------------------------------------- restoring a run ---


@dataclass
class RestoreCandidate:
    """One checkpoint of a run: its directory name, its step when known, and how to get it as a local dir."""

    name: str
    step: int | None
    open: Callable[[], contextlib.AbstractContextManager[Path]]


def load_newest_complete(candidates: Iterable[RestoreCandidate], map_location: str | torch.device = "cpu",
                         warn: Callable[[str], None] = print) -> tuple[dict[str, Any], RestoreCandidate] | None:
    """The state of the newest checkpoint that loads, and which one it was; None when the run has none.

    A checkpoint that does not load (damaged, truncated, refused) is skipped with a warning naming it and what
    failed; resuming from an earlier one says how many steps are done again. When none loads, the error
    lists every checkpoint and its problem.
    """
    skipped: list[tuple[RestoreCandidate, str]] = []
    for candidate in candidates:
        try:
            with candidate.open() as directory:
                state = load_checkpoint(directory, map_location=map_location)
        except (ValueError, OSError) as e:
            warn(f"[resume] {e}; trying the previous checkpoint")
            skipped.append((candidate, str(e)))
            continue
        if skipped:
            newest = max((c.step for c, _ in skipped if c.step is not None), default=None)
            redone = f"{newest - state['step']} step(s)" if newest is not None else "the steps after it"
            warn(f"[resume] WARNING: the newest checkpoint(s) {', '.join(c.name for c, _ in skipped)} could not "
                 f"be loaded; resuming from the earlier complete checkpoint {candidate.name} at step "
                 f"{state['step']}: {redone} are done again")
        return state, candidate
    if skipped:
        raise DamagedCheckpointError(
            "no checkpoint of this run can be loaded, so it cannot resume: "
            + "; ".join(problem for _, problem in skipped)
            + ". Remove the damaged checkpoint directories to start the run afresh, or use another run.name"
        )
    return None


def load_agreed(candidates_of: Callable[[], list[RestoreCandidate]], rank: int, world: int,
                warn: Callable[[str], None] = print) -> tuple[dict[str, Any], RestoreCandidate] | None:
    """The checkpoint every rank of a group restores: rank 0 takes the newest that loads (load_newest_complete),
    the others load the one it named.

    Each rank choosing for itself could restore different steps: ranks list the run's storage at different
    moments, and an upload of the group that just went down may land in between (seen in the elastic test: one
    rank at step 44, the others at 48). The others list the storage after rank 0 chose, so its choice is there.
    """
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return load_newest_complete(candidates_of(), warn=warn)
    restored = load_newest_complete(candidates_of(), warn=warn) if rank == 0 else None
    chosen = [restored[1].name if restored else None]
    dist.broadcast_object_list(chosen, src=0)
    if rank == 0 or chosen[0] is None:
        return restored
    for candidate in candidates_of():
        if candidate.name == chosen[0]:
            with candidate.open() as directory:
                return load_checkpoint(directory), candidate
    raise DamagedCheckpointError(f"rank {rank}: the checkpoint rank 0 restored, {chosen[0]}, is not in the run's "
                                 "storage as this rank lists it")
