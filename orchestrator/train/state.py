"""What a checkpoint holds and a resume restores: the training state of one worker.

`TrainingState` is the single place that says what goes into a checkpoint (model, optimizer, schedule,
step, every rank's data position and RNG state, MLflow run id, compute clock, data counts, resolved config,
and the EMA of the weights when `train.ema_decay` is set) and how a restored checkpoint is put back.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import torch

from orchestrator.checkpoint.format import read_weights, save_checkpoint
from orchestrator.train.checkpoints import load_agreed, rng_state, set_rng_state
from orchestrator.train.compute import ComputeClock
from orchestrator.train.data_counts import DataCounts
from orchestrator.train.ema import WeightEma
from pipelines.loader import ShardLoader


@dataclass
class TrainingState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: ShardLoader
    clock: ComputeClock
    run_id: str | None
    step: int = 0
    start_epoch: int = 0
    resumed: bool = False
    run_counts: DataCounts = field(default_factory=DataCounts)  # finished epochs, all ranks (checkpointed)
    ema: WeightEma | None = None  # train.ema_decay: the EMA of model's weights (checkpointed as "ema")

    def restore(self, session, rank: int, world: int, log) -> bool:
        """Load the checkpoint every rank agrees on (rank 0 chooses); False when there is none."""
        restored = load_agreed(session.restore_candidates, rank, world, warn=log)
        if restored is None:
            return False
        state, source = restored
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.loader.load_state_dict(state["data"])
        self.start_epoch, self.resumed = state["data"]["epoch"], True
        self.run_id = state.get("mlflow_run_id") or self.run_id
        self.clock.resume(state)
        self.run_counts = DataCounts.from_state(state.get("data_counts"))
        rngs = state.get("rng", [])
        if rank < len(rngs):
            set_rng_state(rngs[rank])
        log(f"[resume] from {source.name}: step {self.step}, data at epoch {self.start_epoch} batch "
            f"{self.loader.batches_consumed}")
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        elif self.ema is not None:  # setup starts it from the restored weights once every rank holds them
            log(f"[ema] {source.name} holds no EMA of the weights (written with train.ema_decay off): the EMA "
                f"starts from its weights at step {self.step}")
        return True

    def load_init_weights(self, url: str, storage_options: dict) -> None:
        """A state_dict file (local path or fsspec URL): how fine-tuning starts every worker from its weights.
        Read like every checkpoint file (orchestrator/checkpoint/format.py read_weights: weights_only=True)."""
        from pipelines.redaction import redact_url
        from pipelines.storage import read_bytes

        self.model.load_state_dict(read_weights(io.BytesIO(read_bytes(url, storage_options)), redact_url(url)))

    def save(self, directory, world: int, rank: int, config: dict) -> None:
        """Every rank's RNG state and data position are gathered (a collective); rank 0 writes."""
        rngs, data_states = _gather((rng_state(), self.loader.state_dict()), world)
        if rank != 0:
            return
        save_checkpoint(directory, {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            # every rank's stream position, so a resume skips read samples without decoding them
            "data": ShardLoader.merge_state_dicts(data_states),
            "rng": rngs,
            "mlflow_run_id": self.run_id,
            **self.clock.state(),  # accelerator_hours (held), productive_hours
            "data_counts": self.run_counts.state(),
            "config": config,
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        })


def _gather(mine: tuple, world: int) -> tuple[list, list]:
    """Every rank's (rng state, data position), transposed into two lists indexed by rank."""
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        gathered = [mine]
    else:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    return [g[0] for g in gathered], [g[1] for g in gathered]
