"""Nothing tracked is logged twice: the steps a loop restarted from its checkpoint sends again are dropped."""

from __future__ import annotations

from orchestrator.tracking.tracker import RunTracker


def _steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_steps_resent_after_a_restart_are_not_logged_twice(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = RunTracker(uri, "unit", "resent")
    run_id = t.start()
    for step in range(1, 14):  # a worker logs steps 1-13, then dies; its checkpoint was at step 5
        t.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step)
    for step in range(6, 21):  # the restarted loop continues from step 5 and sends 6-13 again
        t.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step)
    t.log_metrics({"val/top1": 0.5}, 10)  # another key: its own highest step
    t.end()
    client = MlflowClient(uri)
    assert _steps(client, run_id, "train/loss") == list(range(1, 21))
    assert _steps(client, run_id, "train/lr") == list(range(1, 21))
    assert _steps(client, run_id, "val/top1") == [10]
    assert t.resent == 16 and t.unlogged_summary() is None
