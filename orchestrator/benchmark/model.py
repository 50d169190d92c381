"""Training-step throughput of this project's Mixer against timm's MlpMixer (same config, weights, dtype, batch).

The step timed is orchestrator.train.step.train_step, the one the training loop runs: forward, softmax
cross-entropy, backward, clip at global norm 1, AdamW (orchestrator.train.optim, decay on kernels only), schedule.
timm's model is put through exactly the same step. Before timing, timm's model gets our state_dict
(strict=True) and both models' logits on the same images are compared in fp32 (the head is given random
weights first: the official zero head would make every logit equal and the check empty).

CPU: fp32, eager. CUDA: bf16 autocast, eager and torch.compile, MFU against the GPU's dense bf16 peak
(989 TFLOP/s for H100 SXM / H200; orchestrator.train.plan.PEAK_BF16_TFLOPS).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model import count_params, create_model, train_flops_per_image
from orchestrator.benchmark.common import interleaved, ratios, summary
from orchestrator.config.tree import OptimSection
from orchestrator.train.optim import build_optimizer
from orchestrator.train.plan import peak_tflops
from orchestrator.train.step import train_step
from pipelines.cli import InputError, say

DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM / H200 dense bf16, when the GPU's name is not in PEAK_BF16_TFLOPS
TIMM_MISSING = (
    "timm is not importable beside this torch: the comparison with timm is skipped. Install the dev extra "
    "(pip install -e '.[dev]', which pins timm==1.0.31), or without touching the venv: "
    "pip install --target /tmp/timm_site --no-deps timm==1.0.31 huggingface_hub safetensors and run with "
    "PYTHONPATH=/tmp/timm_site"
)


@dataclass
class ModelCase:
    name: str
    batch: int


def cases_for(device: str, quick: bool, batch: int | None, names: list[str] | None) -> list[ModelCase]:
    if device == "cuda":
        default = [ModelCase("mixer_s16_224", 256), ModelCase("mixer_b16_224", 256)]
        if quick:
            default = [ModelCase("mixer_b16_224", 128)]
    else:  # 2 CPU cores: a B/16 step at 224 takes seconds even at batch 4
        default = [ModelCase("mixer_digits", 128), ModelCase("mixer_s16_224", 8), ModelCase("mixer_b16_224", 4)]
        if quick:
            default = [ModelCase("mixer_digits", 64), ModelCase("mixer_s16_224", 2)]
    if names:
        by_name = {c.name: c.batch for c in default}
        default = [ModelCase(n, by_name.get(n, 8 if device == "cpu" else 256)) for n in names]
    if batch:
        default = [ModelCase(c.name, batch) for c in default]
    return default


def import_timm_mixer():
    """timm's MlpMixer class and timm's version, or (None, reason)."""
    try:
        import timm
        from timm.models.mlp_mixer import MlpMixer as TimmMixer
    except Exception as e:  # ImportError, or timm failing against this torch/torchvision
        return None, f"{TIMM_MISSING} ({type(e).__name__}: {e})"
    return TimmMixer, timm.__version__


def timm_twin(ours: nn.Module, timm_cls) -> nn.Module:
    """timm's MlpMixer with our config and our weights (load_state_dict strict=True)."""
    cfg = ours.cfg
    if cfg.gelu != "exact":
        raise ValueError("timm's MlpMixer uses exact GELU; benchmark with gelu='exact'")
    c = cfg.hidden_dim
    twin = timm_cls(
        num_classes=cfg.num_classes, img_size=cfg.img_size, in_chans=cfg.in_chans, patch_size=cfg.patch_size,
        num_blocks=cfg.depth, embed_dim=c, mlp_ratio=(cfg.tokens_mlp_dim / c, cfg.channels_mlp_dim / c),
    )
    twin.load_state_dict(ours.state_dict(), strict=True)
    return twin


def compare_logits(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """fp32 logits of both models on the same images (TF32 off for the check), max abs and relative difference."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ours.eval()
        theirs.eval()
        with torch.no_grad():
            a, b = ours(x).float(), theirs(x).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    diff = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1e-12)
    return {
        "max_abs_diff": diff,
        "max_rel_diff": diff / scale,
        "logit_scale": scale,
        "agree": bool(math.isfinite(diff) and diff <= 1e-4 * max(scale, 1.0)),
    }


def _constant_schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


class _Runner:
    """One implementation (model + AdamW + constant schedule) and its step on a fixed batch."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast, compiled: bool):
        self.model = model
        self.optimizer = build_optimizer(model, OptimSection())
        self.scheduler = _constant_schedule(self.optimizer)
        self.step_model = torch.compile(model) if compiled else model
        self.batch = [(x, y)]
        self.autocast = autocast
        self.compiled = compiled
        self.steps_per_sample = 1

    def step(self) -> torch.Tensor:
        return train_step(
            self.step_model, self.batch, self.optimizer, self.scheduler,
            loss_kind="softmax", clip_norm=1.0, autocast_dtype=self.autocast,
        ).loss

    def sample(self) -> float:
        """Run steps_per_sample steps; returns the images processed."""
        for _ in range(self.steps_per_sample):
            self.step()
        return float(self.steps_per_sample * self.batch[0][0].shape[0])


def bench_case(
    case: ModelCase, device: torch.device, repeats: int, timm_cls, compile_modes: list[bool],
    min_sample_s: float, peak: float | None, quick: bool = False,
) -> dict[str, Any]:
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ours = create_model(case.name, init="official")
    with torch.no_grad():  # random head: the official zero head would make the logit check empty
        nn.init.normal_(ours.head.weight, std=ours.cfg.hidden_dim**-0.5)
    cfg = ours.cfg
    flops = train_flops_per_image(cfg)
    x = torch.randn(case.batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    y = torch.randint(0, cfg.num_classes, (case.batch,))
    theirs = timm_twin(ours, timm_cls) if timm_cls is not None else None
    out: dict[str, Any] = {
        "model": case.name,
        "batch": case.batch,
        "params": count_params(cfg),
        "train_gflops_per_image": flops / 1e9,
    }
    ours.to(device)
    x, y = x.to(device), y.to(device)
    if theirs is not None:
        theirs.to(device)
        out["logits"] = compare_logits(ours, theirs, x[: min(4, case.batch)])
        if not out["logits"]["agree"]:
            raise AssertionError(f"{case.name}: our logits and timm's differ: {out['logits']}")
    autocast = torch.bfloat16 if device.type == "cuda" else None
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    runners: dict[str, _Runner] = {}
    for compiled in compile_modes:
        suffix = "+compile" if compiled else ""
        runners["ours" + suffix] = _Runner(ours, x, y, autocast, compiled)
        if theirs is not None:
            runners["timm" + suffix] = _Runner(theirs, x, y, autocast, compiled)
    # When eager and compiled share a model, they share its optimizer too (one set of Adam moments).
    for name, r in runners.items():
        if name.endswith("+compile") and name.split("+")[0] in runners:
            base = runners[name.split("+")[0]]
            r.optimizer, r.scheduler = base.optimizer, base.scheduler

    # First step of each implementation (also the first warm-up): same weights and batch -> same loss.
    first_loss, first_s = {}, {}
    for name, r in runners.items():
        t0 = time.perf_counter()
        first_loss[name] = r.step().item()
        first_s[name] = time.perf_counter() - t0
    out["first_step_loss"] = first_loss
    # Warm-up (compilation, allocator, autotuning) and calibration: a timed sample lasts >= min_sample_s.
    for name, r in runners.items():
        step_s = first_s[name]
        if not quick or r.compiled:
            for _ in range(3 if r.compiled else 1):
                r.step()
            if sync:
                sync()
            t0 = time.perf_counter()
            r.step()
            if sync:
                sync()
            step_s = time.perf_counter() - t0
        r.steps_per_sample = max(1, math.ceil(min_sample_s / max(step_s, 1e-6)))
    steps = max(r.steps_per_sample for r in runners.values())
    for r in runners.values():  # the same work per sample for every implementation
        r.steps_per_sample = steps
    cpu_rates: dict[str, list[float]] = {}
    rates = interleaved({n: r.sample for n, r in runners.items()}, repeats, warmup=0, sync=sync,
                        cpu_rates=cpu_rates if device.type == "cpu" else None)

    impls: dict[str, Any] = {}
    for name, samples in rates.items():
        s = summary(samples)
        entry = {
            "img_per_s": s,
            "step_ms": 1000 * case.batch / s["median"],
            "achieved_tflops": s["median"] * flops / 1e12,
        }
        if peak:
            entry["mfu"] = s["median"] * flops / (peak * 1e12)
        if name in cpu_rates:
            entry["img_per_cpu_s"] = summary(cpu_rates[name])
        impls[name] = entry
    out["impls"] = impls
    out["steps_per_sample"] = steps
    out["ratios"] = {}
    for compiled in compile_modes:
        suffix = "+compile" if compiled else ""
        if "timm" + suffix in rates:
            out["ratios"][f"ours{suffix}/timm{suffix}"] = summary(ratios(rates["ours" + suffix], rates["timm" + suffix]))
        if "timm" + suffix in cpu_rates:
            out["ratios"][f"cpu time: ours{suffix}/timm{suffix}"] = summary(
                ratios(cpu_rates["ours" + suffix], cpu_rates["timm" + suffix])
            )
        if compiled and "ours" in rates:
            out["ratios"]["ours+compile/ours"] = summary(ratios(rates["ours+compile"], rates["ours"]))
    if device.type == "cuda":
        out["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del runners, ours, theirs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def run(
    device: str = "cpu", repeats: int = 5, quick: bool = False, batch: int | None = None,
    models: list[str] | None = None, compile: str = "auto", threads: int | None = None,
) -> dict[str, Any]:
    dev = torch.device(device)
    if threads is None:
        threads = 1 if dev.type == "cpu" else 0
    if threads:
        torch.set_num_threads(threads)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible to torch here; use --device cpu")
    timm_cls, timm_info = import_timm_mixer()
    if compile == "auto":
        compile_modes = [False, True] if dev.type == "cuda" else [False]
    else:
        compile_modes = [compile == "on"] if compile in ("on", "off") else [False, True]
    peak, peak_note = None, None
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        peak = peak_tflops(name)
        if peak is None:
            peak, peak_note = DEFAULT_PEAK_TFLOPS, f"{name} is not in PEAK_BF16_TFLOPS; MFU assumes 989 TFLOP/s"
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    result: dict[str, Any] = {
        "device": dev.type,
        "dtype": "bf16 autocast" if dev.type == "cuda" else "fp32",
        "step": "orchestrator.train.step.train_step: fwd + softmax CE + bwd + clip 1.0 + AdamW(wd 0.1 kernels) + schedule",
        "timm": timm_info if timm_cls is not None else None,
        "timm_skipped": None if timm_cls is not None else timm_info,
        "peak_tflops": peak,
        "peak_note": peak_note,
        "compile_modes": compile_modes,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "cases": [],
    }
    if timm_cls is None:
        say(f"[model] {timm_info}")
    min_sample_s = (0.2 if quick else 0.5) if dev.type == "cpu" else 0.3
    for case in cases_for(dev.type, quick, batch, models):
        say(f"[model] {case.name} batch {case.batch} on {dev.type} ({result['dtype']}) ...")
        result["cases"].append(bench_case(case, dev, repeats, timm_cls, compile_modes, min_sample_s, peak, quick))
    return result


def tables(result: dict[str, Any]) -> list[tuple[list[str], list[list[Any]]]]:
    from orchestrator.benchmark.common import spread

    headers = ["model", "batch", "impl", "img/s median [min-max]", "step ms", "TFLOP/s", "MFU", "vs timm (same round)",
               "img per CPU-s", "vs timm (CPU time)"]
    out = []
    for c in result["cases"]:
        for name, e in c["impls"].items():
            base = name.replace("ours", "timm")
            key = f"{name}/{base}"
            rel = spread(c["ratios"][key]) + "x" if name.startswith("ours") and key in c["ratios"] else ""
            mfu = f"{e['mfu'] * 100:.1f}%" if "mfu" in e else "-"
            cpu = spread(e["img_per_cpu_s"]) if "img_per_cpu_s" in e else "-"
            cpu_key = f"cpu time: {key}"
            cpu_rel = spread(c["ratios"][cpu_key]) + "x" if name.startswith("ours") and cpu_key in c["ratios"] else ""
            out.append([c["model"], str(c["batch"]), name, spread(e["img_per_s"]), e["step_ms"],
                        e["achieved_tflops"], mfu, rel, cpu, cpu_rel])
    return [(headers, out)]
