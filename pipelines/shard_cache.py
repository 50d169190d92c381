"""Node-local shard cache: each node keeps the shards it has read on local disk, so epochs >= 2 read locally.

    source = ShardSource(opts, CacheConfig("/tmp/mixer-shard-cache", max_bytes=100 * 2**30))
    with source.open(url, size=info.size, sha256=info.sha256) as f:   # a file object, read to the end
        ...
    from_storage, from_cache = source.take_counts()                  # bytes since the last take

A remote shard (any fsspec URL but a local path: caching a local file would only copy it) is fetched whole
with fsspec (``fs.get_file``) into a temporary file in the cache directory, checked against the manifest's
size and SHA-256 (when the manifest has them; older manifests have neither: then the store's own size checks
the fetch, and a hit is not checked), and renamed into place (``os.replace``: a reader never sees a partial shard). Every later open
of that shard on the node reads the local copy. One cache directory serves every process of the node
(the ranks and their DataLoader workers):

- two lock files per shard (``fcntl.flock``): a fetch holds the shard's fetch lock exclusively, so two
  processes asking for the same shard at once download it once (the second waits, then finds it cached);
  a reader holds the shard's read lock shared while its copy is open (readers never wait for each other; a
  copy is replaced by a rename, so a reader of the old one reads on undisturbed);
- LRU by size: a hit touches the file's mtime (atime is unreliable under noatime/relatime); after a fetch,
  while the cache holds more than ``max_bytes`` the least recently used shards are deleted, skipping any
  whose lock is held (being read or fetched); one process evicts at a time (a non-blocking directory lock);
- a damaged copy is fetched again: on every hit the file's size is compared with the manifest's (a
  truncated copy, e.g. after a full disk or a cleaner, is refetched); the SHA-256 is checked once, on fetch,
  before the copy is published (hashing every hit would double the disk reads of every epoch);
- the cache never fails a run: if the directory cannot be used (full disk, permissions) the shard is read
  from storage directly, with one warning per process.

On several nodes the cache warms up over epochs. The epoch plan (pipelines/plan.py) reshuffles the shards over
all stream slots every epoch, so each of N nodes reads a different ~1/N of the dataset each epoch and finds
cached only the shards it happened to read in an earlier one: ~1/N of epoch 2's, 1 - (1 - 1/N)^(e-1) of epoch
e's. Each node's cache thus fills toward the whole dataset, and object storage serves about
N x dataset x (1 - (1 - 1/N)^E) over E epochs (~N datasets for a long run instead of E; at most E for a short
one). Every node needs ``max_bytes`` >= the dataset: with less, LRU evicts shards the node reads again later
(churn), and at best ~max_bytes/dataset of its reads are local. tests/pipelines/test_shard_cache_nodes.py
checks this on two nodes.

Why not fsspec's own caches (``simplecache`` / ``filecache`` / ``blockcache``, fsspec 2026.9): they download
straight into the final file name (a crash or a concurrent reader sees a partial shard, and simplecache then
serves it as whole), they take no lock (two workers fetch the same shard twice), they expire by age, not by
size (nothing bounds the disk they use), and filecache/blockcache keep their index in one metadata file that
each process rewrites (last writer wins across a node's workers). They also do not check a copy against an
expected size or checksum. The fetch itself is fsspec's (retries are the S3 client's, pipelines/storage.py).

Bytes are counted per process (``take_counts``): ``from_storage`` is what was read from object storage
(whole shards fetched into the cache, or the bytes a reader took from storage when there is no cache),
``from_cache`` the bytes readers took from cached copies they did not fetch themselves. The loader carries
them in each chunk's metadata like the bad-sample counts (pipelines/slot_stream.py).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from .redaction import redact_url
from .storage import get_fs, protocol_of

log = logging.getLogger(__name__)

_LOCKS = ".locks"
_TMP = ".tmp-"
_EVICT_LOCK = ".evict.lock"
_STALE_TMP_S = 3600.0  # a temporary file nobody holds the lock of, this old, is a killed fetch's leftover


@dataclass(frozen=True)
class CacheConfig:
    """Where a node keeps its shards and how many bytes it may keep (a fetched shard may exceed it alone)."""

    directory: str
    max_bytes: int

    @classmethod
    def from_gb(cls, directory: str | os.PathLike | None, max_gb: float) -> CacheConfig | None:
        if directory is None or str(directory) == "":
            return None
        return cls(os.path.abspath(os.path.expanduser(os.fspath(directory))), int(max_gb * 2**30))


def cacheable(url: str) -> bool:
    """Remote URLs are cached; local paths (and file:// URLs) are read in place."""
    return protocol_of(url) not in ("file", "local")


class CountingReader:
    """A read-only file object that adds what is read to a counter; closing it releases the entry's lock."""

    def __init__(self, f: BinaryIO, source: ShardSource, kind: str | None, lock_fd: int | None = None):
        self._f, self._source, self._kind, self._lock_fd = f, source, kind, lock_fd

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self._source._count(self._kind, len(b))
        return b

    def readinto(self, buf) -> int:
        n = self._f.readinto(buf)
        self._source._count(self._kind, n or 0)
        return n

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        try:
            self._f.close()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the shared lock
                self._lock_fd = None

    @property
    def closed(self) -> bool:
        return self._f.closed

    def __enter__(self) -> CountingReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name: str):
        return getattr(self._f, name)


class ShardSource:
    """Opens shards for one process: through the node's cache when one is configured and the URL is remote,
    else directly; counts the bytes read from storage and from the cache (picklable before first use)."""

    def __init__(self, opts: Mapping[str, Any], cache: CacheConfig | None = None):
        self.opts = dict(opts)
        self.cache = cache
        self.counts = {"storage": 0, "cache": 0}
        self._disabled = False  # the cache directory failed once in this process: read directly from then on
        self._trusted = False  # the directory was checked to be this user's own

    def _count(self, kind: str | None, n: int) -> None:
        if kind is not None:
            self.counts[kind] += n

    def take_counts(self) -> tuple[int, int]:
        """(bytes from storage, bytes from cache) since the last call."""
        out = (self.counts["storage"], self.counts["cache"])
        self.counts = {"storage": 0, "cache": 0}
        return out

    def open(self, url: str, *, size: int | None = None, sha256: str | None = None) -> CountingReader:
        """The shard as a readable file object. FileNotFoundError when storage has no such shard."""
        if self.cache is None or self._disabled or not cacheable(url):
            return self._direct(url)
        try:
            return self._cached(url, size, sha256)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError | _DamagedFetch) or not _cache_side(exc):
                raise  # storage's problem: the reader counts the shard as missing or unreadable
            self._disabled = True
            log.warning("shard cache %s cannot be used (%s); reading shards from storage directly",
                        self.cache.directory, exc)
            return self._direct(url)

    def _direct(self, url: str) -> CountingReader:
        fs, path = get_fs(url, self.opts, resolved=True)
        return CountingReader(fs.open(path, "rb"), self, "storage")

    # ------------------------------------------------------------------------------------------ cache
    def _cached(self, url: str, size: int | None, sha256: str | None) -> CountingReader:
        d = self.cache.directory
        if not self._trusted:
            _check_private(d)
            self._trusted = True
        name = entry_name(url, self.opts)
        path = os.path.join(d, name)
        read_fd = _lock_file(d, name)  # shared while the copy is open: the evictor skips it
        try:
            fcntl.flock(read_fd, fcntl.LOCK_SH)
            fetched = False
            if _valid(path, size, warn=True):
                f = open(path, "rb")  # noqa: SIM115 (closed by the CountingReader)
                os.utime(path)  # most recently used
            else:
                fetch_fd = _lock_file(d, name + ".fetch")
                try:
                    fcntl.flock(fetch_fd, fcntl.LOCK_EX)  # one process fetches; the others wait, then find it
                    if not _valid(path, size):
                        self._fetch(url, path, size, sha256)
                        fetched = True
                    f = open(path, "rb")  # noqa: SIM115
                finally:
                    os.close(fetch_fd)
        except BaseException:
            os.close(read_fd)
            raise
        if fetched:
            self._evict(keep=name)
        # the bytes of a fetch were counted as they were downloaded: reading the fresh copy is not a cache hit
        return CountingReader(f, self, None if fetched else "cache", read_fd)

    def _fetch(self, url: str, path: str, size: int | None, sha256: str | None) -> None:
        """Download the whole shard next to ``path`` and rename it into place once it checks out."""
        fs, rpath = get_fs(url, self.opts, resolved=True)
        if size is None:  # a manifest without sizes: the store's own (one HEAD request)
            size = int(fs.size(rpath))
        tmp = os.path.join(os.path.dirname(path), f"{_TMP}{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
        try:
            for attempt in (1, 2):
                fs.get_file(rpath, tmp)
                got = os.path.getsize(tmp)
                self._count("storage", got)
                problem = _check(tmp, got, size, sha256)
                if problem is None:
                    break
                log.warning("fetched shard %s %s (attempt %d of 2)", redact_url(url), problem, attempt)
            else:
                raise _DamagedFetch(f"shard {redact_url(url)} fetched twice and {problem}")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _evict(self, keep: str) -> None:
        evict(self.cache, keep=keep)


class _DamagedFetch(OSError):
    """A shard downloaded twice did not match the manifest's size/checksum: read as an unreadable shard."""


def _cache_side(exc: OSError) -> bool:
    """An error of the local cache directory (not of the storage): disk full, permissions, read-only fs."""
    return exc.errno in (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT, errno.ENOTDIR)


def entry_name(url: str, opts: Mapping[str, Any]) -> str:
    """The cache file of a shard: a hash of its URL and endpoint (one bucket name on two stores differs), then
    its file name to be readable."""
    key = f"{opts.get('endpoint_url') or ''}|{url}"
    base = url.rstrip("/").rsplit("/", 1)[-1]
    return f"{hashlib.sha256(key.encode()).hexdigest()[:20]}-{base}"


def _check_private(directory: str) -> None:
    """The cache directory is created 0700 and must be this user's and writable by nobody else: a hit is checked
    by size only, so another local user able to write there could plant shards (a shared /tmp path)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PermissionError(errno.EPERM, f"not used: owned by uid {st.st_uid} with mode {st.st_mode & 0o777:o}; "
                              "a shard cache must be this user's own and writable by nobody else", directory)


def _lock_file(directory: str, name: str) -> int:
    locks = os.path.join(directory, _LOCKS)
    os.makedirs(locks, exist_ok=True)
    # lock files stay (empty, in .locks/): deleting one another process has open would let two hold "the" lock
    return os.open(os.path.join(locks, name), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)


def _valid(path: str, size: int | None, warn: bool = False) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    if size is not None and st.st_size != size:
        if warn:
                log.warning("cached shard %s has %d bytes, the manifest says %d: fetching it again", path, st.st_size, size)
        return False
    return True


def _check(path: str, got: int, size: int | None, sha256: str | None) -> str | None:
    if size is not None and got != size:
        return f"has {got} bytes, the manifest says {size}"
    if sha256 is not None:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != sha256:
            return f"has SHA-256 {digest[:12]}..., the manifest says {sha256[:12]}..."
    return None


def evict(cache: CacheConfig, keep: str | None = None) -> list[str]:
    """Delete least recently used shards until the cache holds at most ``max_bytes`` (never ``keep``, nor one
    whose lock is held); also remove killed fetches' temporary files. Returns the names deleted."""
    d = cache.directory
    try:
        guard = os.open(os.path.join(d, _EVICT_LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        return []
    try:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []  # another process is evicting
        entries, total, now = [], 0, time.time()
        with os.scandir(d) as it:
            for e in it:
                if not e.is_file(follow_symlinks=False) or e.name == _EVICT_LOCK:
                    continue
                st = e.stat(follow_symlinks=False)
                if e.name.startswith(_TMP):
                    if now - st.st_mtime > _STALE_TMP_S and _try_remove(d, e.name.rsplit("-", 1)[0][len(_TMP):],
                                                                         e.path):
                        log.info("removed a stale temporary file %s", e.path)
                    continue
                entries.append((st.st_mtime, e.name, st.st_size))
                total += st.st_size
        removed = []
        for _, name, sz in sorted(entries):
            if total <= cache.max_bytes:
                break
            if name == keep:
                continue
            if _try_remove(d, name, os.path.join(d, name)):
                total -= sz
                removed.append(name)
        if total > cache.max_bytes:
            log.warning("shard cache %s holds %.2f GB, over data.cache_max_gb=%.2f: the shards left are in use",
                        d, total / 2**30, cache.max_bytes / 2**30)
        return removed
    finally:
        os.close(guard)


def _try_remove(directory: str, name: str, path: str) -> bool:
    """Remove ``path`` if the lock of entry ``name`` can be taken now (nobody reads or fetches it)."""
    try:
        fd = os.open(os.path.join(directory, _LOCKS, name), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    finally:
        os.close(fd)
