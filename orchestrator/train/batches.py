"""What the loop trains on: the loaders, and each step's batch gathered from this rank's stream slots.

One optimizer step takes one chunk from every canonical stream slot this rank owns (pipelines/plan.py), so
the global batch is exact at any world size. `BatchFetcher.next` reads those chunks across epoch
boundaries, notes the epochs whose last batch it took (their bad-sample counts are read right then: the next
`set_epoch` starts new counts), and moves the batch to the training device, all in the step timer's
`data_wait` phase; the loader's device stage (augment_on='device') runs inside it, timed as `device_augment`
(`time_device_stage`). observe.data_delay_s slows every batch of the loader on purpose (a diagnostic).
data.permute's fixed permutation (pipelines/permute.py) is applied on the device to the training batch, after
its augmentation, and to every evaluation batch alike (`input_permutation`, `PermutedBatches`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import pretrained_data_config
from orchestrator.config.checks import augment_on, stream_slots
from orchestrator.config.tree import Config
from orchestrator.eval.real import ReaLSet, load_label_file
from orchestrator.observe.step_timer import StepTimer, delayed
from orchestrator.train.data_counts import DataCounts, epoch_counts
from orchestrator.train.plan import chunk_size, micro_batch_size
from pipelines.loader import ShardLoader
from pipelines.mixup import MixupConfig
from pipelines.permute import InputPermutation
from pipelines.sample_index import load_sample_index
from pipelines.subsets import SubsetSpec
from pipelines.transforms import eval_transform, train_pipeline


def subset_spec(cfg: Config, part: str = "train") -> SubsetSpec:
    """The part of the training split a loader reads (pipelines/subsets.py): training keeps what the minival and
    data.train_fraction leave; `part="minival"` is the held-out slice every choice is made on."""
    return SubsetSpec(cfg.data.minival_fraction, cfg.data.train_fraction, part)


def build_loaders(cfg: Config, job, model_cfg, rank: int, world_size: int, device=None):
    """(the training loader, {set name: evaluation loader}): `val`, then `minival` when the run holds one out."""
    data_cfg = pretrained_data_config(cfg.model.name)
    pipeline = train_pipeline(
        input_size=model_cfg.img_size, mean=data_cfg["mean"], std=data_cfg["std"],
        interpolation=data_cfg["interpolation"], preset=cfg.data.transform,
        randaug_num_ops=cfg.reg.randaug_num_ops, randaug_magnitude=cfg.reg.randaug_magnitude or None,
        randaug_impl=cfg.reg.randaug_impl, decode_on=cfg.data.decode_on,
    )
    eval_tf = eval_transform(data_cfg, input_size=model_cfg.img_size, preset=cfg.data.transform)
    loader_args = dict(
        rank=rank,
        world_size=world_size,
        num_workers=cfg.data.loader_workers,
        seed=cfg.run.seed,
        storage_options=job.storage_options,
        max_bad_fraction=cfg.data.max_bad_fraction,
        pin_memory=cfg.scaling.use_gpu,
        cache_dir=cfg.data.cache_dir,
        cache_max_gb=cfg.data.cache_max_gb,
    )
    subset = subset_spec(cfg)
    index = None if subset.whole_split else load_sample_index(job.dataset_url, cfg.data.train_split,
                                                              job.storage_options)
    mixup = None
    if cfg.reg.mixup_alpha > 0 or cfg.reg.label_smoothing > 0:
        mixup = MixupConfig(alpha=cfg.reg.mixup_alpha, label_smoothing=cfg.reg.label_smoothing)
    # one chunk per canonical stream slot and step, the slots shared among the ranks there are (pipelines/plan.py)
    train = ShardLoader(
        job.dataset_url, cfg.data.train_split, batch_size=chunk_size(cfg), slots=stream_slots(cfg), training=True,
        decoder=pipeline.decoder, transform=pipeline.transform, batch_stage=pipeline.batch_stage,
        augment_on=augment_on(cfg), device=device, decode_crop_on_device=pipeline.decode_crop_on_device,
        shuffle_buffer=cfg.data.shuffle_buffer, mixup=mixup, num_classes=job.num_classes,
        return_keys=bool(cfg.data.trace_keys_dir), subset=subset, sample_index=index, **loader_args,
    )
    val = ShardLoader(
        job.dataset_url, cfg.data.val_split, batch_size=max(micro_batch_size(cfg), 64), transform=eval_tf,
        training=False,
        **loader_args,
    )
    sets = {"val": val}
    if cfg.data.minival_fraction > 0:
        sets["minival"] = ShardLoader(
            job.dataset_url, cfg.data.train_split, batch_size=max(micro_batch_size(cfg), 64), transform=eval_tf,
            training=False, subset=subset_spec(cfg, "minival"), sample_index=index, **loader_args,
        )
    permutation = input_permutation(cfg, model_cfg)  # every evaluation set sees the training's
    return train, {name: permuted(s, permutation, device) for name, s in sets.items()}


def input_permutation(cfg: Config, model_cfg) -> InputPermutation | None:
    """data.permute's permutation for this model's input (None for 'none'): a function of the seed only."""
    return InputPermutation.make(cfg.data.permute, cfg.data.permute_seed, model_cfg.img_size, model_cfg.img_size,
                                 model_cfg.patch_size)


def permuted(batches, permutation: InputPermutation | None, device=None):
    """An evaluation set whose images are permuted on `device` (the loader itself when there is nothing to do)."""
    return batches if permutation is None else PermutedBatches(batches, permutation, device)


class PermutedBatches:
    """(x, y) batches of a loader with data.permute's permutation applied on the device; every other attribute
    is the loader's."""

    def __init__(self, loader, permutation: InputPermutation, device=None):
        self.loader, self.permutation = loader, permutation
        self.device = torch.device(device) if device is not None else None

    def __iter__(self):
        for x, y, *rest in self.loader:
            if self.device is not None:
                x = x.to(self.device, non_blocking=True)
            yield (self.permutation(x), y, *rest)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        if name == "loader":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


def build_eval_sets(cfg: Config, job, model_cfg, rank: int, world_size: int) -> dict[str, Iterable]:
    """eval.sets as the driver resolved them (Job.eval_sets), each read as val is (every rank its share); a set
    with a label file yields its sample keys and is scored ReaL-style (orchestrator/eval/real.py)."""
    data_cfg = pretrained_data_config(cfg.model.name)
    eval_tf = eval_transform(data_cfg, input_size=model_cfg.img_size, preset=cfg.data.transform)
    out: dict[str, Iterable] = {}
    for s in job.eval_sets or []:
        loader = ShardLoader(
            s["url"], s["split"], batch_size=max(micro_batch_size(cfg), 64), transform=eval_tf, training=False,
            rank=rank, world_size=world_size, num_workers=cfg.data.loader_workers, seed=cfg.run.seed,
            storage_options=s["storage_options"], max_bad_fraction=cfg.data.max_bad_fraction,
            pin_memory=cfg.scaling.use_gpu, cache_dir=cfg.data.cache_dir, cache_max_gb=cfg.data.cache_max_gb,
            return_keys=s["labels"] is not None,
        )
        if s["labels"] is None:
            out[s["name"]] = loader
        else:
            out[s["name"]] = ReaLSet(loader, load_label_file(s["labels"], s["labels_options"], job.num_classes))
    return out


def build_probe_loaders(cfg: Config, job, model_cfg) -> tuple[ShardLoader, ShardLoader]:
    """Rank 0's few-shot probe data (eval.fewshot_every_steps, train/fewshot_probe.py): the training and val splits
    read whole by one rank, in order, preprocessed as val is (no augmentation)."""
    data_cfg = pretrained_data_config(cfg.model.name)
    eval_tf = eval_transform(data_cfg, input_size=model_cfg.img_size, preset=cfg.data.transform)
    return tuple(ShardLoader(  # type: ignore[return-value]
        job.dataset_url, split, batch_size=max(micro_batch_size(cfg), 64), transform=eval_tf, training=False,
        num_workers=cfg.data.loader_workers, seed=cfg.run.seed, storage_options=job.storage_options,
        max_bad_fraction=cfg.data.max_bad_fraction, pin_memory=cfg.scaling.use_gpu, cache_dir=cfg.data.cache_dir,
        cache_max_gb=cfg.data.cache_max_gb,
    ) for split in (cfg.data.train_split, cfg.data.val_split))


@dataclass
class StepBatch:
    """One step's share of the global batch on this rank, on the training device."""

    x: torch.Tensor
    y: torch.Tensor
    epoch: int  # the epoch of the last chunk taken
    # epochs whose last batch this step took, with their counts summed over all ranks
    ended: list[tuple[int, DataCounts]] = field(default_factory=list)

    def micro_batches(self, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.x.split(size), self.y.split(size), strict=True))


class BatchFetcher:
    """This rank's chunks of each step, read across epoch boundaries; a resumed run continues its first epoch
    from the loaded position."""

    def __init__(self, loader: ShardLoader, device: torch.device, start_epoch: int, resumed: bool,
                 trace: KeyTrace | None = None, timer: StepTimer | None = None, delay_s: float = 0.0,
                 permutation: InputPermutation | None = None):
        self.loader = loader
        self.permutation = permutation  # data.permute, applied after the batch reached the device
        self.device = device
        self.trace = trace
        self.timer = timer or StepTimer(enabled=False)
        self._stream = delayed(self._batches(start_epoch, resumed), delay_s)

    def _batches(self, epoch: int, resumed: bool) -> Iterator[tuple[int, Any]]:
        while True:
            if not resumed:
                self.loader.set_epoch(epoch)
            resumed = False
            for batch in self.loader:
                yield epoch, batch
            epoch += 1

    def next(self, step: int) -> StepBatch:
        """The chunks of optimizer step `step` (1-based). Collective at an epoch's end: every rank is here."""
        chunks, ended = [], []
        with self.timer.phase("data_wait"):
            for _ in range(self.loader.slots_owned):
                epoch, chunk = next(self._stream)
                chunks.append(chunk)
                if self.loader.batches_consumed == len(self.loader):
                    ended.append((epoch, epoch_counts(self.loader, self.device)))
            x = torch.cat([c[0] for c in chunks]).to(self.device, non_blocking=True)
            y = torch.cat([c[1] for c in chunks]).to(self.device, non_blocking=True)
            if self.permutation is not None:
                x = self.permutation(x)
        if self.trace:
            self.trace.write(step, epoch, [k for c in chunks for k in c[2]], x)
        return StepBatch(x, y, epoch, ended)

    def unfinished_epoch_counts(self) -> DataCounts | None:
        """The current epoch's counts (all ranks) when it is part-way through, else None. Collective."""
        if 0 < self.loader.batches_consumed < len(self.loader):
            return epoch_counts(self.loader, self.device)
        return None

    def close(self) -> None:
        self._stream.close()  # the loader's iterator goes now, its worker processes with it
        if self.trace:
            self.trace.close()

    def __enter__(self) -> BatchFetcher:
        return self

    def __exit__(self, *exc) -> None:  # closed whatever ends the loop: the key trace file too
        self.close()


def time_device_stage(loader: ShardLoader, timer: StepTimer) -> None:
    """Time the loader's device stage (augment_on='device': RandAugment, normalisation on the training device)
    as `device_augment`. Nothing to time when the stage runs on the host (inside the loader's processes)."""
    if timer.enabled and loader.augment_on == "device":
        loader.batch_stage = TimedStage(loader.batch_stage, timer)


class TimedStage:
    """A BatchStage whose call (on the device, in the loader's iteration) runs in the timer's `device_augment`
    phase. Its `draw` (in the loader's workers) is the stage's own; pickled, it is the bare stage."""

    def __init__(self, stage, timer: StepTimer):
        self.stage = stage
        self.draw = stage.draw
        self._timed = timer.timed("device_augment", stage)

    def __call__(self, images, draws):
        return self._timed(images, draws)

    def __reduce__(self):
        return _bare_stage, (self.stage,)


def _bare_stage(stage):
    return stage


class KeyTrace:
    """Debug aid (data.trace_keys_dir): each rank appends the sample keys of every batch it trains on."""

    def __init__(self, directory: str, rank: int, world: int):
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.world = world
        self.file = open(Path(directory) / f"rank{rank}.jsonl", "a", buffering=1)  # noqa: SIM115 (closed by close())

    def write(self, step: int, epoch: int, keys: list[str], images: torch.Tensor) -> None:
        pixels = hashlib.sha1(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()  # augmented pixels
        self.file.write(json.dumps({"step": step, "epoch": epoch, "keys": list(keys), "pixels": pixels,
                                    "world": self.world, "time": time.time()}) + "\n")

    def close(self) -> None:
        self.file.close()
