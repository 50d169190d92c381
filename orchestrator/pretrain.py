"""Pretrain an MLP-Mixer with Ray Train, tracked in MLflow.

    python -m orchestrator.pretrain                          # embedded default: digits on 2 local workers
    python -m orchestrator.pretrain --config imagenet1k_b16 data.url=s3://bucket/in1k scaling.num_workers=32
    python -m orchestrator.pretrain --dry-run optim.lr=3e-3  # print resolved config and plan, start nothing
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m orchestrator.pretrain ...

Re-running with the same run.name (and run.storage_path) resumes from that run's latest checkpoint and keeps
logging into the same MLflow run. This module is the command line; what it runs is orchestrator/train/driver.py
(shared with orchestrator/finetune.py). The training step is in orchestrator/train/step.py, the per-worker
loop in orchestrator/train/loop.py, the Ray Train set-up in orchestrator/train/launch.py.
"""

from __future__ import annotations

import argparse
import sys

from orchestrator.config.load import load_config
from orchestrator.config.parse import list_presets
from orchestrator.train.driver import dry_run, pretrain
from pipelines.cli import entry_point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.pretrain",
        description="Pretrain an MLP-Mixer on Ray Train. Overrides are section.key=value.",
        epilog=f"presets: {', '.join(list_presets())}",
    )
    parser.add_argument("--config", default=None, help="preset name or YAML file (default: digits)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and plan, then exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=3e-3")
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    from orchestrator.train.startup import driver_marks, keep_progress_lines_whole

    keep_progress_lines_whole()  # before anything imports Ray (driver_marks may)
    marks = driver_marks()  # start-up phases (orchestrator/train/startup.py)
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        dry_run(cfg)
        return 0
    pretrain(cfg, marks=marks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
