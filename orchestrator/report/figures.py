"""The report's figures (matplotlib, Agg): accuracy against compute, throughput and size; frontier curves.

Conventions, so every figure reads the same way: y is best top-1 in %, one colour per model, filled markers
for finished runs, hollow for runs still in progress, crosses for failed/killed ones; frontier runs are
labelled (all runs are labelled when there are few) and the frontier is a dashed staircase.
"""

from __future__ import annotations

import math
from pathlib import Path

FIGSIZE = (10, 5.5)
DPI = 130
LABEL_ALL_UP_TO = 12
FRONTIER_COLOR = "#222222"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(rows):
    plt = _plt()
    models = sorted({r.model or "?" for r in rows})
    cmap = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")
    return {m: cmap(i % cmap.N) for i, m in enumerate(models)}


def _short(label: str, n: int = 22) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def _use_log(values) -> bool:
    vals = [v for v in values if v and v > 0]
    return len(vals) >= 2 and max(vals) / min(vals) >= 20


def _percent_axis(ax):
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}%" if abs(v - round(v)) < 1e-9 else f"{v:.1f}%"))


def _scatter(ax, rows, xget, colors, annotate_ids, labels):
    """Points by model/status (labels to draw go to `labels`); returns legend handles for the models."""
    from matplotlib.lines import Line2D

    for r in rows:
        x, y = xget(r), r.best_top1
        if x is None or y is None or not math.isfinite(x) or x <= 0 and ax.get_xscale() == "log":
            continue
        col = colors[r.model or "?"]
        if r.status in ("FAILED", "KILLED"):
            ax.scatter(x, 100 * y, marker="x", s=60, color=col, linewidths=2, zorder=3)
        elif r.running:
            ax.scatter(x, 100 * y, marker="o", s=70, facecolors="white", edgecolors=col, linewidths=2, zorder=3)
        else:
            ax.scatter(x, 100 * y, marker="o", s=70, color=col, edgecolors="black", linewidths=0.6, zorder=3)
        if r.run_id in annotate_ids:
            labels.append((x, 100 * y, _short(r.label) + (" (running)" if r.running else "")))
    handles = [Line2D([], [], marker="o", linestyle="", color=c, markeredgecolor="black", markeredgewidth=0.6,
                      markersize=8, label=m) for m, c in colors.items()]
    if any(r.running for r in rows):
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="white", markeredgecolor="gray",
                              markeredgewidth=2, markersize=8, label="in progress"))
    if any(r.status in ("FAILED", "KILLED") for r in rows):
        handles.append(Line2D([], [], marker="x", linestyle="", color="gray", markersize=8, label="failed/killed"))
    return handles


def _human(v: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{unit}"
    return f"{v:g}"


def _finish(fig, ax, path: Path, handles, title, xlabel, n_missing, labels, human_x=False,
            ylabel="best top-1 (validation)"):
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _percent_axis(ax)
    if ax.get_xscale() == "log":
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v) if human_x else f"{v:,g}"))
    elif human_x:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.set_title(title, fontsize=11)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9,
              borderaxespad=0.0)
    if n_missing:
        ax.text(0.01, 0.01, f"{n_missing} run(s) without this number not shown", transform=ax.transAxes,
                fontsize=7, color="gray", va="bottom")
    ax.margins(x=0.08)
    ax.autoscale_view()
    _pad_y(ax)
    to_axes = ax.transAxes.inverted()
    for x, y, text in labels:
        fx = to_axes.transform(ax.transData.transform((x, y)))[0]
        right = fx > 0.8  # near the right edge: label on the left of the point
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(-7, 5) if right else (7, 5),
                    ha="right" if right else "left", fontsize=8, color="#333333")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)


def _pad_y(ax):
    lo, hi = ax.get_ylim()
    span = max(hi - lo, 1.0)
    ax.set_ylim(lo - 0.05 * span, hi + 0.08 * span)


def accuracy_vs_x(rows, front, path: Path, title: str, xget, xlabel: str, frontier: bool,
                  human_x: bool = False, colors: dict | None = None, ylabel: str = "best top-1 (validation)",
                  frontier_label: str = "Pareto frontier\n(more accuracy, less compute)") -> bool:
    """Rows' `best_top1` (in %) against `xget`; `front` (increasing x) drawn as a staircase when `frontier`."""
    usable = [r for r in rows if xget(r) is not None and r.best_top1 is not None]
    if not usable:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    if _use_log([xget(r) for r in usable]):
        ax.set_xscale("log")
    all_colors = colors or _colors(rows)
    colors = {m: c for m, c in all_colors.items() if any((r.model or "?") == m for r in usable)}
    annotate = {r.run_id for r in usable} if len(usable) <= LABEL_ALL_UP_TO else {r.run_id for r in front}
    labels: list = []
    handles = _scatter(ax, usable, xget, colors, annotate, labels)
    if frontier and front:
        from matplotlib.lines import Line2D

        xs = [xget(r) for r in front]
        ys = [100 * r.best_top1 for r in front]
        # Staircase: from each frontier run, the accuracy holds until the next one buys more.
        sx, sy = [xs[0]], [ys[0]]
        for x, y in zip(xs[1:], ys[1:], strict=True):
            sx += [x, x]
            sy += [sy[-1], y]
        xmax = max(xget(r) for r in usable)
        if xmax > sx[-1]:
            sx.append(xmax)
            sy.append(sy[-1])
        ax.plot(sx, sy, linestyle="--", color=FRONTIER_COLOR, linewidth=1.6, zorder=2)
        ax.scatter(xs, ys, s=220, facecolors="none", edgecolors=FRONTIER_COLOR, linewidths=1.8, zorder=4)
        handles.append(Line2D([], [], linestyle="--", color=FRONTIER_COLOR, marker="o", markerfacecolor="none",
                              markersize=12, label=frontier_label))
    _finish(fig, ax, path, handles, title, xlabel, len(rows) - len(usable), labels, human_x, ylabel)
    return True


def training_curves(front, curves: dict, path: Path, title: str, colors: dict | None = None) -> bool:
    runs = [r for r in front if curves.get(r.run_id, {}).get("val/top1")]
    if not runs:
        return False
    import numpy as np

    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    cmap = plt.get_cmap("tab10")
    model_colors = colors or _colors(runs)
    distinct = len({r.model for r in runs}) == len(runs)
    any_hours = False
    for i, r in enumerate(runs):
        col = model_colors[r.model or "?"] if distinct else cmap(i % 10)
        top1 = curves[r.run_id]["val/top1"]
        steps = [s for s, _ in top1]
        acc = [100 * v for _, v in top1]
        label = _short(r.label, 30) + (" (running)" if r.running else "")
        style = "--" if r.running else "-"
        ax1.plot(steps, acc, style, marker="o", markersize=3.5, color=col, label=label)
        hours = curves[r.run_id].get("compute/accelerator_hours") or []
        if len(hours) >= 1:
            hs = np.array([s for s, _ in hours], dtype=float)
            hv = np.array([v for _, v in hours], dtype=float)
            # accelerator-hours at each evaluation step (logged on a different cadence): interpolate.
            at = np.interp(np.array(steps, dtype=float), np.concatenate([[0.0], hs]), np.concatenate([[0.0], hv]))
            ax2.plot(at, acc, style, marker="o", markersize=3.5, color=col, label=label)
            any_hours = True
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("val top-1")
    ax1.set_title("val top-1 vs step", fontsize=10)
    ax2.set_xlabel("accelerator-hours")
    ax2.set_title("val top-1 vs accelerator-hours", fontsize=10)
    if not any_hours:
        ax2.text(0.5, 0.5, "no compute/accelerator_hours logged", ha="center", transform=ax2.transAxes, color="gray")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.35)
        _percent_axis(ax)
    ax1.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def write_figures(rows, front, curves, out: Path, title: str) -> tuple[list[Path], list[str]]:
    """All report figures into `out`; returns (files written, descriptions of figures skipped for lack of data)."""
    made, skipped = [], []
    n = len(rows)
    colors = _colors(rows)
    specs = [
        ("accuracy_vs_compute.png", lambda r: r.accelerator_hours,
         "accelerator-hours held (wall time x accelerators)", True, f"{title}: accuracy vs compute ({n} runs)", False),
        ("accuracy_vs_throughput.png", lambda r: r.img_per_s_per_device, "throughput (img/s per accelerator)",
         False, f"{title}: accuracy vs throughput", False),
        ("accuracy_vs_params.png", lambda r: r.num_params, "parameters", False, f"{title}: accuracy vs model size",
         True),
    ]
    for name, xget, xlabel, frontier, fig_title, human_x in specs:
        if accuracy_vs_x(rows, front, out / name, fig_title, xget, xlabel, frontier, human_x, colors):
            made.append(out / name)
        else:
            skipped.append(f"{name}: no run has both best top-1 and {xlabel}")
    curve_runs = front or [r for r in rows if r.best_top1 is not None][:5]
    what = "frontier runs" if front else "best runs (no frontier: accelerator-hours missing)"
    if training_curves(curve_runs, curves, out / "training_curves.png", f"{title}: training curves of the {what}",
                       colors=colors):
        made.append(out / "training_curves.png")
    else:
        skipped.append("training_curves.png: no val/top1 history")
    return made, skipped
