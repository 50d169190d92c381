"""MLflow tracking for one training run, safe to call from the training loop (rank 0 only).

    tracker = RunTracker(resolve_tracking_uri(None, "~/.mixer"), "mixer-pretrain", "digits-s")
    run_id = tracker.start()                       # or RunTracker(..., run_id=run_id).start() to continue
    tracker.log_params(flatten_config(cfg.to_dict()))
    tracker.log_metrics({"train/loss": 0.7}, step=10)
    tracker.end("FINISHED"); print(tracker.unlogged_summary() or "everything logged")

What it guarantees:
- A tracking server that becomes unreachable never stops training. One call fails within a few seconds
  (MLflow's own HTTP retries, minutes by default, are capped for our calls), the tracker warns once, keeps
  metrics/params/tags (and small artifacts, spooled to a temp dir) in bounded buffers, retries with backoff
  (never more often than every couple of seconds), flushes when the server answers again, and
  `unlogged_summary()` says at the end what never reached MLflow.
- Secrets never reach MLflow or a log line: params/tags/dict keys that look secret (key, secret, token,
  password, credential) are dropped, values that look like AWS keys, URL passwords or the value of a secret
  environment variable are masked.
- `import mlflow` (~2 s) happens only when a tracker starts, never at import of this module.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config.tree import mixer_home
from pipelines.redaction import filter_secrets, redact

logger = logging.getLogger(__name__)

# MLflow's limits (mlflow/utils/validation.py, 3.17).
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
# Older servers (MLflow < 2) still limit param values to 500 chars: stay below that so every server accepts them.
PARAM_VALUE_LIMIT = 500
TRUNCATION_MARK = "...[truncated]"

# Buffers while the server is unreachable (metric points are ~100 bytes each).
MAX_BUFFERED_METRICS = 200_000
MAX_BUFFERED_PARAMS_TAGS = 10_000
MAX_SPOOLED_ARTIFACT_BYTES = 256 * 2**20

# Per-request limits for logging calls (MLflow reads these env vars on every request).
REQUEST_TIMEOUT_S = 3
ARTIFACT_REQUEST_TIMEOUT_S = 120
START_REQUEST_TIMEOUT_S = 20
FIRST_RETRY_S = 2.0


# ------------------------------------------------------------------------------------------ helpers -------


def flatten_config(cfg: dict, prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": "value"}; lists and scalars are stringified; empty dicts are kept as "{}"."""
    out: dict[str, str] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if v:
                out.update(flatten_config(v, prefix=f"{key}."))
            else:
                out[key] = "{}"
        else:
            out[key] = _stringify(v)
    return out


def _stringify(v: Any) -> str:
    if v is None:
        return "None"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_stringify(x) for x in v) + "]"
    return str(v)


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def resolve_tracking_uri(uri: str | None, default_dir: str) -> str:
    """The tracking URI to use: `uri`, else $MLFLOW_TRACKING_URI, else sqlite:///<default_dir>/mlflow.db.

    Relative sqlite paths and bare filesystem paths are made absolute (Ray workers run in another cwd):
    "runs/mlflow.db" -> sqlite:////abs/runs/mlflow.db, "some/dir" -> sqlite:////abs/some/dir/mlflow.db.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if not uri:
        path = Path(default_dir).expanduser().resolve() / "mlflow.db"
        return f"sqlite:///{path}"
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///"):]
        if rest and not rest.startswith("/") and rest != ":memory:":
            return f"sqlite:///{Path(rest).expanduser().resolve()}"
        return uri
    if "://" not in uri and not uri.startswith(("file:", "databricks", "uc:")):
        p = Path(uri).expanduser().resolve()
        if p.suffix != ".db":
            p = p / "mlflow.db"
        return f"sqlite:///{p}"
    return uri


class TrackingUnreachableError(RuntimeError):
    """The tracking store cannot be used; the message names the (redacted) URI and what to change."""


def check_tracking_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail fast (within `timeout` seconds) with a clear message when the tracking store cannot be used.

    http(s): the server's /health endpoint must answer; sqlite: the database's directory must be writable
    (it is created if missing). Other schemes (postgresql://, databricks) are left to MLflow.
    """
    shown = redact(uri)
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        req = urllib.request.Request(url, method="GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                resp.read(64)
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise TrackingUnreachableError(
                    f"MLflow tracking server {shown} refused the request (HTTP {e.code}); set "
                    "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
                ) from None
            if e.code >= 500:
                raise TrackingUnreachableError(
                    f"MLflow tracking server {shown} answered HTTP {e.code} on /health; is it healthy?"
                ) from None
            # Any other answer (e.g. 404 behind a proxy) means something is listening there.
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingUnreachableError(
                f"MLflow tracking server {shown} is unreachable ({redact(str(reason))}) within {timeout:.0f} s; "
                "start it (mlflow server --host ... --port ...), fix tracking.uri / MLFLOW_TRACKING_URI, "
                "or set tracking.enabled=false"
            ) from None
        return
    if scheme == "sqlite":
        rest = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if not rest or rest == ":memory:":
            return
        db = Path(rest)
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingUnreachableError(
                f"cannot create the directory of the MLflow store {shown}: {e.strerror}"
            ) from None
        target = db if db.exists() else db.parent
        if not os.access(target, os.W_OK):
            raise TrackingUnreachableError(
                f"the MLflow store {shown} is not writable ({target}); choose another tracking.uri or MIXER_HOME"
            )
        return
    if scheme == "file":
        d = Path(urllib.parse.urlparse(uri).path)
        if d.exists() and not os.access(d, os.W_OK):
            raise TrackingUnreachableError(f"the MLflow store {shown} is not writable")


@contextmanager
def _env(**names: str):
    """Set environment variables for the calls inside only (MLflow reads them on every request)."""
    names = {k: v for k, v in names.items() if v}
    old = {k: os.environ.get(k) for k in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _http_limits(timeout: int, retries: int):
    """Cap MLflow's HTTP retries/timeout (by default it retries for minutes) for the calls inside."""
    return _env(MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout), MLFLOW_HTTP_REQUEST_MAX_RETRIES=str(retries),
                MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")


# Error codes that mean "this request will never succeed" (drop it, count it) rather than "try again later".
_PERMANENT_CODES = {
    "INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "MALFORMED_REQUEST", "NOT_FOUND",
    "RESOURCE_CONFLICT", "ENDPOINT_NOT_FOUND", "INVALID_REQUEST",
}


def _is_permanent(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", None)
    return code in _PERMANENT_CODES


def _short(exc: BaseException) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return redact(_truncate(msg, 300))


# ------------------------------------------------------------------------------------------ the tracker ---


@dataclass
class _Artifact:
    local_path: str
    artifact_path: str | None
    label: str
    spooled: bool = False


@dataclass
class _Unlogged:
    metrics: int = 0
    params: int = 0
    tags: int = 0
    artifacts: list[str] = field(default_factory=list)
    metric_keys: set[str] = field(default_factory=set)
    rejected: list[str] = field(default_factory=list)  # refused by MLflow (not a connectivity problem)
    status: str | None = None
    model: str | None = None


class RunTracker:
    """One MLflow run, logged from one process. Thread-unsafe by design: call it from the training thread."""

    def __init__(
        self,
        tracking_uri: str | None,
        experiment: str,
        run_name: str,
        run_id: str | None = None,
        tags: dict | None = None,
        parent_run_id: str | None = None,
        retry_seconds: float = 30.0,
        request_timeout: int = REQUEST_TIMEOUT_S,
    ):
        self.tracking_uri = tracking_uri or resolve_tracking_uri(None, str(mixer_home()))
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = run_id
        self.experiment_id: str | None = None
        self._init_tags = dict(tags or {})
        self.parent_run_id = parent_run_id
        self.retry_seconds = max(float(retry_seconds), 0.1)
        self.request_timeout = int(request_timeout)
        self._client = None
        self._metrics: collections.deque = collections.deque()
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._artifacts: list[_Artifact] = []
        self._spool_dir: str | None = None
        self._spool_bytes = 0
        self._pending_status: str | None = None  # RUNNING to set on resume, or the final status
        self._pending_start = False
        self._down = False
        self._down_since: float | None = None
        self._next_retry = 0.0
        self._backoff = min(FIRST_RETRY_S, self.retry_seconds)
        self._last_warn = -1e9
        self._outages = 0
        self._dropped = _Unlogged()
        self._ended = False

    # ------------------------------------------------------------------ lifecycle

    def _get_client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _limits(self, artifact: bool = False, start: bool = False):
        if artifact:
            return _http_limits(ARTIFACT_REQUEST_TIMEOUT_S, 1)
        if start:  # before training: a slow (not dead) server may take its time
            return _http_limits(max(START_REQUEST_TIMEOUT_S, self.request_timeout), 1)
        return _http_limits(self.request_timeout, 0)

    def start(self) -> str:
        """Create the run (or continue `run_id`), set its experiment, and return the run id.

        Creating a run needs the store: an unreachable one raises TrackingUnreachableError naming the URI.
        Continuing a run does not: if the store is down the tracker buffers and sets the run RUNNING later.
        """
        client = self._get_client()
        tags, dropped = filter_secrets({k: _stringify(v) for k, v in self._init_tags.items()})
        self._note_secret_drops("tags", dropped)
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        if self.run_id is not None:
            try:
                with self._limits(start=True):
                    run = client.get_run(self.run_id)
                    self.experiment_id = run.info.experiment_id
                    if run.info.status != "RUNNING":
                        client.update_run(self.run_id, status="RUNNING")
            except Exception as e:
                if _is_permanent(e):
                    raise TrackingUnreachableError(
                        f"cannot continue MLflow run {self.run_id} at {redact(self.tracking_uri)}: {_short(e)}"
                    ) from None
                self._pending_status = "RUNNING"
                self._went_down(e)
            if tags:
                self.set_tags(tags)
            return self.run_id
        try:
            with self._limits(start=True):
                self.experiment_id = self._ensure_experiment(client)
                run = client.create_run(self.experiment_id, run_name=self.run_name,
                                        tags={k: _truncate(v, MAX_TAG_VAL_LENGTH) for k, v in tags.items()})
        except Exception as e:
            raise TrackingUnreachableError(
                f"cannot create an MLflow run in experiment {self.experiment!r} at {redact(self.tracking_uri)}: "
                f"{_short(e)}"
            ) from None
        self.run_id = run.info.run_id
        return self.run_id

    def _ensure_experiment(self, client) -> str:
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        artifact_location = None
        if self.tracking_uri.startswith("sqlite:///"):
            # MLflow's default (./mlruns) is relative to the cwd, which differs between driver and Ray workers.
            db_dir = Path(self.tracking_uri[len("sqlite:///"):]).parent
            artifact_location = (db_dir / "artifacts" / _safe_dirname(self.experiment)).as_uri()
        try:
            return client.create_experiment(self.experiment, artifact_location=artifact_location)
        except Exception as e:  # another process created it first
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise e from None
            return exp.experiment_id

    def end(self, status: str = "FINISHED") -> None:
        """Flush what is buffered (one last try, ignoring the backoff), then set the run's final status."""
        if self.run_id is None:
            return
        self._pending_status = status
        self.flush(force=True)
        self._ended = True
        if self._pending_status is not None:
            self._dropped.status = status
        if self._spool_dir and not self._artifacts:
            shutil.rmtree(self._spool_dir, ignore_errors=True)
            self._spool_dir = None

    # ------------------------------------------------------------------ logging calls (never raise)

    def log_params(self, params: dict) -> None:
        items = {str(k): _stringify(v) for k, v in params.items()}
        items, dropped = filter_secrets(items)
        self._note_secret_drops("params", dropped)
        for k, v in items.items():
            if len(k) > MAX_KEY_LENGTH:
                self._dropped.rejected.append(f"param {k[:40]}... (key longer than {MAX_KEY_LENGTH})")
                continue
            self._params[k] = _truncate(v, PARAM_VALUE_LIMIT)
        self._bound_dicts()
        self._maybe_flush()

    def set_tags(self, tags: dict) -> None:
        items = {str(k): _stringify(v) for k, v in tags.items()}
        items, dropped = filter_secrets(items)
        self._note_secret_drops("tags", dropped)
        for k, v in items.items():
            self._tags[k] = _truncate(v, MAX_TAG_VAL_LENGTH)
        self._bound_dicts()
        self._maybe_flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from_ts = int(time.time() * 1000)
        for k, v in metrics.items():
            try:
                value = float(v.item() if hasattr(v, "item") else v)
            except (TypeError, ValueError):
                self._dropped.rejected.append(f"metric {k} (not a number: {type(v).__name__})")
                continue
            self._metrics.append((str(k), value, from_ts, int(step)))
        overflow = len(self._metrics) - MAX_BUFFERED_METRICS
        for _ in range(max(overflow, 0)):
            key = self._metrics.popleft()[0]
            self._dropped.metrics += 1
            self._dropped.metric_keys.add(key)
        self._maybe_flush()

    def log_dict(self, obj, artifact_file: str) -> None:
        """A dict as YAML (.yaml/.yml) or JSON (anything else), with secret keys dropped and values masked."""
        obj = redact(obj)
        path = self._spool_path(artifact_file)
        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)
        else:
            import json

            text = json.dumps(obj, indent=2, default=str)
        Path(path).write_text(text)
        self._queue_artifact(path, artifact_file, spooled=True)

    def log_figure(self, fig, artifact_file: str) -> None:
        path = self._spool_path(artifact_file)
        try:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        except Exception as e:
            logger.warning("could not render figure %s: %s", artifact_file, _short(e))
            self._dropped.rejected.append(f"figure {artifact_file} ({_short(e)})")
            return
        finally:
            try:
                import matplotlib.pyplot as plt

                plt.close(fig)
            except Exception:
                pass
        self._queue_artifact(path, artifact_file, spooled=True)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """A local file (text files are scrubbed of secrets first) or directory, under `artifact_path`."""
        p = Path(local_path)
        if not p.exists():
            self._dropped.rejected.append(f"artifact {local_path} (no such file)")
            logger.warning("artifact %s does not exist; not logged", redact(local_path))
            return
        if p.is_file() and _is_text_file(p):
            text = p.read_text(errors="replace")
            clean = redact(text)
            if clean != text:
                path = self._spool_path(p.name)
                Path(path).write_text(clean)
                dest = f"{artifact_path}/{p.name}" if artifact_path else p.name
                self._queue_artifact(path, dest, spooled=True)
                return
        dest = f"{artifact_path}/{p.name}" if artifact_path else p.name
        self._artifacts.append(_Artifact(str(p), artifact_path, dest))
        self._maybe_flush()

    def log_model(self, model, input_example) -> str:
        """Log the model as MLflow's pytorch flavour (torch.export, "pt2", with the input example).

        If torch.export cannot trace the model, the state_dict is logged instead as model/state_dict.pt
        (load with torch.load(weights_only=True), no pickled code) and a warning says so.
        Returns "pt2", "state_dict", or "not logged".
        """
        if self.run_id is None:
            return "not logged"
        self.flush(force=True)
        if self._down:
            self._dropped.model = "model (tracking unreachable)"
            return "not logged"
        import mlflow
        import torch
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        if isinstance(input_example, torch.Tensor):  # a numpy example gives the TensorSpec signature pt2 needs
            input_example = input_example.detach().cpu().numpy()
        if getattr(input_example, "ndim", 0) >= 1 and input_example.shape[0] == 1:
            # torch.export specialises a batch dimension of 1: the logged model would accept only batch 1.
            import numpy as np

            input_example = np.concatenate([input_example, input_example])
        try:
            # The LoggedModel goes to the experiment in MLFLOW_EXPERIMENT_ID (else "Default", whose sqlite
            # artifact root is ./mlruns in the cwd): point it at this run's experiment for this call only.
            with self._limits(artifact=True), _env(MLFLOW_EXPERIMENT_ID=self.experiment_id or ""), \
                    _use_tracking_uri(self.tracking_uri):
                mlflow.pytorch.log_model(
                    model, name="model", input_example=input_example, run_id=self.run_id,
                    serialization_format="pt2",
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
                )
            return "pt2"
        except Exception as e:
            if not _is_permanent(e) and _is_connectivity_error(e):
                self._went_down(e)
                self._dropped.model = "model (tracking unreachable)"
                return "not logged"
            logger.warning(
                "MLflow could not log the model with torch.export (%s: %s); logging its state_dict as "
                "model/state_dict.pt instead (torch.load(..., weights_only=True))", type(e).__name__, _short(e),
            )
        path = self._spool_path("state_dict.pt")
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
        self._queue_artifact(path, "model/state_dict.pt", spooled=True)
        self.set_tags({"mixer.model_format": "state_dict (torch.export failed)"})
        return "state_dict"

    # ------------------------------------------------------------------ flushing

    def flush(self, force: bool = False) -> bool:
        """Send what is buffered; True when nothing is left. Without force, respects the retry backoff."""
        if self.run_id is None:
            return not self._has_pending()
        if self._down and not force and time.monotonic() < self._next_retry:
            return False
        try:
            self._flush_once()
        except Exception as e:
            self._went_down(e)
            return False
        if self._down:
            self._came_back()
        return not self._has_pending()

    def _maybe_flush(self) -> None:
        self.flush(force=False)

    def _has_pending(self) -> bool:
        return bool(self._metrics or self._params or self._tags or self._artifacts or self._pending_status)

    def _flush_once(self) -> None:
        """Send buffered items in MLflow's batch sizes; an item leaves the buffer only once it is logged.

        Connectivity errors propagate (the caller backs off); permanent errors drop the item and count it.
        """
        from mlflow.entities import Metric, Param, RunTag

        client = self._get_client()
        if self._pending_status == "RUNNING":
            with self._limits():
                self.experiment_id = client.get_run(self.run_id).info.experiment_id
                client.update_run(self.run_id, status="RUNNING")
            self._pending_status = None
        while self._params or self._tags:
            params = list(self._params.items())[:MAX_PARAMS_TAGS_PER_BATCH]
            tags = list(self._tags.items())[: MAX_PARAMS_TAGS_PER_BATCH - len(params)] if len(params) < 100 else []
            self._send(
                lambda p=params, t=tags: client.log_batch(
                    self.run_id, params=[Param(k, v) for k, v in p], tags=[RunTag(k, v) for k, v in t],
                    synchronous=True,
                ),
                [("param", k) for k, _ in params] + [("tag", k) for k, _ in tags],
            )
            for k, _ in params:
                self._params.pop(k, None)
            for k, _ in tags:
                self._tags.pop(k, None)
        while self._metrics:
            batch = [self._metrics[i] for i in range(min(MAX_METRICS_PER_BATCH, len(self._metrics)))]
            self._send(
                lambda b=batch: client.log_batch(
                    self.run_id, metrics=[Metric(k, v, ts, st) for k, v, ts, st in b], synchronous=True
                ),
                [("metric", m[0]) for m in batch],
                single=lambda i, b=batch: client.log_batch(
                    self.run_id, metrics=[Metric(*b[i])], synchronous=True
                ),
            )
            for _ in batch:
                self._metrics.popleft()
        while self._artifacts:
            art = self._artifacts[0]
            try:
                with self._limits(artifact=True):
                    if Path(art.local_path).is_dir():
                        client.log_artifacts(self.run_id, art.local_path, art.artifact_path)
                    else:
                        client.log_artifact(self.run_id, art.local_path, art.artifact_path)
            except Exception as e:
                if not _is_connectivity_error(e):
                    self._dropped.rejected.append(f"artifact {art.label} ({_short(e)})")
                    logger.warning("MLflow refused artifact %s: %s", art.label, _short(e))
                else:
                    raise
            self._artifacts.pop(0)
            if art.spooled:
                self._spool_bytes -= _size(art.local_path)
                Path(art.local_path).unlink(missing_ok=True)
        if self._pending_status and self._pending_status != "RUNNING":
            with self._limits():
                client.set_terminated(self.run_id, status=self._pending_status)
            self._pending_status = None

    def _send(self, call, items: list[tuple[str, str]], single=None) -> None:
        """Run one batch call. Connectivity errors propagate; a refused batch is retried item by item
        (params/tags by key, metrics via `single`) so one bad item does not lose the others."""
        try:
            with self._limits():
                call()
            return
        except Exception as e:
            if not _is_permanent(e):
                raise
            first = e
        from mlflow.entities import Param, RunTag

        client = self._get_client()
        for i, (kind, key) in enumerate(items):
            try:
                with self._limits():
                    if kind == "param":
                        client.log_batch(self.run_id, params=[Param(key, self._params[key])], synchronous=True)
                    elif kind == "tag":
                        client.log_batch(self.run_id, tags=[RunTag(key, self._tags[key])], synchronous=True)
                    elif single is not None:
                        single(i)
            except Exception as e:
                if not _is_permanent(e):
                    raise
                self._dropped.rejected.append(f"{kind} {key} ({_short(e)})")
                if kind == "param":
                    self._dropped.params += 1
                elif kind == "tag":
                    self._dropped.tags += 1
                else:
                    self._dropped.metrics += 1
                    self._dropped.metric_keys.add(key)
        logger.warning("MLflow refused part of a batch (%s); the rest was logged", _short(first))

    # ------------------------------------------------------------------ outage bookkeeping

    def _went_down(self, exc: BaseException) -> None:
        now = time.monotonic()
        if not self._down:
            self._down, self._down_since = True, now
            self._outages += 1
            self._backoff = min(FIRST_RETRY_S, self.retry_seconds)
            if now - self._last_warn > 60 or self._outages == 1:
                self._last_warn = now
                logger.warning(
                    "MLflow tracking at %s is unreachable (%s). Training continues; metrics and params are "
                    "buffered in memory and retried every %.0f-%.0f s; the end-of-run summary lists what "
                    "could not be logged.",
                    redact(self.tracking_uri), _short(exc), self._backoff, self.retry_seconds,
                )
        else:
            self._backoff = min(self._backoff * 2, self.retry_seconds)
        self._next_retry = now + self._backoff

    def _came_back(self) -> None:
        took = time.monotonic() - (self._down_since or time.monotonic())
        self._down, self._down_since = False, None
        self._backoff = min(FIRST_RETRY_S, self.retry_seconds)
        logger.warning("MLflow tracking at %s is reachable again after %.0f s; buffered data was sent",
                       redact(self.tracking_uri), took)

    def _bound_dicts(self) -> None:
        for d, kind in ((self._params, "params"), (self._tags, "tags")):
            while len(d) > MAX_BUFFERED_PARAMS_TAGS:
                d.pop(next(iter(d)))
                setattr(self._dropped, kind, getattr(self._dropped, kind) + 1)

    def _note_secret_drops(self, kind: str, keys: list[str]) -> None:
        if keys:
            logger.info("not logging %d secret-looking %s to MLflow: %s", len(keys), kind, ", ".join(sorted(keys)))

    # ------------------------------------------------------------------ artifacts spool

    def _spool_path(self, artifact_file: str) -> str:
        if self._spool_dir is None:
            self._spool_dir = tempfile.mkdtemp(prefix="mixer-mlflow-")
        d = tempfile.mkdtemp(dir=self._spool_dir)
        return str(Path(d) / Path(artifact_file).name)

    def _queue_artifact(self, path: str, artifact_file: str, spooled: bool) -> None:
        """Log `path` so it appears as `artifact_file` in the run."""
        parent = str(Path(artifact_file).parent)
        art = _Artifact(path, None if parent in ("", ".") else parent, artifact_file, spooled)
        size = _size(path)
        if spooled and self._spool_bytes + size > MAX_SPOOLED_ARTIFACT_BYTES:
            self._dropped.artifacts.append(artifact_file)
            Path(path).unlink(missing_ok=True)
            return
        self._spool_bytes += size if spooled else 0
        self._artifacts.append(art)
        self._maybe_flush()

    # ------------------------------------------------------------------ end-of-run summary

    def unlogged_summary(self) -> str | None:
        """What never reached MLflow (counts per kind), or None when everything was logged."""
        d = self._dropped
        n_metrics = d.metrics + len(self._metrics)
        keys = set(d.metric_keys) | {m[0] for m in self._metrics}
        n_params = d.params + len(self._params)
        n_tags = d.tags + len(self._tags)
        artifacts = list(d.artifacts) + [a.label for a in self._artifacts]
        parts = []
        if n_metrics:
            parts.append(f"{n_metrics} metric values ({', '.join(sorted(keys)[:8])}{', ...' if len(keys) > 8 else ''})")
        if n_params:
            parts.append(f"{n_params} params")
        if n_tags:
            parts.append(f"{n_tags} tags")
        if artifacts:
            parts.append(f"{len(artifacts)} artifacts ({', '.join(artifacts[:6])}{', ...' if len(artifacts) > 6 else ''})")
        if d.model:
            parts.append(d.model)
        pending_status = self._pending_status or d.status
        if pending_status and self._ended:
            parts.append(f"run status {pending_status}")
        if d.rejected:
            parts.append(f"{len(d.rejected)} refused by MLflow: " + "; ".join(d.rejected[:5])
                         + ("; ..." if len(d.rejected) > 5 else ""))
        if not parts:
            return None
        where = f"MLflow at {redact(self.tracking_uri)}"
        why = " (tracking was unreachable)" if (self._down or self._outages) else ""
        run = f" for run {self.run_id}" if self.run_id else ""
        return f"not logged to {where}{run}{why}: " + "; ".join(parts)

    @property
    def outages(self) -> int:
        """How many times the tracking store became unreachable during this run."""
        return self._outages

    @property
    def is_down(self) -> bool:
        return self._down


def _is_connectivity_error(e: BaseException) -> bool:
    if _is_permanent(e):
        return False
    text = str(e).lower()
    if isinstance(e, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    markers = ("failed with exception", "timeout", "timed out", "connection", "max retries", "refused",
               "temporarily", "unavailable", "database is locked", "503", "502", "504")
    return any(m in text for m in markers) or getattr(e, "error_code", None) in (
        "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED")


def _is_text_file(p: Path) -> bool:
    return p.suffix.lower() in {".yaml", ".yml", ".json", ".txt", ".log", ".cfg", ".toml", ".ini", ".md",
                                ".csv", ".env", ".sh"} and p.stat().st_size < 5 * 2**20


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _safe_dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "experiment"
