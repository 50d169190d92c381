"""Fixtures shared by the fine-tuning and evaluation tests: one small pretrained digits model per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

PRETRAIN_EPOCHS = 6


def pretrained_digits(base: Path) -> dict:
    """Pretrain mixer_digits (16 px) once under `base` (MIXER_HOME=base/home); cached for the session."""
    marker = base / "pretrained.json"
    if marker.exists():
        return json.loads(marker.read_text())
    from orchestrator.config.load import load_config
    from orchestrator.tracking.tracker import RunTracker
    from orchestrator.train.launch import resolve_data
    from orchestrator.train.loop import Job, run_training
    from orchestrator.train.session import LocalSession

    home = base / "home"
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXER_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = load_config("digits", [
            "run.name=digits-pre", f"schedule.epochs={PRETRAIN_EPOCHS}", "schedule.warmup_steps=10",
            "scaling.num_workers=1", "data.loader_workers=0", "eval.every_steps=100000", "train.log_every_steps=20",
        ])
        data = resolve_data(cfg)
        tracker = RunTracker(uri, cfg.tracking.experiment, cfg.run.name)
        run_id = tracker.start()
        job = Job(data.url, data.num_classes, data.train_samples, run_id, uri, data.storage_options)
        run_dir = home / "runs" / "digits-pre"
        result = run_training(cfg, LocalSession(str(run_dir), device="cpu"), job)
        tracker.end("FINISHED")
    info = {"home": str(home), "run_dir": str(run_dir), "data_url": data.url, "top1": result["val/top1"],
            "run_id": run_id, "tracking_uri": uri, "step": result["step"]}
    marker.write_text(json.dumps(info))
    return info


@pytest.fixture(scope="module")
def pre(tmp_path_factory) -> dict:
    return pretrained_digits(tmp_path_factory.getbasetemp() / "digits-pretrained")


@pytest.fixture
def home_env(pre, monkeypatch):
    monkeypatch.setenv("MIXER_HOME", pre["home"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return pre
