"""The README's picture of the step-time breakdown (observe.*), drawn from runs' logged perf/* metrics.

    python docs/observe_figure.py --tracking-uri sqlite:///$HOME/.mixer/mlflow.db \
        --run RUN_ID "loader as is" --run RUN_ID "loader slowed" --out docs/observe_breakdown.png

One column per run: the seconds per step of each phase (perf/<phase>_seconds_mean, the mean over ranks, which
adds up to the ranks' mean step time), stacked per logging window, with perf/step_seconds (the slowest rank) as a
line; below, perf/data_wait_fraction (the most starved rank) and its mean over ranks.
How the committed picture was made: README.md, "Where a run's time goes".
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from orchestrator.observe.step_timer import OTHER, PHASES  # noqa: E402

COLORS = {"data_wait": "#d62728", "forward_backward": "#1f77b4", "optimizer": "#2ca02c",
          "device_augment": "#9467bd", "eval": "#ff7f0e", "checkpoint": "#8c564b", OTHER: "#bbbbbb"}


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def draw(client: MlflowClient, runs: list[tuple[str, str]], out: str) -> None:
    fig, axes = plt.subplots(2, len(runs), figsize=(5.2 * len(runs), 5.6), sharex="col",
                             gridspec_kw={"height_ratios": [2.2, 1]}, squeeze=False)
    for col, (run_id, label) in enumerate(runs):
        top, bottom = axes[0][col], axes[1][col]
        phases = {p: history(client, run_id, f"perf/{p}_seconds_mean") for p in (*PHASES, OTHER)}
        steps = sorted(phases["data_wait"])
        width = (steps[1] - steps[0]) * 0.85 if len(steps) > 1 else 1.0
        base = [0.0] * len(steps)
        for phase, values in phases.items():
            heights = [values.get(s, 0.0) for s in steps]
            if any(heights):
                top.bar(steps, heights, width, bottom=base, color=COLORS[phase], label=phase.replace("_", " "))
                base = [b + h for b, h in zip(base, heights, strict=True)]
        step_s = history(client, run_id, "perf/step_seconds")
        top.plot(steps, [step_s.get(s) for s in steps], "k.-", lw=1, ms=3, label="step (slowest rank)")
        top.set_title(label, fontsize=10)
        top.set_ylabel("seconds per step" if col == 0 else "")
        top.grid(axis="y", alpha=0.3)
        for key, style, name in (("perf/data_wait_fraction", "-", "max over ranks"),
                                 ("perf/data_wait_fraction_mean", "--", "mean over ranks")):
            h = history(client, run_id, key)
            bottom.plot(steps, [h.get(s) for s in steps], style, color=COLORS["data_wait"], label=name)
        bottom.set_ylim(0, 1)
        bottom.set_ylabel("data wait fraction" if col == 0 else "")
        bottom.set_xlabel("step")
        bottom.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[1][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Where a run's time goes: the perf/* step-time breakdown per logging window", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--run", nargs=2, action="append", metavar=("RUN_ID", "LABEL"), required=True)
    parser.add_argument("--out", default="docs/observe_breakdown.png")
    args = parser.parse_args()
    draw(MlflowClient(args.tracking_uri), [tuple(r) for r in args.run], args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
