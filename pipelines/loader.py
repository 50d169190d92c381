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
  exactly where it stopped). Each worker streams its shard pieces through webdataset's tar iterator,
  checks each sample's structure, passes the raw bytes through a seeded shuffle buffer, then decodes
  (torchvision.io.decode_image), augments (torch RNG seeded per batch) and collates full batches;
- every worker yields exactly the batches the plan gives it; bad samples are skipped and counted, and a
  worker that runs short re-reads its pieces (a new seeded pass) to pad, counted as ``padded``;
- the position is (epoch, batches consumed) plus, per worker, the number of shuffled raw samples taken
  (``positions``), which lets a resume skip raw bytes without decoding. Without this rank's positions
  (e.g. a checkpoint holding only rank 0's state) the skipped prefix is decoded to tell good from bad.

Resume with different plan inputs (world size, workers, batch size, seed, shuffle buffer, dataset):
``on_plan_change='restart_epoch'`` (default) warns and restarts the checkpoint's epoch from its first batch
(samples already seen in that epoch are seen again; this is said in the warning and in
``resume_note``); ``on_plan_change='error'`` raises ResumeMismatchError.

Evaluation (``training=False``): no shuffling, no dropping, no padding, every sample read exactly once
across all ranks; the last batch of a worker may be short and ranks may get different batch counts
(evaluate without per-step collectives, then all-reduce the sums). Evaluation always reads the whole split.
"""

from __future__ import annotations

import logging
import tarfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from .manifest import Manifest, ShardInfo, load_manifest, split_manifest_url
from .mixup import MixupConfig, mixup_batch
from .plan import EpochPlan, SlotPlan, derive_seed, epoch_rng, plan_epoch, worker_position
from .redaction import redact_url, scrub
from .storage import (
    DatasetNotFoundError,
    StorageError,
    check_dataset_reachable,
    get_fs,
    is_transient,
    open_url,
    resolve_storage_options,
)
from .transforms import decode_image, default_transform

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "gif", "tif", "tiff")
LABEL_EXTS = ("cls", "label", "cls2")
BAD_KINDS = (
    "missing_shard",
    "unreadable_shard",
    "truncated_tar",
    "non_adjacent",
    "missing_image",
    "missing_label",
    "bad_label",
    "corrupt_image",
)
STATE_VERSION = 1


class DataError(RuntimeError):
    """The data cannot give the planned batches (too many bad samples, a worker with no good sample)."""


class TooManyBadSamplesError(DataError):
    pass


class ResumeMismatchError(ValueError):
    """A state_dict was made with different plan inputs and on_plan_change='error'."""


# ------------------------------------------------------------------------------------------ reading
def _groups(fileobj) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for consecutive files sharing a key, in tar order (webdataset's tar reader)."""
    key, cur = None, {}
    for f in tar_file_iterator(fileobj, handler=reraise_exception):
        prefix, suffix = base_plus_ext(f["fname"])
        if prefix is None:
            continue
        if prefix != key:
            if key is not None:
                yield key, cur
            key, cur = prefix, {}
        cur[suffix.lower()] = f["data"]
    if key is not None:
        yield key, cur


@dataclass
class _Raw:
    key: str
    url: str
    image: bytes
    label: int


def iter_piece(
    url: str,
    start: int,
    stop: int,
    opts: Mapping[str, Any],
    on_bad: Callable[[str, str, int], None],
    num_classes: int | None = None,
    max_reopen: int = 3,
) -> Iterator[_Raw]:
    """Structurally valid samples with index ``start <= i < stop`` of one shard; problems go to on_bad.

    A transient read error re-opens the shard (bounded, with backoff) and skips to where it was.
    """
    idx = 0  # next group index to look at
    seen: set[str] = set()
    reopen = 0
    while True:
        try:
            f = open_url(url, "rb", opts)
        except FileNotFoundError:
            on_bad("missing_shard", url, stop - max(start, idx))
            return
        except Exception as exc:
            log.error("cannot open shard %s: %s", redact_url(url), scrub(str(exc), opts))
            on_bad("unreadable_shard", url, stop - max(start, idx))
            return
        try:
            with f:
                for i, (key, files) in enumerate(_groups(f)):
                    if i < idx:
                        continue  # already handled before a re-open
                    idx = i + 1
                    if i >= stop:
                        return
                    repeated = key in seen
                    seen.add(key)
                    if i < start:
                        continue
                    if repeated:
                        on_bad("non_adjacent", url, 1)
                        continue
                    img_ext = next((e for e in IMAGE_EXTS if e in files), None)
                    if img_ext is None:
                        on_bad("missing_image", url, 1)
                        continue
                    lab_ext = next((e for e in LABEL_EXTS if e in files), None)
                    if lab_ext is None:
                        on_bad("missing_label", url, 1)
                        continue
                    try:
                        label = int(files[lab_ext].decode().strip())
                        if label < 0 or (num_classes is not None and label >= num_classes):
                            raise ValueError(label)
                    except Exception:
                        on_bad("bad_label", url, 1)
                        continue
                    yield _Raw(key, url, files[img_ext], label)
            if idx < stop:  # the shard ended before the manifest said it would
                on_bad("truncated_tar", url, stop - max(start, idx))
            return
        except (tarfile.TarError, EOFError, UnicodeDecodeError) as exc:
            kind = "unreadable_shard" if idx == 0 else "truncated_tar"
            log.warning("%s in %s after %d samples: %s", kind, redact_url(url), idx, exc)
            on_bad(kind, url, stop - max(start, idx))
            return
        except Exception as exc:
            if is_transient(exc) and reopen < max_reopen:
                reopen += 1
                time.sleep(min(2.0, 0.2 * 2**reopen))
                log.warning("re-opening %s after %s", redact_url(url), type(exc).__name__)
                continue
            log.error("unreadable shard %s: %s", redact_url(url), scrub(str(exc), opts))
            on_bad("unreadable_shard", url, stop - max(start, idx))
            return


def _shuffled(it: Iterator[_Raw], bufsize: int, rng) -> Iterator[_Raw]:
    buf: list[_Raw] = []
    for x in it:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        k = rng.randrange(len(buf))
        out, buf[k] = buf[k], x
        yield out
    rng.shuffle(buf)
    yield from buf


# ------------------------------------------------------------------------------------ worker side
@dataclass
class _RankSpec:
    urls: list[str]
    slots: tuple[SlotPlan, ...]  # this rank's slots, index = worker
    training: bool
    batch_size: int
    seed: int
    epoch: int
    rank: int
    rotation: int
    starts: dict[int, tuple[int, int | None]]  # worker -> (batches consumed, raw position or None)
    shuffle_buffer: int
    opts: dict[str, Any]
    transform: Callable[[torch.Tensor], torch.Tensor]
    num_classes: int | None


class _RankDataset(IterableDataset):
    def __init__(self, spec: _RankSpec):
        self.spec = spec

    def __iter__(self):
        info = get_worker_info()
        j = info.id if info is not None else 0
        W = len(self.spec.slots)
        w = (j + self.spec.rotation) % W
        if info is not None:
            torch.set_num_threads(1)
        return _SlotWorker(self.spec, w).batches()


class _SlotWorker:
    def __init__(self, spec: _RankSpec, w: int):
        self.s = spec
        self.w = w
        self.plan = spec.slots[w]
        self.counting = True
        self.bad: Counter = Counter()
        self.padded = 0

    def _on_bad(self, kind: str, url: str, n: int) -> None:
        if self.counting and n > 0:
            self.bad[(kind, url)] += n

    def _pass(self, p: int) -> Iterator[_Raw]:
        s = self.s

        def raw():
            for pc in self.plan.pieces:
                yield from iter_piece(s.urls[pc.shard], pc.start, pc.stop, s.opts, self._on_bad, s.num_classes)

        if not s.training:
            return raw()
        rng = epoch_rng(s.seed, s.epoch, "buffer", s.rank, self.w, p)
        return _shuffled(raw(), s.shuffle_buffer, rng)

    def _stream(self) -> Iterator[tuple[int, _Raw]]:
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
                    f"rank {self.s.rank} worker {self.w}: no readable sample in its shards "
                    f"{[redact_url(u) for u in shards]} (bad: {dict(self.bad)}); cannot form the planned "
                    f"{self.plan.num_batches} batches"
                )
            self._good_in_pass = 0
            p += 1

    def _decode(self, r: _Raw) -> torch.Tensor | None:
        try:
            return decode_image(r.image)
        except Exception:
            return None

    def batches(self):
        s, bs = self.s, self.s.batch_size
        done, raw_pos = s.starts.get(self.w, (0, 0))
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
            imgs, labels, keys = [], [], []
            padded = 0
            seed = derive_seed(s.seed, s.epoch, "aug", s.rank, self.w, done)
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
                    if x is not None:
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
                    padded += int(in_padding)
            if not imgs:
                return  # evaluation: nothing left (bad samples)
            meta = {
                "slot": self.w,
                "batch": done,
                "raw_pos": pos,
                "bad": [(k, u, n) for (k, u), n in self.bad.items()],
                "padded": padded,
                "keys": keys,
            }
            self.bad = Counter()
            done += 1
            yield torch.stack(imgs), torch.tensor(labels, dtype=torch.int64), meta
            if not s.training and len(imgs) < want:
                return


# -------------------------------------------------------------------------------------- main side
def _is_pattern(source: str) -> bool:
    s = str(source)
    return ("{" in s and ".." in s) or s.endswith((".tar", ".tgz", ".tar.gz"))


def _count_samples(url: str, opts: Mapping[str, Any]) -> int:
    with open_url(url, "rb", opts) as f:
        return sum(1 for _ in _groups(f))


def dataset_from_pattern(
    pattern: str, storage_options: Mapping[str, Any] | None = None, split: str = "train"
) -> Manifest:
    """A Manifest for a brace-pattern URL. Sample counts come from a ``manifest.json`` in the shards' folder
    or its parent when it lists these shards; otherwise each shard is read once to count its samples."""
    import braceexpand

    from .manifest import FORMAT_VERSION

    urls = list(braceexpand.braceexpand(str(pattern)))
    opts = resolve_storage_options(urls[0], storage_options)
    folder = urls[0].rsplit("/", 1)[0]
    for root in (folder, folder.rsplit("/", 1)[0]):
        try:
            m = load_manifest(root, opts)
        except Exception:
            continue
        known = {s.url: s for shards in m.splits.values() for s in shards}
        if all(u in known for u in urls):
            return Manifest(m.format_version, m.class_names, {split: [known[u] for u in urls]}, root)
    log.warning("no manifest lists %s: counting samples by reading %d shards", redact_url(pattern), len(urls))
    shards = []
    for u in urls:
        try:
            shards.append(ShardInfo(u, _count_samples(u, opts)))
        except FileNotFoundError:
            raise DatasetNotFoundError(f"shard not found: {redact_url(u)} (from pattern {redact_url(pattern)})") from None
    return Manifest(FORMAT_VERSION, [], {split: shards}, folder)


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
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if on_plan_change not in ("restart_epoch", "error"):
            raise ValueError(f"on_plan_change must be 'restart_epoch' or 'error', got {on_plan_change!r}")
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
        self.transform = transform or default_transform()
        if isinstance(mixup, int | float):
            mixup = MixupConfig(alpha=float(mixup))
        self.mixup = mixup
        opts_url = self.source if "://" in self.source else "file://"
        self._opts = resolve_storage_options(opts_url, storage_options)

        if _is_pattern(self.source):
            check_dataset_reachable(self.source.split("{")[0].rsplit("/", 1)[0], self._opts)
            self.manifest = dataset_from_pattern(self.source, self._opts, split)
        else:
            root, _ = split_manifest_url(self.source)
            check_dataset_reachable(root if "://" in root else "file://" + _abspath(root), self._opts,
                                    want_file="manifest.json" if not self.source.endswith(".json") else None)
            self.manifest = load_manifest(self.source, self._opts)
        self.shards: list[ShardInfo] = self.manifest.shards(split)
        self.num_classes = num_classes or self.manifest.num_classes or None
        if self.mixup is not None and not self.num_classes:
            raise ValueError("mixup needs num_classes (the dataset has no class_names; pass num_classes=)")
        self._fingerprint = self.manifest.fingerprint(split)
        if verify_shards:
            self._verify_shards()

        self.epoch = 0
        self._consumed = 0
        self._positions: dict[int, int] = {}
        self._bad: Counter = Counter()
        self._padded = 0
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
        self._bad = Counter()
        self._padded = 0
        self._just_loaded = False

    def _plan_inputs(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "world_size": self.world_size,
            "num_workers": max(1, self.num_workers),
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
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
            "bad_counts": {str(self.rank): [[k, u, n] for (k, u), n in self._bad.items()]},
            "padded": {str(self.rank): self._padded},
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
        for k, u, n in sd.get("bad_counts", {}).get(str(self.rank), []):
            self._bad[(k, u)] += int(n)
        self._padded = int(sd.get("padded", {}).get(str(self.rank), 0))
        self._just_loaded = True
        self.resume_note = None

    # ------------------------------------------------------------------------------- bad samples
    def bad_sample_counts(self) -> dict[str, dict[str, int]]:
        """This epoch's bad samples on this rank: kind -> {shard URL: count}; plus 'padded' -> {'': n}."""
        out: dict[str, dict[str, int]] = {}
        for (k, u), n in sorted(self._bad.items()):
            out.setdefault(k, {})[u] = n
        if self._padded:
            out["padded"] = {"": self._padded}
        return out

    def num_bad_samples(self) -> int:
        return sum(self._bad.values())

    def _check_bad(self, plan: EpochPlan) -> None:
        n = self.num_bad_samples()
        limit = self.max_bad_fraction * max(1, plan.samples_per_rank(self.rank))
        if n > limit:
            raise TooManyBadSamplesError(self._bad_message(n, plan.samples_per_rank(self.rank)))

    def _bad_message(self, n: int, total: int) -> str:
        per_shard: Counter = Counter()
        kinds: dict[str, Counter] = {}
        for (k, u), c in self._bad.items():
            per_shard[u] += c
            kinds.setdefault(u, Counter())[k] += c
        worst = ", ".join(
            f"{redact_url(u)} ({c}: {dict(kinds[u])})" for u, c in per_shard.most_common(5)
        )
        return (
            f"rank {self.rank}: {n} bad samples in epoch {self.epoch} exceed max_bad_fraction="
            f"{self.max_bad_fraction} of the rank's {total} planned samples; worst shards: {worst}"
        )

    def _verify_shards(self) -> None:
        """List the shard folders once; missing shards beyond the bad-sample budget fail here, clearly."""
        by_dir: dict[str, list[ShardInfo]] = {}
        for s in self.shards:
            by_dir.setdefault(s.url.rsplit("/", 1)[0], []).append(s)
        missing: list[ShardInfo] = []
        for d, shards in by_dir.items():
            try:
                fs, path = get_fs(d, self._opts, resolved=True)
                names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
            except FileNotFoundError:
                names = set()
            except Exception as exc:
                log.warning("could not list %s to verify shards: %s", redact_url(d), scrub(str(exc), self._opts))
                continue
            missing += [s for s in shards if s.url.rsplit("/", 1)[-1] not in names]
        if not missing:
            return
        lost = sum(s.num_samples for s in missing)
        total = max(1, sum(s.num_samples for s in self.shards))
        names = [redact_url(s.url) for s in missing[:10]]
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        msg = f"{len(missing)} shard(s) of split {self.split!r} missing from storage: {names}{more} ({lost} of {total} samples)"
        if lost > self.max_bad_fraction * total:
            raise DatasetNotFoundError(msg + f"; more than max_bad_fraction={self.max_bad_fraction}")
        log.warning(msg + "; they will be skipped and counted as missing_shard")

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
        spec = _RankSpec(
            urls=[s.url for s in self.shards], slots=plan.rank_slots(self.rank), training=self.training,
            batch_size=self.batch_size, seed=self.seed, epoch=self.epoch, rank=self.rank,
            rotation=(k % W) if self.training else 0, starts=starts, shuffle_buffer=self.shuffle_buffer,
            opts=self._opts, transform=self.transform, num_classes=self.num_classes,
        )
        return self._iterate(plan, spec, k, total)

    def _iterate(self, plan: EpochPlan, spec: _RankSpec, k: int, total: int):
        if k >= total:
            return
        W = plan.num_workers
        dl = DataLoader(
            _RankDataset(spec), batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
        )
        mix_gen = torch.Generator() if self.mixup is not None else None
        for images, labels, meta in dl:
            w = meta["slot"]
            if self.training and w != k % W:
                raise DataError(f"internal: batch {k} came from worker {w}, expected {k % W}")
            for kind, url, n in meta["bad"]:
                self._bad[(kind, url)] += n
            self._padded += meta["padded"]
            self._positions[w] = meta["raw_pos"]
            self._check_bad(plan)
            k += 1
            self._consumed = k
            targets = labels
            if self.mixup is not None:
                mix_gen.manual_seed(derive_seed(self.seed, self.epoch, "mixup", self.rank, k - 1))
                images, targets = mixup_batch(
                    images, labels, self.num_classes, self.mixup.alpha, mix_gen, self.mixup.label_smoothing
                )
                if self.pin_memory and torch.cuda.is_available():  # mixing made new, unpinned tensors
                    images, targets = images.pin_memory(), targets.pin_memory()
            if self.return_keys:
                yield images, targets, meta["keys"]
            else:
                yield images, targets
        if self.training and k != total:
            raise DataError(f"internal: rank {self.rank} yielded {k} batches, planned {total}")


def _abspath(p: str) -> str:
    import os

    return os.path.abspath(p)


__all__ = [
    "ShardLoader",
    "DataError",
    "TooManyBadSamplesError",
    "ResumeMismatchError",
    "StorageError",
    "BAD_KINDS",
    "dataset_from_pattern",
    "iter_piece",
]
