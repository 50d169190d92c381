"""How fast, against what: model step vs timm, input pipeline vs decode-only and webdataset, Ray overhead.

    python -m orchestrator.benchmark model --quick --json bench.json        # CPU, ~30 s: digits + S/16 vs timm
    python -m orchestrator.benchmark model                                   # CPU: digits, S/16, B/16 vs timm
    python -m orchestrator.benchmark model --device cuda --json gpu.json     # bf16, eager + torch.compile, MFU
    python -m orchestrator.benchmark data                                    # img/s/core: decode, local, S3 (moto), wds
    python -m orchestrator.benchmark feed --device cuda --json feed.json     # B/16 end to end per placement
    python -m orchestrator.benchmark train                                   # Ray Train vs plain loop, checkpoints
    python -m orchestrator.benchmark train --no-submit                       # ... without the job-submit timing
    python -m orchestrator.benchmark train --observe-only                    # observe.* on vs off, same loop
    python -m orchestrator.benchmark all --json all.json

Every comparison is measured side by side in one run: the cases are interleaved in rounds (``--repeats``),
each figure is the median over rounds with its spread [min-max], and ratios are taken within a round. The
figures and the machine they came from are printed as tables and written with ``--json``. BENCHMARKS.md holds
the latest figures. Parts:
- model (orchestrator/benchmark/model.py): training-step img/s of this Mixer vs timm's MlpMixer, same weights;
- data  (orchestrator/benchmark/data.py): decode (torchvision vs PIL) + train augmentation img/s per core,
  local and S3 shards, against webdataset's recommended pipeline;
- train (orchestrator/benchmark/train.py): steps/s under Ray Train vs without Ray, `ray job submit` to first
  step, checkpoint save/restore and the step around a checkpoint, observe.* (metrics, breakdown) on vs off.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from typing import Any

from orchestrator.benchmark.common import machine_info, table
from pipelines.cli import entry_point

PARTS = ("model", "data", "train", "feed")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.benchmark",
        description="Benchmarks: model step vs timm, data pipeline, Ray orchestration overhead.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    p.add_argument("part", choices=(*PARTS, "all"))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="model part, and the data part's device stage (default cpu)")
    p.add_argument("--json", metavar="FILE", help="write every figure (with samples) to FILE")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds per comparison (default 5, quick 3)")
    p.add_argument("--quick", action="store_true", help="small sizes and few rounds (smoke / CI)")
    g = p.add_argument_group("model")
    g.add_argument("--models", nargs="+", metavar="NAME", help="model names (default per device, see docs)")
    g.add_argument("--batch", type=int, default=None, help="batch size for every model (default per model)")
    g.add_argument("--compile", choices=("auto", "on", "off", "both"), default="auto",
                   help="torch.compile: auto = eager and compiled on cuda, eager on cpu")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads for the model part (default 1 on cpu: per-core figures; 0 = torch's default)")
    g = p.add_argument_group("data")
    g.add_argument("--images", type=int, default=None, help="synthetic JPEGs (default 256, quick 64)")
    g.add_argument("--no-s3", action="store_true", help="skip the loopback S3 (moto) cases")
    g = p.add_argument_group("feed")
    g.add_argument("--loader-workers", type=int, default=None, help="DataLoader workers (default: CPUs - 2, max 12; CPU: 1)")
    g = p.add_argument_group("train")
    g.add_argument("--no-submit", action="store_true", help="skip `ray job submit` -> first step on a local cluster")
    g.add_argument("--observe-only", action="store_true",
                   help="train: only the observability overhead (observe.* on vs off, the same loop)")
    g.add_argument("--steps", type=int, default=None, help="train: steps per Ray / no-Ray run (default 60, quick 30); feed: timed steps per placement")
    a = p.parse_args(argv)
    if a.repeats is not None and a.repeats < 1:
        p.error(f"--repeats={a.repeats}: expected an integer >= 1")
    return a


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    repeats = args.repeats or (3 if args.quick else 5)
    parts = ("model", "data", "train") if args.part == "all" else (args.part,)
    out: dict[str, Any] = {
        "command": "python -m orchestrator.benchmark " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(args.device),
    }
    t0 = time.perf_counter()
    print(f"machine: {out['machine']['cpu_count']} CPUs ({out['machine']['cpu_model']}), "
          f"load average {out['machine']['load_avg_1_5_15']}, torch {out['machine']['torch']}"
          + (f", GPU {out['machine'].get('gpu')}" if args.device == "cuda" else ""), flush=True)
    tables: list[str] = []
    for part in parts:
        if part == "model":
            from orchestrator.benchmark import model as bench_model

            res = bench_model.run(args.device, repeats, args.quick, args.batch, args.models, args.compile, args.threads)
            title = (f"model: training step ({res['dtype']}, {args.device}, torch threads {res['torch_threads']}), "
                     f"{repeats} interleaved rounds")
            if res["timm_skipped"]:
                title += "\n  " + res["timm_skipped"]
        elif part == "data":
            from orchestrator.benchmark import data as bench_data

            res = bench_data.run(repeats, args.quick, args.images, s3=not args.no_s3, device=args.device)
            title = f"data: {res['setup']}, {repeats} interleaved rounds"
        elif part == "feed":
            from orchestrator.benchmark import gpu_check as bench_feed

            res = bench_feed.run(device=args.device, quick=args.quick, batch=args.batch, images=args.images,
                                 model_name=(args.models or [None])[0], steps=args.steps,
                                 loader_workers=args.loader_workers, repeats=repeats)
            title = f"feed: training end to end per placement, {res['setup']}"
        else:
            from orchestrator.benchmark import train as bench_train

            res = bench_train.run(repeats, args.quick, submit=not args.no_submit, steps=args.steps,
                                  observe_only=args.observe_only)
            title = f"train: orchestration overhead, {res['setup']}"
        module = sys.modules[f"orchestrator.benchmark.{'gpu_check' if part == 'feed' else part}"]
        out[part] = res
        text = f"\n== {title}\n" + "\n\n".join(table(h, r) for h, r in module.tables(res))
        for note in res.get("notes", []):
            text += f"\n  note: {note}"
        print(text, flush=True)
        tables.append(text)
    out["machine"]["load_avg_1_5_15_after"] = list(os.getloadavg())
    out["elapsed_s"] = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_finite(out), f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
