"""Compare runs on compute spent against accuracy reached: a table and figures from MLflow.

    python -m orchestrator.report                                   # runs of experiment mixer-pretrain
    python -m orchestrator.report --experiment mixer-tune --parent <search run id>   # trials of one search
    python -m orchestrator.report --filter 'params.`model.name` = "mixer_s16_224"' --out /tmp/s16
    python -m orchestrator.report --log-to-mlflow                   # also keep the report as an MLflow run
    python -m orchestrator.report --tracking-uri http://mlflow.internal:5000 --experiment team-mixer

Writes into --out (default $MIXER_HOME/reports/<experiment>):
    runs.md, runs.csv                 one row per run: model sizes, parameters, GFLOPs/image, throughput,
                                      MFU, accelerator-hours, total FLOPs, best top-1, few-shot accuracy
    accuracy_vs_compute.png           best top-1 vs accelerator-hours, the Pareto frontier marked
    accuracy_vs_throughput.png        best top-1 vs img/s per accelerator
    accuracy_vs_params.png            best top-1 vs parameter count
    training_curves.png               val/top1 vs step and vs accelerator-hours for the frontier runs

How numbers are read (metric names: orchestrator/tracking/tracker.py): best top-1 = max of the val/top1 history;
accelerator-hours and total FLOPs = the last value of the cumulative compute/accelerator_hours and
compute/flops; img/s, img/s per accelerator and MFU = median of their history after the first logging
window (warm-up); few-shot = the last value logged. Runs still in progress are marked "running" and
count with what they reached so far; a run missing a number shows a blank and stays off the frontier.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.tracking.store import resolve_tracking_uri
from pipelines.redaction import redact

DEFAULT_EXPERIMENT = "mixer-pretrain"
REPORT_TAG = "mixer.report"  # marks report runs so that reports never compare themselves
REPORT_RUN_IDS_TAG = "mixer.report.run_ids"
FEWSHOT_PREFIX = "fewshot/"


class ReportError(Exception):
    """A bad input (unknown experiment/run, bad filter, no store): the message says what exists instead."""


def mixer_home() -> Path:
    return Path(os.environ.get("MIXER_HOME", Path.home() / ".mixer")).expanduser().resolve()


def default_tracking_uri() -> str:
    return resolve_tracking_uri(None, str(mixer_home()))


# ------------------------------------------------------------------------------------------ frontier ------


def pareto_frontier(points: Sequence[Any], cost: Callable[[Any], float] | None = None,
                    value: Callable[[Any], float] | None = None) -> list:
    """The points no other point beats: none has lower-or-equal cost and higher-or-equal value with one strict.

    `points` are (cost, value, ...) tuples unless `cost`/`value` say how to read them. Points with a missing
    (None/NaN) cost or value are left out. Returned in increasing cost (and so increasing value).
    """
    cost = cost or (lambda p: p[0])
    value = value or (lambda p: p[1])
    usable = [p for p in points if _finite(cost(p)) and _finite(value(p))]
    front = []
    for p in usable:
        cp, vp = cost(p), value(p)
        dominated = any(
            cost(q) <= cp and value(q) >= vp and (cost(q) < cp or value(q) > vp) for q in usable if q is not p
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: (cost(p), value(p)))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ------------------------------------------------------------------------------------------ reading -------


@dataclass
class RunRow:
    run_id: str
    run_name: str
    status: str  # RUNNING / FINISHED / FAILED / KILLED / SCHEDULED
    model: str | None = None
    ds: int | None = None  # tokens_mlp_dim
    dc: int | None = None  # channels_mlp_dim
    c: int | None = None  # hidden_dim
    depth: int | None = None
    patch: int | None = None
    accelerator: str | None = None
    workers: int | None = None
    num_params: float | None = None
    gflops_per_image: float | None = None
    img_per_s: float | None = None
    img_per_s_per_device: float | None = None
    mfu: float | None = None
    accelerator_hours: float | None = None
    total_flops: float | None = None
    best_top1: float | None = None
    best_top1_step: int | None = None
    last_step: int | None = None
    fewshot: dict[int, float] = field(default_factory=dict)
    parent_run_id: str | None = None
    frontier: bool = False

    @property
    def running(self) -> bool:
        return self.status in ("RUNNING", "SCHEDULED")

    @property
    def label(self) -> str:
        return self.run_name or self.run_id[:8]


def _num(x, kind=float):
    if x is None or x == "" or x == "None":
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v):
        return None
    return int(v) if kind is int else v


def _steady_median(history) -> float | None:
    """Median of a throughput-like history, without the first logging window (warm-up, compilation)."""
    vals = [m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp)) if _finite(m.value)]
    if len(vals) >= 3:
        vals = vals[1:]
    return statistics.median(vals) if vals else None


def _last(history) -> float | None:
    hist = [m for m in history if _finite(m.value)]
    if not hist:
        return None
    return max(hist, key=lambda m: (m.step, m.timestamp)).value


def row_from_run(client, run) -> RunRow:
    """One table row from an MLflow run (reads the metric histories it needs)."""
    p, t, latest = run.data.params, run.data.tags, run.data.metrics
    rid = run.info.run_id

    def hist(key):
        return client.get_metric_history(rid, key) if key in latest else []

    row = RunRow(
        run_id=rid,
        run_name=run.info.run_name or t.get("mlflow.runName", ""),
        status=run.info.status,
        model=t.get("model_name") or p.get("model.name"),
        ds=_num(p.get("model.tokens_mlp_dim"), int),
        dc=_num(p.get("model.channels_mlp_dim"), int),
        c=_num(p.get("model.hidden_dim"), int),
        depth=_num(p.get("model.depth"), int),
        patch=_num(p.get("model.patch_size"), int),
        accelerator=p.get("compute.accelerator"),
        workers=_num(t.get("world_size") or p.get("scaling.num_workers"), int),
        num_params=_num(p.get("compute.num_params")),
        gflops_per_image=_num(p.get("compute.fwd_gflops_per_image")),
        parent_run_id=t.get("mlflow.parentRunId"),
    )
    row.img_per_s = _steady_median(hist("train/img_per_s"))
    row.img_per_s_per_device = _steady_median(hist("train/img_per_s_per_device"))
    if row.img_per_s_per_device is None and row.img_per_s is not None and row.workers:
        row.img_per_s_per_device = row.img_per_s / row.workers
    row.mfu = _steady_median(hist("train/mfu"))
    row.accelerator_hours = _last(hist("compute/accelerator_hours"))
    row.total_flops = _last(hist("compute/flops"))
    top1 = [m for m in hist("val/top1") if _finite(m.value)]
    if top1:
        best = max(top1, key=lambda m: (m.value, -m.step))
        row.best_top1, row.best_top1_step = best.value, best.step
    steps = [m.step for k in ("train/loss", "val/top1") for m in (hist(k) if k != "val/top1" else top1)]
    row.last_step = max(steps) if steps else None
    for key in latest:
        if key.startswith(FEWSHOT_PREFIX) and key.endswith("shot"):
            k = _num(key[len(FEWSHOT_PREFIX):-len("shot")], int)
            if k is not None:
                row.fewshot[k] = _last(hist(key))
    return row


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def open_store(tracking_uri: str):
    """An MlflowClient for an existing store; a clear ReportError when there is none to read."""
    from orchestrator.tracking.store import TrackingUnreachableError, check_tracking_reachable

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.exists():
            raise ReportError(
                f"no MLflow store at {db}: train something first (python -m orchestrator.pretrain) "
                "or pass --tracking-uri (or set MLFLOW_TRACKING_URI / MIXER_HOME)"
            )
    try:
        check_tracking_reachable(tracking_uri)
    except TrackingUnreachableError as e:
        raise ReportError(str(e)) from None
    return _client(tracking_uri)


def _experiment_names(client) -> list[str]:
    from mlflow.entities import ViewType

    return sorted(e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY))


def resolve_experiment(client, experiment: str | None, parent_run_id: str | None):
    """(experiment entity, parent run or None) for the arguments, or a ReportError saying what exists."""
    parent = None
    if parent_run_id:
        try:
            parent = client.get_run(parent_run_id)
        except Exception:
            raise ReportError(f"no MLflow run with id {parent_run_id!r} (--parent)") from None
    if experiment is None:
        if parent is not None:
            return client.get_experiment(parent.info.experiment_id), parent
        experiment = DEFAULT_EXPERIMENT
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage == "deleted":
        names = [n for n in _experiment_names(client) if n != "Default"] or ["(none)"]
        raise ReportError(
            f"experiment {experiment!r} does not exist in {redact(client.tracking_uri)}; experiments there: "
            + ", ".join(repr(n) if n != "(none)" else n for n in names)
        )
    if parent is not None and parent.info.experiment_id != exp.experiment_id:
        raise ReportError(f"run {parent_run_id} (--parent) is not in experiment {experiment!r}")
    return exp, parent


def collect_runs(client, experiment_id: str, parent_run_id: str | None = None,
                 filter_string: str | None = None) -> list[RunRow]:
    """Rows for the runs of an experiment (children of `parent_run_id` if given), oldest first."""
    from mlflow.entities import ViewType

    filters = []
    if parent_run_id:
        filters.append(f"tags.mlflow.parentRunId = '{parent_run_id}'")
    if filter_string:
        filters.append(filter_string)  # MLflow's grammar has AND only: appending keeps both conditions
    query = " and ".join(filters)
    runs, token = [], None
    try:
        while True:
            page = client.search_runs(
                [experiment_id], filter_string=query, run_view_type=ViewType.ACTIVE_ONLY,
                max_results=1000, order_by=["attributes.start_time ASC"], page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                break
    except Exception as e:
        if filter_string and getattr(e, "error_code", None) in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
            raise ReportError(f"MLflow cannot use the filter {filter_string!r}: {str(e).splitlines()[0]}") from None
        raise
    runs = [r for r in runs if r.data.tags.get(REPORT_TAG) != "true"]
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
    # A search's own (parent) run carries no training metrics: it is the container, not a row.
    runs = [r for r in runs if not (r.info.run_id in parents and "val/top1" not in r.data.metrics)]
    return [row_from_run(client, r) for r in runs]


def metric_curves(client, row: RunRow) -> dict[str, list[tuple[int, float]]]:
    """val/top1 and compute/accelerator_hours histories as sorted (step, value) lists."""
    out = {}
    for key in ("val/top1", "compute/accelerator_hours"):
        hist = client.get_metric_history(row.run_id, key)
        out[key] = sorted((m.step, m.value) for m in hist if _finite(m.value))
    return out


# ------------------------------------------------------------------------------------------ table ---------

# (header, CSV column, row -> raw value, formatter for Markdown)
def _fmt_int(v):
    return f"{v:,}" if v is not None else ""


def _fmt_sig(v, digits=3):
    if v is None:
        return ""
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:,.0f}"


def _fmt_params(v):
    if v is None:
        return ""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if v >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.0f}"


def _fmt_pct(v, digits=2):
    return f"{100 * v:.{digits}f}%" if v is not None else ""


def _fmt_flops(v):
    return f"{v:.3g}" if v is not None else ""


def _columns(rows: list[RunRow]):
    shots = sorted({k for r in rows for k in r.fewshot})
    cols = [
        ("run", "run_name", lambda r: r.label + (" (running)" if r.running else "")
         + (f" ({r.status.lower()})" if r.status in ("FAILED", "KILLED") else ""), str),
        ("run id", "run_id", lambda r: r.run_id, lambda v: v[:8]),
        ("status", "status", lambda r: r.status, None),
        ("model", "model", lambda r: r.model, lambda v: v or ""),
        ("D_S", "tokens_mlp_dim", lambda r: r.ds, _fmt_int),
        ("D_C", "channels_mlp_dim", lambda r: r.dc, _fmt_int),
        ("C", "hidden_dim", lambda r: r.c, _fmt_int),
        ("depth", "depth", lambda r: r.depth, _fmt_int),
        ("patch", "patch_size", lambda r: r.patch, _fmt_int),
        ("params", "num_params", lambda r: r.num_params, _fmt_params),
        ("GFLOPs/img", "fwd_gflops_per_image", lambda r: r.gflops_per_image, _fmt_sig),
        ("accelerator", "accelerator", lambda r: r.accelerator, lambda v: v or ""),
        ("img/s", "img_per_s", lambda r: r.img_per_s, lambda v: _fmt_sig(v, 3)),
        ("img/s/acc", "img_per_s_per_accelerator", lambda r: r.img_per_s_per_device, lambda v: _fmt_sig(v, 3)),
        ("MFU", "mfu", lambda r: r.mfu, lambda v: _fmt_pct(v, 1)),
        ("acc-hours", "accelerator_hours", lambda r: r.accelerator_hours, _fmt_sig),
        ("total FLOPs", "total_flops", lambda r: r.total_flops, _fmt_flops),
        ("best top-1", "best_top1", lambda r: r.best_top1, _fmt_pct),
    ]
    for k in shots:
        cols.append((f"{k}-shot", f"fewshot_{k}shot", lambda r, k=k: r.fewshot.get(k), _fmt_pct))
    cols.append(("frontier", "pareto_frontier", lambda r: r.frontier, lambda v: "★" if v else ""))
    return cols


def sort_rows(rows: list[RunRow]) -> list[RunRow]:
    """Best top-1 first; runs without one last (in start order)."""
    return sorted(rows, key=lambda r: (r.best_top1 is None, -(r.best_top1 or 0.0)))


def mark_frontier(rows: list[RunRow]) -> list[RunRow]:
    front = pareto_frontier(rows, cost=lambda r: r.accelerator_hours, value=lambda r: r.best_top1)
    ids = {r.run_id for r in front}
    for r in rows:
        r.frontier = r.run_id in ids
    return front


def markdown_table(rows: list[RunRow]) -> str:
    cols = [c for c in _columns(rows) if c[0] != "status"]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |",
             "|" + "|".join("---" if i < 2 or c[0] in ("model", "accelerator") else "---:"
                            for i, c in enumerate(cols)) + "|"]
    for r in rows:
        cells = []
        for _, _, get, fmt in cols:
            v = get(r)
            cells.append(str(fmt(v) if fmt else (v if v is not None else "")).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[RunRow], path: Path) -> None:
    cols = _columns(rows)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([c[1] for c in cols])
        for r in rows:
            out = []
            for _, name, get, _ in cols:
                v = get(r)
                if name == "run_name":
                    v = r.run_name
                out.append("" if v is None else (repr(v) if isinstance(v, float) else v))
            w.writerow(out)


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


def _markdown_document(exp_name, uri, parent_run_id, filter_string, rows, front) -> str:
    head = [f"# Runs of `{exp_name}`" + (f" under `{parent_run_id}`" if parent_run_id else ""), ""]
    head.append(f"Tracking store: `{redact(uri)}`" + (f"; filter: `{filter_string}`" if filter_string else "")
                + f"; {len(rows)} runs; generated {time.strftime('%Y-%m-%d %H:%M:%S')}.")
    running = [r for r in rows if r.running]
    if running:
        head.append(f"{len(running)} run(s) still in progress: their numbers are what they reached so far.")
    head.append("★ = Pareto frontier: no other run reached a higher best top-1 for fewer accelerator-hours. "
                "Runs missing either number are left off it.")
    head.append("img/s, img/s per accelerator and MFU are medians after warm-up; best top-1 is the maximum of "
                "val/top1; GFLOPs/img is the forward pass.")
    return "\n".join(head) + "\n\n" + markdown_table(rows)


def _log_report_run(uri, experiment, parent_run_id, filter_string, rows, files) -> str:
    from orchestrator.tracking.tracker import MAX_TAG_VAL_LENGTH, RunTracker

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
        print(f"warning: {missing}", file=sys.stderr)
    return run_id


def report_command(experiment: str, parent_run_id: str | None = None, tracking_uri: str | None = None) -> str:
    """The command that compares a run with its siblings (printed at the end of pretrain and tune)."""
    parts = ["python", "-m", "orchestrator.report", "--experiment", experiment]
    if parent_run_id:
        parts += ["--parent", parent_run_id]
    if tracking_uri and tracking_uri != default_tracking_uri():
        parts += ["--tracking-uri", _without_credentials(tracking_uri)]
    return " ".join(shlex.quote(p) for p in parts)


def _without_credentials(uri: str) -> str:
    """http://user:pw@host -> http://host (MLflow takes credentials from MLFLOW_TRACKING_USERNAME/PASSWORD)."""
    import urllib.parse

    parts = urllib.parse.urlsplit(uri)
    if parts.scheme in ("http", "https") and "@" in parts.netloc:
        parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])
        return urllib.parse.urlunsplit(parts)
    return redact(uri)


# ------------------------------------------------------------------------------------------ CLI -----------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.report",
        description="Compare MLflow runs on compute spent against accuracy reached: a table (Markdown, CSV) "
                    "and figures (PNG) with the Pareto frontier.",
    )
    p.add_argument("--experiment", default=None,
                   help=f"MLflow experiment name (default: the --parent run's, else {DEFAULT_EXPERIMENT})")
    p.add_argument("--parent", default=None, metavar="RUN_ID", help="only the child runs of this run (a Tune search)")
    p.add_argument("--filter", default=None, metavar="FILTER",
                   help="MLflow search filter (dotted names in backticks), e.g. "
                        "'params.`model.patch_size` = \"16\" and metrics.`val/top1` > 0.5'")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: $MIXER_HOME/reports/<experiment>)")
    p.add_argument("--log-to-mlflow", action="store_true",
                   help="also log the table and figures as artifacts of a new report run tagged with the run ids")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///$MIXER_HOME/mlflow.db)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rep = make_report(args.tracking_uri, args.experiment, args.parent, args.filter, args.out, args.log_to_mlflow)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    sys.exit(main())

