"""Drain this pod's Ray node with reason PREEMPTION, then wait for its training workers: the KubeRay preStop hook.

    python -m cluster.drain_self --deadline-remaining-seconds 60     # in the pod, before Kubernetes sends SIGTERM

Kubernetes runs a pod's preStop hook before it sends SIGTERM, and counts both against
terminationGracePeriodSeconds. The hook turns an eviction (`kubectl delete pod`, a node drain, a spot reclaim
handled by the cloud's agent) into Ray's preemption notice: `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`
for this pod's node. The run then checkpoints at the next step boundary and waits until Ray Train has committed it
(README, "Preemption"), and Ray Train counts the restart against scaling.max_preemptions, not max_failures. The
hook stays until no Ray Train worker runs in the pod or the deadline has passed, so SIGTERM comes after the
checkpoint; if the hook fails, the workers' own SIGTERM handling (checkpoint.on_sigterm) is the fallback.

This node's id: a driver connected to the cluster from inside the pod is attached to the pod's own raylet, so its
runtime context names the node. The GCS address is RAY_ADDRESS, else KubeRay's FQ_RAY_IP:RAY_PORT (worker pods);
token authentication comes from the environment KubeRay's authOptions gives every container.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from pipelines.cli import entry_point, say

REASON = "DRAIN_NODE_REASON_PREEMPTION"


def gcs_address(env: dict[str, str]) -> str:
    if env.get("RAY_ADDRESS") and env["RAY_ADDRESS"] != "auto":
        return env["RAY_ADDRESS"].split("://", 1)[-1]
    if env.get("FQ_RAY_IP"):
        return f"{env['FQ_RAY_IP']}:{env.get('RAY_PORT', '6379')}"
    return "127.0.0.1:6379"  # the head pod: its own GCS


def drain_command(ray: str, address: str, node_id: str, deadline_s: int, message: str) -> list[str]:
    return [ray, "drain-node", "--address", address, "--node-id", node_id, "--reason", REASON,
            "--reason-message", message, "--deadline-remaining-seconds", str(deadline_s)]


def own_node_id(address: str) -> str:
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        return ray.get_runtime_context().get_node_id()
    finally:
        ray.shutdown()


def training_workers() -> int:
    """Ray Train worker processes in this pod (they share its process namespace with the raylet)."""
    import psutil

    count = 0
    for proc in psutil.process_iter(["cmdline"]):
        args = " ".join(proc.info["cmdline"] or [])
        count += "RayTrainWorker" in args and "drain_self" not in args
    return count


def wait_for_workers(until: float, poll_s: float = 2.0) -> int:
    """Seconds waited until no Ray Train worker runs here, or `until` (time.monotonic) has passed."""
    t0 = time.monotonic()
    while time.monotonic() < until and training_workers():
        time.sleep(poll_s)
    return int(time.monotonic() - t0)


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.drain_self", description=__doc__.split("\n\n")[0])
    parser.add_argument("--deadline-remaining-seconds", type=int, required=True,
                        help="when the node goes, from now; the hook waits at most this long")
    parser.add_argument("--reason-message", default="Kubernetes is terminating the pod")
    parser.add_argument("--no-wait", action="store_true", help="drain and return at once")
    args = parser.parse_args(argv)
    if args.deadline_remaining_seconds < 1:
        parser.error(f"--deadline-remaining-seconds={args.deadline_remaining_seconds}: expected seconds >= 1")
    until = time.monotonic() + args.deadline_remaining_seconds
    address = gcs_address(dict(os.environ))
    node_id = own_node_id(address)
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = drain_command(ray if os.path.exists(ray) else "ray", address, node_id,
                        args.deadline_remaining_seconds, args.reason_message)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:  # e.g. the node is already draining, or the GCS is gone: SIGTERM comes next anyway
        say(f"[drain] ray drain-node failed ({out.returncode}): {(out.stderr or out.stdout).strip()[-500:]}")
        return 1
    say(f"[drain] node {node_id} draining for preemption, deadline {args.deadline_remaining_seconds}s")
    if not args.no_wait:
        say(f"[drain] waited {wait_for_workers(until)}s for this pod's training workers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
