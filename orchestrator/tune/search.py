"""The search itself: resolve config, space and store, check the cluster, then start or resume Tune and hand
the outcome to results.finish_search. Flags: orchestrator/tune/cli.py."""

from __future__ import annotations

import argparse

from orchestrator.config.load import load_config
from orchestrator.config.parse import config_from_dict, parse_override
from orchestrator.config.search_space import SearchSpace, load_space, parse_space
from orchestrator.config.space_checks import PLAN_KEYS, RESOURCE_KEYS, candidate_configs, validate_space
from orchestrator.config.tree import ConfigError
from orchestrator.train.plan import worker_group_resources
from orchestrator.tune.mlflow_runs import log_parent_setup, open_parent_run
from orchestrator.tune.planning import (
    MODE,
    derive_concurrency,
    expected_trials,
    make_scheduler,
    make_search_alg,
    num_reports,
    objective,
    trial_plan,
)
from orchestrator.tune.results import finish_search, saved_trials
from orchestrator.tune.store import pick_name, store_for
from orchestrator.tune.trial import trainable, trial_dirname
from pipelines.cli import say


def run_search(args: argparse.Namespace, space: SearchSpace | None = None, *, kind: str = "tune",
               parent_tags: dict | None = None, parent_files: dict[str, dict] | None = None,
               resume_command: str | None = None) -> int:
    """Run (or --resume) the search of `space` (default: the --space preset or file).

    orchestrator.study runs its grids through here as `kind` "study", with its own name (args.name), tags and
    files for the parent run (`parent_tags`, `parent_files`: artifact path -> dict), and its resume command.
    """
    from orchestrator.train import launch

    space = space or load_space(args.space)
    overrides = dict(space.overrides)
    for item in args.overrides:
        key, value = parse_override(item)
        overrides[key] = value
    base = load_config(args.config or space.config, overrides)
    checked = None
    if not args.resume:  # a new search's space is checked before the store is made (it creates a local directory)
        checked = validate_space(space, base)
        space.to_tune(args.search)  # grid search over a range fails here, naming the key
    store = store_for(base)
    name = pick_name(store, f"tune-{space.name}", args.resume, args.name)
    tag = f"[{kind}]"
    saved = store.read_sidecar(name) if args.resume else None
    if args.resume:
        if saved is None:
            raise ConfigError(f"--resume: {store.experiment_url(name)} holds no search started by orchestrator.tune")
        from ray.tune import Tuner

        if not Tuner.can_restore(store.tune_experiment_path(name), storage_filesystem=store.tune_filesystem):
            raise ConfigError(f"--resume: {store.experiment_url(name)} holds no Tune experiment state to resume "
                              "(the search stopped before Tune saved any); start it again without --resume")
        if args.config or args.overrides:
            say(f"{tag} --resume uses the search's saved config and space; --config and overrides are ignored")
        space = parse_space(saved["space"], name=saved["space_name"])
        base = config_from_dict(saved["base_config"])
        search, scheduler_name = saved["search"], saved["scheduler"]
    else:
        search, scheduler_name = args.search, args.scheduler

    if checked is None:
        checked = validate_space(space, base)
    param_space = space.to_tune(search)  # grid search over a range fails here, naming the key
    num_samples = (saved or {}).get("num_samples") or args.num_samples or space.num_samples or 1
    say(f"{tag} search {name}: space {space.name} ({len(space.params)} keys, {len(space.points)} points, {checked} "
        f"model/plan combinations checked), search {search}, scheduler {scheduler_name}, trials compared on "
        f"{objective(base)}")
    for key, p in space.params.items():
        say(f"  {key:28s} {p.describe()}")
    for label, values in space.points.items():
        say(f"  point {label:22s} " + " ".join(f"{k}={v}" for k, v in values.items()))

    # Everything below touches data and tracking; still nothing on Ray.
    data, _ = launch.resolve_run(base, allow_unreachable=args.dry_run)
    max_t = max(num_reports(trial_plan(c, data)) for c in candidate_configs(space, base, PLAN_KEYS))
    num_trials = expected_trials(space, search, num_samples)
    say(f"{tag} {num_trials} trial(s); each reports {max_t} time(s) (ASHA max_t); base config "
        f"{base.model.name}, {base.scaling.num_workers} worker(s) per trial")
    if args.dry_run:
        print("# base config\n" + base.to_yaml())
        return 0

    tracking_uri = launch.resolve_tracking(base)
    launch.init_ray()
    resource_cfgs = candidate_configs(space, base, RESOURCE_KEYS)
    biggest = max(resource_cfgs, key=lambda c: worker_group_resources(c).get("CPU", 0.0))
    launch.check_capacity(biggest)
    fits, need = derive_concurrency(resource_cfgs)
    max_concurrent = args.max_concurrent or (saved or {}).get("max_concurrent") or fits
    say(f"{tag} a trial needs {need}; {max_concurrent or 'unlimited'} trial(s) at once"
        + ("" if args.max_concurrent else " (derived from the cluster)"))

    parent = open_parent_run(base, tracking_uri, name, (saved or {}).get("parent_run_id"),
                             tags={"mixer.kind": kind, **(parent_tags or {})})
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
        "metric": (saved or {}).get("metric") or objective(base),  # what trials are compared on
        "train_storage": f"{store.experiment_url(name)}/train_runs",
        "resume_command": (saved or {}).get("resume_command") or resume_command,
    }
    if parent and not args.resume:
        log_parent_setup(parent, setup, space, args)
        for path, content in (parent_files or {}).items():
            parent.log_dict(content, path)
    store.write_sidecar(name, setup)

    from ray import tune

    experiment = store.tune_experiment_path(name)
    if args.resume:
        say(f"{tag} resuming {store.experiment_url(name)}")
        tuner = tune.Tuner.restore(experiment, trainable(setup), resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=store.tune_filesystem)
    else:
        tuner = tune.Tuner(
            trainable(setup),
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=setup["metric"], mode=MODE, num_samples=num_samples,
                # BasicVariantGenerator takes its own limit (Tune ignores max_concurrent_trials for it)
                max_concurrent_trials=max_concurrent if search == "optuna" else None,
                search_alg=make_search_alg(search, base.run.seed, max_concurrent),
                scheduler=make_scheduler(scheduler_name, max_t, args.grace_period, args.reduction_factor),
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=store.tune_path, storage_filesystem=store.tune_filesystem,
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
            ),
        )
    tuner.fit()
    trials = saved_trials(store, name)
    # Ctrl-C between trials leaves none running: then fewer trials exist than the search was to make
    return finish_search(trials, setup, space, base, data, parent, args.best_config, store,
                         not_all_generated=len(trials) < num_trials)
