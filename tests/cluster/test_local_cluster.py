"""A real multi-node Ray cluster on this machine: token auth, job submission, node failure, clean teardown.

.venv/bin/python -m pytest tests/cluster/test_local_cluster.py -q      # ~60 s on 2 cores
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
RAY_DIR = list(importlib.util.find_spec("ray").submodule_search_locations)[0]


def _alive(pid: int, create_time: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 0.01
    except psutil.NoSuchProcess:
        return False


def _decoy(cmdline_tail: list[str]) -> subprocess.Popen:
    """A process whose command line looks like a Ray process of *another* cluster: `down` must not touch it."""
    code = f"import time; time.sleep(600)  # {RAY_DIR}/core/src/ray/raylet/raylet"
    return subprocess.Popen([sys.executable, "-c", code, *cmdline_tail])


@pytest.fixture
def foreign_ray(tmp_path):
    """A plain `ray start --head` (no dashboard) that the launcher did not start: `down` must leave it alone."""
    from cluster.loopback import free_port
    from cluster.processes import node_processes, signal_processes

    temp_dir = Path(tempfile.mkdtemp(prefix="mxf-", dir="/tmp"))
    token = tmp_path / "foreign_token"
    token.write_text("f" * 64)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    taken: set[int] = set()
    gcs, client, agent = (free_port(taken, host="") for _ in range(3))  # "": the GCS listens on all interfaces
    cmd = [RAY, "start", "--head", "--include-dashboard=false", "--num-cpus=0", "--disable-usage-stats",
           f"--temp-dir={temp_dir}", f"--port={gcs}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", "--min-worker-port=0", "--max-worker-port=0"]  # fmt: skip
    node = {"temp_dir": str(temp_dir), "pids": []}
    try:
        for _ in range(2):  # Ray gives the raylet 30 s to register: a loaded machine can miss that once
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            if r.returncode == 0:
                break
            signal_processes(node_processes(node), grace_s=0)
        assert r.returncode == 0, r.stdout + r.stderr
        procs = node_processes(node)
        assert any("raylet" in " ".join(p.cmdline()[:1]) for p in procs)
        yield [(p.pid, p.create_time()) for p in procs]
    finally:
        signal_processes(node_processes(node), grace_s=0)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _active_nodes_in_ray_status(text: str) -> int:
    lines = text.splitlines()
    start = lines.index("Active:") + 1
    count = 0
    for line in lines[start:]:
        if not line.startswith(" "):
            break
        if "(no active nodes)" not in line:
            count += 1
    return count


def test_local_cluster_auth_jobs_node_failure_and_teardown(start_local_ray_cluster, foreign_ray, tmp_path):
    t0 = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - t0 - sum(phases.values()), 1)

    cluster = start_local_ray_cluster(workers=2)
    phase("up")

    # What `up` prints: RAY_ADDRESS, the dashboard and the exact submit line (token auth in it).
    up_output = cluster.report()
    assert f"RAY_ADDRESS={cluster.address}" in up_output
    assert cluster.dashboard_url.startswith("http://127.0.0.1:")
    assert f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={cluster.token_path} " in up_output
    assert (
        f"job submit --address {cluster.dashboard_url} --working-dir . -- python -m orchestrator.pretrain"
        in (up_output)
    )
    assert cluster.token_path.stat().st_mode & 0o077 == 0, "token file must be private"

    # A token-authenticated client sees 3 nodes: the head (0 CPU) and 2 workers with their own resources.
    nodes = cluster.alive_nodes()
    assert len(nodes) == 3
    by_resource = {k: n for n in nodes for k in n["resources_total"] if k.startswith("node_")}
    assert set(by_resource) == {"node_0", "node_1", "node_2"}
    assert (
        by_resource["node_0"]["is_head_node"] and by_resource["node_0"]["resources_total"].get("CPU", 0) == 0
    )
    assert (
        by_resource["node_1"]["resources_total"]["CPU"]
        == 1
        == by_resource["node_2"]["resources_total"]["CPU"]
    )
    assert len({n["node_id"] for n in nodes}) == 3
    # `ray status` reads the autoscaler's report, refreshed every few seconds: poll it (bounded) until it
    # has caught up with the nodes the state API already shows.
    deadline = time.monotonic() + 60
    while True:
        status = subprocess.run([RAY, "status", "--address", cluster.address], env=cluster.env,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert status.returncode == 0, status.stderr
        if _active_nodes_in_ray_status(status.stdout) == 3 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert _active_nodes_in_ray_status(status.stdout) == 3, status.stdout

    phase("checks")

    # Without the token the job API answers HTTP 401; with a wrong one, 403.
    assert cluster.api_request("/api/jobs/", token=None)[0] == 401
    assert cluster.api_request("/api/jobs/", token="0" * 64)[0] == 403  # wrong token: forbidden
    body = json.dumps({"entrypoint": "echo pwned"}).encode()
    assert cluster.api_request("/api/jobs/", token=None, method="POST", body=body)[0] == 401
    assert cluster.api_request("/api/jobs/")[0] == 200

    # A trivial job through `ray job submit` runs on the cluster and sees both worker nodes.
    (tmp_path / "job").mkdir()
    code = (
        "import os, ray; ray.init(); r = ray.cluster_resources(); "
        "print('RESOURCES', sorted(k for k in r if k.startswith('node_')), r.get('CPU')); "
        "print('AUTH', os.environ.get('RAY_AUTH_MODE'), 'UNBUFFERED', os.environ.get('PYTHONUNBUFFERED'))"
    )
    runtime_env = ("--runtime-env", str(REPO_ROOT / "cluster" / "runtime_env.yaml"))
    r = cluster.submit(
        ["python", "-c", code], working_dir=tmp_path / "job", timeout=120, extra_args=runtime_env
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RESOURCES ['node_0', 'node_1', 'node_2'] 2.0" in r.stdout, r.stdout
    assert "AUTH token UNBUFFERED 1" in r.stdout, r.stdout  # node env + cluster/runtime_env.yaml env_vars

    phase("job")

    # Kill worker node 1: its processes die, the GCS drops it, node 2 and the head are untouched.
    node1 = cluster.recorded_processes(1)
    node2 = cluster.recorded_processes(2)
    head = cluster.recorded_processes(0)
    cluster.kill_node(1)
    assert not any(_alive(*p) for p in node1)
    cluster.wait_for_alive_nodes(2, timeout=45)
    alive_ids = {n["node_id"] for n in cluster.alive_nodes()}
    assert cluster.node_id(1) not in alive_ids and cluster.node_id(2) in alive_ids
    assert all(_alive(*p) for p in node2 + head)

    phase("kill-node")

    # Teardown stops exactly what this cluster started.
    root = cluster.state["temp_root"]
    decoys = [
        _decoy([f"--temp-dir={root}-other/n0"]),  # a sibling temp dir that shares the prefix
        _decoy([f"--session_dir={root}/n20/session_x"]),  # n20 is not n2
    ]
    others = foreign_ray  # a Ray instance this launcher did not start
    assert others and all(_alive(*p) for p in others)
    try:
        cluster.down(grace_s=2)
        assert not any(_alive(*p) for p in node2 + head), "down left processes of its cluster running"
        assert all(d.poll() is None for d in decoys), "down signalled a process it did not start"
        assert all(_alive(*p) for p in others), "down touched another Ray instance"
        assert not (cluster.state_dir / "state.json").exists()
    finally:
        for d in decoys:
            d.kill()
            d.wait()
    phase("down")
    print(f"phases (s): {phases}, total {time.monotonic() - t0:.1f} s")


def test_down_without_cluster_is_a_noop(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cluster.local_cluster", "down", "--state-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)  # fmt: skip
    assert r.returncode == 0 and "nothing to stop" in r.stdout
