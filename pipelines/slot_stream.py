"""One slot's chunks: its plan pieces read, shuffled, skipped to the position, decoded, padded.

A slot is a canonical training slot (pipelines/plan.py) or an evaluation slot. It streams inside its own
torch DataLoader worker, or in the rank's process with ``num_workers=0``, which then takes the rank's slots
round-robin. Every seeded draw (shuffle buffer, augmentation, batch stage) is a function of the slot id and
the chunk index, never of the rank or the worker, so a chunk is the same whichever rank reads it. Each chunk
carries its metadata (slot, chunk index, raw samples taken, bad samples seen since the previous chunk, padded
samples, bytes read from storage and from the node-local shard cache since the previous chunk, keys) so the rank's ShardLoader can keep the position and the bad-sample tally (pipelines/loader.py).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import shuffle

from . import device_decode
from .bad_samples import DataError
from .batch_stage import BatchStage
from .plan import SlotPlan, derive_seed, epoch_rng
from .redaction import redact_url
from .shard_cache import CacheConfig, ShardSource
from .shard_reader import RawSample, iter_piece
from .transforms import decode_image


@dataclass
class RankSpec:
    """What every stream of one rank needs to produce its slot's chunks (picklable: sent to workers)."""

    urls: list[str]
    slots: tuple[SlotPlan, ...]  # the slots this rank streams, in its round-robin order
    slot_ids: tuple[int, ...]  # their ids: what every seeded draw depends on
    training: bool
    batch_size: int
    seed: int
    epoch: int
    rank: int
    rotation: int  # the stream the rank's next item comes from (its items consumed mod streams)
    starts: dict[int, tuple[int, int | None]]  # slot id -> (chunks consumed, raw position or None)
    shuffle_buffer: int
    opts: dict[str, Any]
    transform: Callable[[torch.Tensor], torch.Tensor]
    num_classes: int | None
    decoder: Callable[[bytes], torch.Tensor] = decode_image  # bytes -> uint8 CHW (may crop: RandomResizedCropDecode)
    batch_stage: BatchStage | None = None  # uint8 batch -> float batch (pipelines/batch_stage.py)
    stage_on_host: bool = True  # False: the batch leaves uint8 with its draws; the loader runs the stage on the device
    device_decode_size: int | None = None  # decode_on='device': the decoder ships JPEG bytes (pipelines/device_decode)
    cache: CacheConfig | None = None  # the node-local shard cache (pipelines/shard_cache.py); None: read storage
    checks: tuple[tuple[int | None, str | None], ...] = ()  # per URL: (size, sha256) from the manifest, if known
    keep: Mapping[int, frozenset[str]] = field(default_factory=dict)  # shard -> keys read, for shards read in part


class RankDataset(IterableDataset):
    """DataLoader worker ``j`` of a rank (one per slot) streams slot ``(j + rotation) % m``; without workers
    the rank's process streams all ``m`` slots round-robin from that one: the same item order either way."""

    def __init__(self, spec: RankSpec):
        self.spec = spec

    def __iter__(self):
        info = get_worker_info()
        m = len(self.spec.slots)
        if info is None:
            return round_robin(SlotWorker(self.spec, (q + self.spec.rotation) % m).batches() for q in range(m))
        torch.set_num_threads(1)
        return SlotWorker(self.spec, (info.id + self.spec.rotation) % m).batches()


def round_robin(streams: Iterable[Iterator]) -> Iterator:
    """One item of each stream in turn, dropping exhausted ones (as torch's DataLoader does with workers)."""
    queue = deque(streams)
    while queue:
        it = queue.popleft()
        for item in it:
            yield item
            queue.append(it)
            break


class SlotWorker:
    """The chunks of one slot, from its position on: shuffle, skip, decode, augment, pad."""

    def __init__(self, spec: RankSpec, q: int):
        self.s = spec
        self.k = spec.slot_ids[q]
        self.plan = spec.slots[q]
        self.counting = True
        self.bad: Counter = Counter()
        self.source = ShardSource(spec.opts, spec.cache)  # bytes read from storage / cache, taken per chunk

    def _open(self, shard: int):
        size, sha256 = self.s.checks[shard] if self.s.checks else (None, None)
        return self.source.open(self.s.urls[shard], size=size, sha256=sha256)

    def _on_bad(self, kind: str, url: str, n: int) -> None:
        if self.counting and n > 0:
            self.bad[(kind, url)] += n

    def _pass(self, p: int) -> Iterator[RawSample]:
        s = self.s

        def raw():
            for pc in self.plan.pieces:
                yield from iter_piece(s.urls[pc.shard], pc.start, pc.stop, s.opts, self._on_bad, s.num_classes,
                                      open_shard=lambda _url, i=pc.shard: self._open(i), keep=s.keep.get(pc.shard))

        if not s.training:
            return raw()
        # webdataset's shuffle buffer, filled before the first sample leaves it. Its state is not saved: a
        # resume replays the pass with the same seeded rng and skips the samples taken (``raw_pos``).
        rng = epoch_rng(s.seed, s.epoch, "buffer", self.k, p)
        return shuffle(s.shuffle_buffer, initial=s.shuffle_buffer, rng=rng)(raw())

    def _stream(self) -> Iterator[tuple[int, RawSample]]:
        """(pass number, raw sample), pass 0 then padding passes while needed (training)."""
        p = 0
        while True:
            if p > 0:
                self.counting = False  # bad samples were counted in pass 0
            n = 0
            for r in self._pass(p):
                n += 1
                yield p, r
            if not self.s.training:
                return
            if n == 0 or (p > 0 and not self._good_in_pass and not self._skipping):
                shards = sorted({self.s.urls[pc.shard] for pc in self.plan.pieces})
                raise DataError(
                    f"rank {self.s.rank} slot {self.k}: no readable sample in its shards "
                    f"{[redact_url(u) for u in shards]} (bad: {dict(self.bad)}); cannot form the planned "
                    f"{self.plan.num_batches} batches"
                )
            self._good_in_pass = 0
            p += 1

    def _decode(self, r: RawSample) -> torch.Tensor | None:
        try:
            return self.s.decoder(r.image)
        except Exception:
            return None

    def batches(self):
        s, bs = self.s, self.s.batch_size
        done, raw_pos = s.starts.get(self.k, (0, 0))
        target = self.plan.num_batches
        if done >= target:
            return
        self._good_in_pass = 0
        stream = self._stream()
        pos = 0
        # skip what was consumed before (no decode when the raw position is known)
        self.counting = False
        self._skipping = True
        if raw_pos is not None:
            for _ in range(raw_pos):
                if next(stream, None) is None:
                    break
                pos += 1
        else:
            good = 0
            while good < done * bs:
                item = next(stream, None)
                if item is None:
                    break
                pos += 1
                if self._decode(item[1]) is not None:
                    good += 1
                    self._good_in_pass += 1
        self.counting = True
        self._skipping = False
        in_padding = False
        last_n = self.plan.num_samples - (target - 1) * bs if not s.training else bs
        while done < target:
            want = bs if (s.training or done < target - 1) else last_n
            imgs, labels, keys, urls = [], [], [], []
            padded = 0
            seed = derive_seed(s.seed, s.epoch, "aug", self.k, done)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                while len(imgs) < want:
                    item = next(stream, None)
                    if item is None:
                        break
                    p, r = item
                    pos += 1
                    if p > 0:
                        in_padding = True
                        self.counting = False
                    x = self._decode(r)
                    if x is not None and not isinstance(x, device_decode.EncodedJpeg):
                        try:
                            x = s.transform(x)
                        except Exception:
                            x = None
                    if x is None:
                        if p == 0:
                            self._on_bad("corrupt_image", r.url, 1)
                        continue
                    self._good_in_pass += 1
                    imgs.append(x)
                    labels.append(r.label)
                    keys.append(r.key)
                    urls.append(r.url)
                    padded += int(in_padding)
            if not imgs:
                return  # evaluation: nothing left (bad samples)
            meta = {
                "slot": self.k,
                "batch": done,
                "raw_pos": pos,
                "bad": [(k, u, n) for (k, u), n in self.bad.items()],
                "padded": padded,
                "bytes": self.source.take_counts(),  # (from storage, from cache) since the previous chunk
                "keys": keys,
            }
            if s.device_decode_size:
                meta["urls"] = urls
                images = device_decode.collate(imgs, s.device_decode_size)
                height = width = s.device_decode_size
            else:
                images = torch.stack(imgs)
                height, width = images.shape[-2:]
            if s.batch_stage is not None:
                gen = torch.Generator().manual_seed(derive_seed(s.seed, s.epoch, "batch_stage", self.k, done))
                draws = s.batch_stage.draw(gen, len(imgs), height, width)
                if s.stage_on_host:
                    images = s.batch_stage(images, draws)
                else:
                    meta["draws"] = draws
            self.bad = Counter()
            done += 1
            yield images, torch.tensor(labels, dtype=torch.int64), meta
            if not s.training and len(imgs) < want:
                return
