"""Elastic training: the samples (and pixels) of step t depend on (seed, epoch, t) only, not on the world size
or on how often it changed; a resize mid-epoch continues from the checkpoint with nothing repeated or skipped."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from shard_samples import make_dataset

from pipelines.loader import ShardLoader
from pipelines.transforms import train_pipeline

K, CHUNK = 6, 4
SIZES = [37, 5, 120, 64, 9, 50]  # 285 samples: 285 // 24 = 11 steps


def _loader(root, rank, world_size, **kw):
    args = dict(batch_size=CHUNK, slots=K, num_workers=0, seed=5, shuffle_buffer=16, return_keys=True)
    args.update(kw)
    return ShardLoader(root, rank=rank, world_size=world_size, **args)


def _steps(loader, steps=None):
    """The rank's items grouped per step (m items each): [[(keys, images, targets), ...], ...]."""
    m, out, cur = loader.slots_owned, [], []
    for x, t, keys in loader:
        cur.append((tuple(keys), x.clone(), t.clone()))
        if len(cur) == m:
            out.append(cur)
            cur = []
            if steps is not None and len(out) == steps:
                break
    assert not cur
    return out


def _global(per_rank):
    """Per step: the chunks of all ranks, keyed by their keys (the step's global batch)."""
    n = len(per_rank[0])
    assert all(len(r) == n for r in per_rank)
    return [{keys: (x, t) for r in per_rank for keys, x, t in r[i]} for i in range(n)]


def _run(root, world_size, steps=None, state=None, **kw):
    loaders = [_loader(root, r, world_size, **kw) for r in range(world_size)]
    for ld in loaders:
        if state is not None:
            ld.load_state_dict(state)
            assert ld.resume_note is None
    out = _global([_steps(ld, steps) for ld in loaders])
    return out, ShardLoader.merge_state_dicts([ld.state_dict() for ld in loaders]), loaders


def _multisets(global_steps):
    return [Counter(k for keys in step for k in keys) for step in global_steps]


def test_step_multisets_do_not_depend_on_the_world_size(make_shards):
    root = make_shards(SIZES)
    ref = None
    for W in (1, 2, 3, 4, 6):
        workers = 1 if W == 3 else 0  # one DataLoader worker per owned slot, or the rank's own process
        steps, _, loaders = _run(root, W, num_workers=workers)
        assert [ld.slots_owned for ld in loaders] == ([2, 2, 1, 1] if W == 4 else [K // W] * W)
        assert all(len(ld) == ld.steps_per_epoch * ld.slots_owned for ld in loaders)
        sets = _multisets(steps)
        assert len(sets) == sum(SIZES) // (K * CHUNK) == loaders[0].steps_per_epoch
        assert all(sum(c.values()) == K * CHUNK for c in sets)  # the same global batch every step
        everything = sum(sets, Counter())
        assert max(everything.values()) == 1  # every sample at most once in the epoch
        assert len(everything) == sum(SIZES) - loaders[0].dropped_samples
        if ref is None:
            ref = sets
        assert sets == ref, W


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for keys in w:
            assert torch.equal(g[keys][0], w[keys][0]) and torch.equal(g[keys][1], w[keys][1]), keys


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("elastic_jpegs"))
    make_dataset(root, [50, 40, 30, 30], jpeg=True)  # 150 samples: 150 // 12 = 12 steps of chunk 2
    return root


def _recipe(**kw):
    p = train_pipeline(input_size=16, randaug_magnitude=15)
    return dict(batch_size=2, decoder=p.decoder, transform=p.transform, batch_stage=p.batch_stage,
                mixup=0.5, num_classes=10, **kw)


def test_resize_mid_epoch_continues_exactly(jpeg_root):
    """3 ranks for 5 steps, then 2 ranks for 4, then 3 ranks to the end: the steps of one 3-rank run,
    augmented pixels and mixup targets included."""
    kw = _recipe()
    whole, _, _ = _run(jpeg_root, 3, **kw)
    assert len(whole) == 12
    a, state, _ = _run(jpeg_root, 3, steps=5, **kw)
    assert state["steps_consumed"] == 5 and len(state["slots"]) == K
    b, state, _ = _run(jpeg_root, 2, steps=4, state=state, **kw)
    assert state["steps_consumed"] == 9
    c, state, _ = _run(jpeg_root, 3, state=state, **kw)
    assert state["steps_consumed"] == 12
    _assert_same(a + b + c, whole)
    keys = [k for step in a + b + c for ks in step for k in ks]
    assert len(keys) == len(set(keys)) == 144  # nothing repeated or skipped


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_workers_or_not_give_the_same_items(jpeg_root):
    """A rank's items with one DataLoader worker per owned slot equal those its own process streams."""
    kw = _recipe()
    with_workers = _steps(_loader(jpeg_root, 1, 2, num_workers=2, **kw))
    in_process = _steps(_loader(jpeg_root, 1, 2, num_workers=0, **kw))
    assert len(with_workers) == len(in_process) == 12
    for sw, sp in zip(with_workers, in_process, strict=True):
        for (kw_, xw, tw), (kp, xp, tp) in zip(sw, sp, strict=True):
            assert kw_ == kp and torch.equal(xw, xp) and torch.equal(tw, tp)


def test_slot_arguments_are_checked(jpeg_root):
    with pytest.raises(ValueError, match=r"world_size=4 must be in \[1, slots=3\]"):
        ShardLoader(jpeg_root, batch_size=2, rank=0, world_size=4, slots=3)
    with pytest.raises(ValueError, match="rank must be in"):
        ShardLoader(jpeg_root, batch_size=2, rank=3, world_size=3, slots=6)
    with pytest.raises(ValueError, match="slots is a training-plan input"):
        ShardLoader(jpeg_root, batch_size=2, slots=4, training=False)
    ld = ShardLoader(jpeg_root, batch_size=2, rank=2, world_size=4, slots=6, num_workers=3)
    assert ld.slots_owned == 1 and ld.steps_per_epoch == 12 and len(ld) == 12
