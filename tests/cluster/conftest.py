"""Fixtures that bring up a real multi-node Ray cluster on 127.0.0.1 with cluster.local.LocalCluster.

Reusable by any end-to-end test that needs several Ray nodes (e.g. a pretraining run that survives a worker
node being killed):

    @pytest.mark.slow
    def test_something(local_ray_cluster):                 # head (0 CPU) + 2 worker nodes x 1 CPU
        r = local_ray_cluster.submit(["python", "-m", "orchestrator.pretrain", "train.max_steps=20"],
                                     working_dir=REPO_ROOT, wait=False)
        local_ray_cluster.kill_node(1)
        local_ray_cluster.wait_for_alive_nodes(2)

    @pytest.mark.parametrize("local_ray_cluster", [{"workers": 3, "cpus_per_node": 2}], indirect=True)
    def test_bigger(local_ray_cluster): ...

    def test_two(start_local_ray_cluster):                 # factory: any number of clusters, all torn down
        a = start_local_ray_cluster(workers=1)

The fixtures hand out the same LocalCluster that `python -m cluster.local_cluster` and the benchmarks use.
The token lives in a per-cluster file (RAY_AUTH_TOKEN_PATH), so ~/.ray/auth_token is never touched.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cluster.local import LocalCluster

# Smaller than Ray's defaults, so that several nodes fit a 2-core CI machine; a killed node is seen dead in ~5 s.
TEST_DEFAULTS = {"workers": 2, "cpus_per_node": 1, "head_cpus": 0, "object_store_mb": 200,
                 "health_check_period_ms": 1000}  # fmt: skip


@pytest.fixture
def start_local_ray_cluster(tmp_path_factory) -> Iterator:
    """Factory: start_local_ray_cluster(**LocalCluster.up kwargs) -> LocalCluster (TEST_DEFAULTS otherwise)."""
    clusters: list[LocalCluster] = []

    def start(**kwargs) -> LocalCluster:
        base = tmp_path_factory.mktemp("ray-cluster")
        c = LocalCluster.up(base / "state", token_file=base / "auth_token", **{**TEST_DEFAULTS, **kwargs})
        clusters.append(c)
        return c

    yield start
    for c in reversed(clusters):
        c.down(grace_s=2)


@pytest.fixture
def local_ray_cluster(request, start_local_ray_cluster) -> LocalCluster:
    """Head (0 CPU) + 2 worker nodes x 1 CPU; override with indirect parametrization (a dict of kwargs)."""
    kwargs = getattr(request, "param", None) or {}
    return start_local_ray_cluster(**kwargs)
