"""A local cluster's node processes and its state file: what `up` records and `down` / `kill-node` signal.

`ray start` daemonises, so the state file (<state-dir>/state.json) records every node's processes by pid and
start time, found by their --temp-dir (a fresh mkdtemp per cluster); `down` and `kill-node` signal only those
pids and their descendants (the node's Ray workers). Never `ray stop`: it would stop every Ray on the machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sys
from pathlib import Path

import psutil

from pipelines.cli import InputError
from pipelines.storage import atomic_write

STATE_VERSION = 1
DEFAULT_STATE_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixer-orchestrator" / "local-cluster"
)


class ClusterError(InputError, RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- installation


def venv_bin() -> Path:
    """The bin dir of the interpreter running this script (not resolved: a venv's python is a symlink)."""
    return Path(sys.executable).parent


def ray_executable() -> Path:
    ray = venv_bin() / "ray"
    if not ray.exists():
        raise ClusterError(f"no `ray` next to {sys.executable}; install the project (pip install -e .) first")
    return ray


def ray_package_dir() -> str:
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise ClusterError(f"ray is not installed for {sys.executable}")
    return list(spec.submodule_search_locations)[0]


# ---------------------------------------------------------------------------------------------- state file


def state_path(state_dir: Path) -> Path:
    return state_dir / "state.json"


def load_state(state_dir: Path) -> dict:
    path = state_path(state_dir)
    if not path.exists():
        raise ClusterError(f"no local cluster recorded in {state_dir} (run `up` first)")
    return json.loads(path.read_text())


def save_state(state_dir: Path, state: dict) -> None:
    path = state_path(state_dir)
    with atomic_write(path) as f:
        f.write(json.dumps(state, indent=2).encode())


# ---------------------------------------------------------------------------------------------- processes


def is_node_process(cmdline: list[str], temp_dir: str, ray_dir: str) -> bool:
    """A Ray process (binary or script inside the ray package) started for this node's --temp-dir."""
    if not cmdline or not any(ray_dir in part for part in cmdline[:3]):
        return False
    joined = "\0".join(cmdline)
    return re.search(re.escape(temp_dir) + r"(?=/|\0|$)", joined) is not None


def node_processes(node: dict) -> list[psutil.Process]:
    """The node's live processes: its recorded pids (same start time), any Ray process started for its
    temp dir since (found by command line), and all their descendants (Ray workers, agents, job drivers)."""
    ray_dir = ray_package_dir()
    found: dict[int, psutil.Process] = {}
    for rec in node.get("pids", []):
        try:
            p = psutil.Process(rec["pid"])
            if abs(p.create_time() - rec["create_time"]) < 0.01:
                found[p.pid] = p
        except psutil.Error:
            pass
    uid = os.getuid()
    for p in psutil.process_iter(["cmdline", "uids"]):
        try:
            if p.info["uids"] and p.info["uids"].real != uid:
                continue
            if is_node_process(p.info["cmdline"] or [], node["temp_dir"], ray_dir):
                found[p.pid] = p
        except psutil.Error:
            pass
    for p in list(found.values()):
        try:
            for child in p.children(recursive=True):
                found[child.pid] = child
        except psutil.Error:
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def describe(p: psutil.Process) -> dict:
    """What the state file records of a process: pid, start time (pids are reused), a short name."""
    try:
        cmd = p.cmdline()
        name = next((os.path.basename(c) for c in cmd[:3] if "/ray/" in c), None) or (
            cmd[0] if cmd else p.name()
        )
        return {"pid": p.pid, "create_time": p.create_time(), "name": name[:60]}
    except psutil.Error:
        return {"pid": p.pid, "create_time": 0.0, "name": "?"}


def signal_processes(procs: list[psutil.Process], grace_s: float) -> list[psutil.Process]:
    """SIGTERM (or SIGKILL right away with grace_s=0), SIGKILL what is left after grace_s; returns survivors."""
    first = signal.SIGTERM if grace_s > 0 else signal.SIGKILL
    for p in procs:
        try:
            p.send_signal(first)  # psutil refuses to signal a pid that was reused
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s if grace_s > 0 else 5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=10)
    return alive
