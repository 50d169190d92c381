"""A run's checkpoints: which ``checkpoint_*`` directories of a run directory hold a checkpoint, newest first.

Read by a restart (orchestrator/train/checkpoints.py, orchestrator/train/session.py) and by evaluation and
fine-tuning from a run directory (orchestrator/eval/sources.py).
"""

from __future__ import annotations

from orchestrator.checkpoint.format import STATE_FILE


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
