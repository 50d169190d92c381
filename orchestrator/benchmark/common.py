"""What every part of ``python -m orchestrator.benchmark`` shares: interleaved timing, statistics, the table.

The machines these figures come from are noisy (shared CPUs, other jobs' load), so a comparison is never two
separate runs: the cases of one comparison are measured in rounds, each round runs every case once (in an
order rotated from round to round), and each case's figure is the median over the rounds with its spread
(min, max). Ratios between two cases are taken within a round (same load) and then summarised the same way.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

# A training run's progress line (orchestrator/train/loop.py): step, planned steps, img/s of its logging window.
STEP_LINE = re.compile(r"step (\d+)/(\d+) epoch \S+ loss \S+ lr \S+ (\d+) img/s")


def summary(samples: list[float]) -> dict[str, Any]:
    """Median and spread of repeated measurements (all kept, in measurement order)."""
    good = [s for s in samples if math.isfinite(s)]
    if not good:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0, "samples": samples}
    med = statistics.median(good)
    return {
        "median": med,
        "min": min(good),
        "max": max(good),
        "spread_pct": (max(good) - min(good)) / med * 100 if med else float("nan"),
        "n": len(good),
        "samples": [round(s, 6) for s in samples],
    }


def interleaved(
    cases: dict[str, Callable[[], float]], repeats: int, *, warmup: int = 1, sync: Callable[[], None] | None = None,
    cpu_rates: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Rates (units per second) of every case, one sample per case per round, rounds interleaved.

    Each case is a callable doing a fixed amount of work and returning how many units (images, steps) it did.
    ``warmup`` untimed rounds come first. The order of the cases rotates each round, so no case always runs
    right after the same neighbour (caches, thermal state, a competing job's phase).
    With ``cpu_rates`` given, it is filled with units per second of this process's CPU time (all its
    threads): on an oversubscribed machine that figure is not inflated by the time the process waits for a
    core, so it shows the cost of the work itself (wall-clock rates stay the headline figures).
    """
    sync = sync or (lambda: None)
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    sync()
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            units = cases[name]()
            sync()
            rates[name].append(units / (time.perf_counter() - t0))
            if cpu_rates is not None:
                cpu_rates.setdefault(name, []).append(units / max(time.process_time() - c0, 1e-9))
    return rates


def ratios(num: list[float], den: list[float]) -> list[float]:
    """Per-round ratios num[i] / den[i] (both measured in the same round)."""
    return [a / b if b else float("nan") for a, b in zip(num, den, strict=True)]


def machine_info(device: str = "cpu") -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        info["cpu_model"] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan"
        if value == 0:
            return "0"
        mag = abs(value)
        if mag >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{max(digits - 1 - int(math.floor(math.log10(mag))), 0)}f}"
    return str(value)


def spread(s: dict[str, Any]) -> str:
    """'median [min-max]' of a summary()."""
    return f"{fmt(s['median'])} [{fmt(s['min'])}-{fmt(s['max'])}]"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
