"""The paper's studies in one command: a Ray Tune grid, one trial (a Ray Train run) per point.

    python -m orchestrator.study model-scale                 # digits: a 30x ladder of Mixer sizes (paper Fig. 3)
    python -m orchestrator.study data-scale                  # digits: 3/10/30/100% at equal steps (Fig. 2, right)
    python -m orchestrator.study permutation                 # digits: none / patch_pixel / global (Fig. 4)
    python -m orchestrator.study model-scale --config jft data.url=s3://BUCKET/jft scaling.num_workers=16
    python -m orchestrator.study data-scale --dry-run        # the points and their planned steps; starts nothing
    python -m orchestrator.study model-scale --resume        # continue the latest model-scale-digits study
    python -m orchestrator.report --study model-scale        # redraw its figures

The study file (--config: a preset of orchestrator/config/studies/ or a YAML path; format in
orchestrator/config/studies.py) names the base config, the models and each study's grid; orchestrator/study/
points.py turns the grid into labelled points. The points run through orchestrator.tune's search (its trial
function, store, resume, cluster checks and MLflow parent/child runs) as a grid without early stopping; the
parent run is named after the study (<study>-<file>[-N]) and tagged mixer.kind=study. At the end the study's
figures and table are drawn (orchestrator/report/study.py) and logged as artifacts of the parent run.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from orchestrator.config.parse import parse_override
from orchestrator.config.studies import POINTS_FILE, STUDY_KINDS, STUDY_TAG, list_study_files, load_study_file
from orchestrator.config.tree import ConfigError
from pipelines.cli import entry_point, say


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.study",
        description="Run one of the paper's studies as a Ray Tune grid (each trial a Ray Train run) and draw it.",
        epilog=f"study files (--config): {', '.join(list_study_files())}",
    )
    p.add_argument("study", choices=STUDY_KINDS, help="which study")
    p.add_argument("--config", default=None, help="study file: preset or YAML path (default: digits)")
    p.add_argument("--name", default=None, help="the study's name (default <study>-<file>[-N]); with --resume: which")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted study (--name, else the latest of this study and file) without "
                        "redoing finished trials")
    p.add_argument("--points", default=None, metavar="LABEL,...",
                   help="run only these points of the study (labels as --dry-run lists them), e.g. a smoke run")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: what the cluster fits: CPUs // (num_workers x cpus_per_worker))")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a failed trial (it resumes from its own checkpoints); -1 = forever")
    p.add_argument("--out", default=None, metavar="DIR", help="where the figures go (default: $MIXER_HOME/reports/<name>)")
    p.add_argument("--dry-run", action="store_true", help="print the points and their plans, start nothing")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every trial, e.g. train.max_steps=50")
    return p.parse_intermixed_args(argv)  # the study first, flags and key=value overrides in any order


@entry_point
def main(argv: list[str] | None = None) -> int:
    from orchestrator.train.startup import keep_progress_lines_whole

    keep_progress_lines_whole()  # before anything imports Ray
    args = parse_args(argv)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent={args.max_concurrent} is not accepted; expected an integer >= 1")
    if args.max_failures < -1:
        raise ConfigError(f"--max-failures={args.max_failures} is not accepted; expected -1 (forever) or an integer >= 0")
    return run_study(args)


def run_study(args: argparse.Namespace) -> int:
    from orchestrator.config.search_space import SearchSpace
    from orchestrator.study.points import build_study, check_args, default_plan_for
    from orchestrator.tune.search import run_search
    from orchestrator.tune.store import pick_name, store_for

    study_file = load_study_file(args.config)
    overrides = dict(parse_override(item) for item in args.overrides)
    only = [p for p in args.points.split(",") if p] if args.points else None
    check_args(study_file, args.study, only, overrides)
    if args.resume:  # the saved grid is resumed as it was: nothing to plan
        from orchestrator.config.load import load_config

        spec = study_file.study(args.study)
        fixed = {**study_file.overrides, **spec.overrides}
        space = SearchSpace(name=f"{args.study}-{study_file.name}", params={}, config=study_file.config,
                            overrides=fixed, source=study_file.source)
        base, facets = load_config(study_file.config, {**fixed, **overrides}), None
    else:
        study = build_study(study_file, args.study, overrides, default_plan_for(allow_unreachable=args.dry_run), only)
        space, base, facets = study.space, study.base, study.facets
        say(f"[study] {args.study} from {study_file.source}: {len(study.facets)} point(s), base config "
            f"{study_file.config} ({base.model.name})")
        say(study.describe())
    store = store_for(base)
    name = pick_name(store, space.name, args.resume, args.name)
    search_args = argparse.Namespace(
        space=None, config=None, overrides=args.overrides, resume=args.resume, name=name, search="grid",
        scheduler="none", dry_run=args.dry_run, num_samples=1, max_concurrent=args.max_concurrent,
        grace_period=1, reduction_factor=2.0, max_failures=args.max_failures, best_config=None,
    )
    code = run_search(search_args, space, kind="study", resume_command=resume_command(args, name),
                      parent_tags={STUDY_TAG: args.study, "mixer.study.file": study_file.name},
                      parent_files={POINTS_FILE: {"kind": args.study, "study_file": study_file.name,
                                                  "points": facets or {}}})
    if args.dry_run or code not in (0, 1):
        return code
    return draw(store, name, args.out) or code


def resume_command(args: argparse.Namespace, name: str) -> str:
    parts = ["python", "-m", "orchestrator.study", args.study, "--resume", "--name", name]
    if args.config:
        parts += ["--config", args.config]
    parts += [o for o in args.overrides if o.split("=", 1)[0] in ("run.storage_path", "tracking.uri")]
    return " ".join(shlex.quote(p) for p in parts)


def draw(store, name: str, out: str | None) -> int:
    """The study's figures and table, logged to its parent run; 0, or 1 when nothing could be drawn."""
    from orchestrator.report.study import make_study_report

    saved = store.read_sidecar(name) or {}
    if not saved.get("tracking_uri") or not saved.get("parent_run_id"):
        say("[study] tracking is off: no MLflow runs to draw the study from")
        return 0
    rep = make_study_report(saved["tracking_uri"], parent_run_id=saved["parent_run_id"], out_dir=out)
    print(f"\nstudy figures  {rep.out_dir}/ ({', '.join(f.name for f in rep.files)}; logged to the parent run)")
    print(f"redraw         python -m orchestrator.report --study {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
