"""Resumable position: exact continuation, determinism, plan changes, evaluation semantics.

The loaders here (world_size 2, num_workers 2, so 4 canonical slots) own 2 slots per rank: a step is 2 items.
"""

from __future__ import annotations

import pytest
import torch

from pipelines.loader import ResumeMismatchError, ShardLoader
from pipelines.transforms import make_transform

SIZES = [23, 41, 7, 60, 18]  # 149 samples


def _loader(root, **kw):
    base = dict(batch_size=4, rank=1, world_size=2, num_workers=2, seed=3, return_keys=True, shuffle_buffer=16)
    base.update(kw)
    return ShardLoader(root, **base)


def _keys(batches):
    return [k for b in batches for k in b[2]]


def test_resume_exact_at_several_points(make_shards):
    root = make_shards(SIZES)
    tf = make_transform(True, input_size=8, preset="digits")
    ref_loader = _loader(root, transform=tf)
    ref_loader.set_epoch(2)
    ref = list(ref_loader)
    n = len(ref_loader)
    assert n == len(ref) == 149 // 8
    for k in (2, 4, 10, n - 2, n):  # step boundaries: a state is taken after whole steps
        a = _loader(root, transform=tf)
        a.set_epoch(2)
        head = []
        for b in a:
            head.append(b)
            if len(head) == k:
                break
        sd = a.state_dict()
        assert sd["steps_consumed"] == k // 2 and sd["epoch"] == 2
        b = _loader(root, transform=tf)
        b.load_state_dict(sd)
        b.set_epoch(2)  # same epoch: keeps the position
        tail = list(b)
        assert _keys(head + tail) == _keys(ref), k
        for got, want in zip(head + tail, ref, strict=True):  # augmentation identical too
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_mid_step_break_continues_in_process_but_is_not_saved(make_shards):
    """Leaving the loop mid-step and iterating again continues exactly (the round-robin picks up at the
    right slot); a state_dict there is refused: the rank's slots are at different chunks."""
    root = make_shards(SIZES)
    ref = _keys(list(_loader(root)))
    a = _loader(root)
    head = [b for _, b in zip(range(3), a, strict=False)]
    assert a.batches_consumed == 3 and a.steps_consumed == 1
    with pytest.raises(ValueError, match="mid-step: rank 1 consumed 3 items, not a multiple of the 2"):
        a.state_dict()
    assert _keys(head) + _keys(list(a)) == ref


def test_resume_without_this_ranks_positions(make_shards):
    """A checkpoint missing one of this rank's slots (e.g. only another rank's state): that slot is skipped
    by decoding, the other by its raw position; still exact."""
    root = make_shards(SIZES)
    ref = _keys(list(_loader(root, num_workers=0, slots=4)))
    a = _loader(root, num_workers=0, slots=4)
    head = [b for _, b in zip(range(4), a, strict=False)]
    sd = a.state_dict()
    assert set(sd["slots"]) == {"1", "3"}
    del sd["slots"]["3"]
    b = _loader(root, num_workers=0, slots=4)
    b.load_state_dict(sd)
    assert _keys(head) + _keys(list(b)) == ref


def test_state_dict_merge(make_shards):
    root = make_shards(SIZES)
    states = []
    for r in range(2):
        ld = _loader(root, rank=r)
        it = iter(ld)
        next(it), next(it)
        states.append(ld.state_dict())
    assert [set(st["slots"]) for st in states] == [{"0", "2"}, {"1", "3"}]
    merged = ShardLoader.merge_state_dicts(states)
    assert set(merged["slots"]) == {"0", "1", "2", "3"} and merged["steps_consumed"] == 1
    assert all(e["raw_pos"] > 0 for e in merged["slots"].values())
    with pytest.raises(ValueError, match="different positions"):
        ShardLoader.merge_state_dicts([states[0], _loader(root).state_dict()])


def test_determinism_and_seed_epoch_change(make_shards):
    root = make_shards(SIZES)
    a = _keys(list(_loader(root)))
    assert a == _keys(list(_loader(root)))
    assert a != _keys(list(_loader(root, seed=4)))
    e1 = _loader(root)
    e1.set_epoch(1)
    assert a != _keys(list(e1))
    assert sorted(a) != sorted(_keys(list(_loader(root, rank=0))))


def test_num_workers_zero_matches_plan(make_shards):
    root = make_shards(SIZES)
    keys = _keys(list(_loader(root, num_workers=0)))
    assert len(keys) == len(set(keys)) == (149 // 8) * 4


def test_resume_with_other_slots_or_chunk_restarts_epoch(make_shards):
    """The plan inputs are the slots and the chunk (not the world size): a change restarts the epoch."""
    root = make_shards(SIZES)
    a = _loader(root)
    a.set_epoch(1)
    it = iter(a)
    next(it), next(it)
    sd = ShardLoader.merge_state_dicts([a.state_dict()])
    b = _loader(root, world_size=3, rank=1)  # slots 3 * 2 = 6
    with pytest.warns(UserWarning, match="restarting epoch 1"):
        b.load_state_dict(sd)
    assert "slots: 4 -> 6" in b.resume_note
    assert b.epoch == 1 and b.batches_consumed == 0
    assert len(list(b)) == len(b)
    c = _loader(root, batch_size=8, on_plan_change="error")
    with pytest.raises(ResumeMismatchError, match="chunk: 4 -> 8"):
        c.load_state_dict(sd)
    d = _loader(root, world_size=3, rank=1, slots=4, on_plan_change="error")  # same slots: continues
    d.load_state_dict(sd)
    assert d.resume_note is None and d.epoch == 1 and d.steps_consumed == 1 and d.batches_consumed == 1


def test_state_of_the_previous_version_restarts_epoch(make_shards):
    """A version-1 state (positions per rank x loader worker) cannot say where a canonical slot is."""
    root = make_shards(SIZES)
    old = {"version": 1, "epoch": 2, "batches_consumed": 5,
           "plan": {"seed": 3, "world_size": 2, "num_workers": 2, "batch_size": 4, "shuffle_buffer": 16,
                    "shuffle": "webdataset", "split": "train", "dataset": "x"},
           "positions": {"1": {"0": 12, "1": 12}}, "bad_counts": {"1": []}, "padded": {"1": 0}}
    b = _loader(root)
    with pytest.warns(UserWarning, match=r"state version: 1 -> 2.*restarting epoch 2"):
        b.load_state_dict(old)
    assert b.epoch == 2 and b.batches_consumed == 0
    assert len(list(b)) == len(b)
    with pytest.raises(ResumeMismatchError, match="state version: 1 -> 2"):
        _loader(root, on_plan_change="error").load_state_dict(old)


def test_new_epoch_resets_position(make_shards):
    root = make_shards(SIZES)
    a = _loader(root)
    next(iter(a))
    a.set_epoch(1)
    assert a.batches_consumed == 0
    assert len(list(a)) == len(a)
    assert len(list(a)) == len(a)  # a finished epoch iterates again from its start


def test_eval_every_sample_once(make_shards):
    root = make_shards(SIZES)
    keys = []
    counts = []
    for r in range(3):
        ld = ShardLoader(root, batch_size=8, rank=r, world_size=3, num_workers=2, training=False, return_keys=True)
        batches = list(ld)
        assert len(batches) == len(ld)
        counts.append(len(batches))
        keys += _keys(batches)
        assert ld.dropped_samples == 0
    assert sorted(keys) == sorted(f"s{j:03d}-{i:05d}" for j, n in enumerate(SIZES) for i in range(n))
    # evaluation order is the manifest order, unshuffled
    ld = ShardLoader(root, batch_size=8, training=False, num_workers=0, return_keys=True)
    assert _keys(list(ld)) == [f"s{j:03d}-{i:05d}" for j, n in enumerate(SIZES) for i in range(n)]


def test_mixup_soft_targets_deterministic(make_shards):
    root = make_shards(SIZES)
    a = list(_loader(root, mixup=0.5, num_workers=0, return_keys=False))
    b = list(_loader(root, mixup=0.5, num_workers=0, return_keys=False))
    x, t = a[0]
    assert t.shape == (4, 10) and t.dtype == torch.float32
    assert torch.allclose(t.sum(1), torch.ones(4))
    for (xa, ta), (xb, tb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)


def test_position_from_the_earlier_shuffle_restarts_epoch(make_shards):
    """A state saved before the loader used webdataset's shuffle holds a position in another sample order."""
    root = make_shards(SIZES)
    a = _loader(root)
    it = iter(a)
    next(it), next(it)
    sd = a.state_dict()
    del sd["plan"]["shuffle"]
    b = _loader(root)
    with pytest.warns(UserWarning, match="shuffle: None -> 'webdataset'"):
        b.load_state_dict(sd)
    assert b.batches_consumed == 0
