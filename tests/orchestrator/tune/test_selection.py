"""Trials are compared on the minival when the runs hold one out, never on the val split that is reported."""

from __future__ import annotations

from orchestrator.config.load import load_config
from orchestrator.tune.planning import objective
from orchestrator.tune.results import best_row, metric_of, write_best_config


def _row(trial, minival, val, status="TERMINATED"):
    return {"trial_id": trial, "status": status, "minival/top1": minival, "val/top1": val, "iterations": 3,
            "step": 30, "resolved": {"optim.lr": 0.001}, "run_name": f"t-{trial}"}


def test_the_objective_is_the_minival_when_the_runs_hold_one():
    assert objective(load_config("digits")) == "minival/top1"  # the preset holds 10% of train out
    assert objective(load_config("digits", ["data.minival_fraction=0"])) == "val/top1"
    assert metric_of({"metric": "val/top1"}, load_config("digits")) == "val/top1"  # a search keeps its own
    assert metric_of({}, load_config("digits")) == "minival/top1"


def test_the_best_trial_is_chosen_on_the_minival_where_val_disagrees(tmp_path):
    rows = [_row("a", minival=0.91, val=0.80), _row("b", minival=0.85, val=0.95), _row("c", 0.99, 0.99, "ERROR")]
    assert best_row(rows, "minival/top1")["trial_id"] == "a"  # val would pick b
    assert best_row(rows, "val/top1")["trial_id"] == "b"
    setup = {"name": "tune-x", "metric": "minival/top1"}
    path = write_best_config(load_config("digits"), rows[0], setup, tmp_path / "best.yaml")
    header = path.read_text().splitlines()[1]
    assert header == ("# minival/top1 = 0.9100 (selected on) after 3 evaluation(s), step 30; "
                      "val/top1 = 0.8000 (reported).")
