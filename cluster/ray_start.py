"""Starting a local cluster's nodes: one `ray start` per node, each with its own ports and --temp-dir.

Every node is a separate `ray start` (its own raylet, object store, agents and --temp-dir), started with the
`ray` next to sys.executable, so job entrypoints run with the project's venv (its bin dir is put first on the
nodes' PATH). Node i (1..N) carries the custom resource {"node_i": 1}; the head carries {"node_0": 1} and,
by default, 0 CPUs, so work lands on worker nodes. The dashboard binds 127.0.0.1 only.

Two of Ray's own files are read, for want of a public API (checked against Ray 2.60.0; a Ray that moves them
fails tests/cluster/test_local_cluster.py):
- ``<head temp dir>/ray_current_cluster``: the GCS address the head registered (start_head), which the other
  nodes' `ray start --address` takes. The head's IP is Ray's choice, so the address is read, not rebuilt.
- ``<node temp dir>/session_latest/dashboard_agent_listen_port_<node id>``: the id of the raylet a `ray start`
  just made (node_id_of). ray.util.state.list_nodes would name it, but it reads the auth token from a
  process-wide cache, while one client here serves clusters with their own tokens (see
  cluster/local.py alive_nodes).
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
from pathlib import Path

from cluster.loopback import free_port
from cluster.processes import (
    ClusterError,
    describe,
    node_processes,
    ray_executable,
    save_state,
    signal_processes,
)
from cluster.token_auth import node_env

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180


def node_id_of(temp_dir: Path) -> str | None:
    """The node id of the raylet most recently started in temp_dir (restart-node reuses the session dir).
    Read from a file name of Ray's session dir (Ray 2.60.0; see the module docstring)."""
    files = sorted(
        (temp_dir / "session_latest").glob("dashboard_agent_listen_port_*"), key=lambda f: f.stat().st_mtime
    )
    return files[-1].name.rsplit("_", 1)[-1] if files else None


def _run_ray_start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:  # appended: a retried start keeps the first attempt's output
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_ray_start(proc: subprocess.Popen, log: Path, what: str) -> None:
    try:
        rc = proc.wait(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = -1
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise ClusterError(f"`ray start` for {what} failed (exit {rc}); log {log}:\n{tail}")


def _common_args(temp_dir: Path, node: dict, taken: set[int], object_store_mb: int | None) -> list[str]:
    # host "": the ports Ray opens listen on every interface, so they must be free on every interface
    args = [
        "--temp-dir", str(temp_dir),
        "--num-cpus", str(node["num_cpus"]),
        "--num-gpus", str(node["num_gpus"]),
        "--resources", json.dumps(node["resources"]),
        # several raylets share this machine: let the OS pick worker ports (as ray.cluster_utils does) and give
        # each node its own dashboard-agent port (the default 52365 would collide)
        "--min-worker-port", "0", "--max-worker-port", "0",
        "--dashboard-agent-listen-port", str(free_port(taken, host="")),
        "--disable-usage-stats",
    ]  # fmt: skip
    if object_store_mb:
        args += ["--object-store-memory", str(object_store_mb * 1024 * 1024)]
    return args


def head_node(temp_root: Path, head_cpus: int) -> dict:
    return {
        "index": 0,
        "role": "head",
        "temp_dir": str(temp_root / "n0"),
        "num_cpus": head_cpus,
        "num_gpus": 0,
        "resources": {"node_0": 1},
        "pids": [],
        "node_id": None,
    }


def _worker_node(state: dict, i: int) -> dict:
    temp_root = Path(state["temp_root"])
    g = state["gpus_per_node"]
    return {
        "index": i,
        "role": "worker",
        "temp_dir": str(temp_root / f"n{i}"),
        "num_cpus": state["cpus_per_node"],
        "num_gpus": g,
        "resources": {f"node_{i}": 1},
        "cuda_visible_devices": ",".join(str(d) for d in range((i - 1) * g, i * g)) if g else None,
        "pids": [],
        "node_id": None,
    }


def start_workers(state: dict, state_dir: Path, indices: list[int], attempts: int = 2) -> None:
    """Start worker nodes side by side; a node whose `ray start` fails (Ray gives a raylet 30 s to register,
    which a loaded machine can miss) is cleaned up and started once more. Each started node is recorded."""
    ray = str(ray_executable())
    token_path = Path(state["token_path"]) if state.get("token_path") else None
    pending, errors = list(indices), {}
    for attempt in range(attempts):
        taken: set[int] = set()
        started = []
        for i in pending:
            node = _worker_node(state, i)
            env = node_env(token_path)
            if node["cuda_visible_devices"] is not None:
                env["CUDA_VISIBLE_DEVICES"] = node["cuda_visible_devices"]
            cmd = [ray, "start", "--address", state["gcs_address"]]
            cmd += _common_args(Path(node["temp_dir"]), node, taken, state.get("object_store_mb"))
            log = state_dir / "logs" / f"start-n{i}.log"
            started.append((node, _run_ray_start(cmd, env, log), log))
        pending = []
        for node, proc, log in started:
            try:
                _wait_ray_start(proc, log, f"worker node {node['index']}")
            except ClusterError as e:
                errors[node["index"]] = str(e)
                signal_processes(node_processes(node), grace_s=0)
                pending.append(node["index"])
                continue
            node["pids"] = [describe(p) for p in node_processes(node)]
            node["node_id"] = node_id_of(Path(node["temp_dir"]))
            state["nodes"] = [n for n in state["nodes"] if n["index"] != node["index"]] + [node]
            state["nodes"].sort(key=lambda n: n["index"])
            save_state(state_dir, state)
        if not pending:
            return
        if attempt + 1 < attempts:
            log.warning("`ray start` failed for worker node(s) %s; trying again", pending)
    raise ClusterError("\n".join(errors[i] for i in pending))


def start_head(state: dict, state_dir: Path, head: dict, attempts: int = 2) -> None:
    """`ray start --head` (retried once); records the head's processes, node id and the GCS address."""
    token_path = Path(state["token_path"]) if state.get("token_path") else None
    env = node_env(token_path)
    if state.get("health_check_period_ms"):
        # GCS side of node-failure detection (RayConfig reads RAY_<name> from the GCS's environment):
        # a node is declared dead after health_check_failure_threshold (5) missed periods.
        env["RAY_health_check_period_ms"] = str(state["health_check_period_ms"])
    log = state_dir / "logs" / "start-n0.log"
    for attempt in range(attempts):
        taken: set[int] = set()
        gcs_port, dashboard_port, client_port = (free_port(taken, host="") for _ in range(3))
        state["dashboard_url"] = f"http://127.0.0.1:{dashboard_port}"
        cmd = [str(ray_executable()), "start", "--head", "--port", str(gcs_port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
               "--ray-client-server-port", str(client_port)]  # fmt: skip
        cmd += _common_args(Path(head["temp_dir"]), head, taken, state.get("object_store_mb"))
        try:
            _wait_ray_start(_run_ray_start(cmd, env, log), log, "the head node")
            break
        except ClusterError:
            signal_processes(node_processes(head), grace_s=0)
            shutil.rmtree(head["temp_dir"], ignore_errors=True)
            if attempt + 1 == attempts:
                raise
            log.warning("`ray start --head` failed; trying again")
    head["pids"] = [describe(p) for p in node_processes(head)]
    head["node_id"] = node_id_of(Path(head["temp_dir"]))
    # Ray's own record of the head's GCS address (Ray 2.60.0; see the module docstring)
    state["gcs_address"] = (Path(head["temp_dir"]) / "ray_current_cluster").read_text().strip()
    save_state(state_dir, state)
