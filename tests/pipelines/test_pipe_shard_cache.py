"""The node-local shard cache (pipelines/shard_cache.py) on loopback S3 (moto via s3fs).

The witness for "fetched once" is moto's own request recorder (its /moto-api/recorder/* endpoints), not our
counters: every GET of a shard object the server answered is in its log.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
from cache_fetcher import fetch_after_barrier

from pipelines.loader import ShardLoader
from pipelines.shard_cache import CacheConfig, ShardSource, entry_name, evict
from pipelines.storage import resolve_storage_options


def _epoch(loader: ShardLoader, epoch: int) -> tuple[int, int]:
    loader.set_epoch(epoch)
    for _ in loader:
        pass
    return loader.bytes_read()


def test_two_epochs_fetch_each_shard_once(s3_digits, recorder, tmp_path):
    url, m = s3_digits
    shards = m.shards("train")
    total = sum(s.size for s in shards)
    # slots=2 with num_workers=1: two DataLoader worker processes share the cache directory
    loader = ShardLoader(url, "train", batch_size=32, num_workers=1, slots=2, seed=0,
                         cache_dir=str(tmp_path / "cache"), cache_max_gb=1.0)
    with recorder:
        t0 = time.perf_counter()
        first = _epoch(loader, 0)
        t1 = time.perf_counter()
        second = _epoch(loader, 1)
        t2 = time.perf_counter()
    gets = recorder.shard_gets()
    keys = {s.url.split("://", 1)[1] for s in shards}  # path-style: bucket/key
    assert gets == dict.fromkeys(keys, 1), gets  # each shard read from S3 exactly once, over both epochs
    assert first[0] == total  # epoch 1: every shard fetched once, whole
    assert second == (0, second[1]) and second[1] > 0.9 * total  # epoch 2: nothing from S3, all from disk
    cached = [n for n in os.listdir(tmp_path / "cache") if n.endswith(".tar")]
    assert len(cached) == len(shards)
    print(f"epoch 1 {t1 - t0:.2f}s, epoch 2 {t2 - t1:.2f}s; bytes {first} then {second}")


def test_truncated_cached_shard_is_refetched(s3_digits, recorder, tmp_path):
    url, m = s3_digits
    s = m.shards("train")[0]
    cache = CacheConfig(str(tmp_path / "cache"), 2**30)
    src = ShardSource(resolve_storage_options(url), cache)
    with recorder:
        with src.open(s.url, size=s.size, sha256=s.sha256) as f:
            whole = f.read()
        assert src.take_counts() == (s.size, 0)
        path = tmp_path / "cache" / entry_name(s.url, src.opts)
        with open(path, "r+b") as f:
            f.truncate(s.size // 2)  # damaged on disk (a full disk, a cleaner)
        with src.open(s.url, size=s.size, sha256=s.sha256) as f:
            assert f.read() == whole
        assert src.take_counts() == (s.size, 0)  # fetched again: counted as from storage
        with src.open(s.url, size=s.size, sha256=s.sha256) as f:
            assert f.read() == whole
        assert src.take_counts() == (0, s.size)
    assert sum(recorder.shard_gets().values()) == 2
    assert os.path.getsize(path) == s.size


def test_wrong_checksum_fetch_is_not_published(s3_digits, tmp_path):
    url, m = s3_digits
    s = m.shards("train")[0]
    src = ShardSource(resolve_storage_options(url), CacheConfig(str(tmp_path / "cache"), 2**30))
    with pytest.raises(OSError, match="SHA-256"):
        src.open(s.url, size=s.size, sha256="0" * 64)
    assert not [n for n in os.listdir(tmp_path / "cache") if not n.startswith(".")]  # no copy, no temp file


def test_full_cache_evicts_least_recently_used(s3_digits, tmp_path):
    url, m = s3_digits
    a, b, c = m.shards("train")[:3]  # 532,480 bytes each
    cache = CacheConfig(str(tmp_path / "cache"), int(2.5 * a.size))  # room for two
    src = ShardSource(resolve_storage_options(url), cache)

    def read(s):
        with src.open(s.url, size=s.size) as f:
            f.read()

    def used_ago(s, seconds):  # distinct mtimes without waiting for the clock to move
        t = time.time() - seconds
        os.utime(tmp_path / "cache" / entry_name(s.url, src.opts), (t, t))

    read(a)
    used_ago(a, 20)
    read(b)
    used_ago(b, 10)
    read(a)  # a hit touches its mtime: a is now more recent than b
    read(c)  # over the bound: b, the least recently used, goes
    names = set(os.listdir(tmp_path / "cache"))
    assert entry_name(b.url, src.opts) not in names
    assert {entry_name(a.url, src.opts), entry_name(c.url, src.opts)} <= names
    # a shard being read is never evicted, even when it is the least recently used
    with src.open(a.url, size=a.size) as f:
        os.utime(tmp_path / "cache" / entry_name(a.url, src.opts), (0, 0))
        assert evict(CacheConfig(cache.directory, 1)) == [entry_name(c.url, src.opts)]
        assert f.read()


def test_two_processes_fetch_one_shard_once(s3_digits, recorder, tmp_path):
    url, m = s3_digits
    s = m.shards("train")[0]
    ctx = mp.get_context("spawn")  # as DataLoader workers of separate ranks: no shared memory
    barrier, out = ctx.Barrier(2), ctx.Queue()
    with recorder:
        procs = [ctx.Process(target=fetch_after_barrier, args=(s.url, s.size, str(tmp_path / "c"), barrier, out))
                 for _ in range(2)]
        for p in procs:
            p.start()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
    assert sorted(r[0] for r in results) == [(0, s.size), (s.size, 0)]  # one fetched, the other read its copy
    assert all(r[1] == s.size for r in results)
    assert sum(recorder.shard_gets().values()) == 1


def test_resume_mid_epoch_through_the_cache(s3_digits, tmp_path):
    """A resumed epoch skips raw samples (no decode) through cached reads and yields what an unbroken one does."""
    url, _ = s3_digits
    kw = dict(batch_size=32, num_workers=0, slots=2, seed=3, return_keys=True,
              cache_dir=str(tmp_path / "cache"), cache_max_gb=1.0)
    full = ShardLoader(url, "train", **kw)
    full.set_epoch(1)
    keys, state = [], None
    for i, (_, _, k) in enumerate(full):
        keys.append(k)
        if i == 9:
            state = full.state_dict()
    saved = [sum(e.get("bytes", (0, 0))[i] for e in state["slots"].values()) for i in (0, 1)]
    assert saved[0] > 0  # the counts travel in the position, like the bad-sample counts
    resumed = ShardLoader(url, "train", **kw)
    resumed.load_state_dict(state)
    rest = [k for _, _, k in resumed]
    assert rest == keys[10:]
    got = resumed.bytes_read()
    assert got[0] == saved[0] and got[1] > saved[1]  # after the resume every shard came from the node's cache


def test_readers_of_one_cached_shard_do_not_wait_for_each_other(s3_digits, tmp_path):
    import concurrent.futures

    url, m = s3_digits
    s = m.shards("train")[0]
    cache = CacheConfig(str(tmp_path / "cache"), 2**30)
    first = ShardSource(resolve_storage_options(url), cache)
    with first.open(s.url, size=s.size) as f:  # fetched, and held open (its read lock shared)
        second = ShardSource(resolve_storage_options(url), cache)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            data = pool.submit(lambda: second.open(s.url, size=s.size).read()).result(timeout=20)
        assert data == f.read()
    assert second.take_counts() == (0, s.size)


def test_unusable_cache_dir_reads_storage_directly(s3_digits, tmp_path, caplog):
    url, m = s3_digits
    s = m.shards("train")[0]
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    src = ShardSource(resolve_storage_options(url), CacheConfig(str(blocker / "cache"), 2**30))
    with src.open(s.url, size=s.size) as f:
        assert len(f.read()) == s.size
    assert src.take_counts() == (s.size, 0)
    assert "cannot be used" in caplog.text


def test_manifest_without_sizes_still_fetches_once(s3_digits, recorder, tmp_path):
    """An older manifest (no size, no sha256): the store's size checks the fetch; hits are served as usual."""
    url, m = s3_digits
    s = m.shards("train")[0]
    src = ShardSource(resolve_storage_options(url), CacheConfig(str(tmp_path / "cache"), 2**30))
    with recorder:
        for _ in range(2):
            with src.open(s.url) as f:
                assert len(f.read()) == s.size
    assert src.take_counts() == (s.size, s.size)
    assert sum(recorder.shard_gets().values()) == 1


def test_a_cache_dir_others_can_write_is_not_used(s3_digits, tmp_path, caplog):
    """A hit is checked by size only: a directory another local user could write to (a shared /tmp path) is not
    trusted; shards are read from storage, with a warning naming the directory."""
    url, m = s3_digits
    s = m.shards("train")[0]
    shared = tmp_path / "shared-cache"
    shared.mkdir()
    shared.chmod(0o777)
    src = ShardSource(resolve_storage_options(url), CacheConfig(str(shared), 2**30))
    with src.open(s.url, size=s.size) as f:
        assert len(f.read()) == s.size
    assert src.take_counts() == (s.size, 0)
    assert "cannot be used" in caplog.text and "writable by nobody else" in caplog.text
    assert not any(p.name.endswith(s.url.rsplit("/", 1)[-1]) for p in shared.iterdir())  # nothing cached there
    private = tmp_path / "private-cache"
    src = ShardSource(resolve_storage_options(url), CacheConfig(str(private), 2**30))
    with src.open(s.url, size=s.size) as f:
        f.read()
    assert private.stat().st_mode & 0o777 == 0o700  # created for this user only
