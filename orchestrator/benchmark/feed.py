"""Feeding the accelerator: host CPU per training image for each placement of the paper's recipe.

The same shards (photo-like JPEGs, orchestrator/benchmark/data.py) go through the ShardLoader three ways, side
by side in interleaved rounds, one process, one torch thread, no loader workers (so CPU time is one core's):

- ``host``: ``augment_on=host``: decode (crop-aware) + RandomResizedCrop + flip + big_vision RandAugment(2, 15)
  + normalisation, all on the host;
- ``device_aug``: ``augment_on=device``: the host decodes, crops and flips and hands over uint8; RandAugment,
  normalisation (and mixup) run as a batch on the device;
- ``device_decode``: ``decode_on=device``: the host reads the JPEG header, draws the crop and ships the bytes; the
  device decodes (nvJPEG on CUDA) and does the rest;
- ``before``: the recipe as it ran before the device placement existed: full decode, then torchvision's
  per-image RandomResizedCrop, flip, RandAugment(2, 15), normalisation (``decode+aug in memory`` in the table
  above measures the same work without the loader).

Host CPU per image = this process's CPU time for the whole iteration minus the time spent inside the device
stage (which, with ``--device cpu``, runs on this same CPU and is not host work of the real setup). The device
stage's own rate (images/s on the device it runs on) is reported separately. "host cores per accelerator" is
6,500 img/s (Mixer-B/16 on one H100 at 50% MFU) divided by the host rate.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from orchestrator.benchmark.common import interleaved, ratios, summary

TARGET_IMG_PER_S = 6500.0  # B/16 on one H100 at 50% MFU (75.6 GFLOP per training image, 989 TFLOP/s bf16)
PLACEMENTS = ("before", "host", "device_aug", "device_decode")


def make_loader(root: str, placement: str, *, batch: int, input_size: int, device: str, num_workers: int = 0,
                magnitude: int = 15, mixup: float = 0.5, num_classes: int = 10, shuffle: int = 1000):
    """A training ShardLoader for one placement (the same construction the training loop makes)."""
    from pipelines.loader import ShardLoader
    from pipelines.transforms import make_transform, train_pipeline

    common = dict(batch_size=batch, num_workers=num_workers, shuffle_buffer=shuffle, mixup=mixup,
                  num_classes=num_classes, pin_memory=device.startswith("cuda"))
    if placement == "before":
        tf = make_transform(True, input_size=input_size, randaug_magnitude=magnitude, randaug_impl="torchvision")
        return ShardLoader(root, transform=tf, **common)
    p = train_pipeline(input_size=input_size, randaug_magnitude=magnitude,
                       decode_on="device" if placement == "device_decode" else "host")
    return ShardLoader(root, decoder=p.decoder, transform=p.transform, batch_stage=p.batch_stage,
                       augment_on="host" if placement == "host" else "device", device=device,
                       decode_crop_on_device=p.decode_crop_on_device, **common)


class _StageTimer:
    """Wraps a loader's device stage and the mixup after it: wall and CPU seconds spent there (synchronised on
    CUDA)."""

    def __init__(self, loader, device: str):
        self.wall = self.cpu = 0.0
        self.images = 0
        inner = loader._finish
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

        def timed(images, labels, meta, mix_gen):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            out = inner(images, labels, meta, mix_gen)
            sync()
            self.wall += time.perf_counter() - t0
            self.cpu += time.process_time() - c0
            self.images += out[0].shape[0]
            return out

        loader._finish = timed


def run(root: str, *, repeats: int, batch: int, input_size: int, device: str = "cpu") -> dict[str, Any]:
    loaders = {p: make_loader(root, p, batch=batch, input_size=input_size, device=device) for p in PLACEMENTS}
    timers = {p: _StageTimer(loaders[p], device) for p in PLACEMENTS if p.startswith("device")}
    host_rates: dict[str, list[float]] = {p: [] for p in PLACEMENTS}
    stage_rates: dict[str, list[float]] = {p: [] for p in timers}

    def case(p: str):
        def fn() -> float:
            t = timers.get(p)
            c0 = time.process_time()
            w0, s0, i0 = (t.wall, t.cpu, t.images) if t else (0.0, 0.0, 0)
            n = sum(int(b[0].shape[0]) for b in loaders[p])
            host_cpu = time.process_time() - c0 - ((t.cpu - s0) if t else 0.0)
            host_rates[p].append(n / max(host_cpu, 1e-9))
            if t:
                stage_rates[p].append((t.images - i0) / max(t.wall - w0, 1e-9))
            return n

        return fn

    interleaved({p: case(p) for p in PLACEMENTS}, repeats, warmup=1)
    # interleaved's warm-up round appended a sample too: drop the first of each
    host = {p: summary(r[1:]) for p, r in host_rates.items()}
    stage = {p: summary(r[1:]) for p, r in stage_rates.items()}
    out: dict[str, Any] = {
        "device": device,
        "host_img_per_cpu_s": host,
        "device_stage_img_per_s": stage,
        "host_cores_per_accelerator": {p: TARGET_IMG_PER_S / host[p]["median"] for p in PLACEMENTS},
        "ratios": {f"{p}/before": summary(ratios(host_rates[p][1:], host_rates["before"][1:]))
                   for p in PLACEMENTS if p != "before"},
        "target_img_per_s": TARGET_IMG_PER_S,
    }
    out["ratios"].update({f"{p}/host": summary(ratios(host_rates[p][1:], host_rates["host"][1:]))
                          for p in ("device_aug", "device_decode")})
    return out


def table(feed: dict[str, Any]):
    from orchestrator.benchmark.common import spread

    rows = []
    for p in PLACEMENTS:
        h = feed["host_img_per_cpu_s"][p]
        st = feed["device_stage_img_per_s"].get(p)
        vb = feed["ratios"].get(f"{p}/before")
        rows.append([p, spread(h), f"{1e3 / h['median']:.2f}", spread(vb) + "x" if vb else "",
                     f"{feed['host_cores_per_accelerator'][p]:.1f}", spread(st) if st else ""])
    return (["placement", "host img per CPU-s", "host CPU-ms/img", "vs before",
             f"host cores per accelerator at {feed['target_img_per_s']:.0f} img/s",
             f"device stage img/s ({feed['device']})"], rows)
