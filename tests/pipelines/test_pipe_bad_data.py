"""Bad data: each kind skipped and counted with its shard URL, padding keeps batch counts, threshold error."""

from __future__ import annotations

import os

import pytest
from shard_samples import good_members

from pipelines.bad_samples import DataError, TooManyBadSamplesError
from pipelines.loader import ShardLoader
from pipelines.storage import DatasetNotFoundError

GOOD = 200


def _bad_shard(kind: str) -> list[tuple[str, bytes]]:
    m = good_members(1, 20)  # 20 samples, 2 files each
    if kind == "corrupt_image":
        m[4] = (m[4][0], b"\x89PNG\r\n\x1a\nthis is not a png")
        m[10] = (m[10][0], b"garbage")
    elif kind == "missing_label":
        del m[5]  # sample 2's .cls
    elif kind == "non_adjacent":
        # sample 3's label stored after sample 4's files
        m[6], m[7], m[8], m[9] = m[6], m[8], m[9], m[7]
    return m


def _num_bad(ld: ShardLoader) -> int:
    return sum(n for kind, per in ld.bad_sample_counts().items() if kind != "padded" for n in per.values())


def _run(root, world_size=2, **kw):
    counts = []
    bad: dict = {}
    for r in range(world_size):
        ld = ShardLoader(root, batch_size=8, rank=r, world_size=world_size, num_workers=2, return_keys=True, **kw)
        n = 0
        for x, _, keys in ld:
            assert x.shape[0] == len(keys) == 8
            n += 1
        assert n == len(ld)
        counts.append(n)
        for kind, per in ld.bad_sample_counts().items():
            for u, c in per.items():
                bad.setdefault(kind, {}).setdefault(u, 0)
                bad[kind][u] += c
    assert len(set(counts)) == 1
    return bad


@pytest.mark.parametrize(
    "kind,expected",
    [("corrupt_image", {"corrupt_image": 2}), ("missing_label", {"missing_label": 1}),
     ("non_adjacent", {"missing_label": 1, "non_adjacent": 1})],
)
def test_bad_sample_kinds_counted_and_padded(make_shards, kind, expected):
    root = make_shards([GOOD, 20], bad={1: _bad_shard(kind)})
    url = os.path.join(root, "train", "train-000001.tar")
    bad = _run(root, max_bad_fraction=1.0)
    got = {k: v[url] for k, v in bad.items() if k != "padded"}
    assert got == expected
    assert sum(bad["padded"].values()) >= 1  # the short worker padded from its own samples


def test_truncated_tar(make_shards, tmp_path):
    root = make_shards([GOOD, 40])
    url = os.path.join(root, "train", "train-000001.tar")
    data = open(url, "rb").read()
    with open(url, "wb") as f:
        f.write(data[: len(data) // 2 + 100])  # cut inside a member
    bad = _run(root, max_bad_fraction=1.0)
    assert 15 <= bad["truncated_tar"][url] <= 25


def test_missing_shard_counted_or_clear_error(make_shards):
    root = make_shards([GOOD, 20], missing=(1,))
    url = os.path.join(root, "train", "train-000001.tar")
    with pytest.raises(DatasetNotFoundError, match="train-000001.tar"):
        ShardLoader(root, batch_size=8)
    # within budget: skipped and counted (the shard's 20 samples against the 96 planned of the rank that reads it)
    bad = _run(root, max_bad_fraction=0.25)
    assert bad["missing_shard"][url] == 20


def test_threshold_error_names_worst_shard(make_shards):
    root = make_shards([GOOD, 20], bad={1: _bad_shard("corrupt_image")})
    with pytest.raises(TooManyBadSamplesError, match=r"train-000001\.tar.*corrupt_image"):
        _run(root, world_size=1, max_bad_fraction=0.001)


def test_worker_with_only_bad_data_fails_not_hangs(make_shards):
    members = [(f"x{i:03d}.png", b"junk") for i in range(40)]
    members = [m for i, m in enumerate(members)]
    cls = [(f"x{i:03d}.cls", b"1") for i in range(40)]
    inter = [x for pair in zip(members, cls, strict=True) for x in pair]
    root = make_shards([40], bad={0: inter})
    with pytest.raises((DataError, RuntimeError), match="no readable sample|bad samples"):
        list(ShardLoader(root, batch_size=8, num_workers=0, max_bad_fraction=1.0))


def test_resume_with_bad_data_is_exact(make_shards):
    root = make_shards([GOOD, 20], bad={1: _bad_shard("corrupt_image")})
    kw = dict(batch_size=8, rank=0, world_size=1, num_workers=2, return_keys=True, max_bad_fraction=1.0)
    whole = ShardLoader(root, **kw)
    ref = [k for b in whole for k in b[2]]
    a = ShardLoader(root, **kw)
    head = []
    for b in a:
        head += b[2]
        if len(head) == 8 * 14:  # 7 steps of the rank's 2 slots (a state is taken at a step boundary)
            break
    assert a.bad_sample_counts()["corrupt_image"]  # the head met the bad samples (and carries them over)
    b = ShardLoader(root, **kw)
    b.load_state_dict(a.state_dict())
    assert head + [k for x in b for k in x[2]] == ref
    assert b.bad_sample_counts() == whole.bad_sample_counts()  # the counts of the head travel in the state


def test_repeated_member_in_a_sample_keeps_the_rest_of_the_shard(make_shards):
    """webdataset's group_by_keys raises on a file name repeated inside a sample; the sample keeps its first
    copy and nothing is counted bad (it has an image and a label)."""
    m = good_members(1, 20)
    m.insert(3, (m[2][0], m[2][1]))  # sample 1's .png twice in a row
    root = make_shards([GOOD, 20], bad={1: m})
    ld = ShardLoader(root, batch_size=8, num_workers=0, training=False, return_keys=True)
    keys = [k for _, _, ks in ld for k in ks]
    assert len(keys) == GOOD + 20 and _num_bad(ld) == 0
