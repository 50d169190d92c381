"""The driver of a training run: what `python -m orchestrator.pretrain` and `python -m orchestrator.finetune`
do once the config is loaded, on the process that submits the job (not on a worker).

- dry_run(cfg): the resolved config and the plan, printed; nothing is started.
- pretrain(cfg, ...): Ray, the MLflow run, the relay and progress ledger, the capacity check, then Ray Train's
  fit (orchestrator/train/launch.py); every way out ends the MLflow run; the summary is printed at the end.
  The per-worker loop is orchestrator/train/loop.py, the step orchestrator/train/step.py.
"""

from __future__ import annotations

import logging
import signal

from orchestrator.config.tree import Config
from pipelines.cli import CommandError, say

log = logging.getLogger(__name__)


def dry_run(cfg: Config) -> None:
    from orchestrator.train.launch import resolve_run

    data, plan = resolve_run(cfg, allow_unreachable=True)
    print("# resolved config")
    print(cfg.to_yaml())
    print("# plan")
    print(f"dataset              {data.url} ({data.num_classes} classes)")
    print(plan.describe())


def pretrain(cfg: Config, *, init_weights_url: str | None = None, run_tags: dict | None = None,
             marks: dict | None = None) -> dict:
    """Run training. The MLflow run ended, a failure is raised for the entry point (pipelines.cli.entry_point) to
    print and map: ClusterTooSmallError (a CapacityError, exit 3) when the cluster is too small, CommandError
    (exit 1) when training fails; SystemExit(143) when a SIGTERM stopped it after a committed checkpoint
    (checkpoint.on_sigterm: the same run.name resumes from it).

    Fine-tuning (orchestrator/finetune.py) passes the adapted weights' URL (loaded by every worker when the run
    has no checkpoint yet) and tags recording where they came from.
    """
    import ray

    from orchestrator.tracking import run as run_tracking
    from orchestrator.tracking.relay import collect_relay, start_relay
    from orchestrator.train import launch
    from orchestrator.train.finish import end_failed, finish_run, keep_unlogged
    from orchestrator.train.progress import start_ledger
    from orchestrator.train.sigterm import stop_on_sigterm
    from orchestrator.train.startup import driver_marks, mark

    marks = marks if marks is not None else driver_marks()
    data, plan = launch.resolve_run(cfg)
    tracking_uri = launch.resolve_tracking(cfg)
    mark(marks, "checks")
    say(f"[plan] {cfg.run.name}: {cfg.model.name} on {data.url}\n{plan.describe()}")

    # Ray before the MLflow run: a bad RAY_ADDRESS (a config error, exit 2) or a Ctrl-C/SIGTERM while Ray
    # starts leaves no run behind.
    launch.init_ray()
    mark(marks, "ray")
    run = run_tracking.open_run(cfg, tracking_uri, plan.model_cfg, plan) if tracking_uri else None
    if run and run_tags:
        run.set_tags(run_tags)
    job = launch.Job(
        dataset_url=data.url,
        num_classes=data.num_classes,
        train_samples=data.train_samples,
        mlflow_run_id=run.run_id if run else None,
        tracking_uri=tracking_uri,
        storage_options=data.storage_options,
        init_weights_url=init_weights_url,
        eval_sets=data.eval_sets,
    )
    # Once the MLflow run is open, every way out ends it: FAILED (or KILLED) with the reason as a tag, and
    # what never reached MLflow is kept next to the checkpoints for the replay command.
    relay = None
    try:
        launch.check_capacity(cfg)
        # Rank 0 logs through an actor this process owns: what an outage buffers outlives any worker.
        relay = start_relay(run) if run else None
        job.tracker_actor = relay.name if relay else None
        # restarts, resizes, steps redone: across worker groups, and across submissions of a continued run
        job.progress_actor, ledger = start_ledger(run.earlier_goodput if run else None)
        mark(marks, "run_setup")
        job.startup = marks
        trainer = launch.build_trainer(cfg, job)
        mark(marks, "fit")
        # from here a SIGTERM is a preemption notice: the workers checkpoint, then the run stops (before: it ends)
        # no deadline of its own (0): the workers' checkpoint and its commit take what they take; a second SIGTERM,
        # or `ray job stop`'s SIGKILL after RAY_JOB_STOP_WAIT_TIME_S, ends it now
        with stop_on_sigterm(ledger if cfg.checkpoint.on_sigterm else None, 0) as sigterm:
            result = trainer.fit()
    except launch.ClusterTooSmallError as e:  # a CapacityError: the entry point prints it and exits 3
        end_failed(cfg, run, relay, str(e))
        raise
    except KeyboardInterrupt:
        end_failed(cfg, run, relay, "interrupted (KeyboardInterrupt)", status="KILLED")
        raise
    except SystemExit:  # a second SIGTERM, or the grace deadline after the first: Ray's handler exits now
        end_failed(cfg, run, relay, "terminated (SIGTERM)", status="KILLED")
        raise
    except Exception as e:
        reason = f"training failed: {type(e).__name__}: {e}"
        end_failed(cfg, run, relay, reason)
        if run and (missing := run.unlogged_summary()):
            log.warning(missing)
        raise CommandError(reason) from e  # the entry point prints it and exits 1

    metrics = dict(result.metrics or {})
    if sigterm is not None and sigterm.received is not None and int(metrics.get("step", 0)) < plan.total_steps:
        reason = f"stopped by SIGTERM at step {metrics.get('step', 0)}, after its checkpoint was committed"
        say(f"[preemption] {reason}; submit again with run.name={cfg.run.name} (and the same run.storage_path) "
            "to resume from it")
        # the stop is a restart the run announced: counted as a preemption, and the next submission counts on
        restarts = ray.get(ledger.stop_for_resubmission.remote())
        if run:
            log_restarts(run, restarts, int(metrics.get("step", 0)))
        end_failed(cfg, run, relay, reason, status="KILLED")
        # not an error (no `error:` line): the run stopped as asked and resumes; the shell's status for SIGTERM
        raise SystemExit(128 + signal.SIGTERM)
    restarts = ray.get(ledger.summary.remote())
    metrics.update(restarts)
    checkpoint_path = result.checkpoint.path if result.checkpoint else None
    if run:
        log_restarts(run, restarts, int(metrics.get("step", 0)))
        collect_relay(run, relay)
        finish_run(run, cfg, plan.model_cfg, result)
        keep_unlogged(cfg, run)
    print_summary(cfg, metrics, run, tracking_uri, checkpoint_path)
    return metrics


def log_restarts(run, restarts: dict, step: int) -> None:
    """The ledger's totals into the MLflow run: goodput/* at the step, the world sizes as a tag."""
    run.log_metrics({k: v for k, v in restarts.items() if k.startswith("goodput/")}, step)
    run.set_tags({"world_sizes": restarts["world_sizes"]})


def print_summary(cfg: Config, metrics: dict, run, tracking_uri: str | None, checkpoint_path: str | None) -> None:
    print("\n=== done ===")
    if "val/top1" in metrics:
        print(f"top-1 {metrics['val/top1']:.4f}  top-5 {metrics['val/top5']:.4f}  after step {metrics.get('step')}")
    if "minival/top1" in metrics:  # held out of training: what choices are made on (val is only reported)
        print(f"minival top-1 {metrics['minival/top1']:.4f}  (held out of the training split; choices are made "
              "on it, val is reported)")
    if "ema/val/top1" in metrics:  # train.ema_decay: the EMA of the weights, measured beside them
        print(f"EMA top-1 {metrics['ema/val/top1']:.4f}  top-5 {metrics['ema/val/top5']:.4f}  "
              f"(train.ema_decay={cfg.train.ema_decay})")
    print(f"checkpoint      {checkpoint_path}")
    for line in figures_lines(metrics):
        print(line)
    if run:
        from orchestrator.tracking.links import mlflow_ui_hint, report_command

        print(f"MLflow run id   {run.run_id}")
        print(f"MLflow UI       {mlflow_ui_hint(tracking_uri)}")
        print(f"compare runs    {report_command(cfg.tracking.experiment, tracking_uri=tracking_uri)}")
        missing = run.unlogged_summary()  # exact counts, and the replay file holding them
        if missing:
            print(missing)


def figures_lines(metrics: dict) -> list[str]:
    """The run's data counts and compute, from the last report of the training loop (absent keys: not shown)."""
    lines = []
    if "data/bad_samples" in metrics:
        kinds = ", ".join(f"{k[len('data/bad/'):]} {int(v):,}" for k, v in sorted(metrics.items())
                          if k.startswith("data/bad/"))
        lines.append(f"samples         {int(metrics['data/bad_samples']):,} bad" + (f" ({kinds})" if kinds else "")
                     + f", {int(metrics.get('data/padded_samples', 0)):,} padded, "
                     f"{int(metrics.get('data/dropped_samples', 0)):,} dropped (all epochs, all workers)")
    if "compute/accelerator_hours" in metrics:
        lines.append(f"compute         {metrics['compute/accelerator_hours']:.4g} accelerator-hours held, "
                     f"{metrics['compute/productive_hours']:.4g} in training steps "
                     f"(goodput {100 * metrics['compute/goodput']:.1f}%)")
    wait, mfu = metrics.get("perf/run_data_wait_fraction"), metrics.get("train/run_mfu")
    if wait is not None or mfu is not None:
        lines.append("time            " + (f"{100 * wait:.1f}% of the training steps waiting for data (the most "
                                           "starved rank)" if wait is not None else "data wait not measured")
                     + ", " + (f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU unknown (no peak known for "
                                                                            "this accelerator)"))
    if "world_sizes" in metrics:
        lines.append(f"restarts        {metrics['goodput/restarts']} ({metrics['goodput/resizes']} resizes; world sizes "
                     f"{metrics['world_sizes']}), {metrics['goodput/steps_redone']} steps redone, "
                     f"{metrics['goodput/recovery_s']:.1f}s recovering"
                     + (f", {metrics['goodput/preemptions']} of them preemptions (checkpointed first)"
                        if metrics.get("goodput/preemptions") else ""))
    return lines
