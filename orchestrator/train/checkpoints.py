"""What a checkpoint holds and how it is written and read.

A checkpoint is a directory with one file, ``state.pt``: model, optimizer, schedule, step, data-stream
position, every rank's RNG state, the MLflow run id and the resolved config. It holds only tensors and
plain Python values, so it loads with ``torch.load(weights_only=True)`` and never executes pickled code.
It never holds secrets: the resolved config carries no credentials (they come from the environment).

A restart resumes from the newest checkpoint of the run that loads (load_newest_complete over the run's
checkpoints as run_checkpoints lists them): a damaged newest one costs the steps since the previous one. Rank 0
chooses it and every other rank of the group restores the same one (load_agreed).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.cli import first_line
from pipelines.storage import atomic_write, get_fs

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


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a checkpoint of this project: it has no {STATE_FILE}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise DamagedCheckpointError(f"checkpoint {path} is damaged or truncated: {_first_line(e)}") from None
        # name the file, not the payload
        raise ValueError(f"checkpoint {path} cannot be loaded safely (weights_only=True): it holds pickled "
                         "objects other than tensors and plain values, which are not executed") from None
    except Exception as e:  # a truncated zip, a short read: the file is damaged
        raise DamagedCheckpointError(f"checkpoint {path} is damaged or truncated: {_first_line(e)}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has an unknown format; expected format_version {FORMAT_VERSION}")
    return state


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {first_line(e, 200)}"


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


# ----------------------------------------------------------------------- finding a run's checkpoints ---


@dataclass
class RestoreCandidate:
    """One checkpoint of a run: its directory name, its step when known, and how to get it as a local dir."""

    name: str
    step: int | None
    open: Callable[[], contextlib.AbstractContextManager[Path]]


def run_checkpoints(fs, path: str) -> list[tuple[str, int | None]]:
    """(name, step) of the run's checkpoint dirs that have a state.pt: the latest Ray Train registered first,
    then newest first. The step comes from Ray Train's registry (what the loop reported) or from our
    ``checkpoint_<step>`` name; None when neither says. Used to resume (the loop) and to read a run (eval)."""
    names = sorted(
        (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)
         if p.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_")),
        reverse=True,  # Ray's checkpoint_<date_ms> and our checkpoint_<zero-padded step> both sort by age
    )
    names = [n for n in names if fs.exists(_join(_join(path, n), STATE_FILE))]
    registered = _registered_steps(fs, path)
    if registered:
        latest = next(reversed(registered))
        if latest in names:
            names.remove(latest)
            names.insert(0, latest)
    return [(n, registered.get(n, _step_from_name(n))) for n in names]


def _join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name


def _step_from_name(name: str) -> int | None:
    suffix = name.removeprefix("checkpoint_")
    return int(suffix) if suffix.isdigit() and len(suffix) == 8 else None  # ours: checkpoint_<08d step>


def _registered_steps(fs, path: str) -> dict[str, int | None]:
    """{checkpoint dir name: reported step} as Ray Train registered them, oldest first (the last is the latest),
    or {} when `path` is not a Ray Train run (e.g. a LocalSession run) or its registry cannot be read now
    (being rewritten, or naming a checkpoint that was just deleted): the caller then goes by directory order."""
    import logging

    import pyarrow.fs
    from ray.train import Result

    # from_path announces at INFO, for a run about to resume, what it found: noise when only reading
    train_logger = logging.getLogger("ray.train")
    level = train_logger.level
    train_logger.setLevel(logging.WARNING)
    try:
        result = Result.from_path(path, storage_filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)))
    except Exception:  # RuntimeError without a registry; Ray's own errors for an unreadable one
        return {}
    finally:
        train_logger.setLevel(level)
    steps = {c.path.rstrip("/").rsplit("/", 1)[-1]: m.get("step") for c, m in (result.best_checkpoints or [])}
    if result.checkpoint is not None:  # the latest goes last whatever the registry's order
        latest = result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
        steps[latest] = steps.pop(latest, (result.metrics or {}).get("step"))
    return steps


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
