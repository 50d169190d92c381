"""The accelerator-feed check: Mixer training end to end from JPEG shards, for each placement of the recipe.

    python -m orchestrator.benchmark feed --device cuda --json feed_gpu.json     # one GPU: B/16 bf16, ~5 min
    python -m orchestrator.benchmark feed --quick                                # CPU: the same code, small

Needs only torch + torchvision (+ the pure-Python webdataset, braceexpand, fsspec, pyyaml on PYTHONPATH): no
Ray, no MLflow, no network. It writes synthetic photo-like JPEG shards (500x375) to local disk, then for
each placement (``host``, ``device_aug``, ``device_decode``; see orchestrator/benchmark/feed.py) trains the
model with the training loop's own step (orchestrator.train.step.train_step, bf16 autocast on CUDA) on batches
from the ShardLoader with ``--loader-workers`` DataLoader workers, and reports img/s, the fraction of wall
time the loop waited for the next batch, and MFU. Then the model-only step (random tensors already on the
device) with and without torch.compile, through orchestrator/benchmark/model.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import torch

from orchestrator.benchmark.feed import make_loader
from pipelines.cli import InputError, say

PLACEMENTS = ("host", "device_aug", "device_decode")


def _train(root: str, placement: str, *, model_name: str, batch: int, steps: int, warmup: int, device: str,
           workers: int, peak: float | None) -> dict[str, Any]:
    from model import create_model, train_flops_per_image
    from orchestrator.config.tree import OptimSection, ScheduleSection
    from orchestrator.train.optim import build_optimizer, build_scheduler
    from orchestrator.train.step import train_step

    dev = torch.device(device)
    model = create_model(model_name, num_classes=10).to(dev)
    opt = build_optimizer(model, OptimSection())
    sched = build_scheduler(opt, steps + warmup, ScheduleSection(warmup_steps=0))
    loader = make_loader(root, placement, batch=batch, input_size=model.cfg.img_size, device=device,
                         num_workers=workers)
    autocast = torch.bfloat16 if dev.type == "cuda" else None
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    it = batches()
    wait = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            wait, t0 = 0.0, time.perf_counter()
        w0 = time.perf_counter()
        x, y = next(it)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        wait += time.perf_counter() - w0
        train_step(model, [(x, y)], opt, sched, autocast_dtype=autocast)
    sync()
    wall = time.perf_counter() - t0
    img_s = steps * batch / wall
    out = {"img_per_s": img_s, "data_wait_fraction": wait / wall, "step_ms": wall / steps * 1e3}
    if peak:
        out["mfu"] = img_s * train_flops_per_image(model.cfg) / (peak * 1e12)
    return out


def run(*, device: str = "cpu", quick: bool = False, model_name: str | None = None, batch: int | None = None,
        steps: int | None = None, images: int | None = None, loader_workers: int | None = None,
        repeats: int = 3) -> dict[str, Any]:
    from orchestrator.benchmark import model as bench_model
    from orchestrator.benchmark.data import synthetic_jpegs
    from orchestrator.train.plan import peak_tflops
    from pipelines.write_shards import write_dataset

    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible to torch here; use --device cpu")
    model_name = model_name or ("mixer_b16_224" if cuda else "mixer_s32_224")
    batch = batch or (256 if cuda else 8)
    steps = steps or (30 if cuda else (3 if quick else 10))
    images = images or (4096 if cuda else (64 if quick else 256))
    workers = loader_workers if loader_workers is not None else (min(12, (os.cpu_count() or 2) - 2) if cuda else 1)
    peak = None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        peak = peak_tflops(torch.cuda.get_device_name()) or bench_model.DEFAULT_PEAK_TFLOPS
    tmp = tempfile.mkdtemp(prefix="mixer-feed-")
    try:
        src, root = os.path.join(tmp, "src"), os.path.join(tmp, "shards")
        t0 = time.perf_counter()
        synthetic_jpegs(src, images, 375, 500)
        write_dataset(src, root, fmt="jpg", val_fraction=0.0, maxcount=256, progress=False)
        say(f"[feed] wrote {images} JPEGs as shards in {time.perf_counter() - t0:.0f}s")
        placements = {}
        for p in PLACEMENTS:
            placements[p] = _train(root, p, model_name=model_name, batch=batch, steps=steps, warmup=2 if quick else 5,
                                   device=device, workers=workers, peak=peak)
            say(f"[feed] {p}: {placements[p]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model_only = bench_model.run(device, repeats, quick, batch, [model_name], "both" if cuda else "off", None)
    return {
        "setup": (f"{model_name}, batch {batch}, {steps} timed steps, {images} JPEGs 500x375, {workers} loader "
                  f"workers, {'bf16 autocast' if cuda else 'fp32'} on {device}"),
        "peak_tflops": peak,
        "placements": placements,
        "model_only": model_only,
    }


def tables(result: dict[str, Any]):
    from orchestrator.benchmark import model as bench_model

    rows = [[p, f"{r['img_per_s']:.1f}", f"{r['step_ms']:.1f}", f"{r['data_wait_fraction'] * 100:.1f}%",
             f"{r['mfu'] * 100:.1f}%" if "mfu" in r else "-"] for p, r in result["placements"].items()]
    return [(["placement", "img/s", "step ms", "waiting for data", "MFU"], rows), *bench_model.tables(result["model_only"])]
