"""One trial: Tune's trainable, which builds the trial's config and fits a TorchTrainer reporting to Tune.

Lives in an importable module because Ray pickles the trainable by reference into every trial's process.
"""

from __future__ import annotations

from orchestrator.config.parse import config_from_dict
from orchestrator.config.search_space import apply, parse_space, resolved_values
from orchestrator.config.tree import Config
from orchestrator.tune.mlflow_runs import SEARCH_TAG, STATUS_TAG, TRIAL_TAG
from orchestrator.tune.planning import objective

TRIAL_DRIVER_MEMORY = 512 * 1024**2  # the trial function only drives a TorchTrainer; its workers hold the model


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

    from orchestrator.tracking import run as run_tracking
    from orchestrator.tracking.relay import collect_relay, start_relay
    from orchestrator.train import launch
    from orchestrator.train.finish import end_failed, finish_run, keep_unlogged

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(setup, params, trial_id)
    space = parse_space(setup["space"], name=setup["space_name"])
    data, plan = launch.resolve_run(cfg)
    model_cfg = plan.model_cfg
    tracking_uri = setup["tracking_uri"]
    run = run_tracking.open_run(cfg, tracking_uri, model_cfg, plan) if tracking_uri else None
    if run:
        run.set_tags({SEARCH_TAG: setup["name"], TRIAL_TAG: trial_id, STATUS_TAG: "running"})
        # The searched values, resolved (D_S/D_C as integers) and as sampled, logged on every attempt: open_run
        # logs the full config only for a new MLflow run, and an attempt may have died before it did.
        run.log_params({**resolved_values(cfg, space.value_keys()), **{f"tune.{k}": v for k, v in params.items()}})
    job = launch.Job(
        dataset_url=data.url, num_classes=data.num_classes, train_samples=data.train_samples,
        mlflow_run_id=run.run_id if run else None, tracking_uri=tracking_uri,
        storage_options=data.storage_options, eval_sets=data.eval_sets,
    )
    already_finished = train_run_finished(cfg, plan.total_steps)
    # As in pretrain: rank 0 logs through an actor this trial owns, so an outage's backlog outlives workers.
    relay = start_relay(run) if run else None
    job.tracker_actor = relay.name if relay else None
    trainer = launch.build_trainer(cfg, job, callbacks=[TuneReportCallback()])
    try:
        result = trainer.fit()
    except BaseException as e:
        if run:
            run.set_tags({STATUS_TAG: "failed"})
            end_failed(cfg, run, relay, f"trial failed: {type(e).__name__}: {e}")
        raise
    if already_finished:
        # Resumed at its last step, the Train run reported nothing: hand its final metrics to Tune so the
        # trial still has a result.
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        if setup.get("metric", objective(cfg)) in metrics:
            tune.report(metrics)
    if run:
        collect_relay(run, relay)
        run.set_tags({STATUS_TAG: "completed"})
        finish_run(run, cfg, model_cfg, result)
        keep_unlogged(cfg, run)


def train_run_finished(cfg: Config, total_steps: int) -> bool:
    """Whether the Train run of `cfg` (run.storage_path/run.name) has a checkpoint at its last step already:
    a driver killed just after the run finished leaves such a run, and fitting it again trains nothing."""
    from ray.train import Result

    from orchestrator.train.launch import storage_target

    path, filesystem = storage_target(cfg)
    try:
        latest = Result.from_path(f"{path.rstrip('/')}/{cfg.run.name}", storage_filesystem=filesystem)
    except RuntimeError:  # what from_path raises for a run that does not exist or has no checkpoint yet
        return False
    return (latest.metrics or {}).get("step", 0) >= total_steps


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def trainable(setup: dict):
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(run_trial, setup=setup), {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}
    )
