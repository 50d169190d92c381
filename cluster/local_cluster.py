"""A real multi-node Ray cluster on one machine: a head and N worker nodes, token authentication on.

    python -m cluster.local_cluster up --workers 2 --cpus-per-node 1      # prints RAY_ADDRESS and the submit line
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:<port> --working-dir . \
        -- python -m orchestrator.pretrain
    python -m cluster.local_cluster status
    eval "$(python -m cluster.local_cluster env)"                         # client env vars for this shell
    python -m cluster.local_cluster kill-node 1                           # SIGKILL worker node 1 (failure tests)
    python -m cluster.local_cluster restart-node 1                        # bring worker node 1 back
    python -m cluster.local_cluster down                                  # stop exactly what `up` started

This is the command line of cluster.local.LocalCluster (the Python API the tests and benchmarks use):
nodes are started by cluster.ray_start, token handling is cluster.token_auth, the recorded processes and
the state file are cluster.processes. Never `ray stop`: it would stop every Ray on the machine.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from cluster.local import LocalCluster
from cluster.processes import DEFAULT_STATE_DIR, ClusterError, node_processes, state_path
from cluster.token_auth import client_env, submit_line
from pipelines.cli import entry_point

log = logging.getLogger(__name__)


def cmd_up(args: argparse.Namespace) -> int:
    cluster = LocalCluster.up(
        args.state_dir,
        workers=args.workers,
        cpus_per_node=args.cpus_per_node,
        gpus_per_node=args.gpus_per_node,
        head_cpus=args.head_cpus,
        object_store_mb=args.object_store_mb,
        token_file=args.token_file,
        health_check_period_ms=args.health_check_period_ms,
        temp_root=args.temp_root,
    )
    print(cluster.report())
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).expanduser().resolve()
    if not state_path(state_dir).exists():
        print(f"no local cluster recorded in {state_dir}; nothing to stop")
        return 0
    cluster = LocalCluster(state_dir)
    survivors = cluster.down(args.grace, args.keep_logs)
    if survivors:
        log.warning("could not stop pids %s", survivors)
        return 1
    kept = f" (logs kept in {cluster.state['temp_root']})" if args.keep_logs else ""
    print(f"stopped the local cluster recorded in {state_dir}{kept}")
    return 0


def cmd_kill_node(args: argparse.Namespace) -> int:
    killed, survivors = LocalCluster(args.state_dir).kill_node(args.index)
    print(f"SIGKILLed worker node {args.index}: pids {killed}")
    return 1 if survivors else 0


def cmd_restart_node(args: argparse.Namespace) -> int:
    node_id = LocalCluster(args.state_dir).restart_node(args.index)
    print(f"worker node {args.index} started again (node id {node_id})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cluster = LocalCluster(args.state_dir)
    state = cluster.state
    print(f"state: {state_path(cluster.state_dir)}")
    print(f"RAY_ADDRESS={state['gcs_address']}  dashboard {state['dashboard_url']}")
    for node in state["nodes"]:
        procs = node_processes(node)
        print(
            f"  node {node['index']} ({node['role']}): {'running' if procs else 'DOWN'}, {len(procs)} processes, "
            f"CPU {node['num_cpus']}, GPU {node['num_gpus']}, resources {node['resources']}, id {node['node_id']}"
        )
    try:
        nodes = cluster.alive_nodes(detail=False)
        print(f"GCS reports {len(nodes)} alive node(s)")
    except (OSError, ClusterError, KeyError, ValueError) as e:
        print(f"GCS/dashboard not reachable: {e}")
        return 1
    print(f"submit: {submit_line(state)}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    state = LocalCluster(args.state_dir).state
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


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
