"""`python -m orchestrator.benchmark model|data --quick` run end to end on CPU and write sane figures.

The run is real (digits preset and Mixer-S/16 at batch 2, fp32, one torch thread, interleaved rounds); on an
idle 2-core machine it takes well under a minute. The comparison with timm is checked too: timm is a dev
dependency (pyproject [dev]), so the test imports it and fails, never skips, when the benchmark left timm out.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
# Train GFLOP per image (3 x forward matmul FLOPs) from model.accounting, checked by hand:
# S/16 at 224, 1000 classes: 3 * 2 * (196*768*512 + 8*(2*512*196*256 + 2*196*512*2048) + 512*1000) / 1e9.
S16_TRAIN_GFLOPS = 3 * 2 * (196 * 768 * 512 + 8 * (2 * 512 * 196 * 256 + 2 * 196 * 512 * 2048) + 512 * 1000) / 1e9


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "model.json"
    cmd = [sys.executable, "-m", "orchestrator.benchmark", "model", "--quick", "--repeats", "2", "--json", str(out)]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(out.read_text()), r.stdout


@pytest.mark.parametrize("part", ["model", "feed"])
def test_cuda_parts_without_a_visible_gpu_exit_2_naming_the_flag(part, monkeypatch, capsys):
    from orchestrator.benchmark.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([part, "--device", "cuda", "--quick"]) == 2
    assert "error: --device cuda: no CUDA device is visible to torch here; use --device cpu" in capsys.readouterr().err


@pytest.mark.timeout(900)
def test_model_quick_writes_sane_figures_and_matches_timm(quick_run):
    import timm  # a dev dependency: without it this test fails (ImportError), it is not skipped

    data, stdout = quick_run
    assert data["command"].startswith("python -m orchestrator.benchmark model --quick")
    assert data["machine"]["cpu_count"] >= 1
    model = data["model"]
    assert model["device"] == "cpu" and model["dtype"] == "fp32" and model["torch_threads"] == 1
    cases = {c["model"]: c for c in model["cases"]}
    assert set(cases) == {"mixer_digits", "mixer_s16_224"}
    assert cases["mixer_s16_224"]["train_gflops_per_image"] == pytest.approx(S16_TRAIN_GFLOPS, rel=1e-9)
    for c in cases.values():
        ours = c["impls"]["ours"]
        s = ours["img_per_s"]
        assert s["n"] == 2 and all(_positive(v) for v in s["samples"])
        assert s["min"] <= s["median"] <= s["max"]
        assert _positive(ours["step_ms"]) and _positive(ours["achieved_tflops"])
        assert ours["step_ms"] == pytest.approx(1000 * c["batch"] / s["median"])
        assert "mfu" not in ours  # no peak on CPU
    assert "mixer_s16_224" in stdout and "img/s" in stdout

    assert not model["timm_skipped"], (
        f"timm {timm.__version__} imports here, the benchmark left it out: {model['timm_skipped']}")
    assert model["timm"].startswith("1.")
    for name, c in cases.items():
        assert c["logits"]["agree"] is True, (name, c["logits"])
        assert c["logits"]["max_abs_diff"] <= 1e-4 * max(1.0, c["logits"]["logit_scale"])
        assert c["logits"]["logit_scale"] > 1e-3  # the random head makes the check meaningful
        # same weights, same batch, same step -> same first loss
        assert c["first_step_loss"]["ours"] == pytest.approx(c["first_step_loss"]["timm"], rel=1e-4)
        assert all(_positive(v) for v in c["impls"]["timm"]["img_per_s"]["samples"])
        ratio = c["ratios"]["ours/timm"]
        assert ratio["n"] == 2 and _positive(ratio["median"])
        assert 0.05 < ratio["median"] < 20, f"{name}: ours/timm {ratio} is not a plausible throughput ratio"
    assert "vs timm" in stdout


def test_model_benchmark_without_timm_says_how_to_install_it(monkeypatch):
    """Where timm does not import, the model benchmark gives a reason that names the dev extra (the
    check the timm run above made only when timm was missing)."""
    from orchestrator.benchmark.model import import_timm_mixer

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    timm_cls, reason = import_timm_mixer()
    assert timm_cls is None
    assert "pip install -e '.[dev]'" in reason


@pytest.mark.timeout(900)
def test_data_quick_measures_every_case_including_loopback_s3(tmp_path):
    """The data part (which absorbed pipelines.bench): decode with torchvision and PIL, the loader and
    webdataset's recommended pipeline, from local shards and from the loopback S3 server."""
    out = tmp_path / "data.json"
    cmd = [sys.executable, "-m", "orchestrator.benchmark", "data", "--quick", "--repeats", "1", "--images", "32",
           "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    data = json.loads(out.read_text())["data"]
    assert data["images"] == 32 and not data["notes"], data["notes"]
    assert set(data["cases"]) == {
        "decode only", "decode only (PIL)", "decode+aug in memory",
        "ShardLoader local", "wds recommended local", "ShardLoader s3", "wds recommended s3",
    }  # fmt: skip
    for name, case in data["cases"].items():
        assert all(_positive(v) for v in case["img_per_s_per_core"]["samples"]), name
    assert _positive(data["ratios"]["decode only (PIL)/decode only"]["median"])
    assert _positive(data["ratios"]["ShardLoader s3/wds recommended s3"]["median"])
    assert "decode only (PIL)" in r.stdout
    cache = data["cache"]  # epoch 2 vs epoch 1 with the node-local shard cache on loopback S3
    assert cache["epoch2_bytes_from_storage_cache"][0] == 0 and cache["epoch2_bytes_from_storage_cache"][1] > 0
    assert _positive(cache["data_path_mb_per_s"]["epoch2/epoch1"]["median"])
    assert _positive(cache["loader_img_per_s"]["epoch2/epoch1"]["median"])
    assert "shard cache on loopback S3" in r.stdout
    feed = data["feed"]  # host CPU per image for each placement of the recipe, and the device stage's rate
    assert set(feed["host_img_per_cpu_s"]) == {"before", "host", "device_aug", "device_decode"}
    for placement, s in feed["host_img_per_cpu_s"].items():
        assert all(_positive(v) for v in s["samples"]), placement
        assert feed["host_cores_per_accelerator"][placement] == pytest.approx(6500 / s["median"])
    assert set(feed["device_stage_img_per_s"]) == {"device_aug", "device_decode"}
    assert all(_positive(s["median"]) for s in feed["device_stage_img_per_s"].values())
    # the host does less with the recipe's batch stage on the device, and less again with the decode there
    assert feed["ratios"]["device_decode/host"]["median"] > 1.0
    assert "host cores per accelerator" in r.stdout


def test_feed_check_runs_on_cpu(tmp_path):
    """The GPU feed check (BENCHMARKS.md) on CPU: the same code end to end, tiny sizes."""
    out = tmp_path / "feed.json"
    cmd = [sys.executable, "-m", "orchestrator.benchmark", "feed", "--quick", "--repeats", "1", "--images", "16",
           "--batch", "4", "--steps", "1", "--models", "mixer_s32_224", "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    feed = json.loads(out.read_text())["feed"]
    assert set(feed["placements"]) == {"host", "device_aug", "device_decode"}
    for placement, p in feed["placements"].items():
        assert _positive(p["img_per_s"]) and 0 <= p["data_wait_fraction"] <= 1, placement
    assert [c["model"] for c in feed["model_only"]["cases"]] == ["mixer_s32_224"]
    assert "waiting for data" in r.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_checkpoint_upload_measures_the_step_after_each_checkpoint(tmp_path):
    """The train benchmark's checkpoint-to-S3 case, for real but small (the digits Mixer as it is, 2 epochs): a
    Ray Train run with its storage on the loopback S3 server; the checkpoints are there and the figures are the
    run's own steps (the step after each checkpoint of the 22 against the others)."""
    from orchestrator.benchmark import checkpoint_upload
    from orchestrator.benchmark.common import table
    from pipelines.digits import ensure_digits_dataset

    res = checkpoint_upload.run(tmp_path, ensure_digits_dataset(str(tmp_path / "digits")), epochs=2, wide=False)
    assert res["checkpoints_in_storage"] >= 2  # steps 10, 20, 22 reported; num_to_keep=2 keeps the last two
    assert res["step_after_checkpoint_s"]["n"] == 2 and res["plain_step_s"]["n"] == 10  # steps 11, 21 vs 12-20, 22
    assert _positive(res["plain_step_s"]["median"]) and _positive(res["step_after_checkpoint_s"]["median"])
    assert res["after_vs_plain"]["median"] == pytest.approx(
        res["step_after_checkpoint_s"]["median"] / res["plain_step_s"]["median"], rel=1e-6)
    assert 0 < res["checkpoint_mb"] < 10
    assert "after a checkpoint" in table(*checkpoint_upload.table(res))


def test_observe_overhead_interleaves_on_and_off(tmp_path):
    """The train benchmark's observability case, tiny: the same loop with observe.* on and off, one round, both
    tracked (so that the sampler runs); the table prints the ratio."""
    from orchestrator.benchmark import train as bench_train
    from orchestrator.benchmark.common import table
    from pipelines.digits import ensure_digits_dataset

    res = bench_train.observe_overhead(tmp_path, ensure_digits_dataset(str(tmp_path / "digits")), steps=6,
                                       rounds=1, log_every=2, warmup=0)
    for case in bench_train.OBSERVE_CASES:
        assert res["steps_per_s"][case]["n"] == 1 and _positive(res["steps_per_s"][case]["median"])
        assert _positive(res["steps_per_cpu_s"][case]["median"])
    assert _positive(res["on_vs_off_steps_per_s"]["median"])
    (head, rows), = bench_train.tables({"observe": res})
    assert rows[-1][0] == "on / off (same round)" and "steps per CPU-s" in table(head, rows)
