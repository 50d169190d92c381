"""A real multi-node Ray cluster on one machine: a head and N worker nodes, token authentication on.

    python -m cluster.local_cluster up --workers 2 --cpus-per-node 1      # prints RAY_ADDRESS and the submit line
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:<port> --working-dir . \
        -- python -m orchestrator.pretrain
    python -m cluster.local_cluster status
    eval "$(python -m cluster.local_cluster env)"                         # client env vars for this shell
    python -m cluster.local_cluster kill-node 1                           # SIGKILL worker node 1 (failure tests)
    python -m cluster.local_cluster restart-node 1                        # bring worker node 1 back
    python -m cluster.local_cluster down                                  # stop exactly what `up` started

Every node is a separate `ray start` (its own raylet, object store, agents and --temp-dir), started with the
`ray` next to sys.executable, so job entrypoints run with the project's venv (its bin dir is put first on the
nodes' PATH). Node i (1..N) carries the custom resource {"node_i": 1}; the head carries {"node_0": 1} and,
by default, 0 CPUs, so work lands on worker nodes.

Ray reads RAY_AUTH_MODE only from the environment (ray/_private/authentication/authentication_token_setup.py,
AUTH_MODE_ENV_VAR); every node is started with RAY_AUTH_MODE=token, and the token is read, in Ray's order, from
RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. `up` uses --token-file,
else $RAY_AUTH_TOKEN, else $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, and writes a new random token
(mode 0600) to that file if it is missing. The dashboard binds 127.0.0.1 only.

Ray replaces a loopback --node-ip-address with the machine's routable address (services.resolve_ip_for_localhost),
so RAY_ADDRESS is <this machine's IP>:<port> and the GCS port listens on all interfaces: token authentication
is what guards it. Run this on a trusted machine.

`ray start` daemonises, so the state file (<state-dir>/state.json) records every node's processes by pid and
start time, found by their --temp-dir (a fresh mkdtemp per cluster); `down` and `kill-node` signal only those
pids and their descendants (the node's Ray workers). Never `ray stop`: it would stop every Ray on the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from cluster.loopback import free_port

STATE_VERSION = 1
DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"
DEFAULT_STATE_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixer-orchestrator" / "local-cluster"
)
START_TIMEOUT_S = 180


class ClusterError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- environment


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


def resolve_token(token_file: str | None) -> Path | None:
    """The token file the nodes and clients use (None: the token comes from $RAY_AUTH_TOKEN)."""
    if token_file:
        path = Path(token_file).expanduser().resolve()
    elif os.environ.get("RAY_AUTH_TOKEN"):
        return None
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser().resolve()
    else:
        path = DEFAULT_TOKEN_PATH
    if not path.exists() or not path.read_text().strip():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # same generator as ray's generate_new_authentication_token
        print(f"wrote a new Ray auth token to {path}", file=sys.stderr)
    return path


def read_token(state: dict) -> str:
    if state.get("token_path"):
        return Path(state["token_path"]).read_text().strip()
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        raise ClusterError("this cluster takes its token from $RAY_AUTH_TOKEN, which is not set here")
    return token


def node_env(token_path: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"
    if token_path is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
        env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)  # a stale RAY_ADDRESS would make `ray start --head` misbehave
    return env


def client_env(state: dict) -> dict[str, str]:
    """What a client (ray job submit, ray status, ray.init) needs to reach this cluster."""
    env = {"RAY_AUTH_MODE": "token", "RAY_ADDRESS": state["gcs_address"]}
    if state.get("token_path") and Path(state["token_path"]) != DEFAULT_TOKEN_PATH:
        env["RAY_AUTH_TOKEN_PATH"] = state["token_path"]
    return env


def submit_line(state: dict, entrypoint: str = "python -m orchestrator.pretrain") -> str:
    env = client_env(state)
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k != "RAY_ADDRESS")
    ray = "ray" if shutil.which("ray") == str(ray_executable()) else str(ray_executable())
    return f"{prefix} {ray} job submit --address {state['dashboard_url']} --working-dir . -- {entrypoint}"


# ---------------------------------------------------------------------------------------------- state


def state_path(state_dir: Path) -> Path:
    return state_dir / "state.json"


def load_state(state_dir: Path) -> dict:
    path = state_path(state_dir)
    if not path.exists():
        raise ClusterError(f"no local cluster recorded in {state_dir} (run `up` first)")
    return json.loads(path.read_text())


def save_state(state_dir: Path, state: dict) -> None:
    path = state_path(state_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- processes


def _is_node_process(cmdline: list[str], temp_dir: str, ray_dir: str) -> bool:
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
            if _is_node_process(p.info["cmdline"] or [], node["temp_dir"], ray_dir):
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


def _describe(p: psutil.Process) -> dict:
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


# ---------------------------------------------------------------------------------------------- dashboard


def api_get(state: dict, path: str, token: str | None, timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(state["dashboard_url"] + path)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def alive_nodes(state: dict) -> list[dict]:
    """Nodes the GCS reports ALIVE, through the dashboard's state API (token-authenticated)."""
    status, body = api_get(state, "/api/v0/nodes?limit=1000&detail=false", read_token(state))
    if status != 200:
        raise ClusterError(f"state API answered HTTP {status}")
    data = json.loads(body)
    rows = data["data"]["result"]["result"]
    return [r for r in rows if r.get("state") == "ALIVE"]


def wait_for_nodes(state: dict, expected: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    n = -1
    while time.monotonic() < deadline:
        try:
            n = len(alive_nodes(state))
            if n == expected:
                return n
        except (OSError, ClusterError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise ClusterError(f"expected {expected} alive nodes, saw {n} after {timeout_s:.0f} s")


# ---------------------------------------------------------------------------------------------- nodes


def _node_id(temp_dir: Path) -> str | None:
    """The node id of the raylet most recently started in temp_dir (restart-node reuses the session dir)."""
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


def _worker_node(state: dict, i: int) -> dict:
    temp_root = Path(state["temp_root"])
    g = state["gpus_per_node"]
    node = {
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
    return node


def _start_workers(state: dict, state_dir: Path, indices: list[int], attempts: int = 2) -> None:
    """Start worker nodes side by side; a node whose `ray start` fails (Ray gives a raylet 30 s to register,
    which a loaded machine can miss) is cleaned up and started once more."""
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
            node["pids"] = [_describe(p) for p in node_processes(node)]
            node["node_id"] = _node_id(Path(node["temp_dir"]))
            state["nodes"] = [n for n in state["nodes"] if n["index"] != node["index"]] + [node]
            state["nodes"].sort(key=lambda n: n["index"])
            save_state(state_dir, state)
        if not pending:
            return
        if attempt + 1 < attempts:
            print(f"`ray start` failed for worker node(s) {pending}; trying again", file=sys.stderr)
    raise ClusterError("\n".join(errors[i] for i in pending))


def _start_head(
    state: dict, state_dir: Path, head: dict, token_path: Path | None, args, attempts: int = 2
) -> None:
    env = node_env(token_path)
    if args.health_check_period_ms:
        # GCS side of node-failure detection (RayConfig reads RAY_<name> from the GCS's environment):
        # a node is declared dead after health_check_failure_threshold (5) missed periods.
        env["RAY_health_check_period_ms"] = str(args.health_check_period_ms)
    log = state_dir / "logs" / "start-n0.log"
    for attempt in range(attempts):
        taken: set[int] = set()
        gcs_port, dashboard_port, client_port = (free_port(taken, host="") for _ in range(3))
        state["dashboard_url"] = f"http://127.0.0.1:{dashboard_port}"
        cmd = [str(ray_executable()), "start", "--head", "--port", str(gcs_port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
               "--ray-client-server-port", str(client_port)]  # fmt: skip
        cmd += _common_args(Path(head["temp_dir"]), head, taken, args.object_store_mb)
        try:
            _wait_ray_start(_run_ray_start(cmd, env, log), log, "the head node")
            return
        except ClusterError:
            signal_processes(node_processes(head), grace_s=0)
            shutil.rmtree(head["temp_dir"], ignore_errors=True)
            if attempt + 1 == attempts:
                raise
            print("`ray start --head` failed; trying again", file=sys.stderr)


def _any_alive(state: dict) -> bool:
    return any(node_processes(n) for n in state.get("nodes", []))


# ---------------------------------------------------------------------------------------------- commands


def cmd_up(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).expanduser().resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    if state_path(state_dir).exists():
        old = load_state(state_dir)
        if _any_alive(old):
            raise ClusterError(f"a local cluster recorded in {state_dir} is still running: `down` it first")
        state_path(state_dir).unlink()
    if args.workers < 0 or args.cpus_per_node < 0 or args.head_cpus < 0 or args.gpus_per_node < 0:
        raise ClusterError("--workers, --cpus-per-node, --head-cpus and --gpus-per-node must be >= 0")

    ray = str(ray_executable())
    token_path = resolve_token(args.token_file)
    # Short temp root: Ray's unix socket paths (<temp-dir>/session_*/sockets/plasma_store) must fit 107 bytes.
    temp_root = Path(tempfile.mkdtemp(prefix="mxc-", dir=args.temp_root))
    head = {
        "index": 0,
        "role": "head",
        "temp_dir": str(temp_root / "n0"),
        "num_cpus": args.head_cpus,
        "num_gpus": 0,
        "resources": {"node_0": 1},
        "pids": [],
        "node_id": None,
    }
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
        "workers": args.workers,
        "cpus_per_node": args.cpus_per_node,
        "gpus_per_node": args.gpus_per_node,
        "object_store_mb": args.object_store_mb,
        "health_check_period_ms": args.health_check_period_ms,
        "nodes": [head],
    }
    save_state(state_dir, state)  # written first, so that `down` can clean up a half-started cluster
    try:
        _start_head(state, state_dir, head, token_path, args)
        head["pids"] = [_describe(p) for p in node_processes(head)]
        head["node_id"] = _node_id(Path(head["temp_dir"]))
        state["gcs_address"] = (Path(head["temp_dir"]) / "ray_current_cluster").read_text().strip()
        save_state(state_dir, state)
        _start_workers(state, state_dir, list(range(1, args.workers + 1)))
        wait_for_nodes(state, args.workers + 1, timeout_s=60)
    except BaseException:
        print(f"start failed; stopping what was started (Ray logs kept in {temp_root})", file=sys.stderr)
        _down(state, state_dir, grace_s=0, keep_logs=True)
        raise

    env = client_env(state)
    print(f"Local Ray cluster up: head + {args.workers} worker node(s), token authentication on.")
    print(f"  state:      {state_path(state_dir)}")
    print(f"  RAY_ADDRESS={state['gcs_address']}")
    print(f"  dashboard:  {state['dashboard_url']}  (bound to 127.0.0.1; every request needs the token)")
    print("  client environment:")
    for k, v in env.items():
        print(f"    export {k}={shlex.quote(v)}")
    print("  submit a job:")
    print(f"    {submit_line(state)}")
    print(
        f"  stop it:    {shlex.quote(sys.executable)} -m cluster.local_cluster down --state-dir {state_dir}"
    )
    return 0


def _down(state: dict, state_dir: Path, grace_s: float, keep_logs: bool) -> list[psutil.Process]:
    procs: dict[int, psutil.Process] = {}
    for node in state.get("nodes", []):
        for p in node_processes(node):
            procs[p.pid] = p
    survivors = signal_processes(list(procs.values()), grace_s)
    if not survivors:
        if not keep_logs and state.get("temp_root") and Path(state["temp_root"]).name.startswith("mxc-"):
            shutil.rmtree(state["temp_root"], ignore_errors=True)
        path = state_path(state_dir)
        if path.exists():
            path.unlink()
    return survivors


def cmd_down(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).expanduser().resolve()
    if not state_path(state_dir).exists():
        print(f"no local cluster recorded in {state_dir}; nothing to stop")
        return 0
    state = load_state(state_dir)
    survivors = _down(state, state_dir, args.grace, args.keep_logs)
    if survivors:
        print(f"could not stop pids {[p.pid for p in survivors]}", file=sys.stderr)
        return 1
    kept = f" (logs kept in {state['temp_root']})" if args.keep_logs else ""
    print(f"stopped the local cluster recorded in {state_dir}{kept}")
    return 0


def _worker(state: dict, index: int) -> dict:
    for node in state["nodes"]:
        if node["index"] == index:
            if node["role"] == "head":
                raise ClusterError("node 0 is the head; use `down` to stop the cluster")
            return node
    raise ClusterError(f"no worker node {index}; this cluster has nodes 1..{state['workers']}")


def cmd_kill_node(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).expanduser().resolve()
    state = load_state(state_dir)
    node = _worker(state, args.index)
    procs = node_processes(node)
    survivors = signal_processes(procs, grace_s=0)
    node["killed_at"] = time.time()
    save_state(state_dir, state)
    print(f"SIGKILLed worker node {args.index}: pids {sorted(p.pid for p in procs)}")
    return 1 if survivors else 0


def cmd_restart_node(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).expanduser().resolve()
    state = load_state(state_dir)
    node = _worker(state, args.index)
    if node_processes(node):
        raise ClusterError(f"worker node {args.index} is still running; kill-node it first")
    _start_workers(state, state_dir, [args.index])
    print(f"worker node {args.index} started again (node id {_worker(state, args.index)['node_id']})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).expanduser().resolve()
    state = load_state(state_dir)
    print(f"state: {state_path(state_dir)}")
    print(f"RAY_ADDRESS={state['gcs_address']}  dashboard {state['dashboard_url']}")
    for node in state["nodes"]:
        procs = node_processes(node)
        print(
            f"  node {node['index']} ({node['role']}): {'running' if procs else 'DOWN'}, {len(procs)} processes, "
            f"CPU {node['num_cpus']}, GPU {node['num_gpus']}, resources {node['resources']}, id {node['node_id']}"
        )
    try:
        nodes = alive_nodes(state)
        print(f"GCS reports {len(nodes)} alive node(s)")
    except (OSError, ClusterError, KeyError, ValueError) as e:
        print(f"GCS/dashboard not reachable: {e}")
        return 1
    print(f"submit: {submit_line(state)}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    state = load_state(Path(args.state_dir).expanduser().resolve())
    for k, v in client_env(state).items():
        print(f"export {k}={shlex.quote(v)}")
    print(f"export RAY_API_SERVER_ADDRESS={shlex.quote(state['dashboard_url'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.local_cluster",
        description="A multi-node Ray cluster on this machine (token authentication on).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "--state-dir", default=str(DEFAULT_STATE_DIR), help="where state.json and start logs live"
        )
        p.set_defaults(fn=fn)
        return p

    p = add("up", cmd_up, "start a head and N worker nodes")
    p.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    p.add_argument("--cpus-per-node", type=int, default=1, help="CPUs each worker node offers (default 1)")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=0,
        help="GPUs per worker node; node i gets CUDA_VISIBLE_DEVICES=(i-1)*G..i*G-1 (default 0)",
    )
    p.add_argument(
        "--head-cpus", type=int, default=0, help="CPUs the head offers (default 0: work goes to workers)"
    )
    p.add_argument("--object-store-mb", type=int, default=None, help="object store per node (default: Ray's)")
    p.add_argument(
        "--token-file",
        default=None,
        help="auth token file (created if missing); default $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token",
    )
    p.add_argument(
        "--health-check-period-ms",
        type=int,
        default=None,
        help="GCS node health-check period (Ray's default 3000: a killed node is seen dead after ~15 s)",
    )
    p.add_argument("--temp-root", default="/tmp", help="parent of the per-cluster temp dir (keep it short)")
    p = add("down", cmd_down, "stop only the processes this cluster started")
    p.add_argument("--grace", type=float, default=3.0, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("--keep-logs", action="store_true", help="keep the nodes' temp dirs (Ray logs)")
    add("status", cmd_status, "show the recorded nodes and what the GCS sees")
    add("env", cmd_env, "print export lines for a client shell")
    p = add("kill-node", cmd_kill_node, "SIGKILL one worker node's processes (failure tests)")
    p.add_argument("index", type=int, help="worker node index, 1..N")
    p = add("restart-node", cmd_restart_node, "start a killed worker node again")
    p.add_argument("index", type=int, help="worker node index, 1..N")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
