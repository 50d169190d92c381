"""`python -m orchestrator.pretrain`: dry run and every validation error, all before any Ray resource."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.loopback import free_port
from orchestrator import pretrain

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def mixer_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path / "home"


def _dry_run(mixer_home, *overrides: str) -> str:
    """`python -m orchestrator.pretrain --dry-run OVERRIDES` in a fresh process; its stdout (exit 0 asserted)."""
    env = {**os.environ, "MIXER_HOME": str(mixer_home)}
    out = subprocess.run([sys.executable, "-m", "orchestrator.pretrain", "--dry-run", *overrides],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_dry_run_prints_resolved_config_and_plan(mixer_home):
    text = _dry_run(mixer_home, "scaling.num_workers=2", "optim.global_batch_size=128", "optim.micro_batch_size=32")
    assert "# resolved config" in text and "mixer_digits" in text
    # 128 global = 2 workers x 64 samples each, in 2 micro-batches of 32 (gradient accumulation)
    assert "128 global = 2 stream slots x 64; micro-batches of at most 32" in text
    assert "2 workers: 64 samples in 2 micro-batches per rank" in text
    assert "FLOPs for the run" in text
    assert (mixer_home / "data" / "digits" / "manifest.json").exists()  # the embedded dataset was written
    import ray

    assert not ray.is_initialized()


def test_dry_run_of_paper_preset_without_its_bucket(mixer_home, monkeypatch, capsys):
    # No network here: the preset's bucket is unreachable, so the plan uses data.num_train_samples.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-value")
    assert pretrain.main(["--config", "imagenet1k_b16", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "num_train_samples=1281167" in out and "4096 global" in out
    # the preset's 1% minival (12,812) held out: 1,268,355 trained on, 309 steps/epoch x 300 epochs
    assert "1,268,355" in out and "12,812 samples held out" in out and "92,700" in out
    assert "testing-secret-value" not in out


@pytest.mark.parametrize(
    "args, expected",
    [
        (["optim.lr=-1"], ["optim.lr", "-1"]),
        (["optim.warmup=5"], ["optim.warmup", "accepted keys"]),
        (["optim.global_batch_size=100", "scaling.num_workers=3"], ["optim.global_batch_size", "100"]),
        (["model.patch_size=3"], ["patch_size", "3"]),
        (["data.url=/nonexistent/dataset"], ["data.url", "/nonexistent/dataset"]),
        (["--config", "no_such_preset"], ["no_such_preset", "digits"]),
    ],
)
def test_validation_errors_exit_2_before_ray(args, expected, mixer_home, capsys):
    import ray

    assert pretrain.main(args) == 2
    err = capsys.readouterr().err
    for word in expected:
        assert word in err
    assert not ray.is_initialized()


def test_unreachable_bucket_is_a_clear_error(mixer_home, monkeypatch, capsys):
    port = free_port()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-value")
    assert pretrain.main(["data.url=s3://no-bucket/data", f"data.endpoint_url=http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert "data.url" in err and "s3://no-bucket/data" in err
    assert "testing-secret-value" not in err


def test_unreachable_tracking_server_is_a_clear_error(mixer_home, capsys):
    port = free_port()
    assert pretrain.main([f"tracking.uri=http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert "tracking.uri" in err and str(port) in err


def test_dry_run_prints_the_plan_of_every_world_size_of_an_elastic_range(mixer_home):
    text = _dry_run(mixer_home, "scaling.num_workers=[1,3]", "optim.global_batch_size=120",
                    "optim.micro_batch_size=32")
    assert "1-3 (elastic)" in text and "120 global = 3 stream slots x 40" in text
    assert "1 worker : 120 samples in 4 micro-batches per rank" in text
    assert "2 workers: 80 samples in 3 micro-batches or 40 samples in 2 micro-batches per rank (unequal" in text
    assert "3 workers: 40 samples in 2 micro-batches per rank" in text
