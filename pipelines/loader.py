"""ShardLoader: stream WebDataset shards from any fsspec URL, evenly split across ranks, resumable.

    loader = ShardLoader("s3://bucket/digits", "train", batch_size=64, rank=r, world_size=n,
                         transform=make_transform(True, input_size=32, preset="digits"))
    loader.load_state_dict(ckpt["data"])          # optional: continue after the last consumed batch
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for images, labels in loader: ...
            ckpt["data"] = loader.state_dict()

How an epoch is read (see pipelines/plan.py for the plan itself):

- each rank runs a torch DataLoader over one IterableDataset; DataLoader worker ``j`` reads plan slot
  ``(j + rotation) % W`` (rotation = batches consumed mod W, so a resumed rank continues the round-robin
  exactly where it stopped). Each worker streams its shard pieces through webdataset's tar stages
  (tar_file_expander, group_by_keys), checks each sample's structure, passes the raw bytes through
  webdataset's shuffle buffer (seeded per epoch, rank, worker and pass), then decodes
  (torchvision.io.decode_image), augments (torch RNG seeded per batch) and collates full batches;
- every worker yields exactly the batches the plan gives it; bad samples are skipped and counted, and a
  worker that runs short re-reads its pieces (a new seeded pass) to pad, counted as ``padded``;
- the position is (epoch, batches consumed) plus, per worker, the number of shuffled raw samples taken
  (``positions``), which lets a resume skip raw bytes without decoding. Without this rank's positions
  (e.g. a checkpoint holding only rank 0's state) the skipped prefix is decoded to tell good from bad.

Per image the worker runs ``decoder`` (bytes -> uint8; RandomResizedCrop fused with a crop-aware decode for the
training recipe) and ``transform``; per batch the ``batch_stage`` (pipelines/batch_stage.py: big_vision's
RandAugment with per-image draws, normalisation) runs in the worker (``augment_on='host'``) or, with
``augment_on='device'``, in this process on ``device`` after an asynchronous copy of the uint8 batch; mixup
follows wherever the images are. With ``decode_crop_on_device`` the worker ships JPEG bytes and the device
decodes them (pipelines/device_decode.py).

Resume with different plan inputs (world size, workers, batch size, seed, shuffle buffer, dataset):
``on_plan_change='restart_epoch'`` (default) warns and restarts the checkpoint's epoch from its first batch
(samples already seen in that epoch are seen again; this is said in the warning and in
``resume_note``); ``on_plan_change='error'`` raises ResumeMismatchError.

Where each part lives: pipelines/shard_reader.py reads a shard into checked raw samples,
pipelines/slot_stream.py produces one slot's batches inside a DataLoader worker, pipelines/bad_samples.py
keeps the bad-sample tally and its budget; this module holds the rank's position and its state_dict.

Evaluation (``training=False``): no shuffling, no dropping, no padding, every sample read exactly once
across all ranks; the last batch of a worker may be short and ranks may get different batch counts
(evaluate without per-step collectives, then all-reduce the sums). Evaluation always reads the whole split.
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
from .bad_samples import BadSampleTally, DataError, check_shards_present
from .batch_stage import BatchStage
from .manifest import ShardInfo, dataset_from_pattern, is_pattern, load_manifest, split_manifest_url
from .mixup import MixupConfig, mixup_batch
from .plan import EpochPlan, derive_seed, plan_epoch, worker_position
from .slot_stream import RankDataset, RankSpec
from .storage import check_dataset_reachable, resolve_storage_options
from .transforms import decode_image, default_transform, identity

log = logging.getLogger(__name__)

STATE_VERSION = 1
# The shuffle's algorithm is a plan input: a position saved under another one (before webdataset's shuffle
# was used) cannot be continued exactly, so such a resume restarts the epoch like any other plan change.
SHUFFLE = "webdataset"
AUGMENT_ON = ("host", "device")


class ResumeMismatchError(ValueError):
    """A state_dict was made with different plan inputs and on_plan_change='error'."""


class ShardLoader:
    """Batches of (float32 NCHW images, int64 labels) for one rank; see the module docstring.

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
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if on_plan_change not in ("restart_epoch", "error"):
            raise ValueError(f"on_plan_change must be 'restart_epoch' or 'error', got {on_plan_change!r}")
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got {augment_on!r}")
        if augment_on == "device" and batch_stage is None:
            raise ValueError("augment_on='device' needs a batch_stage (what to run on the device)")
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 1:
            raise ValueError(f"bad batch_size={batch_size} / num_workers={num_workers} / shuffle_buffer={shuffle_buffer}")
        self.source = str(source)
        self.split = split
        self.batch_size = batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed = seed
        self.training = training
        self.shuffle_buffer = shuffle_buffer
        self.max_bad_fraction = max_bad_fraction
        self.pin_memory = pin_memory
        self.return_keys = return_keys
        self.on_plan_change = on_plan_change
        self.prefetch_factor = prefetch_factor
        # No batch stage: the per-image transform does everything (float out), as evaluation does.
        self.transform = transform or (default_transform() if batch_stage is None else identity)
        self.decoder = decoder or decode_image
        self.batch_stage = batch_stage
        self.augment_on = augment_on
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if decode_crop_on_device is not None and augment_on != "device":
            raise ValueError("decode_crop_on_device needs augment_on='device'")
        # (crop size, interpolation): the decoder ships JPEG bytes (ShipJpeg) and they are decoded on the device
        self.decode_crop_on_device = decode_crop_on_device
        if isinstance(mixup, int | float):
            mixup = MixupConfig(alpha=float(mixup))
        self.mixup = mixup
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
        if verify_shards:
            check_shards_present(self.shards, split, self._opts, max_bad_fraction)

        self.epoch = 0
        self._consumed = 0
        self._positions: dict[int, int] = {}
        self._tally = BadSampleTally(rank, max_bad_fraction)
        self._just_loaded = False
        self._plan_cache: tuple[int, EpochPlan] | None = None
        self.resume_note: str | None = None

    # ----------------------------------------------------------------------------- plan and position
    def plan(self, epoch: int | None = None) -> EpochPlan:
        e = self.epoch if epoch is None else epoch
        if self._plan_cache and self._plan_cache[0] == e:
            return self._plan_cache[1]
        p = plan_epoch(
            [s.num_samples for s in self.shards], seed=self.seed, epoch=e, world_size=self.world_size,
            num_workers=self.num_workers, batch_size=self.batch_size, training=self.training,
        )
        self._plan_cache = (e, p)
        return p

    def __len__(self) -> int:
        return self.plan().batches_per_rank(self.rank)

    @property
    def dropped_samples(self) -> int:
        """Samples of the split not used this epoch (over all ranks) so that every rank gets equal batches."""
        return self.plan().dropped

    @property
    def batches_consumed(self) -> int:
        return self._consumed

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch. Keeps the position when it is the epoch already set (e.g. after load_state_dict)."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._reset_position()

    def _reset_position(self) -> None:
        self._consumed = 0
        self._positions = {}
        self._tally = BadSampleTally(self.rank, self.max_bad_fraction)
        self._just_loaded = False

    def _plan_inputs(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "world_size": self.world_size,
            "num_workers": max(1, self.num_workers),
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "shuffle": SHUFFLE,
            "split": self.split,
            "dataset": self._fingerprint,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out. Plain ints/strs (torch.load(weights_only=True) safe).

        Holds this rank's worker positions; merge the states of all ranks with merge_state_dicts() to let
        every rank skip without decoding on resume (not needed for exactness)."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches_consumed": self._consumed,
            "plan": self._plan_inputs(),
            "positions": {str(self.rank): {str(w): p for w, p in self._positions.items()}},
            "bad_counts": {str(self.rank): self._tally.triples()},
            "padded": {str(self.rank): self._tally.padded},
        }

    @staticmethod
    def merge_state_dicts(states: list[Mapping[str, Any]]) -> dict[str, Any]:
        """One state holding every rank's positions and counts (e.g. after all_gather_object)."""
        out = dict(states[0])
        for key in ("positions", "bad_counts", "padded"):
            merged = {}
            for st in states:
                merged.update(st.get(key, {}))
            out[key] = merged
        return out

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        if int(sd.get("version", 0)) != STATE_VERSION:
            raise ValueError(f"unknown data state version {sd.get('version')!r} (expected {STATE_VERSION})")
        mine = self._plan_inputs()
        theirs = dict(sd["plan"])
        diffs = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        self.epoch = int(sd["epoch"])
        self._plan_cache = None
        self._reset_position()
        if diffs:
            desc = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items())
            if self.on_plan_change == "error":
                raise ResumeMismatchError(
                    f"data position was saved with other plan inputs ({desc}); cannot continue the epoch "
                    f"exactly. Use on_plan_change='restart_epoch' to restart epoch {self.epoch} from its start."
                )
            self.resume_note = (
                f"plan inputs changed ({desc}): restarting epoch {self.epoch} from its first batch; the "
                f"{int(sd['batches_consumed'])} batches per rank already consumed in this epoch will be seen again"
            )
            warnings.warn(self.resume_note, stacklevel=2)
            log.warning(self.resume_note)
            return
        self._consumed = int(sd["batches_consumed"])
        pos = sd.get("positions", {}).get(str(self.rank))
        self._positions = {int(w): int(p) for w, p in pos.items()} if pos is not None else {}
        self._positions_known = pos is not None
        self._tally.add(sd.get("bad_counts", {}).get(str(self.rank), []), sd.get("padded", {}).get(str(self.rank), 0))
        self._just_loaded = True
        self.resume_note = None

    # ------------------------------------------------------------------------------- bad samples
    def bad_sample_counts(self) -> dict[str, dict[str, int]]:
        """This epoch's bad samples on this rank: kind -> {shard URL: count}; plus 'padded' -> {'': n}."""
        return self._tally.by_kind()

    # -------------------------------------------------------------------------------- iteration
    def __iter__(self):
        plan = self.plan()
        total = plan.batches_per_rank(self.rank)
        W = plan.num_workers
        if not self.training:
            self._reset_position()
        k = self._consumed
        if k >= total and not self._just_loaded:
            self._reset_position()  # a new pass over the same epoch
            k = 0
        known = getattr(self, "_positions_known", True) or not self._just_loaded
        self._just_loaded = False
        self._positions_known = True
        starts: dict[int, tuple[int, int | None]] = {}
        for w in range(W):
            c = worker_position(k, w, W) if self.training else 0
            if c == 0:
                starts[w] = (0, 0)
            else:
                starts[w] = (c, self._positions.get(w) if known else None)
        spec = RankSpec(
            urls=[s.url for s in self.shards], slots=plan.rank_slots(self.rank), training=self.training,
            batch_size=self.batch_size, seed=self.seed, epoch=self.epoch, rank=self.rank,
            rotation=(k % W) if self.training else 0, starts=starts, shuffle_buffer=self.shuffle_buffer,
            opts=self._opts, transform=self.transform, num_classes=self.num_classes, decoder=self.decoder,
            batch_stage=self.batch_stage, stage_on_host=self.augment_on == "host",
            device_decode_size=self.decode_crop_on_device[0] if self.decode_crop_on_device else None,
        )
        return self._iterate(plan, spec, k, total)

    def _iterate(self, plan: EpochPlan, spec: RankSpec, k: int, total: int):
        if k >= total:
            return
        W = plan.num_workers
        dl = DataLoader(
            RankDataset(spec), batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
        )
        mix_gen = torch.Generator() if self.mixup is not None else None
        for images, labels, meta in dl:
            w = meta["slot"]
            if self.training and w != k % W:
                raise DataError(f"internal: batch {k} came from worker {w}, expected {k % W}")
            self._tally.add(meta["bad"], meta["padded"])
            self._positions[w] = meta["raw_pos"]
            self._tally.check(self.epoch, plan.samples_per_rank(self.rank))
            k += 1
            self._consumed = k
            images, targets = self._finish(images, labels, meta, k - 1, mix_gen)
            if self.return_keys:
                yield images, targets, meta["keys"]
            else:
                yield images, targets
        if self.training and k != total:
            raise DataError(f"internal: rank {self.rank} yielded {k} batches, planned {total}")

    def _finish(self, images, labels: torch.Tensor, meta: dict, index: int, mix_gen: torch.Generator | None):
        """The rank's batch ``index`` after the worker: the device stage (augment_on='device'), then mixup, which
        needs the rank's batch index for its seed and runs where the images are."""
        if self.augment_on == "device":
            images, labels = self._device_stage(images, labels, meta)
        if self.mixup is None:
            return images, labels
        mix_gen.manual_seed(derive_seed(self.seed, self.epoch, "mixup", self.rank, index))
        images, targets = mixup_batch(images, labels, self.num_classes, self.mixup.alpha, mix_gen,
                                      self.mixup.label_smoothing)
        if self.pin_memory and images.device.type == "cpu" and torch.cuda.is_available():  # new, unpinned tensors
            images, targets = images.pin_memory(), targets.pin_memory()
        return images, targets

    def _device_stage(self, images, labels: torch.Tensor, meta: dict):
        """uint8 crops (pinned when pin_memory) copied asynchronously to the device, then the batch stage there.
        With a device decode, ``images`` is the batch's encoded JPEGs (pipelines/device_decode.py): decoded here;
        one the decoder rejects is counted as corrupt and dropped from the batch."""
        dev = self.device
        draws = meta.get("draws")
        if isinstance(images, dict):
            images, failed = device_decode.decode_on_device(images, dev, self.decode_crop_on_device[1])
            if failed:
                keep = [i for i in range(len(labels)) if i not in set(failed)]
                for i in failed:
                    self._tally.add([("corrupt_image", meta["urls"][i], 1)], 0)
                labels, meta["keys"] = labels[keep], [meta["keys"][i] for i in keep]
                draws = {k: v[keep] for k, v in draws.items()} if draws is not None else None
                self._tally.check(self.epoch, self.plan().samples_per_rank(self.rank))
        else:
            images = images.to(dev, non_blocking=True)
        if draws is not None:
            draws = {k: v.to(dev, non_blocking=True) for k, v in draws.items()}
        return self.batch_stage(images, draws), labels.to(dev, non_blocking=True)
