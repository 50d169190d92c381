"""The comparison itself: the Pareto frontier of accuracy against compute, the table (Markdown and CSV)."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orchestrator.report.runs import RunRow, finite


def pareto_frontier(points: Sequence[Any], cost: Callable[[Any], float] | None = None,
                    value: Callable[[Any], float] | None = None) -> list:
    """The points no other point beats: none has lower-or-equal cost and higher-or-equal value with one strict.

    `points` are (cost, value, ...) tuples unless `cost`/`value` say how to read them. Points with a missing
    (None/NaN) cost or value are left out. Returned in increasing cost (and so increasing value).
    """
    cost = cost or (lambda p: p[0])
    value = value or (lambda p: p[1])
    usable = [p for p in points if finite(cost(p)) and finite(value(p))]
    front = []
    for p in usable:
        cp, vp = cost(p), value(p)
        dominated = any(
            cost(q) <= cp and value(q) >= vp and (cost(q) < cp or value(q) > vp) for q in usable if q is not p
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: (cost(p), value(p)))


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
    """(header, CSV column, row -> raw value, formatter for Markdown) for every column."""
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
        ("data wait", "data_wait_fraction", lambda r: r.data_wait, lambda v: _fmt_pct(v, 1)),
        ("acc-hours", "accelerator_hours", lambda r: r.accelerator_hours, _fmt_sig),
        ("productive h", "productive_hours", lambda r: r.productive_hours, _fmt_sig),
        ("goodput", "goodput", lambda r: r.goodput, lambda v: _fmt_pct(v, 0)),
        ("total FLOPs", "total_flops", lambda r: r.total_flops, _fmt_flops),
        ("best top-1", "best_top1", lambda r: r.best_top1, _fmt_pct),
        ("selected on", "selected_on", lambda r: r.selected_on, lambda v: v or ""),
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

