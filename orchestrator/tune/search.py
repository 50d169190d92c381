"""Search D_S, D_C and regularisation with Ray Tune; every trial is a distributed Ray Train run.

    python -m orchestrator.tune                                   # embedded default: digits space, ASHA, local Ray
    python -m orchestrator.tune --space paper_appendix_b data.url=s3://bucket/in1k scaling.num_workers=8 \
        scaling.use_gpu=true                                      # the paper's App. B grid + D_S/D_C choices
    python -m orchestrator.tune --search optuna --num-samples 32  # TPE instead of random/grid sampling
    python -m orchestrator.tune --resume                          # continue the latest search of this space
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m orchestrator.tune ...

A trial builds its config (base config + space overrides + sampled values, D_S/D_C ratios resolved against C),
opens a nested MLflow run under the search's parent run, and fits a TorchTrainer whose reports reach Tune
through TuneReportCallback; ASHA stops weak trials on val/top1. The trial's Train run is named after the
search and the trial id, so a retried or resumed trial continues from its own checkpoints. At the end the
best trial's config is written as a file that `python -m orchestrator.pretrain --config FILE` accepts.
Search spaces: orchestrator/config/search_space.py (format) and orchestrator/spaces/*.yaml (presets).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config.search_space import (
    PLAN_KEYS,
    RESOURCE_KEYS,
    SearchSpace,
    apply,
    candidate_configs,
    list_spaces,
    load_space,
    parse_space,
    per_trial_resources,
    resolved_values,
    validate_space,
)
from orchestrator.config.tree import (
    Config,
    ConfigError,
    config_from_dict,
    list_presets,
    load_config,
    parse_override,
)

METRIC, MODE = "val/top1", "max"
TRIAL_DRIVER_MEMORY = 512 * 1024**2  # the trial function only drives a TorchTrainer; its workers hold the model
SIDECAR = "mixer_search.json"  # what --resume needs to rebuild the trial function, next to Tune's own state
SEARCH_TAG = "mixer.tune_search"
TRIAL_TAG = "mixer.tune_trial_id"
STATUS_TAG = "mixer.tune_status"
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------- CLI -------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.tune",
        description="Search MLP-Mixer widths and regularisation with Ray Tune (each trial a Ray Train run).",
        epilog=f"config presets: {', '.join(list_presets())}; space presets: {', '.join(list_spaces())}",
    )
    p.add_argument("--config", default=None, help="base config: preset or YAML file (default: the space's, else digits)")
    p.add_argument("--space", default=None, help="search space: preset or YAML file (default: digits)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="samples of the space (random: each repeats the grid; optuna: trials); default: the space's, else 1")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: what the cluster fits: CPUs // (num_workers x cpus_per_worker))")
    p.add_argument("--search", choices=("random", "grid", "optuna"), default="random",
                   help="random: grids crossed, choices/ranges sampled; grid: every choice crossed too; optuna: TPE")
    p.add_argument("--scheduler", choices=("asha", "none"), default="asha", help="early stopping on val/top1")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: evaluations before a trial can be stopped")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep the best 1/N at each rung")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a failed trial (it resumes from its own checkpoints); -1 = forever")
    p.add_argument("--name", default=None,
                   help="search name (Tune experiment and MLflow parent run); default tune-<space>[-N]")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted search (--name, else the latest of this space) without redoing "
                        "finished trials; its saved config and space are used")
    p.add_argument("--best-config", default=None, help="where to write the best trial's config (YAML)")
    p.add_argument("--dry-run", action="store_true", help="validate the space, print the search plan, start nothing")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every trial, e.g. schedule.epochs=10")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run_search(args)
    except ConfigError as e:  # SpaceError included
        print(f"error: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- storage ---------------------------------


@dataclass
class SearchStore:
    """Where the search lives: Tune's experiment directory (local path or s3://) plus our sidecar file."""

    storage_path: str  # as Tune/Train take it (path without scheme when `filesystem` is given)
    filesystem: Any  # pyarrow filesystem or None

    def _fs(self):
        import pyarrow.fs

        if self.filesystem is not None:
            return self.filesystem, self.storage_path
        if "://" in self.storage_path:
            return pyarrow.fs.FileSystem.from_uri(self.storage_path)
        return pyarrow.fs.LocalFileSystem(), self.storage_path

    def experiment_path(self, name: str) -> str:
        return f"{self.storage_path.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        import pyarrow.fs

        fs, base = self._fs()
        return fs.get_file_info(f"{base.rstrip('/')}/{name}").type != pyarrow.fs.FileType.NotFound

    def names(self) -> list[str]:
        import pyarrow.fs

        fs, base = self._fs()
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
        except OSError:
            return []
        return [Path(i.path).name for i in infos if i.type == pyarrow.fs.FileType.Directory]

    def write_sidecar(self, name: str, data: dict) -> None:
        fs, base = self._fs()
        fs.create_dir(f"{base.rstrip('/')}/{name}", recursive=True)
        with fs.open_output_stream(f"{base.rstrip('/')}/{name}/{SIDECAR}") as f:
            f.write(json.dumps(data, indent=1, default=str).encode())

    def unfinished_trials(self, name: str) -> set[str]:
        """Trial ids that Tune's saved experiment state holds as not finished (what --resume would continue)."""
        import pyarrow.fs

        fs, base = self._fs()
        root = f"{base.rstrip('/')}/{name}"
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(root))
            states = sorted(i.path for i in infos if Path(i.path).name.startswith("experiment_state"))
            if not states:
                return set()
            with fs.open_input_stream(states[-1]) as f:
                state = json.loads(f.read().decode())
            out = set()
            for item in state.get("trial_data", []):
                trial = json.loads(item[0]) if isinstance(item[0], str) else item[0]
                if trial.get("status") in ("RUNNING", "PENDING", "PAUSED"):
                    out.add(trial.get("trial_id"))
            return out
        except Exception:  # Tune's state format is internal: fall back to what fit() returned
            return set()

    def read_sidecar(self, name: str) -> dict | None:
        fs, base = self._fs()
        try:
            with fs.open_input_stream(f"{base.rstrip('/')}/{name}/{SIDECAR}") as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError):
            return None


def store_for(cfg: Config) -> SearchStore:
    from orchestrator.train.launch import storage_target

    path, fs = storage_target(cfg)
    return SearchStore(path, fs)


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
                f"--resume: no search named {base} (or {base}-N) under {store.storage_path}; pass --name of the "
                "search to resume (the name printed when it started)"
            )
        return max(taken, key=lambda n: 1 if n == base else int(n.rsplit("-", 1)[1]))
    if base not in taken:
        return base
    i = 2
    while f"{base}-{i}" in taken:
        i += 1
    return f"{base}-{i}"


# ---------------------------------------------------------------- the trial -------------------------------


def trial_run_name(search_name: str, trial_id: str) -> str:
    return f"{search_name}-{trial_id}"


def trial_config(setup: dict, params: dict, trial_id: str) -> Config:
    """The config one trial trains with: base + sampled values, its own Train run and nested MLflow run."""
    space = parse_space(setup["space"], name=setup["space_name"])
    cfg = apply(config_from_dict(setup["base_config"]), params, space)
    cfg.run.name = trial_run_name(setup["name"], trial_id)
    cfg.run.storage_path = setup["train_storage"]
    if setup["tracking_uri"]:
        cfg.tracking.uri = setup["tracking_uri"]
    cfg.tracking.parent_run_id = setup["parent_run_id"]
    return cfg


def run_trial(params: dict, setup: dict) -> None:
    """Tune's trainable: one TorchTrainer run, reporting to Tune through TuneReportCallback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.pretrain import resolve_run
    from orchestrator.tracking import run as run_tracking
    from orchestrator.train import launch

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(setup, params, trial_id)
    data, plan = resolve_run(cfg)
    model_cfg = plan.model_cfg
    tracking_uri = setup["tracking_uri"]
    run = run_tracking.open_run(cfg, tracking_uri, model_cfg, plan) if tracking_uri else None
    if run:
        run.set_tags({SEARCH_TAG: setup["name"], TRIAL_TAG: trial_id, STATUS_TAG: "running"})
        # The searched values, resolved (D_S/D_C as integers) and as sampled, logged on every attempt: open_run
        # logs the full config only for a new MLflow run, and an attempt may have died before it did.
        space_keys = [k for k in params if k in setup["space"]["params"]]
        run.log_params({**resolved_values(cfg, space_keys), **{f"tune.{k}": v for k, v in params.items()}})
    job = launch.Job(
        dataset_url=data.url, num_classes=data.num_classes, train_samples=data.train_samples,
        mlflow_run_id=run.run_id if run else None, tracking_uri=tracking_uri,
        storage_options=data.storage_options,
    )
    trainer = launch.build_trainer(cfg, job, callbacks=[TuneReportCallback()])
    try:
        result = trainer.fit()
    except BaseException:
        if run:
            run.set_tags({STATUS_TAG: "failed"})
            run.end("FAILED")
        raise
    _report_if_silent(result)
    if run:
        run.set_tags({STATUS_TAG: "completed"})
        run_tracking.finish_run(run, cfg, model_cfg, result)


def _report_if_silent(result) -> None:
    """A Train run that had already finished (driver killed just after it) resumes at its end and reports
    nothing; hand its final metrics to Tune so the trial still has a result."""
    from ray import tune

    try:
        from ray.train._internal.session import get_session

        silent = get_session().iteration == 0
    except Exception:
        return
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    if silent and METRIC in metrics:
        tune.report(metrics)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def trainable(setup: dict):
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(run_trial, setup=setup), {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}
    )


# ---------------------------------------------------------------- planning --------------------------------


def num_reports(plan) -> int:
    """How many times a run reports to Tune (train_loop: at every evaluation or checkpoint, and at the end)."""
    total, e, c = plan.total_steps, plan.eval_every_steps, plan.checkpoint_every_steps
    lcm = e * c // math.gcd(e, c)
    return total // e + total // c - total // lcm + (0 if total % e == 0 or total % c == 0 else 1)


def reports_for(cfg: Config, data) -> int:
    from orchestrator.train.plan import make_plan

    return num_reports(make_plan(cfg, data.num_classes, data.train_samples))


def derive_concurrency(trial_cfgs: list[Config]) -> tuple[int | None, dict[str, float]]:
    """Trials the cluster fits at once (the biggest trial's worker group counts), and that group's needs."""
    import ray

    total = ray.cluster_resources()
    need: dict[str, float] = {}
    for cfg in trial_cfgs:
        for k, v in per_trial_resources(cfg).items():
            need[k] = max(need.get(k, 0.0), v)
    fits = [int(total.get(k, 0.0) // v) for k, v in need.items() if v > 0]
    return (min(fits) if fits else None), need


# ---------------------------------------------------------------- the search ------------------------------


def run_search(args: argparse.Namespace) -> int:
    from orchestrator.pretrain import resolve_run
    from orchestrator.train import launch

    for flag in ("num_samples", "max_concurrent"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}={v} is not accepted; expected an integer >= 1")
    if args.grace_period < 1:
        raise ConfigError(f"--grace-period={args.grace_period} is not accepted; expected an integer >= 1")
    if args.reduction_factor <= 1:
        raise ConfigError(f"--reduction-factor={args.reduction_factor} is not accepted; expected a number > 1")

    space = load_space(args.space)
    overrides = dict(space.overrides)
    for item in args.overrides:
        key, value = parse_override(item)
        overrides[key] = value
    base = load_config(args.config or space.config, overrides)
    store = store_for(base)
    name = pick_name(store, f"tune-{space.name}", args.resume, args.name)
    saved = store.read_sidecar(name) if args.resume else None
    if args.resume:
        if saved is None:
            raise ConfigError(f"--resume: {store.experiment_path(name)} holds no search started by orchestrator.tune")
        if args.config or args.overrides:
            print("[tune] --resume uses the search's saved config and space; --config and overrides are ignored")
        space = parse_space(saved["space"], name=saved["space_name"])
        base = config_from_dict(saved["base_config"])
        search, scheduler_name = saved["search"], saved["scheduler"]
    else:
        search, scheduler_name = args.search, args.scheduler

    checked = validate_space(space, base)
    param_space = space.to_tune(search)  # grid search over a range fails here, naming the key
    num_samples = (saved or {}).get("num_samples") or args.num_samples or space.num_samples or 1
    print(f"[tune] search {name}: space {space.name} ({len(space.params)} keys, {checked} model/plan combinations "
          f"checked), search {search}, scheduler {scheduler_name}")
    for key, p in space.params.items():
        print(f"  {key:28s} {p.describe()}")

    # Everything below touches data and tracking; still nothing on Ray.
    data, _ = resolve_run(base, allow_unreachable=args.dry_run)
    plan_cfgs = candidate_configs(space, base, PLAN_KEYS)
    max_t = max(reports_for(c, data) for c in plan_cfgs)
    trials_hint = space.grid_size(search) * num_samples if search != "optuna" else num_samples
    print(f"[tune] {trials_hint} trial(s); each reports {max_t} time(s) (ASHA max_t); base config "
          f"{base.model.name}, {base.scaling.num_workers} worker(s) per trial")
    if args.dry_run:
        print("# base config\n" + base.to_yaml())
        return 0

    tracking_uri = launch.resolve_tracking(base)
    launch.init_ray()
    resource_cfgs = candidate_configs(space, base, RESOURCE_KEYS)
    biggest = max(resource_cfgs, key=lambda c: per_trial_resources(c).get("CPU", 0.0))
    launch.check_capacity(biggest)
    fits, need = derive_concurrency(resource_cfgs)
    max_concurrent = args.max_concurrent or (saved or {}).get("max_concurrent") or fits
    print(f"[tune] a trial needs {need}; {max_concurrent or 'unlimited'} trial(s) at once"
          + ("" if args.max_concurrent else " (derived from the cluster)"))

    parent = open_parent_run(base, tracking_uri, name, (saved or {}).get("parent_run_id"))
    setup = {
        "name": name,
        "space_name": space.name,
        "space": space.to_dict(),
        "base_config": base.to_dict(),
        "search": search,
        "scheduler": scheduler_name,
        "num_samples": num_samples,
        "max_concurrent": max_concurrent,
        "max_t": max_t,
        "tracking_uri": tracking_uri,
        "parent_run_id": parent.run_id if parent else None,
        "train_storage": f"{store.experiment_path(name)}/train_runs" if store.filesystem is None
        else f"s3://{store.experiment_path(name)}/train_runs",
    }
    if parent and not args.resume:
        log_parent_setup(parent, setup, space, args)
    store.write_sidecar(name, setup)

    from ray import tune

    run_config = tune.RunConfig(
        name=name, storage_path=store.storage_path, storage_filesystem=store.filesystem,
        failure_config=tune.FailureConfig(max_failures=args.max_failures),
    )
    if args.resume:
        print(f"[tune] resuming {store.experiment_path(name)}")
        tuner = tune.Tuner.restore(
            store.experiment_path(name), trainable(setup), resume_unfinished=True, resume_errored=True,
            storage_filesystem=store.filesystem,
        )
    else:
        tuner = tune.Tuner(
            trainable(setup),
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=MODE, num_samples=num_samples,
                # BasicVariantGenerator takes its own limit (Tune ignores max_concurrent_trials for it)
                max_concurrent_trials=max_concurrent if search == "optuna" else None,
                search_alg=make_search_alg(search, base.run.seed, max_concurrent),
                scheduler=make_scheduler(scheduler_name, max_t, args.grace_period, args.reduction_factor),
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=run_config,
        )
    results = tuner.fit()
    unfinished = store.unfinished_trials(name)
    # Ctrl-C between trials leaves none running: then fewer trials exist than the search was to make
    expected = space.grid_size(search) * num_samples if search != "optuna" else num_samples
    missing = len(results._experiment_analysis.trials) < expected
    return finish_search(results, setup, space, base, data, parent, args.best_config, store,
                         unfinished=unfinished, interrupted=missing or bool(unfinished))


def make_search_alg(search: str, seed: int, max_concurrent: int | None):
    """Seeded, so the same space and run.seed sample the same trials."""
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)  # TPE sampler; metric/mode come from TuneConfig
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent or 0)


def make_scheduler(name: str, max_t: int, grace_period: int, reduction_factor: float):
    if name == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # stop_last_trials=False: a trial that reaches max_t ends on its own, so its MLflow run is finished properly.
    return ASHAScheduler(
        time_attr="training_iteration", max_t=max(max_t, 1), grace_period=min(grace_period, max(max_t, 1)),
        reduction_factor=reduction_factor, stop_last_trials=False,
    )


# ---------------------------------------------------------------- MLflow parent ---------------------------


def open_parent_run(base: Config, tracking_uri: str | None, name: str, run_id: str | None):
    if not tracking_uri:
        return None
    from orchestrator.tracking.tracker import RunTracker

    parent = RunTracker(tracking_uri, base.tracking.experiment, name, run_id=run_id,
                        tags={SEARCH_TAG: name, "mixer.kind": "tune"})
    parent.start()
    return parent


def log_parent_setup(parent, setup: dict, space: SearchSpace, args) -> None:
    params = {
        "search.algorithm": {"random": "random (BasicVariantGenerator)", "grid": "grid (BasicVariantGenerator)",
                             "optuna": "optuna TPE (OptunaSearch)"}[setup["search"]],
        "search.scheduler": "none" if setup["scheduler"] == "none" else
        f"ASHA(time_attr=training_iteration, max_t={setup['max_t']}, grace_period={args.grace_period}, "
        f"reduction_factor={args.reduction_factor:g})",
        "search.metric": f"{METRIC} ({MODE})",
        "search.num_samples": setup["num_samples"],
        "search.max_concurrent": setup["max_concurrent"],
        "search.max_failures": args.max_failures,
        "search.space_name": space.name,
        "base.model": setup["base_config"]["model"]["name"],
    }
    params.update({f"space.{k}": p.describe() for k, p in space.params.items()})
    parent.log_params(params)
    parent.log_dict(space.to_dict(), "search/space.yaml")
    parent.log_dict(setup["base_config"], "search/base_config.yaml")


# ---------------------------------------------------------------- results ---------------------------------


def trial_rows(results, setup: dict, space: SearchSpace, base: Config, data) -> list[dict]:
    """One row per trial: status, whether ASHA stopped it, its sampled and resolved values, its metrics."""
    from orchestrator.train.plan import make_plan

    rows = []
    analysis = results._experiment_analysis  # the Trial objects carry status and failure counts
    for trial in analysis.trials:
        cfg_values = {k: v for k, v in trial.config.items() if k in space.params}
        row: dict[str, Any] = {"trial_id": trial.trial_id, "status": trial.status,
                               "run_name": trial_run_name(setup["name"], trial.trial_id),
                               "num_failures": trial.run_metadata.num_failures, "params": cfg_values}
        try:
            cfg = apply(base, cfg_values, space)
            row["resolved"] = resolved_values(cfg, space.params)
            plan = make_plan(cfg, data.num_classes, data.train_samples)
            row["expected_reports"] = num_reports(plan)
            row["train_flops_per_step"] = plan.train_flops_per_step
        except ConfigError as e:
            row["resolved"], row["expected_reports"] = {}, None
            row["config_error"] = str(e)
        last = trial.last_result or {}
        row["iterations"] = last.get("training_iteration", 0)
        for key in (METRIC, "val/top5", "val/loss", "step", "epoch"):
            if key in last:
                row[key] = last[key]
        if trial.status == "ERROR":
            row["error"] = _first_line(trial.error_file, trial)
        row["stopped_early"] = (trial.status == "TERMINATED" and row["expected_reports"] is not None
                                and row["iterations"] < row["expected_reports"])
        rows.append(row)
    return rows


def _first_line(_error_file, trial) -> str:
    try:
        return str(trial.get_pickled_error() or trial.get_error() or "error").strip().splitlines()[-1][:500]
    except Exception:
        return "error (see the trial's error file)"


def best_row(rows: list[dict]) -> dict | None:
    done = [r for r in rows if METRIC in r and r["status"] != "ERROR"]
    return max(done, key=lambda r: r[METRIC]) if done else None


def best_config(base: Config, space: SearchSpace, row: dict) -> Config:
    cfg = apply(base, row["params"], space)
    cfg.run.name = f"{row['run_name'].rsplit('-', 1)[0]}-best"
    cfg.tracking.parent_run_id = None
    return cfg


def write_best_config(cfg: Config, row: dict, setup: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = [
        f"# Best trial of Tune search {setup['name']} (trial {row['trial_id']}, Train run {row['run_name']}):",
        f"# {METRIC} = {row[METRIC]:.4f} after {row['iterations']} evaluation(s), step {row.get('step')}.",
        "# Searched: " + ", ".join(f"{k}={v}" for k, v in row["resolved"].items()),
        f"# Command:  python -m orchestrator.pretrain --config {path}",
    ]
    path.write_text("\n".join(header) + "\n" + cfg.to_yaml())
    load_config(str(path))  # what pretrain --config will do with it
    return path


def finish_search(results, setup, space, base, data, parent, best_path, store, *,
                  unfinished: set[str] = frozenset(), interrupted: bool = False) -> int:
    rows = trial_rows(results, setup, space, base, data)
    for r in rows:  # Tune reports the trials it stopped on Ctrl-C as TERMINATED; its saved state says RUNNING
        if r["trial_id"] in unfinished:
            r["status"], r["stopped_early"] = "UNFINISHED", False
    interrupted = [r for r in rows if r["status"] not in ("TERMINATED", "ERROR")] or (
        [{"trial_id": "(not yet generated)"}] if interrupted else [])
    print(f"\n=== search {setup['name']} ===")
    keys = list(space.params)
    for r in rows:
        vals = " ".join(f"{k.split('.')[-1]}={r['resolved'].get(k, r['params'].get(k))}" for k in keys)
        note = ("stopped early by ASHA" if r["stopped_early"] else
                f"error: {r.get('error')}" if r["status"] == "ERROR" else r["status"].lower())
        top1 = f"{r[METRIC]:.4f}" if METRIC in r else "  -   "
        print(f"  {r['trial_id']}  top-1 {top1}  evals {r['iterations']:>3}/{r['expected_reports']}  "
              f"{vals}  [{note}]")
    if setup["tracking_uri"]:
        close_child_runs(setup["tracking_uri"], base, rows, parent.run_id if parent else None)
    best = best_row(rows)
    best_file = None
    if best is not None:
        cfg = best_config(base, space, best)
        if best_path:
            best_file = Path(best_path)
        elif store.filesystem is None and "://" not in store.storage_path:
            best_file = Path(store.experiment_path(setup["name"])) / "best_config.yaml"
        else:
            from orchestrator.config.tree import mixer_home

            best_file = mixer_home() / "tune" / setup["name"] / "best_config.yaml"
        write_best_config(cfg, best, setup, best_file)
        print(f"\nbest trial     {best['trial_id']}  {METRIC} {best[METRIC]:.4f}")
        for k, v in best["resolved"].items():
            print(f"  {k:28s} {v}" + (f"   (sampled {best['params'][k]} x C)" if space.params[k].ratio_of_c else ""))
        print(f"best config    {best_file}")
        print(f"train it       python -m orchestrator.pretrain --config {best_file}")
    n_early = sum(r["stopped_early"] for r in rows)
    n_err = sum(r["status"] == "ERROR" for r in rows)
    print(f"trials         {len(rows)}: {n_early} stopped early by ASHA, {n_err} failed, "
          f"{len(interrupted)} unfinished")
    if parent:
        summary = {"trials.total": len(rows), "trials.stopped_early": n_early, "trials.failed": n_err,
                   "trials.unfinished": len(interrupted)}
        parent.log_metrics(summary, 0)
        parent.log_dict({"trials": rows}, "search/trials.json")
        if best is not None:
            parent.log_metrics({f"best/{METRIC.replace('val/', '')}": best[METRIC],
                                **({"best/top5": best["val/top5"]} if "val/top5" in best else {})}, 0)
            parent.set_tags({"best.trial_id": best["trial_id"], "best.run_name": best["run_name"],
                             **{f"best.{k}": str(v) for k, v in best["resolved"].items()}})
            parent.log_artifact(str(best_file), "search")
        parent.end("KILLED" if interrupted else "FINISHED")
        print(f"MLflow parent  {parent.run_id} (experiment {base.tracking.experiment})")
        print(f"MLflow UI      mlflow ui --backend-store-uri {setup['tracking_uri']}   (then open http://127.0.0.1:5000)")
        try:
            from orchestrator.report.compare import report_command

            print(f"compare trials {report_command(base.tracking.experiment, parent_run_id=parent.run_id, tracking_uri=setup['tracking_uri'])}")
        except ImportError:
            pass
    if interrupted:
        print(f"\nsearch interrupted with {len(interrupted)} trial(s) unfinished; continue it with:\n"
              f"  python -m orchestrator.tune --resume --name {setup['name']}"
              + (f" --space {space.name}" if space.name != "digits" else ""))
        return EXIT_INTERRUPTED
    return 0 if best is not None else 1


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


if __name__ == "__main__":
    sys.exit(main())
