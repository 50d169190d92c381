"""Fixtures that bring up a real multi-node Ray cluster on 127.0.0.1 with `python -m cluster.local_cluster`.

Reusable by any end-to-end test that needs several Ray nodes (e.g. a pretraining run that survives a worker
node being killed):

    @pytest.mark.slow
    def test_something(local_ray_cluster):                 # head (0 CPU) + 2 worker nodes x 1 CPU
        r = local_ray_cluster.submit(["python", "-m", "orchestrator.pretrain", "train.max_steps=20"],
                                     working_dir=REPO_ROOT, wait=False)
        local_ray_cluster.kill_node(1)
        local_ray_cluster.wait_for_alive_nodes(2)

    @pytest.mark.parametrize("local_ray_cluster", [{"num_workers": 3, "cpus_per_node": 2}], indirect=True)
    def test_bigger(local_ray_cluster): ...

    def test_two(start_local_ray_cluster):                 # factory: any number of clusters, all torn down
        a = start_local_ray_cluster(num_workers=1)

The cluster is driven through its CLI, exactly as a user would; the state file it writes is the interface.
The token lives in a per-cluster file (RAY_AUTH_TOKEN_PATH), so ~/.ray/auth_token is never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `cluster` is run from the checkout, not installed as a package
    sys.path.insert(0, str(REPO_ROOT))
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")


@dataclass
class LocalRayCluster:
    state_dir: Path
    token_path: Path
    state: dict = field(default_factory=dict)
    stopped: bool = False
    up_output: str = ""

    # ------------------------------------------------------------------ CLI
    def cli(self, *args: str, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "cluster.local_cluster", *args, "--state-dir", str(self.state_dir)]
        r = subprocess.run(
            cmd, cwd=REPO_ROOT, env=self.base_env(), capture_output=True, text=True, timeout=timeout
        )
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def reload(self) -> dict:
        path = self.state_dir / "state.json"
        self.state = json.loads(path.read_text()) if path.exists() else {}
        return self.state

    # ------------------------------------------------------------------ addresses and environment
    @property
    def address(self) -> str:
        """GCS address (RAY_ADDRESS) for ray.init / ray status."""
        return self.state["gcs_address"]

    @property
    def dashboard_url(self) -> str:
        """http://127.0.0.1:PORT: the job API (ray job submit --address ...)."""
        return self.state["dashboard_url"]

    @property
    def num_workers(self) -> int:
        return self.state["workers"]

    def token(self) -> str:
        return self.token_path.read_text().strip()

    @property
    def client_env(self) -> dict[str, str]:
        """Just the variables a client needs."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_ADDRESS": self.address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
        }

    @staticmethod
    def base_env() -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS"):
            env.pop(k, None)
        return env

    @property
    def env(self) -> dict[str, str]:
        """Full environment for a client subprocess (ray CLI, a driver script)."""
        return {**self.base_env(), **self.client_env}

    # ------------------------------------------------------------------ inspection
    def http_get(
        self, path: str, token: str | None = "__cluster__", method: str = "GET", body: bytes | None = None
    ):
        """(status, body) of a dashboard request; token=None sends no Authorization header."""
        req = urllib.request.Request(self.dashboard_url + path, method=method, data=body)
        if token is not None:
            req.add_header("Authorization", f"Bearer {self.token() if token == '__cluster__' else token}")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def alive_nodes(self) -> list[dict]:
        status, body = self.http_get("/api/v0/nodes?limit=1000&detail=true")
        assert status == 200, body[:500]
        rows = json.loads(body)["data"]["result"]["result"]
        return [r for r in rows if r.get("state") == "ALIVE"]

    def wait_for_alive_nodes(self, n: int, timeout: float = 60) -> float:
        """Wait until the GCS reports exactly n alive nodes; returns the seconds it took."""
        t0 = time.monotonic()
        seen = None
        while time.monotonic() - t0 < timeout:
            seen = len(self.alive_nodes())
            if seen == n:
                return time.monotonic() - t0
            time.sleep(0.5)
        raise AssertionError(f"expected {n} alive nodes, still {seen} after {timeout} s")

    def node(self, index: int) -> dict:
        return next(n for n in self.reload()["nodes"] if n["index"] == index)

    def node_id(self, index: int) -> str:
        return self.node(index)["node_id"]

    def recorded_processes(self, index: int | None = None) -> list[tuple[int, float]]:
        """(pid, create_time) recorded in the state file, for one node or all."""
        nodes = self.reload().get("nodes", [])
        return [(p["pid"], p["create_time"]) for n in nodes if index in (None, n["index"]) for p in n["pids"]]

    # ------------------------------------------------------------------ actions
    def submit(
        self,
        entrypoint: list[str],
        working_dir: Path | str,
        timeout: float = 300,
        wait: bool = True,
        extra_args: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess | subprocess.Popen:
        """`ray job submit` the entrypoint (token-authenticated); wait=False returns the Popen.
        extra_args go before `--`, e.g. ("--runtime-env", "cluster/runtime_env.yaml")."""
        cmd = [RAY, "job", "submit", "--address", self.dashboard_url, "--working-dir", str(working_dir)]
        cmd += list(extra_args)
        cmd += ["--", *entrypoint]
        if not wait:
            return subprocess.Popen(
                cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def kill_node(self, index: int) -> list[int]:
        """SIGKILL worker node `index` (1..N); returns the pids that were killed."""
        before = [pid for pid, _ in self.recorded_processes(index)]
        self.cli("kill-node", str(index))
        return before

    def restart_node(self, index: int) -> None:
        self.cli("restart-node", str(index))
        self.reload()

    def teardown(self) -> None:
        if not self.stopped:
            self.cli("down", "--grace", "2", check=False)
            self.stopped = True


def start_cluster(
    base: Path,
    num_workers: int = 2,
    cpus_per_node: int = 1,
    head_cpus: int = 0,
    object_store_mb: int = 200,
    health_check_period_ms: int | None = 1000,
) -> LocalRayCluster:
    base.mkdir(parents=True, exist_ok=True)
    cluster = LocalRayCluster(state_dir=base / "state", token_path=base / "auth_token")
    args = ["up", "--workers", str(num_workers), "--cpus-per-node", str(cpus_per_node)]
    args += ["--head-cpus", str(head_cpus), "--object-store-mb", str(object_store_mb)]
    args += ["--token-file", str(cluster.token_path)]
    if health_check_period_ms:
        args += ["--health-check-period-ms", str(health_check_period_ms)]
    r = cluster.cli(*args, check=False)
    cluster.reload()
    if r.returncode != 0:
        cluster.teardown()
        raise AssertionError(f"local cluster failed to start:\n{r.stdout}\n{r.stderr}")
    cluster.up_output = r.stdout
    return cluster


@pytest.fixture
def start_local_ray_cluster(tmp_path_factory) -> Iterator:
    """Factory: start_local_ray_cluster(num_workers=2, cpus_per_node=1, head_cpus=0, ...) -> LocalRayCluster."""
    clusters: list[LocalRayCluster] = []

    def start(**kwargs) -> LocalRayCluster:
        c = start_cluster(tmp_path_factory.mktemp("ray-cluster"), **kwargs)
        clusters.append(c)
        return c

    yield start
    for c in reversed(clusters):
        c.teardown()


@pytest.fixture
def local_ray_cluster(request, start_local_ray_cluster) -> LocalRayCluster:
    """Head (0 CPU) + 2 worker nodes x 1 CPU; override with indirect parametrization (a dict of kwargs)."""
    kwargs = getattr(request, "param", None) or {}
    return start_local_ray_cluster(**kwargs)
