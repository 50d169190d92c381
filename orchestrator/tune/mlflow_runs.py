"""The search in MLflow: a parent run per search, a nested child run per trial (opened by the trial itself),
closed and labelled here once Tune is done with it."""

from __future__ import annotations

import re

from orchestrator.config.search_space import SearchSpace
from orchestrator.config.tree import Config
from orchestrator.tune.planning import MODE

SEARCH_TAG = "mixer.tune_search"
TRIAL_TAG = "mixer.tune_trial_id"
STATUS_TAG = "mixer.tune_status"


def open_parent_run(base: Config, tracking_uri: str | None, name: str, run_id: str | None,
                    tags: dict | None = None):
    if not tracking_uri:
        return None
    from orchestrator.tracking.tracker import RunTracker

    parent = RunTracker(tracking_uri, base.tracking.experiment, name, run_id=run_id,
                        tags={SEARCH_TAG: name, "mixer.kind": "tune", **(tags or {})})
    parent.start()
    return parent


def log_parent_setup(parent, setup: dict, space: SearchSpace, args) -> None:
    params = {
        "search.algorithm": {"random": "random (BasicVariantGenerator)", "grid": "grid (BasicVariantGenerator)",
                             "optuna": "optuna TPE (OptunaSearch)"}[setup["search"]],
        "search.scheduler": "none" if setup["scheduler"] == "none" else
        f"ASHA(time_attr=training_iteration, max_t={setup['max_t']}, grace_period={args.grace_period}, "
        f"reduction_factor={args.reduction_factor:g})",
        "search.metric": f"{setup['metric']} ({MODE})",
        "search.num_samples": setup["num_samples"],
        "search.max_concurrent": setup["max_concurrent"],
        "search.max_failures": args.max_failures,
        "search.space_name": space.name,
        "base.model": setup["base_config"]["model"]["name"],
    }
    params.update({f"space.{k}": p.describe() for k, p in space.params.items()})
    params.update({"space.point." + re.sub(r"[^\w\-. /]", "_", label): " ".join(f"{k}={v}" for k, v in values.items())
                   for label, values in space.points.items()})  # MLflow's key charset: C48-d2@0.1 -> C48-d2_0.1
    parent.log_params(params)
    parent.log_dict(space.to_dict(), "search/space.yaml")
    parent.log_dict(setup["base_config"], "search/base_config.yaml")


def close_child_runs(tracking_uri: str, base: Config, rows: list[dict], parent_run_id: str | None) -> None:
    """Trials stopped by ASHA (or lost) leave their MLflow run open: close and label them. A trial that failed
    before it opened its run gets a FAILED child run, so no trial is missing from the MLflow comparison."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.run import find_run_id

    client = MlflowClient(tracking_uri)
    for r in rows:
        run_id = find_run_id(tracking_uri, base.tracking.experiment, r["run_name"])
        if run_id is None:
            if r["status"] == "ERROR" and parent_run_id:
                record_failed_trial(tracking_uri, base, r, parent_run_id)
            continue
        r["mlflow_run_id"] = run_id
        run = client.get_run(run_id)
        status = ("stopped_early" if r["stopped_early"] else "failed" if r["status"] == "ERROR"
                  else "completed" if r["status"] == "TERMINATED" else "unfinished")
        client.set_tag(run_id, STATUS_TAG, status)
        if "compute/flops" not in run.data.metrics and r.get("step") and r.get("train_flops_per_step"):
            # stopped before its first training log: its compute so far, from the steps it reported
            client.log_metric(run_id, "compute/flops", r["train_flops_per_step"] * r["step"], step=int(r["step"]))
        if run.info.status == "RUNNING" and r["status"] in ("TERMINATED", "ERROR"):
            client.set_terminated(run_id, {"stopped_early": "KILLED", "failed": "FAILED"}.get(status, "FINISHED"))


def record_failed_trial(tracking_uri: str, base: Config, row: dict, parent_run_id: str) -> None:
    from orchestrator.tracking.run import RUN_NAME_TAG
    from orchestrator.tracking.tracker import RunTracker

    run = RunTracker(tracking_uri, base.tracking.experiment, row["run_name"], parent_run_id=parent_run_id,
                     tags={RUN_NAME_TAG: row["run_name"], TRIAL_TAG: row["trial_id"], STATUS_TAG: "failed",
                           "mixer.tune_error": row.get("error", "")})
    run.start()
    run.log_params({**row.get("resolved", {}), **{f"tune.{k}": v for k, v in row["params"].items()}})
    run.end("FAILED")
    row["mlflow_run_id"] = run.run_id

