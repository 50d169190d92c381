"""A study's figures and table (`python -m orchestrator.report --study NAME`; drawn by orchestrator.study at its
end), read from its MLflow parent run and that run's nested trial runs, logged back as the parent's artifacts.

    model-scale   accuracy_vs_flops.png, accuracy_vs_compute.png (Pareto frontiers), accuracy_vs_throughput.png
    data-scale    accuracy_vs_data.png: top-1 against the fraction of the training split, one line per model
    permutation   permutation.png: top-1 per input permutation (bars, one group per model)
    every study   study.md, study.csv: one row per trial (point, model, fraction/mode, plan, compute, top-1)

y is the FINAL top-1 of each trial (its last val/top1: nothing chosen on the validation set; the best, as
orchestrator.report reads it, is in the table). The point of each trial is its `tune.point` param; what the
point varies (model, fraction, mode) and its planned steps come from the parent run's study/points.json. NAME is a study's name (model-scale-digits-2) or
kind (model-scale: the newest study of that kind).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config.studies import POINTS_FILE, STUDY_KINDS, STUDY_TAG
from orchestrator.config.tree import mixer_home
from orchestrator.report.runs import REPORT_TAG, ReportError, RunRow, open_store, row_from_run
from orchestrator.tracking.store import resolve_tracking_uri
from pipelines.redaction import redact

POINT_PARAM = "tune.point"


@dataclass
class StudyRow:
    label: str  # the point
    facets: dict  # model, fraction / mode, planned steps ...
    run: RunRow

    @property
    def top1(self) -> float | None:
        return self.run.final_top1

    def plotted(self) -> RunRow:
        """The row as the shared figures read it: y = final top-1, coloured by the point's model."""
        return dataclasses.replace(self.run, best_top1=self.top1, model=str(self.facets.get("model", "?")),
                                   run_name=self.label)


@dataclass
class StudyReport:
    name: str
    kind: str
    parent_run_id: str
    out_dir: Path
    rows: list[StudyRow]
    files: list[Path]
    points_drawn: dict[str, int]  # figure file name -> points (or bars) drawn on it
    markdown: str


def find_study(client, study: str):
    """The parent run of the study named `study` (or the newest of that kind), else a ReportError listing them."""
    from mlflow.entities import ViewType

    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    runs = client.search_runs(ids, filter_string="tags.`mixer.kind` = 'study'", run_view_type=ViewType.ACTIVE_ONLY,
                              order_by=["attributes.start_time DESC"], max_results=1000) if ids else []
    for match in (lambda r: r.info.run_name == study, lambda r: r.data.tags.get(STUDY_TAG) == study):
        found = [r for r in runs if match(r)]
        if found:
            return found[0]
    names = sorted({r.info.run_name for r in runs}) or ["(none)"]
    raise ReportError(f"--study {study!r}: no such study in {redact(client.tracking_uri)}; studies there: "
                      f"{', '.join(names)} (or a kind: {', '.join(STUDY_KINDS)})")


def study_rows(client, parent) -> tuple[str, list[StudyRow]]:
    """(the study's kind, one row per trial run in the points' order)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            info = json.loads(Path(client.download_artifacts(parent.info.run_id, POINTS_FILE, tmp)).read_text())
        except Exception:
            raise ReportError(f"run {parent.info.run_id} ({parent.info.run_name}) holds no {POINTS_FILE}: "
                              "not a study started by orchestrator.study") from None
    points = info.get("points", {})
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"], max_results=1000)
    rows = [StudyRow(c.data.params.get(POINT_PARAM, c.info.run_name), points.get(c.data.params.get(POINT_PARAM), {}),
                     row_from_run(client, c))
            for c in children if c.data.tags.get(REPORT_TAG) != "true"]
    order = {label: i for i, label in enumerate(points)}
    return info.get("kind") or parent.data.tags.get(STUDY_TAG), sorted(rows, key=lambda r: order.get(r.label, 1e9))


def make_study_report(tracking_uri: str | None = None, study: str | None = None, parent_run_id: str | None = None,
                      out_dir: str | Path | None = None, log_to_parent: bool = True) -> StudyReport:
    from orchestrator.report import study_figures

    uri = resolve_tracking_uri(tracking_uri, str(mixer_home()))
    client = open_store(uri)
    if parent_run_id:
        parent = client.get_run(parent_run_id)
    else:
        parent = find_study(client, study or "")
    name = parent.info.run_name
    kind, rows = study_rows(client, parent)
    if not rows:
        raise ReportError(f"study {name} ({parent.info.run_id}) has no trial runs yet")
    out = Path(out_dir) if out_dir else mixer_home() / "reports" / name
    out.mkdir(parents=True, exist_ok=True)
    drawn = study_figures.draw(kind, rows, out, name)
    md = markdown(kind, name, rows)
    (out / "study.md").write_text(md)
    write_csv(kind, rows, out / "study.csv")
    files = [out / f for f in drawn] + [out / "study.md", out / "study.csv"]
    if log_to_parent:
        for f in files:
            client.log_artifact(parent.info.run_id, str(f), "report")
    return StudyReport(name, kind, parent.info.run_id, out, rows, files, drawn, md)


COLUMNS = [  # (header, CSV name, StudyRow -> value, Markdown format)
    ("point", "point", lambda r: r.label, str),
    ("model", "model", lambda r: r.facets.get("model"), str),
    ("fraction", "train_fraction", lambda r: r.facets.get("fraction"), lambda v: f"{100 * v:g}%"),
    ("permutation", "permute", lambda r: r.facets.get("mode"), str),
    ("status", "status", lambda r: r.run.status, str),
    ("params", "num_params", lambda r: r.facets.get("params") or r.run.num_params, lambda v: f"{v:,.0f}"),
    ("epochs", "epochs", lambda r: r.facets.get("epochs"), lambda v: f"{v:g}"),
    ("steps", "planned_steps", lambda r: r.facets.get("steps"), lambda v: f"{v:,}"),
    ("total FLOPs", "total_flops", lambda r: r.run.total_flops, lambda v: f"{v:.3g}"),
    ("acc-hours", "accelerator_hours", lambda r: r.run.accelerator_hours, lambda v: f"{v:.3g}"),
    ("img/s/acc", "img_per_s_per_accelerator", lambda r: r.run.img_per_s_per_device, lambda v: f"{v:,.0f}"),
    ("final top-1", "final_top1", lambda r: r.top1, lambda v: f"{100 * v:.2f}%"),
    ("best top-1", "best_top1", lambda r: r.run.best_top1, lambda v: f"{100 * v:.2f}%"),
    ("run id", "run_id", lambda r: r.run.run_id, lambda v: v[:8]),
]
ONLY_FOR = {"train_fraction": "data-scale", "permute": "permutation"}


def _columns(kind: str):
    return [c for c in COLUMNS if ONLY_FOR.get(c[1], kind) == kind]


def markdown(kind: str, name: str, rows: list[StudyRow]) -> str:
    cols = _columns(kind)
    lines = [f"# Study `{name}` ({kind}): {len(rows)} trials", "",
             "final top-1 = the trial's last val/top1 (the figures' y); best top-1 = the report's: val/top1 where "
             "minival/top1 peaked (val's own maximum without a minival); steps, epochs = planned.", "",
             "| " + " | ".join(c[0] for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("" if (v := get(r)) is None else fmt(v) for _, _, get, fmt in cols) + " |")
    return "\n".join(lines) + "\n"


def write_csv(kind: str, rows: list[StudyRow], path: Path) -> None:
    cols = _columns(kind)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([c[1] for c in cols])
        for r in rows:
            w.writerow(["" if (v := get(r)) is None else v for _, _, get, _ in cols])
