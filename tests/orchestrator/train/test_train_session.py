"""The one private Ray use (quieting Ray Train's per-report log line), pinned so that a Ray upgrade that moves
it fails here, loudly, instead of silently flooding the training logs."""

from __future__ import annotations

import logging
import os

import pytest

from orchestrator.train.session import quiet_per_report_logs


def test_ray_train_per_report_logger_is_still_where_quiet_per_report_logs_looks():
    import ray
    from ray.train.v2._internal.execution import context  # what quiet_per_report_logs relies on (Ray 2.60.0)

    assert context.logger.name == context.__file__, (
        f"Ray {ray.__version__} no longer names its per-report logger after context.py: update "
        "orchestrator/train/session.quiet_per_report_logs"
    )
    previous = context.logger.level
    try:
        context.logger.setLevel(logging.NOTSET)
        quiet_per_report_logs()
        assert not context.logger.isEnabledFor(logging.INFO)
        assert context.logger.isEnabledFor(logging.WARNING)
    finally:
        context.logger.setLevel(previous)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_session_uploads_checkpoints_in_the_background_one_at_a_time(tmp_path):
    """RaySession.report against a real Train V2 run: rank 0's reports are ASYNC (the step after a checkpoint
    does not wait for storage), the previous checkpoint is committed before the next is handed over (a restart
    never finds none registered), wait_for_checkpoints() returns once the last one is registered, the staged
    directory goes once uploaded, and the last checkpoint, still uploading when the function returns, is the
    run's."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_fn():  # nested: pickled by value for the worker
        import ray.train

        from orchestrator.train.session import RaySession

        session = RaySession()
        calls = []

        class Recording:  # ray.train, with the calls RaySession makes recorded in order
            def __getattr__(self, name):
                return getattr(ray.train, name)

            def report(self, metrics, **kw):
                calls.append(("report", metrics["step"], kw["checkpoint_upload_mode"].value, kw["checkpoint"] is not None))
                return ray.train.report(metrics, **kw)

            def get_all_reported_checkpoints(self, **kw):
                calls.append(("commit", kw["consistency_mode"].value))
                return ray.train.get_all_reported_checkpoints(**kw)

        session._train = Recording()
        staged = []
        for step in (1, 2, 3):
            d = session.staging_dir()
            (d / "state.pt").write_bytes(b"x" * 1000)
            staged.append(d)
            session.report({"step": step}, d)
            session.report({"step": step}, None)  # a metrics-only report in between
        session.wait_for_checkpoints()
        committed = [c.metrics["step"] for c in ray.train.get_all_reported_checkpoints()]
        session.report({"step": 4}, session.staging_dir())  # the last: the function returns while it uploads
        return {"calls": calls, "committed": committed, "staged_left": [d.exists() for d in staged]}

    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        result = TorchTrainer(train_fn, scaling_config=ScalingConfig(num_workers=1),
                              run_config=RunConfig(name="r", storage_path=str(tmp_path / "runs"))).fit()
    finally:
        ray.shutdown()
    out = result.return_value
    assert result.checkpoint is not None and result.metrics["step"] == 4  # registered after the return
    reports = [c for c in out["calls"] if c[0] == "report"]
    assert {c[2] for c in reports} == {"ASYNC"} and len(reports) == 7
    # before each checkpoint after the first, the one before it is committed; never two in flight
    assert out["calls"] == [
        ("report", 1, "ASYNC", True), ("report", 1, "ASYNC", False),
        ("commit", "COMMITTED"), ("report", 2, "ASYNC", True), ("report", 2, "ASYNC", False),
        ("commit", "COMMITTED"), ("report", 3, "ASYNC", True), ("report", 3, "ASYNC", False),
        ("commit", "COMMITTED"),  # wait_for_checkpoints()
        ("report", 4, "ASYNC", True),  # nothing in flight: no commit needed before it
    ]
    assert out["committed"] == [1, 2, 3]
    assert out["staged_left"] == [False, False, False]


def test_node_ranks_count_ray_nodes_in_world_rank_order(monkeypatch):
    """Workers on Ray nodes [B, A, B, C] (world ranks 0-3): nodes numbered by their lowest rank, B=0, A=1, C=2."""
    from types import SimpleNamespace

    import ray
    import torch.distributed as dist

    from orchestrator.train.session import LocalSession, ray_node_ranks

    nodes = ["B", "A", "B", "C"]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), nodes))
    ranks = []
    for rank, node in enumerate(nodes):
        monkeypatch.setattr(ray, "get_runtime_context", lambda n=node: SimpleNamespace(get_node_id=lambda: n))
        ranks.append(ray_node_ranks(rank, len(nodes)))
    assert ranks == [(0, 0), (1, 0), (0, 1), (2, 0)]
    assert ray_node_ranks(0, 1) == (0, 0)
    assert (LocalSession.node_rank, LocalSession.local_rank) == (0, 0)


def test_a_remote_checkpoint_is_restored_from_this_process_own_copy(tmp_path):
    """Checkpoint.as_directory shares one temp dir per checkpoint among a node's processes and deletes it when the
    last reader leaves; ranks on nodes sharing /tmp read it while another's exit deleted it. Each restore gets
    its own download, removed after; a local checkpoint is read where it lies."""
    import fsspec
    import pyarrow.fs
    import ray.train

    from orchestrator.train.session import _own_copy

    mem = fsspec.filesystem("memory")
    mem.pipe("/ckpts/checkpoint_1/state.pt", b"weights")
    remote = ray.train.Checkpoint("/ckpts/checkpoint_1",
                                  pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(mem)))
    with _own_copy(remote)() as a, _own_copy(remote)() as b:
        assert a != b  # two readers, two copies
        assert open(f"{a}/state.pt", "rb").read() == open(f"{b}/state.pt", "rb").read() == b"weights"
    assert not os.path.exists(a) and not os.path.exists(b)  # removed with the context
    (tmp_path / "c").mkdir()
    local = ray.train.Checkpoint(str(tmp_path / "c"))
    with _own_copy(local)() as path:
        assert path == str(tmp_path / "c")
    assert (tmp_path / "c").exists()  # a local checkpoint is not copied nor removed
