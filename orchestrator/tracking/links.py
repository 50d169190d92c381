"""Where a user goes next after a command: the MLflow UI for a tracking store, and the report command that
compares a run with its siblings. Printed at the end of pretrain, tune and evaluate, and used by the report;
here, below all of them, so no entry point imports another for a line of text. Credentials never appear
(an http(s) URI loses its user:password, any other is redacted).
"""

from __future__ import annotations

import shlex
import urllib.parse

from orchestrator.config.tree import mixer_home
from orchestrator.tracking.store import resolve_tracking_uri
from pipelines.redaction import redact


def default_tracking_uri() -> str:
    """The store a command uses when none is given: $MLFLOW_TRACKING_URI, else $MIXER_HOME/mlflow.db."""
    return resolve_tracking_uri(None, str(mixer_home()))


def report_command(experiment: str, parent_run_id: str | None = None, tracking_uri: str | None = None) -> str:
    """The command that compares a run with its siblings (printed at the end of pretrain and tune)."""
    parts = ["python", "-m", "orchestrator.report", "--experiment", experiment]
    if parent_run_id:
        parts += ["--parent", parent_run_id]
    if tracking_uri and tracking_uri != default_tracking_uri():
        parts += ["--tracking-uri", _without_credentials(tracking_uri)]
    return " ".join(shlex.quote(p) for p in parts)


def mlflow_ui_hint(tracking_uri: str) -> str:
    """Where to see the runs: an http(s) tracking server's own UI, else the `mlflow ui` command for the store."""
    if urllib.parse.urlsplit(tracking_uri).scheme in ("http", "https"):
        return _without_credentials(tracking_uri)
    return f"mlflow ui --backend-store-uri {redact(tracking_uri)}   (then open http://127.0.0.1:5000)"


def _without_credentials(uri: str) -> str:
    """http://user:pw@host -> http://host (MLflow takes credentials from MLFLOW_TRACKING_USERNAME/PASSWORD)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme in ("http", "https") and "@" in parts.netloc:
        parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])
        return urllib.parse.urlunsplit(parts)
    return redact(uri)
