"""Reading runs from MLflow into table rows: which runs, and how each number is read from its histories.

best top-1 = val/top1 at the evaluation where the run's minival/top1 peaked, for a run that holds a minival out
(data.minival_fraction: chosen on the minival, val only reported), else the max of the val/top1 history
(chosen on val itself: say so, `selected_on`); accelerator-hours (held), productive hours, goodput and total FLOPs =
the last value of compute/accelerator_hours, compute/productive_hours, compute/goodput and compute/flops;
img/s, img/s per accelerator and MFU = median of their history after the first logging window (warm-up), MFU
else the run's own figure (train/run_mfu, logged at its end); data wait = the run's fraction of training time
spent waiting for data (perf/run_data_wait_fraction, logged at its end), else the median of the windows'
perf/data_wait_fraction after the first; few-shot = the last value logged.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.cli import InputError, first_line
from pipelines.redaction import redact

REPORT_TAG = "mixer.report"  # marks report runs so that reports never compare themselves
FEWSHOT_PREFIX = "fewshot/"


class ReportError(InputError):
    """A bad input (unknown experiment/run, bad filter, no store): the message says what exists instead."""


def finite(x) -> bool:
    """A number that can be plotted and compared (not None, bool, NaN or infinite)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
    data_wait: float | None = None  # fraction of the training steps' time spent waiting for data (0..1)
    accelerator_hours: float | None = None  # held: wall time x accelerators
    productive_hours: float | None = None  # inside training steps
    goodput: float | None = None
    total_flops: float | None = None
    best_top1: float | None = None
    final_top1: float | None = None  # the last val/top1 (a study's figure: no choice made on val)
    selected_on: str | None = None  # the split the best evaluation was chosen on: "minival", or "val" itself
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
    vals = [m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp)) if finite(m.value)]
    if len(vals) >= 3:
        vals = vals[1:]
    return statistics.median(vals) if vals else None


def _last(history) -> float | None:
    hist = [m for m in history if finite(m.value)]
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
    if row.mfu is None:
        row.mfu = _last(hist("train/run_mfu"))
    row.data_wait = _last(hist("perf/run_data_wait_fraction"))
    if row.data_wait is None:
        row.data_wait = _steady_median(hist("perf/data_wait_fraction"))
    row.accelerator_hours = _last(hist("compute/accelerator_hours"))
    row.productive_hours = _last(hist("compute/productive_hours"))
    row.goodput = _last(hist("compute/goodput"))
    row.total_flops = _last(hist("compute/flops"))
    top1 = [m for m in hist("val/top1") if finite(m.value)]
    minival = sorted((m for m in hist("minival/top1") if finite(m.value)), key=lambda m: m.step)
    if minival and top1:  # the first evaluation with the best minival top-1, and val there
        chosen = max(minival, key=lambda m: m.value).step
        at = [m.value for m in top1 if m.step == chosen]
        row.best_top1, row.selected_on = (at[-1], "minival") if at else (None, None)
    elif top1:
        row.best_top1, row.selected_on = max(m.value for m in top1), "val"
    if top1:
        row.final_top1 = _last(top1)
    for key in latest:
        if key.startswith(FEWSHOT_PREFIX) and key.endswith("shot"):
            k = _num(key[len(FEWSHOT_PREFIX):-len("shot")], int)
            if k is not None:
                row.fewshot[k] = _last(hist(key))
    return row

def open_store(tracking_uri: str):
    """An MlflowClient for an existing store; a clear ReportError when there is none to read."""
    from mlflow.tracking import MlflowClient

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
    return MlflowClient(tracking_uri)


def _experiment_names(client) -> list[str]:
    from mlflow.entities import ViewType

    return sorted(e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY))


def default_experiment() -> str:
    """The experiment a plain `python -m orchestrator.pretrain` logs to (the default preset's), so that a plain
    `python -m orchestrator.report` right after it compares those runs."""
    from orchestrator.config.load import load_config

    return load_config().tracking.experiment


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
        experiment = default_experiment()
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
            raise ReportError(f"MLflow cannot use the filter {filter_string!r}: {first_line(e)}") from None
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
        out[key] = sorted((m.step, m.value) for m in hist if finite(m.value))
    return out
