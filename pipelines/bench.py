"""Throughput of the input pipeline, in images/second per core (one process, one torch thread).

    python -m pipelines.bench                 # local shards and a loopback S3 server (moto)
    python -m pipelines.bench --no-s3 --images 256

Cases, measured interleaved (``--repeats`` rounds, median reported), over the same JPEGs:
- ``decode tv`` / ``decode pil``: decode-only loops over in-memory bytes (torchvision.io vs PIL);
- ``plain decode+aug``: decode + the paper's train transform (RandomResizedCrop 224, flip,
  RandAugment(2, 15), [-1, 1]) over in-memory bytes, batched with torch.stack: the floor for the pipeline;
- ``loader local`` / ``loader s3``: ShardLoader (num_workers=0: planning, tar streaming, shuffle buffer,
  structural checks, decode, augmentation, batching) from local shards / from s3:// via s3fs.
The overhead column is relative to ``plain decode+aug``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from .loader import ShardLoader, iter_piece
from .manifest import load_manifest
from .transforms import decode_image, decode_image_pil, make_transform
from .write_shards import write_dataset


def _synthetic_jpegs(folder: str, n: int, h: int, w: int, classes: int = 10) -> None:
    """Smooth gradients + texture + noise: decodes like a photo, not like white noise."""
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-s3", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    tmp = tempfile.mkdtemp(prefix="pipelines-bench-")
    src, root = os.path.join(tmp, "src"), os.path.join(tmp, "shards")
    _synthetic_jpegs(src, a.images, a.height, a.width)
    m = write_dataset(src, root, fmt="jpg", val_fraction=0.0, maxcount=128, progress=False)
    raw = [r.image for s in m.shards("train") for r in iter_piece(s.url, 0, s.num_samples, {}, lambda *x: None)]
    mean_kb = sum(map(len, raw)) / len(raw) / 1024
    print(f"{len(raw)} JPEGs {a.width}x{a.height} (mean {mean_kb:.0f} KiB), train transform at {a.input_size}, "
          f"RandAugment(2, 15), batch {a.batch_size}, 1 process, torch threads 1")
    tf = make_transform(True, input_size=a.input_size, randaug_magnitude=15)
    bs = a.batch_size

    def decode_tv():
        for b in raw:
            decode_image(b)
        return len(raw)

    def decode_pil():
        for b in raw:
            decode_image_pil(b)
        return len(raw)

    def plain():
        n = 0
        for i in range(0, len(raw) - bs + 1, bs):
            torch.stack([tf(decode_image(b)) for b in raw[i : i + bs]])
            n += bs
        return n

    def loader(url, opts=None):
        ld = ShardLoader(url, batch_size=bs, num_workers=0, transform=tf, storage_options=opts)
        return lambda: sum(x.shape[0] for x, _ in ld)

    cases = {"decode tv": decode_tv, "decode pil": decode_pil, "plain decode+aug": plain,
             "loader local": loader(root)}
    server = None
    if not a.no_s3:
        import logging

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)

        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        opts = {"endpoint_url": endpoint}
        import fsspec

        fs = fsspec.filesystem("s3", endpoint_url=endpoint)
        fs.put(root, "bench/shards", recursive=True)
        load_manifest("s3://bench/shards", opts)
        cases["loader s3"] = loader("s3://bench/shards", opts)

    rates: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(a.repeats):
        for name, fn in cases.items():
            t = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t))
    base = statistics.median(rates["plain decode+aug"])
    print(f"{'case':<18} {'img/s/core':>11}  {'vs plain decode+aug':>20}   (median of {a.repeats})")
    for name, r in rates.items():
        med = statistics.median(r)
        rel = f"{(med / base - 1) * 100:+.1f}%" if "decode+aug" in name or "loader" in name else ""
        print(f"{name:<18} {med:>11.1f}  {rel:>20}")
    if server is not None:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
