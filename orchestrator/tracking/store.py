"""Where the MLflow store is, whether it can be used, and how MLflow's HTTP client behaves when it cannot.

- `resolve_tracking_uri(uri, default_dir)`: the URI to use (made absolute: Ray workers run in another cwd).
- `check_tracking_reachable(uri)`: fail fast, before any cluster resource is requested, with a clear message.
- `use_bounded_http_retries()`: MLflow's own HTTP retry/timeout settings for this process, set once (and
  MLflow's async-logging errors kept free of URL passwords).
- `ensure_experiment(client, name)`: the experiment's id, created next to a sqlite store if missing.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from pipelines.redaction import redact

# MLflow reads these on every request (mlflow/utils/rest_utils.py, 3.17). Its defaults (7 retries, backoff
# factor 2, 120 s timeout) keep one call retrying for minutes; the tracker retries failed batches itself, so
# one request gets one quick retry and a failure surfaces in seconds. A user's own setting wins.
HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",  # per socket operation; an artifact upload answers after it is stored
}

# MlflowException.error_code values that mean "this request will never succeed" (count it, do not retry).
REFUSED_CODES = {
    "INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "MALFORMED_REQUEST", "NOT_FOUND",
    "RESOURCE_CONFLICT", "ENDPOINT_NOT_FOUND", "INVALID_REQUEST",
}


def is_refused(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) in REFUSED_CODES


def use_bounded_http_retries() -> None:
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)
    queue_log = logging.getLogger(ASYNC_QUEUE_LOGGER)
    if not any(isinstance(f, _RedactingFilter) for f in queue_log.filters):
        queue_log.addFilter(_RedactingFilter())


# MLflow's async queue logs each failed batch with the request URL, which carries any user:password of the
# tracking URI (logger name checked against MLflow 3.17.2; tests/orchestrator/tracking/test_tracking.py pins it).
ASYNC_QUEUE_LOGGER = "mlflow.utils.async_logging.async_logging_queue"


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


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
        req = urllib.request.Request(uri.rstrip("/") + "/health", method="GET")
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


def ensure_experiment(client, name: str) -> str:
    """The id of experiment `name` (restored if deleted, created if missing; another process may win the race)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    artifact_location = None
    if client.tracking_uri.startswith("sqlite:///"):
        # MLflow's default (./mlruns) is relative to the cwd, which differs between driver and Ray workers.
        db_dir = Path(client.tracking_uri[len("sqlite:///"):]).parent
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "experiment"
        artifact_location = (db_dir / "artifacts" / safe).as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
