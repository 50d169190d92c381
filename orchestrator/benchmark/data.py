"""Input pipeline throughput, images/second per core: decode + train augmentation from shards.

One process, one torch thread, DataLoader workers 0, so each figure is what one core gives (a rank's loader
workers multiply it). The images are synthetic photo-like JPEGs (synthetic_jpegs below, 500x375,
ImageNet's typical size) written as WebDataset shards with pipelines.write_shards; the transform is the
paper's train recipe (pipelines.transforms.make_transform: RandomResizedCrop 224 bicubic, flip,
RandAugment(2, 15), [-1, 1]). Cases, interleaved in rounds over the same images:

- ``decode only``: torchvision.io decode of the in-memory JPEG bytes, nothing else (the decode ceiling);
- ``decode only (PIL)``: the same with PIL (pipelines.transforms.decode_image_pil), to show why the loader
  decodes with torchvision.io;
- ``decode+aug in memory``: decode + transform + batch over in-memory bytes (no I/O, no loader);
- ``ShardLoader local`` / ``ShardLoader s3``: this project's loader from shards on local disk / on a
  loopback S3 server (moto's ThreadedMotoServer on 127.0.0.1, through s3fs as a real bucket);
- ``feed`` table (orchestrator/benchmark/feed.py): host CPU per image for each placement of the recipe
  (``augment_on=host``, ``augment_on=device``, ``decode_on=device``) and the device stage's rate;
- ``cache`` table (S3 only): epoch 2 vs epoch 1 with the node-local shard cache on (``data.cache_dir``,
  pipelines/shard_cache.py), a fresh cache directory per round: the raw data path (shards read and split into
  samples, no decode: what the cache changes) in MB/s and samples/s, and the whole ShardLoader (with the
  train transform) in img/s; epoch 1 fetches every shard from S3 into the cache, epoch 2 reads local copies;
- ``wds recommended local`` / ``s3``: the pipeline the webdataset documentation recommends for the same
  work, ``wds.WebDataset(urls, shardshuffle=100).shuffle(1000).decode("torchrgb").to_tuple("jpg", "cls")
  .map_tuple(transform, identity).batched(batch)``; webdataset 1.0.2 has no s3:// handler, so for S3 an
  fsspec opener is registered in webdataset.gopen.gopen_schemes["s3"] (the documented extension point).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from typing import Any

import numpy as np
import torch
from PIL import Image

from cluster.loopback import create_bucket, moto_s3_server
from orchestrator.benchmark import feed as bench_feed
from orchestrator.benchmark.common import interleaved, ratios, spread, summary

SHUFFLE = 1000


def synthetic_jpegs(folder: str, n: int, h: int, w: int, classes: int = 10) -> None:
    """n JPEGs in folder/c<class>/: smooth gradients + texture + noise, so they decode like photos, not like
    white noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        c = i % classes
        os.makedirs(os.path.join(folder, f"c{c}"), exist_ok=True)
        f = rng.uniform(0.01, 0.06, 3)
        img = np.stack(
            [127 + 100 * np.sin(xx * f[k] + yy * f[(k + 1) % 3] + rng.uniform(0, 6)) for k in range(3)], axis=2
        )
        img += rng.normal(0, 8, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
            os.path.join(folder, f"c{c}", f"{i:06d}.jpg"), quality=90
        )


def _register_wds_s3(opts: dict[str, Any]) -> None:
    import fsspec
    import webdataset  # noqa: F401  (makes webdataset.gopen importable as a module)

    gopen = sys.modules["webdataset.gopen"]

    def open_s3(url, mode="rb", bufsize=8192, **kw):
        return fsspec.open(url, mode, **opts).open()

    gopen.gopen_schemes["s3"] = open_s3


def run(repeats: int = 5, quick: bool = False, images: int | None = None, s3: bool = True,
        batch_size: int = 32, input_size: int = 224, device: str = "cpu") -> dict[str, Any]:
    import webdataset as wds

    from pipelines.loader import ShardLoader
    from pipelines.shard_reader import iter_piece
    from pipelines.transforms import decode_image, decode_image_pil, make_transform
    from pipelines.write_shards import write_dataset

    images = images or (64 if quick else 256)
    batch_size = min(batch_size, images)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="mixer-bench-data-")
    notes: list[str] = []
    try:
        src, root = os.path.join(tmp, "src"), os.path.join(tmp, "shards")
        synthetic_jpegs(src, images, 375, 500)
        manifest = write_dataset(src, root, fmt="jpg", val_fraction=0.0, maxcount=64, progress=False)
        shards = manifest.shards("train")
        local_urls = [s.url for s in shards]
        raw = [r.image for s in shards for r in iter_piece(s.url, 0, s.num_samples, {}, lambda *a: None)]
        # the per-image recipe as it ran before the device placement (torchvision's RandAugment, which also takes
        # the float images webdataset's "torchrgb" decoder gives): these cases keep their meaning across
        # BENCHMARKS.md's history; the feed table below measures the placements
        tf = make_transform(True, input_size=input_size, randaug_magnitude=15, randaug_impl="torchvision")
        bs = batch_size

        def decode_only(decode=decode_image):
            def fn() -> float:
                for b in raw:
                    decode(b)
                return len(raw)

            return fn

        def in_memory() -> float:
            n = 0
            for i in range(0, len(raw) - bs + 1, bs):
                torch.stack([tf(decode_image(b)) for b in raw[i: i + bs]])
                n += bs
            return n

        def shard_loader(url: str, opts: dict | None = None):
            loader = ShardLoader(url, batch_size=bs, num_workers=0, transform=tf, storage_options=opts,
                                 shuffle_buffer=SHUFFLE)
            return lambda: float(sum(x.shape[0] for x, _ in loader))

        def wds_pipeline(urls: list[str]):
            ds = (
                wds.WebDataset(urls, shardshuffle=100, empty_check=False)
                .shuffle(SHUFFLE)
                .decode("torchrgb")
                .to_tuple("jpg", "cls")
                .map_tuple(tf, lambda c: c)
                .batched(bs, partial=False)
            )
            return lambda: float(sum(x.shape[0] for x, _ in ds))

        cases = {
            "decode only": decode_only(),
            "decode only (PIL)": decode_only(decode_image_pil),
            "decode+aug in memory": in_memory,
            "ShardLoader local": shard_loader(root),
            "wds recommended local": wds_pipeline(local_urls),
        }
        cache = None
        with contextlib.ExitStack() as stack:
            if s3:
                try:
                    endpoint = stack.enter_context(moto_s3_server())
                    opts = {"endpoint_url": endpoint}
                    create_bucket(endpoint, "bench")
                    import fsspec

                    fsspec.filesystem("s3", **opts).put(root, "bench/shards", recursive=True)
                    s3_root = "s3://bench/shards"
                    _register_wds_s3(opts)
                    cases["ShardLoader s3"] = shard_loader(s3_root, opts)
                    cases["wds recommended s3"] = wds_pipeline(
                        [s3_root + "/" + os.path.relpath(u, root) for u in local_urls]
                    )
                except ImportError as e:
                    notes.append(f"S3 cases skipped: {e}")
            rates = interleaved(cases, repeats, warmup=1)
            cache = cache_epochs(s3_root, opts, shards, tf, bs, repeats, tmp) if "ShardLoader s3" in cases else None
        feed = bench_feed.run(root, repeats=repeats, batch=bs, input_size=input_size, device=device)
    finally:
        torch.set_num_threads(saved_threads)
        shutil.rmtree(tmp, ignore_errors=True)

    mean_kib = sum(map(len, raw)) / len(raw) / 1024
    result: dict[str, Any] = {
        "setup": (f"{len(raw)} JPEGs 500x375 (mean {mean_kib:.0f} KiB), train transform at {input_size} "
                  f"(RandomResizedCrop, flip, RandAugment(2, 15)), batch {bs}, 1 process, 1 torch thread"),
        "images": len(raw),
        "batch": bs,
        "cases": {name: {"img_per_s_per_core": summary(r)} for name, r in rates.items()},
        "ratios": {},
        "notes": notes,
        "feed": feed,
    }
    if cache is not None:
        result["cache"] = cache
    for name in rates:
        if name != "decode only":
            result["ratios"][f"{name}/decode only"] = summary(ratios(rates[name], rates["decode only"]))
    for where in ("local", "s3"):
        if f"ShardLoader {where}" in rates:
            result["ratios"][f"ShardLoader {where}/wds recommended {where}"] = summary(
                ratios(rates[f"ShardLoader {where}"], rates[f"wds recommended {where}"])
            )
            result["ratios"][f"ShardLoader {where}/decode+aug in memory"] = summary(
                ratios(rates[f"ShardLoader {where}"], rates["decode+aug in memory"])
            )
    return result


def cache_epochs(s3_root: str, opts: dict, shards, tf, bs: int, repeats: int, tmp: str) -> dict[str, Any]:
    """Epoch 1 (cold cache: every shard fetched from S3) vs epoch 2 (warm: local copies), a fresh cache per round.

    ``data path``: every shard read through a ShardSource and split into raw samples (no decode);
    ``ShardLoader``: the loader with the train transform, epochs 0 and 1 of one loader."""
    import time

    from pipelines.loader import ShardLoader
    from pipelines.shard_cache import CacheConfig, ShardSource
    from pipelines.shard_reader import iter_piece

    urls = [s3_root + "/" + s.url.split("/shards/", 1)[1] for s in shards]
    total = sum(s.size for s in shards)
    samples = sum(s.num_samples for s in shards)
    runs: dict[str, list[float]] = {k: [] for k in ("raw1", "raw2", "img1", "img2")}
    counted: list[tuple[int, int]] = []
    for r in range(repeats + 1):  # the first round warms the S3 client and the imports, untimed
        cache = CacheConfig(os.path.join(tmp, f"cache-raw-{r}"), 2**30)
        src = ShardSource(opts, cache)
        for epoch in (1, 2):
            t0 = time.perf_counter()
            for u, s in zip(urls, shards, strict=True):
                for _ in iter_piece(u, 0, s.num_samples, opts, lambda *a: None,
                                    open_shard=lambda _u, u=u, s=s, src=src: src.open(u, size=s.size, sha256=s.sha256)):
                    pass
            if r:
                runs[f"raw{epoch}"].append(total / (time.perf_counter() - t0))
            if r and epoch == 2:
                counted.append(src.take_counts())
            src.take_counts()
        loader = ShardLoader(s3_root, batch_size=bs, num_workers=0, transform=tf, storage_options=opts,
                             shuffle_buffer=SHUFFLE, cache_dir=os.path.join(tmp, f"cache-loader-{r}"), cache_max_gb=1)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            t0 = time.perf_counter()
            n = sum(x.shape[0] for x, _ in loader)
            if r:
                runs[f"img{epoch + 1}"].append(n / (time.perf_counter() - t0))
    mb = {k: [v / 1e6 for v in runs[k]] for k in ("raw1", "raw2")}
    return {
        "shards": len(shards), "bytes": total, "samples": samples,
        "data_path_mb_per_s": {"epoch1": summary(mb["raw1"]), "epoch2": summary(mb["raw2"]),
                               "epoch2/epoch1": summary(ratios(runs["raw2"], runs["raw1"]))},
        "data_path_samples_per_s": {"epoch1": summary([v * samples / total for v in runs["raw1"]]),
                                    "epoch2": summary([v * samples / total for v in runs["raw2"]])},
        "loader_img_per_s": {"epoch1": summary(runs["img1"]), "epoch2": summary(runs["img2"]),
                             "epoch2/epoch1": summary(ratios(runs["img2"], runs["img1"]))},
        "epoch2_bytes_from_storage_cache": counted[-1] if counted else None,
    }


def tables(result: dict[str, Any]):
    rows = []
    for name, c in result["cases"].items():
        vs_decode = result["ratios"].get(f"{name}/decode only")
        where = name.rsplit(" ", 1)[-1]
        vs_wds = result["ratios"].get(f"{name}/wds recommended {where}")
        rows.append([name, spread(c["img_per_s_per_core"]), spread(vs_decode) + "x" if vs_decode else "",
                     spread(vs_wds) + "x" if vs_wds else ""])
    out = [(["case", "img/s/core median [min-max]", "vs decode only", "vs wds recommended"], rows),
           bench_feed.table(result["feed"])]
    c = result.get("cache")
    if c:
        dp, sp, ld = c["data_path_mb_per_s"], c["data_path_samples_per_s"], c["loader_img_per_s"]
        out.append((["shard cache on loopback S3", "epoch 1 (cold)", "epoch 2 (cached)", "epoch 2 / epoch 1"], [
            ["data path MB/s (read + split, no decode)", spread(dp["epoch1"]), spread(dp["epoch2"]),
             spread(dp["epoch2/epoch1"]) + "x"],
            ["data path samples/s", spread(sp["epoch1"]), spread(sp["epoch2"]), ""],
            ["ShardLoader img/s (train transform)", spread(ld["epoch1"]), spread(ld["epoch2"]),
             spread(ld["epoch2/epoch1"]) + "x"],
        ]))
    return out
