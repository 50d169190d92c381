"""MLflow tracking for one run, safe to call from a training loop (the driver's tracker, and the one in the
driver-owned actor that rank 0 logs through, relay.py).

    tracker = RunTracker(resolve_tracking_uri(None, "~/.mixer"), "mixer-pretrain", "digits-s")
    run_id = tracker.start()                       # or RunTracker(..., run_id=run_id).start() to continue
    tracker.log_params(flatten_config(cfg.to_dict()))
    tracker.log_metrics({"train/loss": 0.7}, step=10)
    tracker.end("FINISHED"); print(tracker.unlogged_summary() or "everything logged")

How it uses MLflow (checked against MLflow 3.17.2):
- Metrics go through MLflow's asynchronous logging, `MlflowClient.log_batch(..., synchronous=False)`: the call
  returns at once and MLflow's threads send the batch. MLflow's queue does not keep a batch that failed (its
  RunOperations future raises and the data is gone, mlflow/utils/async_logging/async_logging_queue.py), so
  until MLflow confirms a batch the tracker keeps it: a failed batch returns to a bounded buffer (the newest
  MAX_BUFFERED_METRICS points) and is handed to MLflow again once the backoff has passed (outage.py).
- Params, tags, artifacts and the run status are few: sent synchronously, so MLflow's error code tells a
  refusal (counted, never retried) from an outage (kept and sent again once the store answers).
- HTTP retries and timeouts are MLflow's own (MLFLOW_HTTP_REQUEST_*), set once per process (store.py); there is
  no retry loop of ours around a request. What is ours is what comes after MLflow gives up on one, because
  MLflow keeps nothing then: the outage buffer and its backoff (outage.py; MLflow's async queue drops a failed
  batch), the relay actor that keeps rank 0's buffer past a worker's death (relay.py) and the replay file that
  keeps it past the run (replay.py).
- A metric point below the highest step already taken for its key, or at it with the same value, is dropped:
  a loop restarted from a checkpoint re-sends the steps between that checkpoint and the crash, which were
  logged already. A new value at the highest step (a figure updated at the end of the run) is kept.
- Nothing raises into the training loop; `unlogged_summary()` counts exactly what never reached MLflow, and
  `pending()` gives what is still unlogged as plain data (replay.py writes it next to the checkpoints).
- Secrets never reach MLflow or a log line (pipelines.redaction). `import mlflow` (~2 s) waits for start().
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from orchestrator.config.tree import mixer_home
from orchestrator.tracking.artifacts import ArtifactLogging
from orchestrator.tracking.limits import (
    MAX_KEY_LENGTH,
    MAX_TAG_VAL_LENGTH,
    METRICS_PER_REQUEST,
    PARAM_VALUE_LIMIT,
    stringify,
    truncate,
)
from orchestrator.tracking.outage import Outage, Unlogged, short
from orchestrator.tracking.store import (
    TrackingUnreachableError,
    ensure_experiment,
    is_refused,
    resolve_tracking_uri,
    use_bounded_http_retries,
)
from pipelines.redaction import filter_secrets, redact

logger = logging.getLogger(__name__)

MAX_BUFFERED_METRICS = 200_000  # points kept while the store is away (~100 bytes each)
MAX_BUFFERED_PARAMS_TAGS = 10_000


class RunTracker(ArtifactLogging):
    """One MLflow run, logged from one thread (its buffers are shared, under a lock, only with the thread
    that waits for MLflow's confirmations)."""

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str, run_id: str | None = None,
                 tags: dict | None = None, parent_run_id: str | None = None, retry_seconds: float = 30.0):
        self.tracking_uri = tracking_uri or resolve_tracking_uri(None, str(mixer_home()))
        self.experiment, self.run_name, self.run_id = experiment, run_name, run_id
        self.experiment_id: str | None = None
        self.parent_run_id = parent_run_id
        # a continued run's goodput/* totals and world_sizes tag, read by tracking.run.open_run (else empty)
        self.earlier_goodput: dict = {}
        self._init_tags = dict(tags or {})
        self._client = None
        self.retry_seconds = retry_seconds
        self._outage = Outage(self.tracking_uri, retry_seconds)
        self._lost = Unlogged()
        self._lock = threading.RLock()
        self._metrics: collections.deque = collections.deque()  # mlflow Metric entities not yet sent
        self._in_flight: list[list] = []  # [confirmation future, its metrics]: sent, not yet confirmed
        self._confirmer: ThreadPoolExecutor | None = None
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._calls: list[tuple[str, Callable[[], Any]]] = []  # artifact calls kept for later (label, call)
        self._blobs: dict[str, bytes] = {}  # artifact file -> content not yet logged (log_artifact_bytes)
        self._status: str | None = None  # RUNNING to set on resume, or the final status, until it is set
        self._ended = False
        # The highest step taken per metric key: a loop restarted from a checkpoint sends the steps between
        # that checkpoint and the crash again; they were logged already and are dropped, not logged twice.
        self._last_step: dict[str, int] = {}
        self._last_value: dict[str, float] = {}
        self.kept_at: str | None = None  # the replay file holding what was not logged (replay.py)

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            use_bounded_http_retries()
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    @property
    def is_down(self) -> bool:
        return self._outage.down

    def is_reachable(self) -> bool:
        """`not is_down` as a method: what a caller of the relay actor can wait for (RelayedTracker.sync)."""
        return not self._outage.down

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Create the run (or continue `run_id`), set its experiment, and return the run id.

        Creating a run needs the store: an unreachable one raises TrackingUnreachableError naming the URI.
        Continuing a run does not: if the store is down the tracker buffers and sets the run RUNNING later.
        """
        tags = self._clean(self._init_tags, "tags")
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        where = redact(self.tracking_uri)
        if self.run_id is not None:
            try:
                self._set_running()
            except Exception as e:
                if is_refused(e):
                    raise TrackingUnreachableError(
                        f"cannot continue MLflow run {self.run_id} at {where}: {short(e)}") from None
                self._status = "RUNNING"
                self._outage.failed(e)
            self.set_tags(tags)
            return self.run_id
        try:
            self.experiment_id = ensure_experiment(self.client, self.experiment)
            run = self.client.create_run(self.experiment_id, run_name=self.run_name,
                                         tags={k: truncate(v, MAX_TAG_VAL_LENGTH) for k, v in tags.items()})
        except Exception as e:
            raise TrackingUnreachableError(
                f"cannot create an MLflow run in experiment {self.experiment!r} at {where}: {short(e)}") from None
        self.run_id = run.info.run_id
        return self.run_id

    def _set_running(self) -> None:
        run = self.client.get_run(self.run_id)
        self.experiment_id = run.info.experiment_id
        if run.info.status != "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")

    def end(self, status: str | None = "FINISHED") -> None:
        """Send what is left (one last try, ignoring the backoff), then set the run's final status (None: leave
        it as it is, for a tracker that adds to another process's run without start())."""
        if self.run_id is None:
            return
        self._status = status
        self.flush(force=True)
        self._ended = True
        if self._confirmer is not None:
            self._confirmer.shutdown(wait=False)
            self._confirmer = None

    # ------------------------------------------------------------------ logging calls (never raise)

    def log_params(self, params: dict) -> None:
        for k, v in self._clean(params, "params").items():
            if len(k) > MAX_KEY_LENGTH:
                self._lost.refused.append(f"param {k[:40]}... (key longer than {MAX_KEY_LENGTH})")
            else:
                self._params[k] = truncate(v, PARAM_VALUE_LIMIT)
        self._bound(self._params, "params")
        self.flush()

    def set_tags(self, tags: dict) -> None:
        for k, v in self._clean(tags, "tags").items():
            self._tags[k] = truncate(v, MAX_TAG_VAL_LENGTH)
        self._bound(self._tags, "tags")
        self.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = []
        for k, v in metrics.items():
            key, last = str(k), self._last_step.get(str(k), -1)
            try:
                value = float(v.item() if hasattr(v, "item") else v)
            except (TypeError, ValueError):
                self._lost.refused.append(f"metric {k} (not a number: {type(v).__name__})")
                continue
            if int(step) < last or (int(step) == last and value == self._last_value.get(key)):
                continue
            points.append(Metric(key, value, now, int(step)))
            self._last_step[key], self._last_value[key] = int(step), value
        self._buffer_metrics(points)
        self.flush()

    def _clean(self, items: dict, kind: str) -> dict[str, str]:
        kept, dropped = filter_secrets({str(k): stringify(v) for k, v in items.items()})
        if dropped:
            logger.info("not logging %d secret-looking %s to MLflow: %s", len(dropped), kind, ", ".join(sorted(dropped)))
        return kept

    # ------------------------------------------------------------------ sending

    def flush(self, force: bool = False) -> bool:
        """Send what is buffered; True when nothing is left. Without force, respects the retry backoff and
        does not wait for MLflow's confirmation of the metrics; with force, waits for it."""
        if self.run_id is None or not (force or self._outage.due()):
            return not self._has_pending()
        try:
            if self._status == "RUNNING":
                self._sync(self._set_running)
                self._status = None
            self._send_params_and_tags()
            while self._calls:
                self._sync(self._calls[0][1], label=self._calls[0][0])
                self._calls.pop(0)
        except Exception as e:  # the store is away: everything stays, the next try comes after the backoff
            self._outage.failed(e)
            return False
        self._send_metrics()
        if force:
            for confirmation, _ in list(self._in_flight):
                confirmation.exception()  # waits; _confirm handles the outcome
        if self._status and not self._has_pending(status=False) and not self.is_down:
            try:
                self._sync(lambda: self.client.set_terminated(self.run_id, status=self._status))
                self._status = None
            except Exception as e:
                self._outage.failed(e)
        return not self._has_pending()

    def _has_pending(self, status: bool = True) -> bool:
        return bool(self._metrics or self._in_flight or self._params or self._tags or self._calls
                    or (status and self._status))

    def _send_params_and_tags(self) -> None:
        """Synchronously; a refused batch is retried item by item so one bad item does not lose the others."""
        from mlflow.entities import Param, RunTag

        while self._params or self._tags:
            params = [Param(k, v) for k, v in list(self._params.items())[:100]]
            tags = [RunTag(k, v) for k, v in list(self._tags.items())[:100]]
            if not self._sync(lambda p=params, t=tags: self.client.log_batch(self.run_id, params=p, tags=t),
                              refusal_counted=False):
                for kind, item in [("param", p) for p in params] + [("tag", t) for t in tags]:
                    if not self._sync(lambda i=item, k=kind: self.client.log_batch(self.run_id, **{f"{k}s": [i]}),
                                      label=f"{kind} {item.key}"):
                        setattr(self._lost, f"{kind}s", getattr(self._lost, f"{kind}s") + 1)
            for p in params:
                self._params.pop(p.key)
            for t in tags:
                self._tags.pop(t.key)

    def _sync(self, call: Callable[[], Any], label: str = "", refusal_counted: bool = True) -> bool:
        """One synchronous MLflow call. True when it went through; False when MLflow refused it (counted under
        `label` unless refusal_counted=False); an outage raises (the caller keeps what it was sending)."""
        try:
            call()
        except Exception as e:
            if not is_refused(e):
                raise
            if refusal_counted:
                self._lost.refused.append(f"{label} ({short(e)})")
                logger.warning("MLflow refused %s: %s", label, short(e))
            return False
        self._outage.answered()
        return True

    def _call_or_keep(self, label: str, call: Callable[[], Any]) -> None:
        """Run a synchronous call (an artifact) now, or keep it for the next flush while the store is away."""
        self._calls.append((label, call))
        self.flush()

    def _send_metrics(self) -> None:
        """Hand the buffered points to MLflow's asynchronous logging; _confirm learns how each batch went."""
        with self._lock:
            points = list(self._metrics)
            self._metrics.clear()
        if points and self._confirmer is None:
            self._confirmer = ThreadPoolExecutor(1, thread_name_prefix="mixer-mlflow-confirm")
        # One request per call (MLflow's batch limit), so a failure means that whole batch was not logged.
        for i in range(0, len(points), METRICS_PER_REQUEST):
            batch = points[i:i + METRICS_PER_REQUEST]
            try:
                ops = self.client.log_batch(self.run_id, metrics=batch, synchronous=False)
            except Exception as e:  # MLflow did not take it: kept, like a batch that failed
                self._buffer_metrics(points[i:], older=True)
                self._outage.failed(e)
                return
            entry: list = [None, batch]
            with self._lock:  # _confirm removes the entry: it must be listed first
                entry[0] = self._confirmer.submit(self._confirm, ops, entry)
                self._in_flight.append(entry)

    def _confirm(self, ops, entry: list) -> None:
        """(confirming thread) Wait for MLflow's RunOperations; a failed batch goes back to the buffer."""
        try:
            ops.wait()
        except Exception as e:
            with self._lock:  # both at once: unlogged_summary() counts them in one place or the other
                self._in_flight.remove(entry)
                self._buffer_metrics(entry[1], older=True)
            self._outage.failed(e)
            return
        with self._lock:
            self._in_flight.remove(entry)
        self._outage.answered()

    def _buffer_metrics(self, points: list, older: bool = False) -> None:
        """Keep the newest MAX_BUFFERED_METRICS points not yet sent; count the dropped ones."""
        with self._lock:
            if older:  # a failed batch: its points come before anything logged since
                self._metrics.extendleft(reversed(points))
            else:
                self._metrics.extend(points)
            while len(self._metrics) > MAX_BUFFERED_METRICS:
                self._lost.metrics += 1
                self._lost.metric_keys.add(self._metrics.popleft().key)

    # ------------------------------------------------------------------ what is not logged, as plain data

    def pending(self) -> dict:
        """What is not logged yet (after waiting for MLflow's confirmations): metrics as [key, value,
        timestamp, step], params, tags, and the final status if the run ended without it being set."""
        for confirmation, _ in list(self._in_flight):
            confirmation.exception()  # waits; a failed batch returns to the buffer
        with self._lock:
            metrics = [[m.key, m.value, m.timestamp, m.step] for m in self._metrics]
        return {"metrics": metrics, "params": dict(self._params), "tags": dict(self._tags),
                "artifacts": dict(self._blobs), "status": self._status if self._ended else None}

    def hand_over(self) -> tuple[dict, Unlogged, int]:
        """(pending(), the tally of what was lost, the number of outages), taken out of this tracker: how the
        driver's relay actor (relay.py) passes its leftovers to the driver's tracker (adopt)."""
        state = self.pending()
        with self._lock:
            self._metrics.clear()
        self._params, self._tags = {}, {}
        self._calls = [(label, call) for label, call in self._calls if label not in self._blobs]
        self._blobs = {}
        lost, self._lost = self._lost, Unlogged()
        return state, lost, self._outage.count

    def adopt(self, state: dict, lost: Unlogged | None = None, outages: int = 0) -> None:
        """Take over another tracker's leftovers (hand_over, or a replay file) for this run: sent with this
        tracker's next flush, or counted in its summary."""
        from mlflow.entities import Metric

        self._buffer_metrics([Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in state["metrics"]],
                             older=True)
        self._params = {**state["params"], **self._params}
        self._tags = {**state["tags"], **self._tags}
        for artifact_file, data in state.get("artifacts", {}).items():
            self.log_artifact_bytes(data, artifact_file)
        if lost is not None:
            self._lost.merge(lost)
        self._outage.count += outages

    def _bound(self, d: dict, kind: str) -> None:
        while len(d) > MAX_BUFFERED_PARAMS_TAGS:
            d.pop(next(iter(d)))
            setattr(self._lost, kind, getattr(self._lost, kind) + 1)

    def unlogged_summary(self) -> str | None:
        """What never reached MLflow (counts per kind), or None when everything was logged."""
        with self._lock:
            keys = [m.key for m in self._metrics] + [m.key for _, batch in self._in_flight for m in batch]
        return self._lost.summary(
            redact(self.tracking_uri), self.run_id, self._outage.count, buffered_metrics=keys,
            params=len(self._params), tags=len(self._tags), artifacts=[label for label, _ in self._calls],
            status=self._status if self._ended else None, kept_at=self.kept_at, kept_artifacts=len(self._blobs))
