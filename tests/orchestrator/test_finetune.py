"""Fine-tuning: checkpoint sources, App. C on real data, every bad-checkpoint case, and the CLI on local Ray.

A small digits model is pretrained once per test session without Ray (LocalSession + run_training, tracked in
a temp sqlite store) by `pretrained_digits` in tests/orchestrator/conftest.py, shared with test_evaluate.py.
- App. C on real digits: the 2x model on a 2x2 tiling of each held-out image scores exactly the source's top-1;
- bad input (fast, no Ray): missing, not a checkpoint, pickled code (never executed), npz with objects,
  non-Mixer state dict, incompatible patch size, shape mismatch, non-integer resolution factor, truncated file;
  a run directory of a run in progress yields its latest complete checkpoint;
- slow: `python -m orchestrator.finetune --from <run dir>` on local Ray at 32 px: top-1 holds or improves on
  the source's, the MLflow run records the source, and `python -m orchestrator.evaluate` on the fine-tuned run
  prints and logs the same top-1 as the run's final evaluation.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator import finetune
from orchestrator.eval.sources import CheckpointError, adapt_for_finetune, load_source

REPO = Path(__file__).resolve().parents[2]
@pytest.fixture(scope="module")
def bare_home(tmp_path_factory) -> Path:
    """A MIXER_HOME with only the digits dataset: the bad-input cases need no trained model."""
    from pipelines.digits import ensure_digits_dataset

    home = tmp_path_factory.mktemp("bare-home")
    ensure_digits_dataset(str(home / "data" / "digits"))
    return home


@pytest.fixture
def bare_env(bare_home, monkeypatch) -> Path:
    monkeypatch.setenv("MIXER_HOME", str(bare_home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return bare_home


def _untrained_checkpoint(directory: Path, **model_overrides) -> Path:
    """One of our checkpoint dirs holding an untrained mixer_digits (fast; for the bad-input cases)."""
    from model import create_model
    from orchestrator.checkpoint.format import save_checkpoint
    from orchestrator.config.load import load_config

    cfg = load_config("digits")
    model = create_model("mixer_digits", **model_overrides)
    save_checkpoint(directory, {"model": model.state_dict(), "step": 0, "mlflow_run_id": None,
                                "config": cfg.to_dict()})
    return directory


def _finetune_error(capsys, *argv: str) -> str:
    assert finetune.main(["--dry-run", *argv]) == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------------ App. C ---


def test_adapted_model_on_tiled_real_digits_scores_the_source_top1(pre):
    """App. C on real data: the 2x model sees each 16 px part on its own, so 2x2 tiles = the source."""
    from orchestrator.eval.metrics import evaluate
    from pipelines.loader import ShardLoader
    from pipelines.transforms import make_transform

    src = load_source(pre["run_dir"])
    assert src.kind == "project" and src.mlflow_run_id == pre["run_id"] and src.step == pre["step"]
    source_model = src.build_model()
    adapted = adapt_for_finetune(src, img_size=32, num_classes=10, keep_head=True)
    assert adapted.factor == 2 and not adapted.head_replaced
    assert adapted.model.cfg.tokens_mlp_dim == 4 * src.model_cfg.tokens_mlp_dim

    tf = make_transform(False, input_size=16, preset="digits", interpolation="bilinear", crop_pct=1.0)
    val = ShardLoader(pre["data_url"], "val", batch_size=128, training=False, transform=tf, num_workers=0)

    class Tiled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x.repeat(1, 1, 2, 2))

    cpu = torch.device("cpu")
    source = evaluate(source_model, val, cpu)
    tiled = evaluate(Tiled(adapted.model), val, cpu)
    assert source["count"] == tiled["count"] == 360
    assert source["top1"] == pytest.approx(pre["top1"]) and source["top1"] > 0.8
    assert tiled["top1"] == source["top1"] and tiled["loss"] == pytest.approx(source["loss"], rel=1e-4)

    fresh = adapt_for_finetune(src, img_size=32, num_classes=7)
    assert fresh.head_replaced and fresh.model.num_classes == 7
    assert torch.count_nonzero(fresh.model.head.weight) == 0  # the paper's zero-initialised head


def test_dry_run_sets_the_architecture_from_the_checkpoint(home_env, capsys):
    assert finetune.main(["--from", home_env["run_dir"], "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "project checkpoint" in out and "img 16, patch 4" in out
    assert re.search(r"img_size: 32\n", out) and re.search(r"tokens_mlp_dim: 256\n", out)


def test_other_source_formats_load(home_env, tmp_path):
    """Plain/timm state dicts (.pth, wrapped, DDP-prefixed, safetensors) and the official .npz layout."""
    from model.jax_checkpoint import torch_key

    src = load_source(home_env["run_dir"])
    sd = src.state_dict
    torch.save(sd, tmp_path / "plain.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "wrapped.pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    for name in ("plain.pth", "wrapped.pt", "w.safetensors"):
        s = load_source(str(tmp_path / name))
        assert s.kind == "state_dict" and s.model_cfg.img_size == 16 and s.model_cfg.depth == 4
        assert all(torch.equal(s.state_dict[k], sd[k]) for k in sd)

    # the same weights in the Flax layout, written as the official .npz files are
    flax = {}
    for npz_key in _flax_keys(src.model_cfg.depth):
        t = sd[torch_key(npz_key)].numpy()
        flax[npz_key] = t.transpose(2, 3, 1, 0) if t.ndim == 4 else (t.T if t.ndim == 2 else t)
    np.savez(tmp_path / "Mixer-digits.npz", **flax)
    s = load_source(str(tmp_path / "Mixer-digits.npz"))
    assert s.kind == "npz" and s.model_cfg.gelu == "tanh" and s.model_cfg.tokens_mlp_dim == 64
    assert all(torch.allclose(s.state_dict[k], sd[k]) for k in sd)


def _flax_keys(depth: int) -> list[str]:
    keys = ["stem/kernel", "stem/bias", "pre_head_layer_norm/scale", "pre_head_layer_norm/bias", "head/kernel",
            "head/bias"]
    for i in range(depth):
        for part in ("LayerNorm_0", "LayerNorm_1"):
            keys += [f"MixerBlock_{i}/{part}/scale", f"MixerBlock_{i}/{part}/bias"]
        for part in ("token_mixing/Dense_0", "token_mixing/Dense_1", "channel_mixing/Dense_0",
                     "channel_mixing/Dense_1"):
            keys += [f"MixerBlock_{i}/{part}/kernel", f"MixerBlock_{i}/{part}/bias"]
    return keys


# ---------------------------------------------------------------------------------------- bad input ---


def test_missing_and_non_checkpoints(bare_env, tmp_path, capsys):
    err = _finetune_error(capsys, "--from", str(tmp_path / "nope"))
    assert "does not exist" in err and "nope" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "without state.pt" in _finetune_error(capsys, "--from", str(empty))

    (tmp_path / "notes.pt").write_text("hello, not a checkpoint")
    assert "cannot be loaded safely" in _finetune_error(capsys, "--from", str(tmp_path / "notes.pt"))

    torch.save({"foo": torch.zeros(3)}, tmp_path / "other.pt")
    err = _finetune_error(capsys, "--from", str(tmp_path / "other.pt"))
    assert "not an MLP-Mixer state dict" in err and "stem.proj.weight" in err

    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "is not a checkpoint" in _finetune_error(capsys, "--from", str(tmp_path / "list.pt"))

    ckpt = _untrained_checkpoint(tmp_path / "trunc")
    data = (ckpt / "state.pt").read_bytes()
    (ckpt / "state.pt").write_bytes(data[: len(data) // 2])
    assert "cannot be loaded safely" in _finetune_error(capsys, "--from", str(ckpt))

    np.savez(tmp_path / "junk.npz", foo=np.zeros(3))
    assert "not an official Mixer .npz" in _finetune_error(capsys, "--from", str(tmp_path / "junk.npz"))


class _Payload:
    """Unpickling this would create a file: proof of executed code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickled_code_is_never_executed(bare_env, tmp_path, capsys):
    marker = tmp_path / "executed"
    torch.save({"model": _Payload(str(marker))}, tmp_path / "evil.pt")
    err = _finetune_error(capsys, "--from", str(tmp_path / "evil.pt"))
    assert "weights_only=True" in err and not marker.exists()

    evil_dir = tmp_path / "evil_ckpt"
    evil_dir.mkdir()
    torch.save({"format_version": 1, "model": _Payload(str(marker))}, evil_dir / "state.pt")
    assert "weights_only=True" in _finetune_error(capsys, "--from", str(evil_dir)) and not marker.exists()

    # an .npz whose array is a pickled object: np.load(allow_pickle=False) refuses it
    with zipfile.ZipFile(tmp_path / "evil.npz", "w") as z:
        arr = np.array([_Payload(str(marker))], dtype=object)
        with z.open("stem/kernel.npy", "w") as f:
            np.lib.format.write_array(f, arr, allow_pickle=True)
    err = _finetune_error(capsys, "--from", str(tmp_path / "evil.npz"))
    assert "allow_pickle=False" in err and not marker.exists()
    assert pickle  # the payload class is picklable (sanity of the test itself)


def test_initial_weights_are_read_like_every_checkpoint_file(tmp_path):
    """What fine-tuning hands the workers (orchestrator/train/state.py load_init_weights) goes through the one
    reader (orchestrator/checkpoint/format.py read_weights): weights_only, a clear error for a bad file."""
    from types import SimpleNamespace

    from orchestrator.checkpoint.format import DamagedCheckpointError, UnsafeCheckpointError
    from orchestrator.train.state import TrainingState

    model = torch.nn.Linear(2, 2)
    holder = SimpleNamespace(model=torch.nn.Linear(2, 2))
    torch.save(model.state_dict(), tmp_path / "init.pt")
    TrainingState.load_init_weights(holder, str(tmp_path / "init.pt"), {})
    assert torch.equal(holder.model.weight, model.weight)

    data = (tmp_path / "init.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedCheckpointError, match="damaged or truncated") as damaged:
        TrainingState.load_init_weights(holder, str(tmp_path / "cut.pt"), {})
    assert str(tmp_path / "cut.pt") in str(damaged.value)

    marker = tmp_path / "executed"
    torch.save({"weight": _Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"cannot be loaded safely \(weights_only=True\)"):
        TrainingState.load_init_weights(holder, str(tmp_path / "evil.pt"), {})
    assert not marker.exists()


def test_incompatible_models_and_resolutions(bare_env, tmp_path, capsys):
    run_dir = str(_untrained_checkpoint(tmp_path / "ok"))
    assert finetune.main(["--dry-run", "--from", run_dir]) == 0 and "img_size: 32" in capsys.readouterr().out
    err = _finetune_error(capsys, "--from", str(_untrained_checkpoint(tmp_path / "p2", patch_size=2)))
    assert "incompatible model" in err and "model.patch_size=4" in err and "needs 2" in err

    err = _finetune_error(capsys, "--from", run_dir, "model.img_size=24")
    assert "resolution factor 24/16 = 1.5" in err and "integer factor" in err
    err = _finetune_error(capsys, "--from", run_dir, "model.img_size=8")
    assert "resolution factor 8/16" in err

    err = _finetune_error(capsys, "--from", run_dir, "model.depth=8")
    assert "model.depth=8" in err and "needs 4" in err

    sd = load_source(run_dir).state_dict
    sd["blocks.2.mlp_channels.fc1.weight"] = torch.zeros(100, 128)
    torch.save(sd, tmp_path / "bad_shape.pt")
    err = _finetune_error(capsys, "--from", str(tmp_path / "bad_shape.pt"))
    assert "blocks.2.mlp_channels.fc1.weight" in err and "(100, 128)" in err

    with pytest.raises(CheckpointError, match="--keep-head"):
        adapt_for_finetune(load_source(run_dir), img_size=32, num_classes=3, keep_head=True)


def test_run_dir_of_a_run_in_progress_yields_the_latest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    older = _untrained_checkpoint(run / "checkpoint_2026-01-01_10-00-00.000001")
    torch.save({"format_version": 1, "model": {}, "step": 3}, older / "state.pt")  # replaced below
    _untrained_checkpoint(older)
    newer = run / "checkpoint_2026-01-01_10-05-00.000001"
    newer.mkdir(parents=True)
    (newer / "state.pt").write_bytes(b"PK\x03\x04 half-copied")  # still being written
    (run / "checkpoint_2026-01-01_10-06-00.000001").mkdir()  # no state.pt yet
    src = load_source(str(run))
    assert src.resolved.endswith("checkpoint_2026-01-01_10-00-00.000001/state.pt")
    # Ray Train's registry of a real run wins over directory order: see the CLI test on Ray below


# ------------------------------------------------------------------------------------- CLI on Ray ---


def _env(home: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(MIXER_HOME=home, PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token")
    return env


@pytest.mark.slow
def test_finetune_cli_at_2x_on_ray_keeps_accuracy_and_evaluate_matches(pre):
    from mlflow.tracking import MlflowClient

    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.finetune", "--from", pre["run_dir"], "train.log_every_steps=5"],
        cwd=REPO, env=_env(pre["home"]), capture_output=True, text=True, timeout=600,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "resolution x2 -> 32 px" in text and "head replaced" in text
    evals = [float(x) for x in re.findall(r"eval step \d+: top-1 ([0-9.]+)", text)]
    assert evals and evals[-1] >= pre["top1"] - 0.01, (evals, pre["top1"])  # holds or improves
    run_id = re.search(r"MLflow run id\s+(\w+)", out.stdout).group(1)
    print(f"FIGURES source top-1 {pre['top1']:.4f} (16 px); fine-tuned at 32 px, top-1 per epoch {evals}")

    client = MlflowClient(pre["tracking_uri"])
    run = client.get_run(run_id)
    tags, params = run.data.tags, run.data.params
    assert tags["finetune.source"] == pre["run_dir"] and tags["finetune.pretrain_run_id"] == pre["run_id"]
    assert tags["finetune.resolution_factor"] == "2" and tags["finetune.source_kind"] == "project"
    assert params["model.img_size"] == "32" and params["model.tokens_mlp_dim"] == "256"
    assert params["optim.optimizer"] == "sgd" and params["optim.weight_decay"] == "0.0"
    final = run.data.metrics["final/top1"]
    assert final == pytest.approx(evals[-1], abs=1e-4)

    # evaluate on the fine-tuned run's latest checkpoint: the same top-1, printed and logged
    ev = subprocess.run(
        [sys.executable, "-m", "orchestrator.evaluate", "--from", str(Path(pre["home"]) / "runs" / "digits_finetune")],
        cwd=REPO, env=_env(pre["home"]), capture_output=True, text=True, timeout=300,
    )
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    printed = float(re.search(r"top-1 ([0-9.]+)", ev.stdout).group(1))
    assert printed == pytest.approx(final, abs=5e-5)
    eval_run = client.get_run(re.search(r"MLflow run id\s+(\w+)", ev.stdout).group(1))
    assert eval_run.data.metrics["eval/top1"] == pytest.approx(final, abs=1e-9)
    assert eval_run.data.tags["eval.source_run_id"] == run_id

    # Ray Train's registry (ray.train.Result.from_path) names the run's latest registered checkpoint: it wins
    # over directory order, here over a newer complete checkpoint_* that Ray never registered ...
    from ray.train import Result

    run_dir = Path(pre["home"]) / "runs" / "digits_finetune"
    registered = Path(Result.from_path(str(run_dir)).checkpoint.path).name
    stray = run_dir / "checkpoint_9999-12-31_23-59-59.999999"
    shutil.copytree(run_dir / registered, stray)
    assert load_source(str(run_dir)).resolved.endswith(f"{registered}/state.pt")
    # ... unless its state.pt does not load: then the newest complete one is read
    state = (run_dir / registered / "state.pt").read_bytes()
    (run_dir / registered / "state.pt").write_bytes(state[: len(state) // 2])
    try:
        assert load_source(str(run_dir)).resolved.endswith(f"{stray.name}/state.pt")
    finally:
        (run_dir / registered / "state.pt").write_bytes(state)
        shutil.rmtree(stray)


def test_sources_on_s3(s3_server, s3_bucket, tmp_path, monkeypatch):
    """A run directory and an .npz-free state dict read through s3fs from the loopback S3 server."""
    import s3fs

    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_server)
    ckpt = _untrained_checkpoint(tmp_path / "run" / "checkpoint_00000011")
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    fs.put(str(tmp_path / "run"), f"{s3_bucket}/runs/run", recursive=True)
    src = load_source(f"s3://{s3_bucket}/runs/run")
    assert src.kind == "project" and src.resolved.endswith("checkpoint_00000011/state.pt")
    assert src.model_cfg.img_size == 16
    torch.save(load_source(str(ckpt)).state_dict, tmp_path / "w.pth")
    fs.put(str(tmp_path / "w.pth"), f"{s3_bucket}/w.pth")
    assert load_source(f"s3://{s3_bucket}/w.pth").kind == "state_dict"
    with pytest.raises(CheckpointError, match="does not exist"):
        load_source(f"s3://{s3_bucket}/nothing-here")
