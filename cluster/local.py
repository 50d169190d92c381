"""The Python client of a local multi-node Ray cluster: one API for the CLI, the tests and the benchmarks.

    from cluster.local import LocalCluster
    cluster = LocalCluster.up(state_dir, workers=2, token_file=tmp / "token")   # head + 2 worker nodes
    try:
        subprocess.run(cluster.submit_command(["python", "-m", "orchestrator.pretrain"], "."), env=cluster.env)
        cluster.kill_node(1)                      # SIGKILL worker node 1's processes
        cluster.wait_for_alive_nodes(2)
    finally:
        cluster.down()                            # only the processes this cluster started

    LocalCluster(state_dir)                       # a cluster `up` recorded earlier (another process, the CLI)

The state file (<state_dir>/state.json) is the record: addresses, token path, every node's pids.
Ray replaces a loopback --node-ip-address with the machine's routable address (services.resolve_ip_for_localhost),
so the GCS address is <this machine's IP>:<port> and the GCS port listens on all interfaces: token
authentication (always on) is what guards it. Run this on a trusted machine.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from cluster.processes import (
    DEFAULT_STATE_DIR,
    STATE_VERSION,
    ClusterError,
    load_state,
    node_processes,
    ray_executable,
    save_state,
    signal_processes,
    state_path,
)
from cluster.ray_start import head_node, start_head, start_workers
from cluster.token_auth import client_env, node_env, read_token, resolve_token, submit_line

log = logging.getLogger(__name__)

CLUSTER_TOKEN = object()  # api_request's default: authenticate with this cluster's token


class LocalCluster:
    """A local cluster recorded in <state_dir>/state.json: its addresses, token and node processes."""

    def __init__(self, state_dir: str | Path = DEFAULT_STATE_DIR, state: dict | None = None):
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.state = state if state is not None else load_state(self.state_dir)

    @classmethod
    def up(
        cls,
        state_dir: str | Path = DEFAULT_STATE_DIR,
        *,
        workers: int = 2,
        cpus_per_node: int = 1,
        gpus_per_node: int = 0,
        head_cpus: int = 0,
        object_store_mb: int | None = None,
        token_file: str | Path | None = None,
        health_check_period_ms: int | None = None,
        temp_root: str | Path = "/tmp",
    ) -> LocalCluster:
        """Start a head and `workers` worker nodes; returns once the GCS reports all of them alive. On failure
        everything started is stopped (Ray logs kept) and ClusterError is raised."""
        state_dir = Path(state_dir).expanduser().resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
        if state_path(state_dir).exists():
            old = load_state(state_dir)
            if any(node_processes(n) for n in old.get("nodes", [])):
                raise ClusterError(f"a local cluster recorded in {state_dir} is still running: `down` it first")
            state_path(state_dir).unlink()
        if workers < 0 or cpus_per_node < 0 or head_cpus < 0 or gpus_per_node < 0:
            raise ClusterError("--workers, --cpus-per-node, --head-cpus and --gpus-per-node must be >= 0")

        ray = str(ray_executable())
        token_path = resolve_token(token_file)
        # Short temp root: Ray's unix socket paths (<temp-dir>/session_*/sockets/plasma_store) must fit 107 bytes.
        temp_root = Path(tempfile.mkdtemp(prefix="mxc-", dir=temp_root))
        head = head_node(temp_root, head_cpus)
        state = {
            "version": STATE_VERSION,
            "state_dir": str(state_dir),
            "created": time.time(),
            "ray": ray,
            "python": sys.executable,
            "temp_root": str(temp_root),
            "token_path": str(token_path) if token_path else None,
            "auth_mode": "token",
            "gcs_address": None,
            "dashboard_url": None,
            "workers": workers,
            "cpus_per_node": cpus_per_node,
            "gpus_per_node": gpus_per_node,
            "object_store_mb": object_store_mb,
            "health_check_period_ms": health_check_period_ms,
            "nodes": [head],
        }
        save_state(state_dir, state)  # written first, so that `down` can clean up a half-started cluster
        cluster = cls(state_dir, state)
        try:
            start_head(state, state_dir, head)
            start_workers(state, state_dir, list(range(1, workers + 1)))
            cluster.wait_for_alive_nodes(workers + 1, timeout=60)
        except BaseException:
            log.warning("start failed; stopping what was started (Ray logs kept in %s)", temp_root)
            cluster.down(grace_s=0, keep_logs=True)
            raise
        return cluster

    def reload(self) -> dict:
        """Re-read the state file (another process may have killed or restarted a node); {} once it is down."""
        path = state_path(self.state_dir)
        self.state = json.loads(path.read_text()) if path.exists() else {}
        return self.state

    # ------------------------------------------------------------------ addresses and environment
    @property
    def address(self) -> str:
        """GCS address (RAY_ADDRESS) for ray.init / ray status."""
        return self.state["gcs_address"]

    @property
    def dashboard_url(self) -> str:
        """http://127.0.0.1:PORT: the job and state APIs (ray job submit --address ...)."""
        return self.state["dashboard_url"]

    @property
    def token_path(self) -> Path | None:
        """The token file (None: the token comes from $RAY_AUTH_TOKEN)."""
        return Path(self.state["token_path"]) if self.state.get("token_path") else None

    @property
    def num_workers(self) -> int:
        return self.state["workers"]

    def token(self) -> str:
        return read_token(self.state)

    @property
    def env(self) -> dict[str, str]:
        """Full environment for a client subprocess (ray CLI, a driver script) of this cluster."""
        return {
            **node_env(self.token_path),
            "RAY_ADDRESS": self.address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
        }

    def report(self) -> str:
        """What `python -m cluster.local_cluster up` prints: addresses, client environment, submit line."""
        lines = [
            f"Local Ray cluster up: head + {self.num_workers} worker node(s), token authentication on.",
            f"  state:      {state_path(self.state_dir)}",
            f"  RAY_ADDRESS={self.address}",
            f"  dashboard:  {self.dashboard_url}  (bound to 127.0.0.1; every request needs the token)",
            "  client environment:",
            *(f"    export {k}={shlex.quote(v)}" for k, v in client_env(self.state).items()),
            "  submit a job:",
            f"    {submit_line(self.state)}",
            f"  stop it:    {shlex.quote(sys.executable)} -m cluster.local_cluster down --state-dir {self.state_dir}",
        ]
        return "\n".join(lines)

    # ------------------------------------------------------------------ jobs
    def submit_command(
        self, entrypoint: list[str], working_dir: str | Path, extra_args: tuple[str, ...] = ()
    ) -> list[str]:
        """`ray job submit` of the entrypoint; run it with env=self.env. extra_args go before `--`,
        e.g. ("--runtime-env", "cluster/runtime_env.yaml")."""
        cmd = [str(ray_executable()), "job", "submit", "--address", self.dashboard_url]
        return cmd + ["--working-dir", str(working_dir), *extra_args, "--", *entrypoint]

    def submit(
        self,
        entrypoint: list[str],
        working_dir: str | Path,
        timeout: float = 300,
        wait: bool = True,
        extra_args: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess | subprocess.Popen:
        """Run submit_command; wait=False returns the Popen (stdout and stderr merged, text)."""
        cmd = self.submit_command(entrypoint, working_dir, extra_args)
        if not wait:
            return subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)

    # ------------------------------------------------------------------ dashboard
    def api_request(
        self, path: str, token=CLUSTER_TOKEN, method: str = "GET", body: bytes | None = None, timeout: float = 10
    ) -> tuple[int, bytes]:
        """(status, body) of a dashboard request; token=None sends no Authorization header."""
        req = urllib.request.Request(self.dashboard_url + path, method=method, data=body)
        if token is not None:
            req.add_header("Authorization", f"Bearer {self.token() if token is CLUSTER_TOKEN else token}")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def alive_nodes(self, detail: bool = True) -> list[dict]:
        """Nodes the GCS reports ALIVE, through the dashboard's state API (token-authenticated).

        The same endpoint ray.util.state.list_nodes reads; that client takes the auth mode from the process's
        environment and the token from a process-wide cache (ray._raylet.AuthenticationTokenLoader, Ray 2.60),
        while this client serves clusters with their own token files from one process without touching
        its environment, so it sends this cluster's token itself."""
        status, body = self.api_request(f"/api/v0/nodes?limit=1000&detail={str(detail).lower()}")
        if status != 200:
            raise ClusterError(f"state API answered HTTP {status}: {body[:300]!r}")
        rows = json.loads(body)["data"]["result"]["result"]
        return [r for r in rows if r.get("state") == "ALIVE"]

    def wait_for_alive_nodes(self, n: int, timeout: float = 60) -> float:
        """Wait until the GCS reports exactly n alive nodes; returns the seconds it took."""
        t0 = time.monotonic()
        seen = -1
        while time.monotonic() - t0 < timeout:
            try:
                seen = len(self.alive_nodes(detail=False))
                if seen == n:
                    return time.monotonic() - t0
            except (OSError, ClusterError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise ClusterError(f"expected {n} alive nodes, saw {seen} after {timeout:.0f} s")

    # ------------------------------------------------------------------ nodes
    def node(self, index: int) -> dict:
        """Node `index`'s record (0: the head), re-read from the state file."""
        return next(n for n in self.reload()["nodes"] if n["index"] == index)

    def node_id(self, index: int) -> str:
        return self.node(index)["node_id"]

    def recorded_processes(self, index: int | None = None) -> list[tuple[int, float]]:
        """(pid, create_time) recorded in the state file, for one node or all."""
        nodes = self.reload().get("nodes", [])
        return [(p["pid"], p["create_time"]) for n in nodes if index in (None, n["index"]) for p in n["pids"]]

    def _worker(self, index: int) -> dict:
        for node in self.reload()["nodes"]:
            if node["index"] == index:
                if node["role"] == "head":
                    raise ClusterError("node 0 is the head; use `down` to stop the cluster")
                return node
        raise ClusterError(f"no worker node {index}; this cluster has nodes 1..{self.state['workers']}")

    def kill_node(self, index: int) -> tuple[list[int], list[int]]:
        """SIGKILL worker node `index` (1..N) and its Ray workers; returns (pids killed, pids that survived)."""
        node = self._worker(index)
        procs = node_processes(node)
        survivors = signal_processes(procs, grace_s=0)
        node["killed_at"] = time.time()
        save_state(self.state_dir, self.state)
        return sorted(p.pid for p in procs), sorted(p.pid for p in survivors)

    def restart_node(self, index: int) -> str | None:
        """Start a killed worker node again (same index, resources and temp dir); returns its new node id."""
        if node_processes(self._worker(index)):
            raise ClusterError(f"worker node {index} is still running; kill-node it first")
        start_workers(self.state, self.state_dir, [index])
        return self._worker(index)["node_id"]

    def down(self, grace_s: float = 3.0, keep_logs: bool = False) -> list[int]:
        """Stop exactly the processes this cluster started (SIGTERM, SIGKILL after grace_s); once none is
        left, delete the temp dirs (unless keep_logs) and the state file. Returns the pids that survived.
        Stopping a stopped cluster does nothing."""
        if state_path(self.state_dir).exists():
            self.reload()  # nodes restarted by another process since this object read the state
        procs = {p.pid: p for node in self.state.get("nodes", []) for p in node_processes(node)}
        survivors = signal_processes(list(procs.values()), grace_s)
        if not survivors:
            temp_root = self.state.get("temp_root")
            if not keep_logs and temp_root and Path(temp_root).name.startswith("mxc-"):
                shutil.rmtree(temp_root, ignore_errors=True)
            state_path(self.state_dir).unlink(missing_ok=True)
        return [p.pid for p in survivors]
