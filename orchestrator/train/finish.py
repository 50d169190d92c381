"""The end of a training run, on the driver: its MLflow run closed FINISHED with the final model and the
training curves (finish_run), or FAILED / KILLED with the reason (end_failed); either way what never reached
MLflow is kept next to the checkpoints for the replay command (keep_unlogged).

Used by orchestrator/train/driver.py (pretrain and finetune) and by every Tune trial (orchestrator/tune/trial.py). The
run's start (open_run) is orchestrator/tracking/run.py; this module reads the final checkpoint, which the
tracking layer does not.
"""

from __future__ import annotations

from orchestrator.config.tree import Config
from orchestrator.tracking.tracker import RunTracker


def finish_run(tracker: RunTracker, cfg: Config, model_cfg, result) -> None:
    """Log the final model (with an input example) and a training-curve figure, then end the run."""
    import torch

    from model import MlpMixer
    from orchestrator.checkpoint.format import load_checkpoint

    metrics = dict(result.metrics or {})
    if "val/top1" in metrics:
        tracker.log_metrics({"final/top1": metrics["val/top1"], "final/top5": metrics["val/top5"]},
                            int(metrics.get("step", 0)))
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as path:
            state = load_checkpoint(path)
        model = MlpMixer(model_cfg)
        model.load_state_dict(state["model"])
        model.eval()
        example = torch.zeros(1, model_cfg.in_chans, model_cfg.img_size, model_cfg.img_size)
        tracker.log_model(model, example)
    fig = curves_figure(tracker)
    if fig is not None:
        tracker.log_figure(fig, "curves.png")
    tracker.end("FINISHED")


def curves_figure(tracker: RunTracker):
    """Loss and top-1 against the step, read back from MLflow (so restarts are included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracker.tracking_uri)
        loss = client.get_metric_history(tracker.run_id, "train/loss")
        top1 = client.get_metric_history(tracker.run_id, "val/top1")
    except Exception:  # tracking unreachable at the end: the figure is skipped, the run summary says so
        return None
    if not loss and not top1:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    loss = sorted(loss, key=lambda m: m.step)
    top1 = sorted(top1, key=lambda m: m.step)
    ax1.plot([m.step for m in loss], [m.value for m in loss])
    ax1.set(xlabel="step", ylabel="train loss", title="training loss")
    ax2.plot([m.step for m in top1], [m.value for m in top1], marker="o")
    ax2.set(xlabel="step", ylabel="top-1", title="validation top-1")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


FAILURE_REASON_TAG = "failure.reason"


def end_failed(cfg: Config, run, relay, reason: str, status: str = "FAILED") -> None:
    """End the driver's MLflow run (if any) with `status` and the reason in the failure.reason tag, after
    taking over what rank 0's relay still holds; what is still unlogged goes to the replay file."""
    if run:
        from orchestrator.tracking.relay import collect_relay

        collect_relay(run, relay)
        run.set_tags({FAILURE_REASON_TAG: reason})
        run.end(status)
        keep_unlogged(cfg, run)


def keep_unlogged(cfg: Config, run) -> None:
    """What never reached MLflow goes next to the run's checkpoints, for `python -m orchestrator.tracking.replay`."""
    from orchestrator.tracking.replay import write_unlogged
    from orchestrator.train.launch import storage_options
    from pipelines.storage import join_url

    run_dir = join_url(cfg.resolved_storage_path(), cfg.run.name)
    write_unlogged(run, run_dir, storage_options(cfg, run_dir))
