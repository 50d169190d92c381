"""Where the training loop runs: a Ray Train worker or a plain single process.

The loop only talks to a Session (rank, device, model preparation, checkpoint hand-off, reporting), so the
same loop runs under Ray Train and without Ray (tests, benchmarks, debugging).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.checkpoint.runs import run_checkpoints
from orchestrator.train.checkpoints import LocalCheckpointStore, RestoreCandidate


class LocalSession:
    """One process, no Ray; checkpoints go to `checkpoint_root` (see LocalCheckpointStore)."""

    world_rank = 0
    world_size = 1
    local_rank = 0  # this worker's rank on its node (ray_node_ranks)
    node_rank = 0  # its node's rank among the group's nodes

    def __init__(self, checkpoint_root: str, num_to_keep: int = 2, device: str | None = None):
        self.store = LocalCheckpointStore(checkpoint_root, num_to_keep)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.reports: list[dict[str, Any]] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def restore_candidates(self) -> list[RestoreCandidate]:
        return self.store.candidates()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None:
            self.store.commit(checkpoint_dir, metrics["step"])
        self.reports.append(metrics)

    def wait_for_checkpoints(self) -> None:
        pass  # report() commits before it returns

    def staging_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="ckpt_"))

    def preemption_notice(self) -> str | None:
        return None  # one process, no cluster: nothing tells it about preemption

    def agree_max(self, value: int) -> int:
        return value  # one rank: nothing to agree with

    def sigterm_notice(self, grace_s: float):
        return None  # the process's own SIGTERM handling is left alone


class RaySession:
    """A Ray Train V2 worker: DDP via prepare_model, checkpoints persisted by ray.train.report."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        quiet_per_report_logs()
        ctx = ray.train.get_context()
        self.world_rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        # the local rank 0 of each node samples the node's system metrics
        self.node_rank, self.local_rank = ray_node_ranks(self.world_rank, self.world_size)
        self.device = ray.train.torch.get_device()
        self._train = ray.train
        self._unconfirmed = False  # a checkpoint reported, its upload not yet known to be committed
        self._cpu_group = None  # agree_max's gloo group when the training backend is NCCL

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def restore_candidates(self) -> list[RestoreCandidate]:
        """Newest first: checkpoints in the run's storage directory newer than the latest Ray Train hands over,
        then that latest, then its earlier siblings. The loop takes the first that loads.

        Newer ones exist when the group went down between a checkpoint's upload and the controller taking the
        report (Ray 2.60 drops reports it has not yet taken when it restarts a group): the upload is complete,
        or, if it was cut off, the checkpoint does not load and the next one is tried.
        """
        from fsspec.implementations.arrow import ArrowFSWrapper

        latest = self._train.get_checkpoint()
        if latest is None:
            return []
        run_dir = latest.path.rstrip("/").rsplit("/", 1)[0]
        try:
            found = run_checkpoints(ArrowFSWrapper(latest.filesystem), run_dir)
        except Exception:  # the run's directory cannot be listed now: the latest alone
            found = []
        latest_name = latest.path.rstrip("/").rsplit("/", 1)[-1]
        steps = dict(found)
        by_age = sorted(steps, reverse=True)  # checkpoint names sort by age (see run_checkpoints)
        order = [n for n in by_age if n > latest_name] + [latest_name] + [n for n in by_age if n < latest_name]
        return [
            RestoreCandidate(latest_name, steps.get(latest_name), _own_copy(latest)) if name == latest_name
            else RestoreCandidate(name, steps[name],
                                  _own_copy(self._train.Checkpoint(f"{run_dir}/{name}", latest.filesystem)))
            for name in order
        ]

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """A barrier: every rank calls it the same number of times; only rank 0 hands over a checkpoint.

        Rank 0 reports with ASYNC upload: Ray Train uploads the staged checkpoint in a background thread and
        hands it to the controller in report order, so the step after a checkpoint does not wait for storage.
        At most one upload is in flight: before the next checkpoint goes out the previous one is committed
        (registered by the controller). In Ray 2.60 a report the controller has not yet taken is dropped when
        the worker group restarts; with two in flight a failure could leave the run with no checkpoint at all.
        """
        from ray.train import CheckpointUploadMode

        checkpoint = None
        if checkpoint_dir is not None:
            self.wait_for_checkpoints()
            checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir))
            self._unconfirmed = True
        # The staged directory is a temp copy: it goes once persisted (a B/16 checkpoint with its optimizer
        # state is ~0.7 GB per save).
        self._train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                           delete_local_checkpoint_after_upload=checkpoint is not None)

    def wait_for_checkpoints(self) -> None:
        """Return once the last checkpoint this rank reported is uploaded and registered by the controller
        (a restart from then on resumes from it). Not a barrier: ranks without a checkpoint return at once."""
        if self._unconfirmed:
            from ray.train import CheckpointConsistencyMode

            self._train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
            self._unconfirmed = False

    def staging_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="ckpt_"))

    def preemption_notice(self) -> str | None:
        """Ray's notice that a node of this worker group is about to be reclaimed, or None. A barrier: every rank
        calls it equally often. Ray's PreemptionInfo names the nodes, ranks and deadline."""
        from ray.exceptions import ActorDiedError

        try:
            info = self._train.get_preemption_info()
        except ActorDiedError:
            # the controller's synchronisation actor is gone: the group is being torn down (a failure elsewhere,
            # or Tune's scheduler stopping the trial); the worker goes with it, not as a failed training step
            return None
        return None if info is None else str(info)

    def sigterm_notice(self, grace_s: float):
        """This worker process's SIGTERM notice (train/sigterm.py), or None when it cannot be installed."""
        from orchestrator.train.sigterm import install_in_ray_worker

        return install_in_ray_worker(grace_s)

    def agree_max(self, value: int) -> int:
        """The largest of every rank's `value` (an all_reduce of one integer; a barrier: every rank, equally often)."""
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():
            return value
        if self._cpu_group is None and dist.get_backend() != "gloo":
            # a CUDA tensor's .item() would make the host wait for the step's GPU work every step: a gloo group
            # of the same ranks (created by every rank at its first call, equally often) keeps it on the host
            self._cpu_group = dist.new_group(backend="gloo")
        flag = torch.tensor([value], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._cpu_group)
        return int(flag.item())


def _own_copy(checkpoint):
    """A context manager yielding the checkpoint as a local directory this process alone reads.

    Checkpoint.as_directory shares one temp directory per checkpoint among a node's processes and deletes it
    when the last reader leaves; on nodes that share /tmp (a local multi-node cluster, several pods on one
    host path) a rank could read it while another rank's exit was deleting it ("file read failed", seen as a
    damaged checkpoint and a failed restart). A remote checkpoint is downloaded into this process's own
    directory instead; a local one is read where it lies."""
    import contextlib
    import shutil

    import pyarrow.fs

    @contextlib.contextmanager
    def opened():
        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            yield checkpoint.path
            return
        own = tempfile.mkdtemp(prefix="restore_")
        try:
            yield checkpoint.to_directory(own)
        finally:
            shutil.rmtree(own, ignore_errors=True)

    return opened


def ray_node_ranks(world_rank: int, world_size: int) -> tuple[int, int]:
    """(node rank, local rank) of this worker among the group's Ray nodes: nodes numbered in the order of their
    lowest world rank, workers on a node in world-rank order. A collective (every rank, once).

    Ray Train's own get_node_rank()/get_local_rank() group workers by IP address, so several Ray nodes on one host
    (a local multi-node cluster, cluster/local.py) count as one node there; here a node is a Ray node, as
    `ray status` and the dashboard list them. On a cluster with one Ray node per host or pod both agree.
    """
    import ray
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()
    if world_size == 1 or not dist.is_initialized():
        return 0, 0
    nodes: list = [None] * world_size
    dist.all_gather_object(nodes, mine)
    return list(dict.fromkeys(nodes)).index(mine), nodes[:world_rank].count(mine)


def quiet_per_report_logs() -> None:
    """Keep Ray Train's per-report INFO line ("Reporting training result ...", every rank, every report) out of
    the worker's console, where it would drown the progress lines.

    Checked against Ray 2.60.0, which has no public setting for it: the line comes from a logger named after
    the file ray/train/v2/_internal/execution/context.py (``logging.getLogger(__file__)``), outside the
    "ray.train" hierarchy that RunConfig(logging_config=LoggingConfig(...)) filters, and the worker's root
    logger prints INFO. tests/orchestrator/train/test_train_session.py fails when a Ray upgrade moves it; here a
    missing module only means noisier logs.
    """
    import logging

    try:
        from ray.train.v2._internal.execution import (
            context,  # private, see the docstring; README lists every one
        )
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
