"""Compare runs on compute spent against accuracy reached: a table and figures from MLflow.

    python -m orchestrator.report                                   # runs of the default pretrain (mixer-digits)
    python -m orchestrator.report --experiment mixer-tune --parent <search run id>   # trials of one search
    python -m orchestrator.report --filter 'params.`model.name` = "mixer_s16_224"' --out /tmp/s16
    python -m orchestrator.report --log-to-mlflow                   # also keep the report as an MLflow run
    python -m orchestrator.report --tracking-uri http://mlflow.internal:5000 --experiment team-mixer
    python -m orchestrator.report --study model-scale            # a study's figures (orchestrator/report/study.py)

Writes into --out (default $MIXER_HOME/reports/<experiment>):
    runs.md, runs.csv                 one row per run: model sizes, parameters, GFLOPs/image, throughput,
                                      MFU, data-wait fraction, accelerator-hours, total FLOPs, best top-1,
                                      few-shot accuracy
    accuracy_vs_compute.png           best top-1 vs accelerator-hours, the Pareto frontier marked
    accuracy_vs_throughput.png        best top-1 vs img/s per accelerator
    accuracy_vs_params.png            best top-1 vs parameter count
    training_curves.png               val/top1 vs step and vs accelerator-hours for the frontier runs

How each number is read from MLflow: orchestrator/report/runs.py (metric names: orchestrator/tracking/tracker.py);
the frontier and the table: orchestrator/report/table.py. Runs still in progress are marked "running" and
count with what they reached so far; a run missing a number shows a blank and stays off the frontier.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config.tree import mixer_home
from orchestrator.report.runs import (
    REPORT_TAG,
    ReportError,
    RunRow,
    collect_runs,
    default_experiment,
    metric_curves,
    open_store,
    resolve_experiment,
)
from orchestrator.report.table import mark_frontier, markdown_table, sort_rows, write_csv
from orchestrator.tracking.store import resolve_tracking_uri
from pipelines.cli import entry_point
from pipelines.redaction import redact

log = logging.getLogger(__name__)

REPORT_RUN_IDS_TAG = "mixer.report.run_ids"


# ------------------------------------------------------------------------------------------ report --------


@dataclass
class Report:
    out_dir: Path
    rows: list[RunRow]
    frontier: list[RunRow]
    files: list[Path]
    skipped: list[str]
    markdown: str
    report_run_id: str | None = None


def make_report(tracking_uri: str | None = None, experiment: str | None = None, parent_run_id: str | None = None,
                filter_string: str | None = None, out_dir: str | Path | None = None,
                log_to_mlflow: bool = False) -> Report:
    """Read the runs, write table and figures to `out_dir`, optionally log them as a report run."""
    from orchestrator.report import figures as report_figures

    if out_dir is not None:
        _check_out_dir(out_dir)
    uri = resolve_tracking_uri(tracking_uri, str(mixer_home()))
    client = open_store(uri)
    exp, parent = resolve_experiment(client, experiment, parent_run_id)
    rows = collect_runs(client, exp.experiment_id, parent_run_id, filter_string)
    if not rows:
        where = f"experiment {exp.name!r}" + (f" under run {parent_run_id}" if parent_run_id else "")
        raise ReportError(f"no runs to compare in {where}" + (f" matching {filter_string!r}" if filter_string else ""))
    front = mark_frontier(rows)
    rows = sort_rows(rows)

    out = Path(out_dir) if out_dir else _default_out(exp.name, parent_run_id)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    md = _markdown_document(exp.name, uri, parent_run_id, filter_string, rows, front)
    (out / "runs.md").write_text(md)
    write_csv(rows, out / "runs.csv")
    files += [out / "runs.md", out / "runs.csv"]

    curves = {r.run_id: metric_curves(client, r) for r in (front or rows[:5])}
    title = exp.name + (f" / {parent.info.run_name or parent_run_id[:8]}" if parent else "")
    made, skipped = report_figures.write_figures(rows, front, curves, out, title)
    files += made

    report_run_id = None
    if log_to_mlflow:
        report_run_id = _log_report_run(uri, exp.name, parent_run_id, filter_string, rows, files)
    return Report(out, rows, front, files, skipped, md, report_run_id)


def _default_out(experiment: str, parent_run_id: str | None) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in experiment)
    return mixer_home() / "reports" / (safe + (f"-{parent_run_id[:8]}" if parent_run_id else ""))


def _check_out_dir(out_dir: str | Path) -> None:
    """--out must be a directory or creatable as one; checked before the store is read."""
    from pipelines.storage import StorageError, check_writable_target

    try:
        check_writable_target(str(out_dir), what="--out")
    except StorageError as e:
        raise ReportError(str(e)) from None


def _markdown_document(exp_name, uri, parent_run_id, filter_string, rows, front) -> str:
    head = [f"# Runs of `{exp_name}`" + (f" under `{parent_run_id}`" if parent_run_id else ""), ""]
    head.append(f"Tracking store: `{redact(uri)}`" + (f"; filter: `{filter_string}`" if filter_string else "")
                + f"; {len(rows)} runs; generated {time.strftime('%Y-%m-%d %H:%M:%S')}.")
    running = [r for r in rows if r.running]
    if running:
        head.append(f"{len(running)} run(s) still in progress: their numbers are what they reached so far.")
    head.append("★ = Pareto frontier: no other run reached a higher best top-1 for fewer accelerator-hours. "
                "Runs missing either number are left off it.")
    head.append("img/s, img/s per accelerator and MFU are medians after warm-up; best top-1 is val/top1 at the "
                "evaluation chosen on the split in `selected on`: the minival's best (held out of training, "
                "data.minival_fraction) or, for a run without one, val's own maximum; GFLOPs/img is the forward pass; data wait is the share of the training steps' time "
                "spent waiting for the next batch (the most starved rank).")
    return "\n".join(head) + "\n\n" + markdown_table(rows)


def _log_report_run(uri, experiment, parent_run_id, filter_string, rows, files) -> str:
    from orchestrator.tracking.limits import MAX_TAG_VAL_LENGTH
    from orchestrator.tracking.tracker import RunTracker

    ids = ",".join(r.run_id for r in rows)
    if len(ids) > MAX_TAG_VAL_LENGTH:
        ids = ids[: MAX_TAG_VAL_LENGTH - 40].rsplit(",", 1)[0] + f",... ({len(rows)} runs, see runs.json)"
    tracker = RunTracker(
        uri, experiment, f"report-{time.strftime('%Y%m%d-%H%M%S')}", parent_run_id=parent_run_id,
        tags={REPORT_TAG: "true", REPORT_RUN_IDS_TAG: ids, "mixer.report.num_runs": len(rows),
              "mixer.report.filter": filter_string or ""},
    )
    run_id = tracker.start()
    for f in files:
        tracker.log_artifact(str(f), "report")
    tracker.log_dict({"compared_runs": [{"run_id": r.run_id, "run_name": r.run_name, "frontier": r.frontier}
                                        for r in rows]}, "report/runs.json")
    tracker.end("FINISHED")
    missing = tracker.unlogged_summary()
    if missing:
        log.warning("warning: %s", missing)
    return run_id


# ------------------------------------------------------------------------------------------ CLI -----------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.report",
        description="Compare MLflow runs on compute spent against accuracy reached: a table (Markdown, CSV) "
                    "and figures (PNG) with the Pareto frontier.",
    )
    p.add_argument("--experiment", default=None,
                   help="MLflow experiment name (default: the --parent run's, else the one a plain "
                        f"`python -m orchestrator.pretrain` logs to, {default_experiment()})")
    p.add_argument("--parent", default=None, metavar="RUN_ID", help="only the child runs of this run (a Tune search)")
    p.add_argument("--filter", default=None, metavar="FILTER",
                   help="MLflow search filter (dotted names in backticks), e.g. "
                        "'params.`model.patch_size` = \"16\" and metrics.`val/top1` > 0.5'")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: $MIXER_HOME/reports/<experiment>)")
    p.add_argument("--log-to-mlflow", action="store_true",
                   help="also log the table and figures as artifacts of a new report run tagged with the run ids")
    p.add_argument("--study", default=None, metavar="NAME",
                   help="draw the study NAME (orchestrator.study: its name, or a kind for the newest of that kind: "
                        "model-scale, data-scale, permutation) and log the figures to its parent run")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///$MIXER_HOME/mlflow.db)")
    return p.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.study is not None:
        return study_main(args)
    rep = make_report(args.tracking_uri, args.experiment, args.parent, args.filter, args.out, args.log_to_mlflow)
    print(rep.markdown)
    print(f"{len(rep.rows)} runs, {len(rep.frontier)} on the frontier: "
          + ", ".join(r.label for r in rep.frontier))
    print(f"wrote {rep.out_dir}/")
    for f in rep.files:
        print(f"  {f.name}")
    for s in rep.skipped:
        print(f"  (skipped {s})")
    if rep.report_run_id:
        print(f"report run {rep.report_run_id} (artifacts under report/)")
    return 0


def study_main(args: argparse.Namespace) -> int:
    from orchestrator.report.study import make_study_report

    for flag in ("experiment", "parent", "filter"):
        if getattr(args, flag) is not None:
            raise ReportError(f"--{flag} is not accepted with --study (a study is one parent run and its trials)")
    if args.out is not None:
        _check_out_dir(args.out)
    rep = make_study_report(args.tracking_uri, study=args.study, out_dir=args.out)
    print(rep.markdown)
    print(f"wrote {rep.out_dir}/ (logged to the study's parent run {rep.parent_run_id} under report/)")
    for f in rep.files:
        print(f"  {f.name}" + (f"  ({rep.points_drawn[f.name]} points)" if f.name in rep.points_drawn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
