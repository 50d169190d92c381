"""The driver's side of MLflow for a training run: open (or re-open) the run. Its end (final model, curves,
failure reason) is orchestrator/train/finish.py, which reads the final checkpoint.

Workers only log metrics and a few params (rank 0, orchestrator/train/loop.py, through the driver-owned actor
of relay.py). The driver owns the run's lifecycle so a run restarted by Ray, or re-submitted with the same
run.name, keeps one MLflow run.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

from orchestrator.config.tree import Config
from orchestrator.tracking.limits import stringify
from orchestrator.tracking.tracker import RunTracker
from pipelines.cli import say

RUN_NAME_TAG = "mixer.run_name"


def flatten_config(cfg: dict, prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": "value"}; lists and scalars are stringified; empty dicts are kept as "{}"; a list
    of named records (eval.sets) gives one key per record and field: "eval.sets.<name>.url"."""
    out: dict[str, str] = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, prefix=f"{prefix}{k}."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) and "name" in x for x in v):
            for x in v:
                out.update(flatten_config({f: y for f, y in x.items() if f != "name"}, prefix=f"{prefix}{k}.{x['name']}."))
        else:
            out[f"{prefix}{k}"] = "{}" if isinstance(v, dict) else stringify(v)
    return out


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def find_run_id(tracking_uri: str, experiment: str, run_name: str) -> str | None:
    """The newest MLflow run of `experiment` made for Ray run `run_name`, if any."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], filter_string=tag_like_filter(RUN_NAME_TAG, run_name),
        order_by=["attributes.start_time DESC"], max_results=100,
    )
    return next((r.info.run_id for r in runs if r.data.tags.get(RUN_NAME_TAG) == run_name), None)


def tag_like_filter(key: str, value: str) -> str:
    """An MLflow filter that matches tag `key` == `value` and possibly a few more (the caller keeps exact matches).

    MLflow's filter grammar (checked against MLflow 3.17.2) has no escape inside a quoted string: a quote or a
    backslash in a run name would end or break the literal. Those characters, and LIKE's own wildcards, become
    LIKE's one-character wildcard `_`.
    """
    pattern = "".join("_" if c in "'\"\\%_" else c for c in value)
    return f"tags.`{key}` LIKE '{pattern}'"


def open_run(cfg: Config, tracking_uri: str, model_cfg, plan) -> RunTracker:
    import mlflow
    import ray
    import torch

    run_id = find_run_id(tracking_uri, cfg.tracking.experiment, cfg.run.name)
    tracker = RunTracker(
        tracking_uri, cfg.tracking.experiment, cfg.run.name, run_id=run_id,
        parent_run_id=cfg.tracking.parent_run_id,
        tags={
            RUN_NAME_TAG: cfg.run.name,
            "model_name": cfg.model.name,
            "world_size": str(cfg.scaling.num_workers),
            "git_commit": _git_commit(),
            "versions.torch": torch.__version__,
            "versions.ray": ray.__version__,
            "versions.mlflow": mlflow.__version__,
            "versions.python": platform.python_version(),
        },
    )
    tracker.start()
    params = flatten_config(cfg.to_dict())
    # The model's resolved sizes (not only the overrides) so runs compare on D_S, D_C, C, depth, patch.
    params.update({f"model.{k}": v for k, v in model_cfg.to_dict().items()})
    params.update({
        "compute.num_params": plan.num_params,
        "compute.fwd_gflops_per_image": round(plan.fwd_gflops_per_image, 6),
        "compute.train_gflops_per_image": round(plan.train_gflops_per_image, 6),
        "plan.total_steps": plan.total_steps,
        "plan.grad_accum_steps": plan.grad_accum_steps,
        "plan.micro_batch_size": plan.micro_batch_size,
        "plan.train_flops_total": f"{plan.train_flops_total:.6g}",
    })
    if run_id is not None:
        # MLflow params are write-once: a resumed run adds only what it lacks (e.g. a first attempt that
        # died before logging them); a changed value (say, more epochs) is kept as first logged.
        say(f"[mlflow] continuing run {run_id} of {cfg.run.name}")
        earlier = _earlier_data(tracking_uri, run_id)  # one read: its params and what its restarts were
        params = {k: v for k, v in params.items() if k not in (earlier.params if earlier else {})}
        tracker.earlier_goodput = _goodput(earlier) if earlier else {}
    if params:
        tracker.log_params(params)
    if run_id is None:
        tracker.log_dict(cfg.to_dict(), "config/resolved_config.yaml")
    return tracker


def _goodput(data) -> dict:
    """What earlier submissions of a continued run logged of its restarts: the latest goodput/* values and the
    world_sizes tag. The run's progress ledger counts on from them (train/progress.py)."""
    out = {k: v for k, v in data.metrics.items() if k.startswith("goodput/")}
    if "world_sizes" in data.tags:
        out["world_sizes"] = data.tags["world_sizes"]
    return out


def _earlier_data(tracking_uri: str, run_id: str):
    """The continued run's MLflow RunData, None when the store cannot be read now (the tracker buffers; refused
    duplicate params are only counted, and this submission counts its own restarts only)."""
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri).get_run(run_id).data
    except Exception:
        return None
