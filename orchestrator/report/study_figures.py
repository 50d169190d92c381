"""The studies' figures (matplotlib, Agg), in the report's conventions (figures.py): y is top-1 in %, one colour
per model. Model-scale reuses the report's accuracy-vs-x figure with its Pareto frontier; data-scale and
permutation have their own (lines over the data fraction, bars per permutation)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.report import figures
from orchestrator.report.table import pareto_frontier

Y_LABEL = "final top-1 (validation)"


def draw(kind: str, rows, out: Path, name: str) -> dict[str, int]:
    """The figures of a study of `kind` into `out`; file name -> points drawn on it (figures with none are left out)."""
    plotted = [r.plotted() for r in rows]
    if kind == "model-scale":
        return _model_scale(plotted, out, name)
    if kind == "data-scale":
        return _drawn("accuracy_vs_data.png", accuracy_vs_data(rows, out / "accuracy_vs_data.png", name))
    return _drawn("permutation.png", permutation_bars(rows, out / "permutation.png", name))


def _drawn(file: str, n: int) -> dict[str, int]:
    return {file: n} if n else {}


def _model_scale(rows, out: Path, name: str) -> dict[str, int]:
    colors = figures._colors(rows)
    specs = [
        ("accuracy_vs_flops.png", lambda r: r.total_flops, "total training FLOPs", True, True),
        ("accuracy_vs_compute.png", lambda r: r.accelerator_hours, "accelerator-hours held (wall time x accelerators)",
         True, False),
        ("accuracy_vs_throughput.png", lambda r: r.img_per_s_per_device, "throughput (img/s per accelerator)",
         False, False),
    ]
    drawn = {}
    for file, xget, xlabel, with_frontier, human_x in specs:
        front = pareto_frontier(rows, cost=xget, value=lambda r: r.best_top1) if with_frontier else []
        if figures.accuracy_vs_x(rows, front, out / file, f"{name}: top-1 vs {xlabel.split(' (')[0]}", xget, xlabel,
                                 with_frontier, human_x, colors, ylabel=Y_LABEL):
            drawn[file] = sum(1 for r in rows if xget(r) is not None and r.best_top1 is not None)
    return drawn


def accuracy_vs_data(rows, path: Path, name: str) -> int:
    """Top-1 against the training fraction (log x), one line per model; returns the points drawn."""
    usable = [r for r in rows if r.top1 is not None and r.facets.get("fraction")]
    if not usable:
        return 0
    plt = figures._plt()
    fig, ax = plt.subplots(figsize=figures.FIGSIZE)
    colors = figures._colors([r.plotted() for r in usable])
    for model in dict.fromkeys(r.facets["model"] for r in usable):
        pts = sorted((r.facets["fraction"], 100 * r.top1) for r in usable if r.facets["model"] == model)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=colors[model], markeredgecolor="black",
                markeredgewidth=0.6, markersize=8, label=model)
    fractions = sorted({r.facets["fraction"] for r in usable})
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{100 * f:g}%" for f in fractions])
    ax.minorticks_off()
    steps = {r.facets.get("steps") for r in usable}
    per_point = f"every point {steps.pop():,} steps" if len(steps) == 1 else "steps differ between points"
    ax.set_xlabel(f"fraction of the training split ({per_point}: fewer samples, more epochs)")
    ax.set_ylabel(Y_LABEL)
    figures._percent_axis(ax)
    ax.grid(True, alpha=0.35)
    ax.legend(title="model", loc="lower right", fontsize=9)
    ax.set_title(f"{name}: top-1 vs pre-training data at equal compute ({len(usable)} runs)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=figures.DPI)
    plt.close(fig)
    return len(usable)


def permutation_bars(rows, path: Path, name: str) -> int:
    """Top-1 per data.permute mode, one group of bars per model; returns the bars drawn."""
    usable = [r for r in rows if r.top1 is not None and r.facets.get("mode")]
    if not usable:
        return 0
    plt = figures._plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    modes = list(dict.fromkeys(r.facets["mode"] for r in usable))
    models = list(dict.fromkeys(r.facets["model"] for r in usable))
    cmap = plt.get_cmap("tab10")
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        for i, model in enumerate(models):
            hit = [r for r in usable if r.facets["model"] == model and r.facets["mode"] == mode]
            if not hit:
                continue
            y = 100 * hit[0].top1
            x = i + (j - (len(modes) - 1) / 2) * width
            ax.bar(x, y, width * 0.9, color=cmap(j), edgecolor="black", linewidth=0.6, label=mode if i == 0 else None)
            ax.annotate(f"{y:.1f}%", (x, y), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=9)
    ax.set_xticks(range(len(models)), models)
    ax.set_xlabel("model")
    ax.set_ylabel(Y_LABEL)
    figures._percent_axis(ax)
    ax.set_ylim(0, 105)
    ax.grid(True, axis="y", alpha=0.35)
    ax.legend(title="data.permute", loc="lower right", fontsize=9)
    ax.set_title(f"{name}: top-1 under a fixed input permutation ({len(usable)} runs)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=figures.DPI)
    plt.close(fig)
    return len(usable)
