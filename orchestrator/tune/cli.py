"""Search D_S, D_C and regularisation with Ray Tune; every trial is a distributed Ray Train run.

    python -m orchestrator.tune                                   # embedded default: digits space, ASHA, local Ray
    python -m orchestrator.tune --space paper_appendix_b data.url=s3://bucket/in1k scaling.num_workers=8 \
        scaling.use_gpu=true                                      # the paper's App. B grid + D_S/D_C choices
    python -m orchestrator.tune --search optuna --num-samples 32  # TPE instead of random/grid sampling
    python -m orchestrator.tune --resume                          # continue the latest search of this space
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m orchestrator.tune ...

A trial builds its config (base config + space overrides + sampled values, D_S/D_C ratios resolved against C),
opens a nested MLflow run under the search's parent run, and fits a TorchTrainer whose reports reach Tune
through TuneReportCallback; ASHA stops weak trials on minival/top1 (val/top1 without a minival). The trial's Train run is named after the
search and the trial id, so a retried or resumed trial continues from its own checkpoints. At the end the
best trial's config is written as a file that `python -m orchestrator.pretrain --config FILE` accepts.
Search spaces: orchestrator/config/search_space.py (format) and orchestrator/config/spaces/*.yaml (presets).
The parts: search.py (the search), trial.py (one trial), store.py, planning.py, results.py, mlflow_runs.py.
"""

from __future__ import annotations

import argparse
import sys

from orchestrator.config.parse import list_presets
from orchestrator.config.search_space import list_spaces
from orchestrator.config.tree import ConfigError
from orchestrator.tune.search import run_search
from pipelines.cli import entry_point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.tune",
        description="Search MLP-Mixer widths and regularisation with Ray Tune (each trial a Ray Train run).",
        epilog=f"config presets: {', '.join(list_presets())}; space presets: {', '.join(list_spaces())}",
    )
    p.add_argument("--config", default=None, help="base config: preset or YAML file (default: the space's, else digits)")
    p.add_argument("--space", default=None, help="search space: preset or YAML file (default: digits)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="samples of the space (random: each repeats the grid; optuna: trials); default: the space's, else 1")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: what the cluster fits: CPUs // (num_workers x cpus_per_worker))")
    p.add_argument("--search", choices=("random", "grid", "optuna"), default="random",
                   help="random: grids crossed, choices/ranges sampled; grid: every choice crossed too; optuna: TPE")
    p.add_argument("--scheduler", choices=("asha", "none"), default="asha", help="early stopping on minival/top1 (val/top1 without a minival)")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: evaluations before a trial can be stopped")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep the best 1/N at each rung")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a failed trial (it resumes from its own checkpoints); -1 = forever")
    p.add_argument("--name", default=None,
                   help="search name (Tune experiment and MLflow parent run); default tune-<space>[-N]")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted search (--name, else the latest of this space) without redoing "
                        "finished trials; its saved config and space are used")
    p.add_argument("--best-config", default=None, help="where to write the best trial's config (YAML)")
    p.add_argument("--dry-run", action="store_true", help="validate the space, print the search plan, start nothing")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every trial, e.g. schedule.epochs=10")
    return p.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    from orchestrator.train.startup import keep_progress_lines_whole

    keep_progress_lines_whole()  # before anything imports Ray
    args = parse_args(argv)
    check_args(args)
    return run_search(args)


def check_args(args: argparse.Namespace) -> None:
    """The flags' own bounds, before anything is loaded."""
    for flag in ("num_samples", "max_concurrent"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}={v} is not accepted; expected an integer >= 1")
    if args.max_failures < -1:
        raise ConfigError(f"--max-failures={args.max_failures} is not accepted; expected -1 (forever) or an integer >= 0")
    if args.grace_period < 1:
        raise ConfigError(f"--grace-period={args.grace_period} is not accepted; expected an integer >= 1")
    if args.reduction_factor <= 1:
        raise ConfigError(f"--reduction-factor={args.reduction_factor} is not accepted; expected a number > 1")
    if args.best_config:  # written at the very end: a path that cannot be written must fail now
        check_best_config_path(args.best_config)


def check_best_config_path(path: str) -> None:
    import os

    from pipelines.storage import StorageError, check_writable_target

    try:
        check_writable_target(os.path.dirname(os.path.abspath(path)), what=f"--best-config {path!r}: its folder")
    except StorageError as e:
        raise ConfigError(str(e)) from None
    if os.path.isdir(path) or not path.endswith((".yaml", ".yml")):
        raise ConfigError(f"--best-config {path!r} is not accepted; expected a .yaml file path (what "
                          "`python -m orchestrator.pretrain --config FILE` takes)")


if __name__ == "__main__":
    sys.exit(main())
