"""What a run could not log to MLflow, kept next to its checkpoints, and the command that replays it.

    python -m orchestrator.tracking.replay RUN_DIR_OR_FILE [--tracking-uri URI]

At the end of a run whose tracking store was unreachable, the driver writes the metrics, params, tags, files held
as bytes (the profiler's) and final status still unlogged to run.storage_path/run.name/unlogged_tracking.jsonl
(any fsspec URL), and the end-of-run summary names the file. The command sends them into the same MLflow run (through RunTracker, with
its retries and refusal handling); once everything is logged the file is renamed *.replayed-<time>.jsonl, so
a second replay cannot log a point twice. What is still not logged stays in the file (exit code 1).

File format: JSON lines; the first is the run ({"run_id", "experiment", "run_name", "tracking_uri" with any
password masked, "status": the final status to set, or null}), then one line per item:
{"metric": [key, value, timestamp_ms, step]}, {"param": [key, value]}, {"tag": [key, value]},
{"artifact": [artifact file, base64 content]} (a file that came as bytes from a worker: the profiler's).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
import time
from typing import Any

from orchestrator.tracking.outage import short
from orchestrator.tracking.store import TrackingUnreachableError
from orchestrator.tracking.tracker import RunTracker
from pipelines.cli import CommandError, InputError, entry_point
from pipelines.redaction import redact
from pipelines.storage import atomic_write, get_fs, join_url, protocol_of, read_bytes, resolve_storage_options

log = logging.getLogger(__name__)

REPLAY_FILE = "unlogged_tracking.jsonl"


def write_unlogged(tracker: RunTracker, run_dir: str, storage_options: dict | None = None) -> str | None:
    """Write what `tracker` could not log to run_dir/unlogged_tracking.jsonl; its URL, or None if nothing is
    left (or the file could not be written: a warning says so and the summary then has no file to name)."""
    state = tracker.pending()
    if not _anything(state) or tracker.run_id is None:
        return None
    url = join_url(run_dir, REPLAY_FILE)
    head = {"run_id": tracker.run_id, "experiment": tracker.experiment, "run_name": tracker.run_name,
            "tracking_uri": redact(tracker.tracking_uri), "status": state["status"]}
    try:
        _write(url, head, state, storage_options)
    except OSError as e:
        log.warning("warning: could not keep the unlogged tracking data in %s: %s", redact(url), redact(str(e)))
        return None
    tracker.kept_at = redact(url)
    return url


def _anything(state: dict) -> bool:
    return bool(state["metrics"] or state["params"] or state["tags"] or state.get("artifacts") or state["status"])


def _write(url: str, head: dict, state: dict, storage_options: dict | None) -> None:
    lines = [head] + [{"metric": m} for m in state["metrics"]]
    lines += [{"param": [k, v]} for k, v in state["params"].items()]
    lines += [{"tag": [k, v]} for k, v in state["tags"].items()]
    lines += [{"artifact": [k, base64.b64encode(v).decode()]} for k, v in state.get("artifacts", {}).items()]
    if protocol_of(url) in ("file", "local"):
        os.makedirs(os.path.dirname(get_fs(url, storage_options)[1]), exist_ok=True)
    with atomic_write(url, storage_options) as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines).encode())


def read_unlogged(url: str, storage_options: dict | None = None) -> tuple[dict, dict]:
    """(the run line, the state as RunTracker.pending() gives it) from a replay file."""
    head: dict[str, Any] | None = None
    state: dict[str, Any] = {"metrics": [], "params": {}, "tags": {}, "artifacts": {}}
    for line in read_bytes(url, storage_options).decode().splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        if head is None:
            head = item
        elif "metric" in item:
            state["metrics"].append(item["metric"])
        elif "artifact" in item:
            name, content = item["artifact"]
            state["artifacts"][name] = base64.b64decode(content)
        else:
            kind = "param" if "param" in item else "tag"
            key, value = item[kind]
            state[f"{kind}s"][key] = value
    if head is None or "run_id" not in head:
        raise ValueError(f"{redact(url)} is not a replay file (no run line)")
    state["status"] = head.get("status")
    return head, state


def replay(url: str, tracking_uri: str, storage_options: dict | None = None) -> tuple[RunTracker, dict]:
    """Send the file's items into its run at `tracking_uri`; the file is renamed once all are logged and
    rewritten with what is left otherwise. Returns (the tracker, the state that was read)."""
    head, state = read_unlogged(url, storage_options)
    tracker = RunTracker(tracking_uri, head["experiment"], head["run_name"], run_id=head["run_id"])
    # Continuing a run sets it RUNNING: it goes back to its final status, or to the one it has now.
    try:
        status = state["status"] or tracker.client.get_run(head["run_id"]).info.status
    except Exception as e:
        raise TrackingUnreachableError(f"cannot read MLflow run {head['run_id']} at {redact(tracking_uri)}: "
                                       f"{short(e)}") from None
    tracker.start()
    tracker.adopt(state)
    tracker.end(status)
    fs, path = get_fs(url, storage_options)
    left = tracker.pending()
    if _anything(left):
        _write(url, head, left, storage_options)
    else:
        fs.mv(path, path.removesuffix(".jsonl") + time.strftime(".replayed-%Y%m%d-%H%M%S.jsonl"))
    return tracker, state


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.tracking.replay",
        description="Log what a run could not log to MLflow (its unlogged_tracking.jsonl) into the same run.")
    parser.add_argument("path", help=f"the run's directory (run.storage_path/run.name) or its {REPLAY_FILE}")
    parser.add_argument("--tracking-uri", default=None,
                        help="the MLflow store (default: $MLFLOW_TRACKING_URI, else the one recorded in the file)")
    args = parser.parse_args(argv)
    url = args.path if args.path.endswith(".jsonl") else join_url(args.path, REPLAY_FILE)
    opts = resolve_storage_options(url)
    try:
        head, _ = read_unlogged(url, opts)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {redact(url)}: {redact(str(e))}") from None
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or head["tracking_uri"]
    if "****" in uri:
        raise InputError(f"the recorded tracking URI {uri} has its password masked; pass --tracking-uri")
    try:
        tracker, state = replay(url, uri, opts)
    except TrackingUnreachableError as e:
        raise CommandError(f"{e}; nothing was replayed, {redact(url)} is unchanged") from None
    missing = tracker.unlogged_summary()
    if missing:
        log.warning(missing)
        log.warning("what is not logged stays in %s; run this command again once MLflow answers", redact(url))
        return 1
    print(f"replayed {len(state['metrics'])} metric values, {len(state['params'])} params, "
          f"{len(state['tags'])} tags, {len(state['artifacts'])} artifacts"
          f"{' and the run status' if state['status'] else ''} "
          f"into MLflow run {tracker.run_id} at {redact(uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
