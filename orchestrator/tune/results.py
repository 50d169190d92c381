"""What a search produced: one row per trial from Tune's saved experiment, the summary, the best trial's config
as a file `python -m orchestrator.pretrain --config FILE` accepts, and the parent run's closing entries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.config.load import load_config
from orchestrator.config.search_space import POINT_KEY, SearchSpace, apply, resolved_values
from orchestrator.config.tree import Config, ConfigError
from orchestrator.tune.mlflow_runs import close_child_runs
from orchestrator.tune.planning import REPORTED, num_reports, objective, trial_plan
from orchestrator.tune.store import SearchStore
from orchestrator.tune.trial import trial_run_name

EXIT_INTERRUPTED = 130
UNFINISHED_STATUSES = ("RUNNING", "PENDING", "PAUSED")  # as Tune saved them: what --resume continues


def saved_trials(store: SearchStore, name: str) -> list:
    """The search's trials as Tune's last saved experiment state holds them (what --resume would see).

    Read back rather than taken from fit()'s ResultGrid: on Ctrl-C Tune saves its state first, then stops the
    running trials and reports them as TERMINATED, while the saved state rightly keeps them unfinished.
    """
    from ray.tune import ExperimentAnalysis

    return ExperimentAnalysis(store.tune_experiment_path(name), storage_filesystem=store.tune_filesystem).trials


def trial_rows(trials: list, setup: dict, space: SearchSpace, base: Config, data) -> list[dict]:
    """One row per trial: status, whether ASHA stopped it, its sampled and resolved values, its metrics."""
    rows = []
    for trial in trials:
        cfg_values = {k: v for k, v in trial.config.items() if k in space.tune_keys()}
        status = "UNFINISHED" if trial.status in UNFINISHED_STATUSES else trial.status
        row: dict[str, Any] = {"trial_id": trial.trial_id, "status": status,
                               "run_name": trial_run_name(setup["name"], trial.trial_id),
                               "num_failures": trial.num_failures, "params": cfg_values}
        try:
            cfg = apply(base, cfg_values, space)
            row["resolved"] = resolved_values(cfg, space.value_keys())
            plan = trial_plan(cfg, data)
            row["expected_reports"] = num_reports(plan)
            row["train_flops_per_step"] = plan.train_flops_per_step
        except ConfigError as e:
            row["resolved"], row["expected_reports"] = {}, None
            row["config_error"] = str(e)
        last = trial.last_result or {}
        row["iterations"] = last.get("training_iteration", 0)
        for key in (metric_of(setup, base), REPORTED, "val/top5", "val/loss", "step", "epoch"):
            if key in last:
                row[key] = last[key]
        if trial.status == "ERROR":
            row["error"] = _error_line(trial)
        row["stopped_early"] = (trial.status == "TERMINATED" and row["expected_reports"] is not None
                                and row["iterations"] < row["expected_reports"])
        rows.append(row)
    return rows


def _error_line(trial) -> str:
    try:
        return str(trial.get_pickled_error() or trial.get_error() or "error").strip().splitlines()[-1][:500]
    except Exception:
        return "error (see the trial's error file)"


def metric_of(setup: dict, base: Config) -> str:
    """The search's objective, saved in its setup (a search saved before that: its base config's)."""
    return setup.get("metric") or objective(base)


def best_row(rows: list[dict], metric: str) -> dict | None:
    """The trial with the best objective: the minival's top-1 when the runs hold one out, never val's then."""
    done = [r for r in rows if metric in r and r["status"] != "ERROR"]
    return max(done, key=lambda r: r[metric]) if done else None


def best_config(base: Config, space: SearchSpace, row: dict) -> Config:
    cfg = apply(base, row["params"], space)
    cfg.run.name = f"{row['run_name'].rsplit('-', 1)[0]}-best"
    cfg.tracking.parent_run_id = None
    return cfg


def write_best_config(cfg: Config, row: dict, setup: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = [
        f"# Best trial of Tune search {setup['name']} (trial {row['trial_id']}, Train run {row['run_name']}):",
        f"# {setup['metric']} = {row[setup['metric']]:.4f} (selected on) after {row['iterations']} evaluation(s), "
        f"step {row.get('step')}" + (f"; {REPORTED} = {row[REPORTED]:.4f} (reported)." if REPORTED in row and
                                      setup["metric"] != REPORTED else "."),
        "# Searched: " + ", ".join(f"{k}={v}" for k, v in row["resolved"].items()),
        f"# Command:  python -m orchestrator.pretrain --config {path}",
    ]
    path.write_text("\n".join(header) + "\n" + cfg.to_yaml())
    load_config(str(path))  # what pretrain --config will do with it
    return path


def best_config_path(store: SearchStore, name: str, explicit: str | None) -> Path:
    """--best-config, else next to the search when it is on local disk, else under MIXER_HOME."""
    if explicit:
        return Path(explicit)
    if store.is_local:
        return Path(store.experiment_url(name)) / "best_config.yaml"
    from orchestrator.config.tree import mixer_home

    return mixer_home() / "tune" / name / "best_config.yaml"


def finish_search(trials: list, setup, space, base, data, parent, best_path, store, *,
                  not_all_generated: bool = False) -> int:
    """Print and record the outcome; exit code 0 (a best trial), 1 (none), or EXIT_INTERRUPTED."""
    rows = trial_rows(trials, setup, space, base, data)
    metric = setup["metric"] = metric_of(setup, base)
    reported = "" if metric == REPORTED else f" ({REPORTED} reported, never selected on)"
    print(f"\n=== search {setup['name']} ===   trials compared on {metric}{reported}")
    interrupted = [r for r in rows if r["status"] not in ("TERMINATED", "ERROR")] or (
        [{"trial_id": "(not yet generated)"}] if not_all_generated else [])
    keys = space.value_keys()
    for r in rows:
        vals = (f"{r['params'][POINT_KEY]}: " if POINT_KEY in r["params"] else "") + " ".join(
            f"{k.split('.')[-1]}={r['resolved'].get(k, r['params'].get(k))}" for k in keys)
        note = ("stopped early by ASHA" if r["stopped_early"] else
                f"error: {r.get('error')}" if r["status"] == "ERROR" else r["status"].lower())
        top1 = f"{r[metric]:.4f}" if metric in r else "  -   "
        shown = f"  {REPORTED} {r[REPORTED]:.4f}" if reported and REPORTED in r else ""
        print(f"  {r['trial_id']}  {metric} {top1}{shown}  evals {r['iterations']:>3}/{r['expected_reports']}  "
              f"{vals}  [{note}]")
    if setup["tracking_uri"]:
        close_child_runs(setup["tracking_uri"], base, rows, parent.run_id if parent else None)
    best = best_row(rows, metric)
    best_file = None
    if best is not None:
        best_file = write_best_config(best_config(base, space, best), best, setup,
                                      best_config_path(store, setup["name"], best_path))
        print(f"\nbest trial     {best['trial_id']}  {metric} {best[metric]:.4f} (selected on)"
              + (f", {REPORTED} {best[REPORTED]:.4f} (reported)" if reported and REPORTED in best else ""))
        for k, v in best["resolved"].items():
            ratio = k in space.params and space.params[k].ratio_of_c
            print(f"  {k:28s} {v}" + (f"   (sampled {best['params'][k]} x C)" if ratio else ""))
        print(f"best config    {best_file}")
        print(f"train it       python -m orchestrator.pretrain --config {best_file}")
    n_early = sum(r["stopped_early"] for r in rows)
    n_err = sum(r["status"] == "ERROR" for r in rows)
    print(f"trials         {len(rows)}: {n_early} stopped early by ASHA, {n_err} failed, "
          f"{len(interrupted)} unfinished")
    if parent:
        _close_parent(parent, rows, best, best_file, n_early, n_err, len(interrupted), base, setup)
    if interrupted:
        resume = setup.get("resume_command") or (f"python -m orchestrator.tune --resume --name {setup['name']}"
                                                 + (f" --space {space.name}" if space.name != "digits" else ""))
        print(f"\nsearch interrupted with {len(interrupted)} trial(s) unfinished; continue it with:\n  {resume}")
        return EXIT_INTERRUPTED
    return 0 if best is not None else 1


def _close_parent(parent, rows, best, best_file, n_early, n_err, n_unfinished, base, setup) -> None:
    summary = {"trials.total": len(rows), "trials.stopped_early": n_early, "trials.failed": n_err,
               "trials.unfinished": n_unfinished}
    parent.log_metrics(summary, 0)
    parent.log_dict({"trials": rows}, "search/trials.json")
    if best is not None:
        metric = setup["metric"]
        # best/top1 and best/top5: the chosen trial's val figures (what is reported); best/selection_top1: the
        # figure it was chosen on (the minival's when the runs hold one out)
        parent.log_metrics({**({"best/top1": best[REPORTED]} if REPORTED in best else {}),
                            "best/selection_top1": best[metric],
                            **({"best/top5": best["val/top5"]} if "val/top5" in best else {})}, 0)
        parent.set_tags({"best.trial_id": best["trial_id"], "best.run_name": best["run_name"],
                         "search.selected_on": metric,
                         **{f"best.{k}": str(v) for k, v in best["resolved"].items()}})
        parent.log_artifact(str(best_file), "search")
    parent.end("KILLED" if n_unfinished else "FINISHED")
    print(f"MLflow parent  {parent.run_id} (experiment {base.tracking.experiment})")
    from orchestrator.tracking.links import mlflow_ui_hint, report_command

    print(f"MLflow UI      {mlflow_ui_hint(setup['tracking_uri'])}")
    print(f"compare trials {report_command(base.tracking.experiment, parent_run_id=parent.run_id, tracking_uri=setup['tracking_uri'])}")
