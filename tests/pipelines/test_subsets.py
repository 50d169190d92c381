"""Key-chosen parts of the training split (pipelines/subsets.py) and the sample index they are computed from
(pipelines/sample_index.py): the minival is class-stratified, never trained on, the same at world sizes 1/2/3
and across a resume; data.train_fraction subsets are nested and world-size independent."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pipelines.loader import ShardLoader
from pipelines.manifest import load_manifest
from pipelines.sample_index import SampleIndexError, index_url, load_sample_index, scan_index
from pipelines.sample_index import main as index_main
from pipelines.subsets import SubsetSpec, select

SLOTS, CHUNK = 6, 20  # 120 samples a step over 6 canonical slots: world sizes 1, 2, 3 all divide them


def _train(root, world, rank, spec, **kw):
    return ShardLoader(root, "train", batch_size=CHUNK, slots=SLOTS, rank=rank, world_size=world, num_workers=0,
                       seed=5, shuffle_buffer=64, return_keys=True, subset=spec, **kw)


def _epoch_steps(root, world, spec, epoch=1) -> list[Counter]:
    """The keys of every step of an epoch, summed over the ranks of `world`."""
    per_rank = []
    for rank in range(world):
        loader = _train(root, world, rank, spec)
        loader.set_epoch(epoch)
        m = loader.slots_owned
        items = [keys for _x, _y, keys in loader]
        per_rank.append([sum((Counter(k) for k in items[i:i + m]), Counter()) for i in range(0, len(items), m)])
    return [sum((r[s] for r in per_rank), Counter()) for s in range(len(per_rank[0]))]


def _minival_keys(root, fraction, world=1) -> list[str]:
    keys = []
    for rank in range(world):
        loader = ShardLoader(root, "train", batch_size=32, rank=rank, world_size=world, num_workers=0, training=False,
                             return_keys=True, subset=SubsetSpec(fraction, part="minival"))
        keys += [k for _x, _y, ks in loader for k in ks]
    return keys


def _labels(root) -> dict[str, int]:
    index = load_sample_index(root, "train")
    return {k: lab for s in index.shards for k, lab in zip(s.keys, s.labels, strict=True)}


def test_write_shards_writes_the_index_the_scan_would_find(digits_root, tmp_path):
    index = load_sample_index(digits_root, "train")
    manifest = load_manifest(digits_root)
    assert Path(index_url(digits_root, "train")).exists()
    assert index == scan_index(manifest, "train", {})
    assert [len(s.keys) for s in index.shards] == [s.num_samples for s in manifest.shards("train")]
    # an index written for other shards is not used: the shards are read instead
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(digits_root, copy)
    doc = json.loads(Path(index_url(str(copy), "train")).read_text())
    doc["fingerprint"], doc["shards"][0]["labels"][0] = "stale", 99
    Path(index_url(str(copy), "train")).write_text(json.dumps(doc))
    assert load_sample_index(str(copy), "train").shards[0].labels[0] != 99
    Path(index_url(str(copy), "train")).write_text("{not json")
    with pytest.raises(SampleIndexError, match="is not valid.*python -m pipelines.sample_index"):
        load_sample_index(str(copy), "train")
    # the command writes the index of a dataset that has none
    Path(index_url(str(copy), "train")).unlink()
    assert index_main([str(copy), "--split", "train"]) == 0
    assert load_sample_index(str(copy), "train") == index


def test_a_dataset_without_an_index_is_indexed_by_reading_its_shards(make_shards):
    root = make_shards([30, 50, 40])
    spec = SubsetSpec(0.2)
    loader = _train(root, 1, 0, spec)
    assert not Path(index_url(root, "train")).exists()
    assert loader.selection.num_samples + len(_minival_keys(root, 0.2)) == 120


def test_minival_is_class_stratified_disjoint_from_training_and_the_same_at_any_world_size(digits_root):
    labels = _labels(digits_root)
    per_class = Counter(labels.values())
    minival = _minival_keys(digits_root, 0.1)
    assert len(minival) == len(set(minival))
    assert Counter(labels[k] for k in minival) == {c: round(0.1 * n) for c, n in per_class.items()}
    for world in (2, 3):
        assert sorted(_minival_keys(digits_root, 0.1, world)) == sorted(minival)

    spec = SubsetSpec(0.1)
    steps = {world: _epoch_steps(digits_root, world, spec) for world in (1, 2, 3)}
    assert steps[1] == steps[2] == steps[3]  # every step's samples, whatever the world size
    trained = Counter(k for step in steps[1] for k in step.elements())
    assert max(trained.values()) == 1 and not set(trained) & set(minival)
    loader = _train(digits_root, 1, 0, spec)
    assert len(trained) + loader.dropped_samples + len(minival) == len(labels)  # the rest is trained on
    # in few shards: the minival is read from one or two of the six training shards
    assert select(load_sample_index(digits_root, "train"), SubsetSpec(0.1, part="minival")).shards_read <= 2


def test_a_resumed_epoch_continues_on_the_same_subset(digits_root):
    spec = SubsetSpec(0.1, 0.5)
    reference = _epoch_steps(digits_root, 2, spec, epoch=0)
    first = [_train(digits_root, 2, r, spec) for r in range(2)]
    head = []
    for loader in first:
        loader.set_epoch(0)
        got = []
        for item in loader:
            got.append(item[2])
            if len(got) == 2 * loader.slots_owned:
                break
        head.append(got)
    state = ShardLoader.merge_state_dicts([loader.state_dict() for loader in first])
    # resumed at another world size (3): the remaining steps are the planned ones, on the same subset
    tail = []
    for rank in range(3):
        loader = _train(digits_root, 3, rank, spec)
        loader.load_state_dict(state)
        loader.set_epoch(0)
        assert loader.resume_note is None  # the same plan: no restart of the epoch
        m = loader.slots_owned
        items = [keys for _x, _y, keys in loader]
        tail.append([sum((Counter(k) for k in items[i:i + m]), Counter()) for i in range(0, len(items), m)])
    resumed = [sum((r[s] for r in tail), Counter()) for s in range(len(tail[0]))]
    assert resumed == reference[2:]
    # a different minival is a different plan: the resume says it restarts the epoch
    other = _train(digits_root, 2, 0, SubsetSpec(0.2, 0.5))
    other.load_state_dict(state)
    assert other.resume_note and "restart" in other.resume_note


def test_train_fraction_subsets_are_nested_and_world_size_independent(digits_root):
    index = load_sample_index(digits_root, "train")

    def keys(fraction):
        sel = select(index, SubsetSpec(0.1, fraction))
        kept = set()
        for s, shard in enumerate(index.shards):
            if sel.counts[s]:
                kept |= set(sel.keep.get(s, shard.keys))
        return kept

    sizes = {}
    minival = set(_minival_keys(digits_root, 0.1))
    previous = set()
    for fraction in (0.03, 0.1, 0.3, 1.0):
        kept = keys(fraction)
        assert previous <= kept and not kept & minival, fraction
        sizes[fraction] = len(kept)
        previous = kept
    assert sizes[1.0] == len(index.key_set()) - len(minival)
    assert abs(sizes[0.3] - 0.3 * sizes[1.0]) <= 10  # per-class rounding
    spec = SubsetSpec(0.1, 0.3)
    one = _epoch_steps(digits_root, 1, spec)
    assert one == _epoch_steps(digits_root, 3, spec)
    assert set(k for step in one for k in step) <= keys(0.3)
