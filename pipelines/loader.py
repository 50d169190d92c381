"""ShardLoader: stream WebDataset shards from any fsspec URL per rank, elastic and exactly resumable.

    loader = ShardLoader("s3://bucket/digits", "train", batch_size=64, rank=r, world_size=n, slots=8,
                         transform=make_transform(True, input_size=32, preset="digits"))
    loader.load_state_dict(ckpt["data"])          # optional: continue after the last consumed step
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for i, (images, labels) in enumerate(loader):   # one optimizer step = loader.slots_owned items
            ...
            if (i + 1) % loader.slots_owned == 0:     # a step boundary: all ranks' states, merged
                ckpt["data"] = ShardLoader.merge_state_dicts(all_gather_object(loader.state_dict()))

How a training epoch is read (see pipelines/plan.py for the plan itself):

- the epoch is planned for ``K`` canonical slots (``slots``; default world_size * max(1, num_workers)) with a
  chunk of ``c = batch_size`` samples per slot per step; the global batch of step t is chunk t of every slot
  (K*c samples). Rank r of W owns the slots ``k % W == r`` (m = ceil or floor of K/W; any W in 1..K) and
  yields items = chunks round-robin over them: item i is owned slot ``owned[i % m]``'s chunk ``i // m``, so a
  training step consumes m items (micro-batches) and ``len(loader)`` = steps_per_epoch * m. An elastic run
  passes a fixed ``slots``: the default follows world_size, so a resize would change the plan;
- loader work follows the data share: with ``num_workers > 0`` the rank runs one DataLoader worker process
  per owned slot (torch's round-robin over workers gives the item order above; the value of num_workers
  only says "use workers" once ``slots`` is given), with ``num_workers == 0`` its own process streams its
  slots round-robin. Each slot streams its shard pieces through webdataset's tar stages, checks each
  sample's structure, passes the raw bytes through webdataset's shuffle buffer, then decodes, augments and
  collates full chunks;
- every seeded draw (shuffle buffer, per-chunk augmentation, batch stage, mixup) is a function of (seed,
  epoch, slot, chunk index): the samples and pixels of step t do not depend on the world size or on how
  often it changed;
- every slot yields exactly the chunks the plan gives it; bad samples are skipped and counted, and a slot
  that runs short re-reads its pieces (a new seeded pass) to pad, counted as ``padded``;
- the position (pipelines/position.py) is (epoch, steps consumed) plus, per canonical slot, the shuffled
  raw samples taken (``raw_pos``, so a resume skips raw bytes without decoding) and its bad/padded tallies.
  A rank's state_dict holds its owned slots (only at a step boundary); merge_state_dicts joins the ranks'.
  A merged state resumes at any world size; a slot whose raw position is missing is skipped by decoding.

Per image the slot runs ``decoder`` (bytes -> uint8; RandomResizedCrop fused with a crop-aware decode for the
training recipe) and ``transform``; per chunk the ``batch_stage`` (pipelines/batch_stage.py: big_vision's
RandAugment with per-image draws, normalisation) runs in the slot's stream (``augment_on='host'``) or, with
``augment_on='device'``, in this process on ``device`` after an asynchronous copy of the uint8 chunk; mixup
follows wherever the images are. With ``decode_crop_on_device`` the stream ships JPEG bytes and the device
decodes them (pipelines/device_decode.py).

Resume with different plan inputs (slots, chunk size, seed, shuffle buffer, dataset, or a state of the
previous version): ``on_plan_change='restart_epoch'`` (default) warns and restarts the checkpoint's epoch
from its first step (samples already seen in that epoch are seen again; this is said in the warning and in
``resume_note``); ``on_plan_change='error'`` raises ResumeMismatchError. World size and loader workers are
not plan inputs.

With ``cache_dir`` remote shards are read through the node-local cache (pipelines/shard_cache.py; not local ones);
``bytes_read()``: the epoch's bytes from storage and from the cache on this rank (in the position).
Where each part lives: pipelines/shard_reader.py reads a shard into checked raw samples,
pipelines/slot_stream.py produces one slot's chunks, pipelines/bad_samples.py keeps the bad-sample tally and
its budget, pipelines/position.py the position and the data state; this module holds the rank's iteration.

Evaluation (``training=False``, unchanged by slots): the split is cut over world_size x max(1, num_workers)
slots; no shuffling, no dropping, no padding, every sample read exactly once across all ranks; the last
batch of a worker may be short and ranks may get different batch counts (evaluate without per-step
collectives, then all-reduce the sums). ``subset`` reads a key-chosen part of the split instead of all of it
(the minival, or what training keeps of the split: pipelines/subsets.py), in training and evaluation alike.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from . import device_decode
from .bad_samples import DataError, check_shards_present
from .batch_stage import BatchStage
from .manifest import ShardInfo, dataset_from_pattern, is_pattern, load_manifest, split_manifest_url
from .mixup import MixupConfig, mixup_batch
from .plan import EpochPlan, derive_seed, owned_slots, plan_canonical_epoch, plan_epoch, worker_position
from .position import SHUFFLE, STATE_VERSION, RankPosition, ResumeMismatchError, plan_changes, restart_note
from .position import merge_state_dicts as _merge
from .sample_index import SampleIndex, load_sample_index
from .shard_cache import CacheConfig
from .slot_stream import RankDataset, RankSpec
from .storage import check_dataset_reachable, resolve_storage_options
from .subsets import SubsetSpec, select
from .transforms import decode_image, default_transform, identity

log = logging.getLogger(__name__)

AUGMENT_ON = ("host", "device")
__all__ = ["STATE_VERSION", "ResumeMismatchError", "ShardLoader"]


class ShardLoader:
    """Items (chunks) of (float32 NCHW images, int64 labels) for one rank; see the module docstring.

    With ``mixup`` (a MixupConfig or a float alpha) batches are (images, soft float32 targets [N, C]).
    With ``return_keys=True`` a third element, the list of sample keys, is added (for debugging/tests).
    """

    def __init__(
        self,
        source: str,
        split: str = "train",
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        seed: int = 0,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        training: bool = True,
        shuffle_buffer: int = 1000,
        storage_options: Mapping[str, Any] | None = None,
        max_bad_fraction: float = 0.01,
        pin_memory: bool = False,
        mixup: MixupConfig | float | None = None,
        num_classes: int | None = None,
        return_keys: bool = False,
        on_plan_change: str = "restart_epoch",
        prefetch_factor: int = 2,
        verify_shards: bool = True,
        decoder: Callable[[bytes], torch.Tensor] | None = None,
        batch_stage: BatchStage | None = None,
        augment_on: str = "host",
        device: torch.device | str | None = None,
        decode_crop_on_device: tuple[int, str] | None = None,
        slots: int | None = None,
        cache_dir: str | None = None,
        cache_max_gb: float = 100.0,
        subset: SubsetSpec | None = None,
        sample_index: SampleIndex | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if slots is not None and not training:
            raise ValueError("slots is a training-plan input; evaluation is split by world_size and num_workers")
        K = world_size * max(1, num_workers) if slots is None else int(slots)
        if not 1 <= world_size <= K:
            raise ValueError(f"world_size={world_size} must be in [1, slots={K}]: every rank needs a canonical slot")
        if on_plan_change not in ("restart_epoch", "error"):
            raise ValueError(f"on_plan_change must be 'restart_epoch' or 'error', got {on_plan_change!r}")
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got {augment_on!r}")
        if augment_on == "device" and batch_stage is None:
            raise ValueError("augment_on='device' needs a batch_stage (what to run on the device)")
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 1:
            raise ValueError(f"bad batch_size={batch_size} / num_workers={num_workers} / shuffle_buffer={shuffle_buffer}")
        self.source, self.split, self.batch_size, self.slots = str(source), split, batch_size, K
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        # the slots this rank streams: canonical ids (training) or its evaluation slots
        w = max(1, num_workers)
        self._owned = owned_slots(rank, world_size, K) if training else tuple(range(rank * w, (rank + 1) * w))
        self.seed, self.training, self.shuffle_buffer = seed, training, shuffle_buffer
        self.max_bad_fraction, self.pin_memory, self.return_keys = max_bad_fraction, pin_memory, return_keys
        self.prefetch_factor, self.on_plan_change = prefetch_factor, on_plan_change
        # No batch stage: the per-image transform does everything (float out), as evaluation does.
        self.transform = transform or (default_transform() if batch_stage is None else identity)
        self.decoder, self.batch_stage, self.augment_on = decoder or decode_image, batch_stage, augment_on
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if decode_crop_on_device is not None and augment_on != "device":
            raise ValueError("decode_crop_on_device needs augment_on='device'")
        # (crop size, interpolation): the decoder ships JPEG bytes (ShipJpeg) and they are decoded on the device
        self.decode_crop_on_device = decode_crop_on_device
        self.mixup = MixupConfig(alpha=float(mixup)) if isinstance(mixup, int | float) else mixup
        self.cache = CacheConfig.from_gb(cache_dir, cache_max_gb)
        opts_url = self.source if "://" in self.source else "file://"
        self._opts = resolve_storage_options(opts_url, storage_options)

        if is_pattern(self.source):
            check_dataset_reachable(self.source.split("{")[0].rsplit("/", 1)[0], self._opts)
            self.manifest = dataset_from_pattern(self.source, self._opts, split)
        else:
            root, _ = split_manifest_url(self.source)
            check_dataset_reachable(root if "://" in root else "file://" + os.path.abspath(root), self._opts,
                                    want_file="manifest.json" if not self.source.endswith(".json") else None)
            self.manifest = load_manifest(self.source, self._opts)
        self.shards: list[ShardInfo] = self.manifest.shards(split)
        self.num_classes = num_classes or self.manifest.num_classes or None
        if self.mixup is not None and not self.num_classes:
            raise ValueError("mixup needs num_classes (the dataset has no class_names; pass num_classes=)")
        self._fingerprint = self.manifest.fingerprint(split)
        # a key-chosen part of the split (pipelines/subsets.py): its per-shard counts are what the plan splits
        self.subset = subset or SubsetSpec()
        self.selection = None if self.subset.whole_split else select(
            sample_index or load_sample_index(self.source, split, self._opts, manifest=self.manifest), self.subset)
        if verify_shards:
            check_shards_present(self.shards, split, self._opts, max_bad_fraction)

        self.epoch = 0
        self._pos = RankPosition(rank, self._owned, max_bad_fraction)
        self._plan_cache: tuple[int, EpochPlan] | None = None
        self.resume_note: str | None = None

    # ----------------------------------------------------------------------------- plan and position
    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The epoch's plan: K canonical slots (training) or the evaluation split over ranks x workers."""
        e = self.epoch if epoch is None else epoch
        if self._plan_cache and self._plan_cache[0] == e:
            return self._plan_cache[1]
        sizes = list(self.selection.counts) if self.selection else [s.num_samples for s in self.shards]
        if self.training:
            p = plan_canonical_epoch(sizes, seed=self.seed, epoch=e, slots=self.slots, chunk=self.batch_size)
        else:
            p = plan_epoch(sizes, seed=self.seed, epoch=e, world_size=self.world_size,
                           num_workers=self.num_workers, batch_size=self.batch_size, training=False)
        self._plan_cache = (e, p)
        return p

    def __len__(self) -> int:
        """Items (chunks) this rank yields in the epoch: steps_per_epoch * slots_owned when training."""
        plan = self.plan()
        if self.training:
            return plan.slots[0].num_batches * len(self._owned)
        return plan.batches_per_rank(self.rank)

    @property
    def slots_owned(self) -> int:
        """m: the slots this rank streams, i.e. the items (micro-batches) it yields per training step."""
        return len(self._owned)

    @property
    def steps_per_epoch(self) -> int:
        """Training steps in an epoch: the chunks of every canonical slot."""
        if not self.training:
            raise ValueError("steps_per_epoch is a training notion; evaluation ranks may get different batch counts")
        return self.plan().slots[0].num_batches

    @property
    def dropped_samples(self) -> int:
        """Samples of the split not used this epoch (over all ranks) so that every slot gets equal chunks."""
        return self.plan().dropped

    @property
    def batches_consumed(self) -> int:
        """Items (chunks) this rank consumed in the epoch."""
        return self._pos.items

    @property
    def steps_consumed(self) -> int:
        """Whole training steps consumed in the epoch (every owned slot's chunks)."""
        return self._pos.items // len(self._owned)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch. Keeps the position when it is the epoch already set (e.g. after load_state_dict)."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._reset_position()

    def _reset_position(self) -> None:
        self._pos = RankPosition(self.rank, self._owned, self.max_bad_fraction)

    def _planned_samples(self) -> int:
        plan = self.plan()
        if self.training:
            return sum(plan.slots[k].num_samples for k in self._owned)
        return plan.samples_per_rank(self.rank)

    def _plan_inputs(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "slots": self.slots,
            "chunk": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "shuffle": SHUFFLE,
            "split": self.split,
            "dataset": self._fingerprint,
            **({"subset": self.selection.fingerprint} if self.selection else {}),
        }

    def state_dict(self) -> dict[str, Any]:
        """Position after the last step handed out. Plain ints/strs (torch.load(weights_only=True) safe).

        Holds this rank's slots; merge the states of all ranks with merge_state_dicts() so that a resume at
        any world size finds every slot (a slot without its raw position is skipped by decoding)."""
        m = len(self._owned)
        if self._pos.items % m:
            raise ValueError(
                f"state_dict() mid-step: rank {self.rank} consumed {self._pos.items} items, not a multiple of the "
                f"{m} it yields per step; take the state after a whole step (its slots are at different chunks)"
            )
        return self._pos.state(self.epoch, self._pos.items // m, self._plan_inputs())

    @staticmethod
    def merge_state_dicts(states: list[Mapping[str, Any]]) -> dict[str, Any]:
        """One state holding every rank's slots and counts (e.g. after all_gather_object)."""
        return _merge(states)

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Continue the saved epoch at its step with this rank's (possibly new) owned slots, at any world size."""
        diffs = plan_changes(sd, self._plan_inputs())
        self.epoch = int(sd["epoch"])
        self._plan_cache = None
        self._reset_position()
        if diffs:
            self.resume_note = restart_note(diffs, sd, self.on_plan_change)
            warnings.warn(self.resume_note, stacklevel=2)
            log.warning(self.resume_note)
            return
        self._pos.load(sd, self._owned, self.steps_per_epoch)
        self.resume_note = None

    # ------------------------------------------------------------------------------- bad samples
    def bad_sample_counts(self) -> dict[str, dict[str, int]]:
        """This epoch's bad samples on this rank: kind -> {shard URL: count}; plus 'padded' -> {'': n}."""
        return self._pos.tally.by_kind()

    def bytes_read(self) -> tuple[int, int]:
        """This epoch's (bytes from storage, bytes from the node-local shard cache) on this rank."""
        return self._pos.bytes_read()

    # -------------------------------------------------------------------------------- iteration
    def __iter__(self):
        plan = self.plan()
        total = len(self)
        if not self.training:
            self._reset_position()
        k = self._pos.items
        if k >= total and not self._pos.just_loaded:
            self._reset_position()  # a new pass over the same epoch
            k = 0
        self._pos.just_loaded = False
        m = len(self._owned)
        starts: dict[int, tuple[int, int | None]] = {}
        for q, sid in enumerate(self._owned):
            c = worker_position(k, q, m) if self.training else 0
            starts[sid] = (c, self._pos.raw_pos.get(sid) if c else 0)
        spec = RankSpec(
            urls=[s.url for s in self.shards], slots=tuple(plan.slots[sid] for sid in self._owned),
            slot_ids=self._owned, training=self.training, batch_size=self.batch_size, seed=self.seed,
            epoch=self.epoch, rank=self.rank, rotation=k % m, starts=starts, shuffle_buffer=self.shuffle_buffer,
            opts=self._opts, transform=self.transform, num_classes=self.num_classes, decoder=self.decoder,
            batch_stage=self.batch_stage, stage_on_host=self.augment_on == "host",
            device_decode_size=self.decode_crop_on_device[0] if self.decode_crop_on_device else None,
            cache=self.cache, checks=tuple((s.size, s.sha256) for s in self.shards),
            keep=self.selection.keep if self.selection else {},
        )
        return self._iterate(spec, k, total)

    def _iterate(self, spec: RankSpec, k: int, total: int):
        if k >= total:
            return
        m = len(self._owned)
        workers = m if self.num_workers > 0 else 0  # one DataLoader worker per slot this rank streams
        dl = DataLoader(
            RankDataset(spec), batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )
        mix_gen = torch.Generator() if self.mixup is not None else None
        planned = self._planned_samples()
        for images, labels, meta in dl:
            if self.training and meta["slot"] != self._owned[k % m]:
                raise DataError(f"internal: item {k} came from slot {meta['slot']}, expected {self._owned[k % m]}")
            self._pos.took(meta)
            self._pos.tally.check(self.epoch, planned)
            k += 1
            images, targets = self._finish(images, labels, meta, mix_gen)
            if self.return_keys:
                yield images, targets, meta["keys"]
            else:
                yield images, targets
        if self.training and k != total:
            raise DataError(f"internal: rank {self.rank} yielded {k} items, planned {total}")

    def _finish(self, images, labels: torch.Tensor, meta: dict, mix_gen: torch.Generator | None):
        """A chunk after its stream: the device stage (augment_on='device'), then mixup, seeded by the chunk's
        (slot, index) so that it does not depend on the rank, and run where the images are."""
        if self.augment_on == "device":
            images, labels = self._device_stage(images, labels, meta)
        if self.mixup is None:
            return images, labels
        mix_gen.manual_seed(derive_seed(self.seed, self.epoch, "mixup", meta["slot"], meta["batch"]))
        images, targets = mixup_batch(images, labels, self.num_classes, self.mixup.alpha, mix_gen,
                                      self.mixup.label_smoothing)
        if self.pin_memory and images.device.type == "cpu" and torch.cuda.is_available():  # new, unpinned tensors
            images, targets = images.pin_memory(), targets.pin_memory()
        return images, targets

    def _device_stage(self, images, labels: torch.Tensor, meta: dict):
        """uint8 crops (pinned when pin_memory) copied asynchronously to the device, then the batch stage there.
        With a device decode, ``images`` is the chunk's encoded JPEGs (pipelines/device_decode.py): decoded here;
        one the decoder rejects is counted as corrupt (in its slot's tally) and dropped from the chunk."""
        dev = self.device
        draws = meta.get("draws")
        if isinstance(images, dict):
            images, failed = device_decode.decode_on_device(images, dev, self.decode_crop_on_device[1])
            if failed:
                rejected = set(failed)
                keep = [i for i in range(len(labels)) if i not in rejected]
                self._pos.add_bad(meta["slot"], [("corrupt_image", meta["urls"][i], 1) for i in failed])
                labels, meta["keys"] = labels[keep], [meta["keys"][i] for i in keep]
                draws = {k: v[keep] for k, v in draws.items()} if draws is not None else None
                self._pos.tally.check(self.epoch, self._planned_samples())
        else:
            images = images.to(dev, non_blocking=True)
        if draws is not None:
            draws = {k: v.to(dev, non_blocking=True) for k, v in draws.items()}
        return self.batch_stage(images, draws), labels.to(dev, non_blocking=True)
