"""While the tracking store is away: when to try again, what to say, and the tally of what never arrived.

No MLflow here: RunTracker (tracker.py) reports each failure and each answer, asks `due()` before it sends
again, and hands its buffers to `Unlogged.summary()` at the end of the run.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from pipelines.cli import first_line
from pipelines.redaction import redact

logger = logging.getLogger(__name__)

FIRST_RETRY_S = 2.0


def short(exc: BaseException) -> str:
    """The first line of an error, secret-free and at most 300 characters."""
    msg = first_line(exc) or type(exc).__name__
    return redact(msg if len(msg) <= 300 else msg[:297] + "...")


class Outage:
    """Reachability of one store: warns once per outage (at most once a minute), backs off 2 s doubling to
    `retry_seconds` between tries. Thread-safe: MLflow's confirmations arrive on another thread."""

    def __init__(self, tracking_uri: str, retry_seconds: float):
        self.where, self.retry_seconds = redact(tracking_uri), max(float(retry_seconds), 0.1)
        self.since: float | None = None
        self.count = 0
        self._next_try, self._backoff, self._last_warn = 0.0, min(FIRST_RETRY_S, self.retry_seconds), -1e9
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.since is not None

    def due(self) -> bool:
        """Whether to send now: always while reachable; while away, once the backoff has passed."""
        return self.since is None or time.monotonic() >= self._next_try

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            now = time.monotonic()
            if self.since is None:
                self.since, self.count = now, self.count + 1
                self._backoff = min(FIRST_RETRY_S, self.retry_seconds)
                if now - self._last_warn > 60 or self.count == 1:
                    self._last_warn = now
                    logger.warning(
                        "MLflow tracking at %s is unreachable (%s). Training continues; metrics and params are "
                        "buffered in memory and retried every %.0f-%.0f s; the end-of-run summary lists what could "
                        "not be logged.", self.where, short(exc), self._backoff, self.retry_seconds)
            elif now < self._next_try:
                return  # a batch sent before the outage was noticed: the next try stays as planned
            else:
                self._backoff = min(self._backoff * 2, self.retry_seconds)
            self._next_try = now + self._backoff

    def answered(self) -> None:
        with self._lock:
            if self.since is None:
                return
            took, self.since = time.monotonic() - self.since, None
            self._backoff = min(FIRST_RETRY_S, self.retry_seconds)
        logger.warning("MLflow tracking at %s is reachable again after %.0f s; sending what was buffered",
                       self.where, took)


@dataclass
class Unlogged:
    """What will never reach MLflow; with what is still buffered at the end, the run's "not logged" line."""

    metrics: int = 0
    metric_keys: set[str] = field(default_factory=set)
    params: int = 0
    tags: int = 0
    refused: list[str] = field(default_factory=list)  # refused by MLflow (not an outage)
    model: str | None = None

    def merge(self, other: Unlogged) -> None:
        self.metrics += other.metrics
        self.metric_keys |= other.metric_keys
        self.params += other.params
        self.tags += other.tags
        self.refused += other.refused
        self.model = self.model or other.model

    def summary(self, where: str, run_id: str | None, outages: int, *, buffered_metrics: list[str], params: int,
                tags: int, artifacts: list[str], status: str | None, kept_at: str | None = None,
                kept_artifacts: int = 0) -> str | None:
        """One line (counts per kind, plus the still-buffered ones given), or None when nothing is missing.
        `kept_at`: the replay file that holds the still-buffered metrics, params, tags, status and the
        `kept_artifacts` artifacts whose content the tracker holds (RunTracker.log_artifact_bytes)."""
        keys = sorted(self.metric_keys | set(buffered_metrics))
        parts = []
        if n := self.metrics + len(buffered_metrics):
            parts.append(f"{n} metric values ({', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''})")
        if n := self.params + params:
            parts.append(f"{n} params")
        if n := self.tags + tags:
            parts.append(f"{n} tags")
        if artifacts:
            parts.append(f"{len(artifacts)} artifacts ({', '.join(artifacts[:6])}"
                         f"{', ...' if len(artifacts) > 6 else ''})")
        if self.model:
            parts.append(self.model)
        if status:
            parts.append(f"run status {status}")
        if self.refused:
            parts.append(f"{len(self.refused)} refused by MLflow: " + "; ".join(self.refused[:5])
                         + ("; ..." if len(self.refused) > 5 else ""))
        if not parts:
            return None
        why = " (tracking was unreachable)" if outages else ""
        run = f" for run {run_id}" if run_id else ""
        line = f"not logged to MLflow at {where}{run}{why}: " + "; ".join(parts)
        if kept_at:
            kept = [f"{len(buffered_metrics)} metric values", f"{params} params", f"{tags} tags"]
            kept += [f"{kept_artifacts} artifacts"] if kept_artifacts else []
            line += (f". Kept for replay ({', '.join(kept)}{', the run status' if status else ''}) in {kept_at}; "
                     f"replay into the same run with: python -m orchestrator.tracking.replay {kept_at}")
        return line
