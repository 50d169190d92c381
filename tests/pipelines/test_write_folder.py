"""python -m pipelines.write_shards folder: one split of a tiny generated image folder, keys from the relative paths,
class indices from another dataset's manifest; the set it writes passes the driver's eval.sets checks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.manifest import FORMAT_VERSION, Manifest, load_manifest, write_manifest
from pipelines.write_shards import main

CLASSES = [f"class_{c}" for c in "abcde"]  # the "training" dataset's class names


@pytest.fixture
def trained_on(tmp_path) -> str:
    """A dataset root whose manifest lists CLASSES (no shards needed: only its class names are read)."""
    root = tmp_path / "train_ds"
    root.mkdir()
    write_manifest(Manifest(FORMAT_VERSION, CLASSES, {"train": []}, root=str(root)), str(root))
    return str(root)


def _folder(tmp_path, layout: dict[str, list[str]]) -> str:
    src = tmp_path / "images"
    rng = np.random.default_rng(0)
    for rel_dir, names in layout.items():
        (src / rel_dir).mkdir(parents=True, exist_ok=True)
        for name in names:
            Image.fromarray(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)).save(src / rel_dir / name)
    return str(src)


def _samples(url: str, split: str) -> dict[str, int]:
    from pipelines.shard_reader import iter_piece

    out = {}
    for shard in load_manifest(url).shards(split):
        out.update({s.key: s.label for s in iter_piece(shard.url, 0, shard.num_samples, {}, lambda *bad: None)})
    return out


def test_writes_a_split_with_path_keys_and_the_training_classes(tmp_path, trained_on, capsys, caplog):
    src = _folder(tmp_path, {"class_d": ["x1.png", "img.v2.png"], "class_b": ["y.png"], "class_b/more": ["z.png"]})
    dest = str(tmp_path / "v2")
    assert main(["folder", src, dest, "--split", "val", "--class-names-from", trained_on, "--maxcount", "2",
                 "--no-progress"]) == 0
    assert "val: 2 shards, 4 samples, 5 classes" in capsys.readouterr().out
    m = load_manifest(dest)
    assert m.class_names == CLASSES and list(m.splits) == ["val"]
    assert _samples(dest, "val") == {"class_d/x1": 3, "class_d/img_v2": 3, "class_b/y": 1, "class_b/more/z": 1}
    from pipelines.sample_index import index_url, load_sample_index

    assert (tmp_path / "v2" / "index" / "val.json").exists() and index_url(dest, "val").endswith("index/val.json")
    assert load_sample_index(dest, "val").key_set() == set(_samples(dest, "val"))
    assert "no sample index" not in caplog.text  # the index written with the shards, not a scan
    # the same keys on another write, whatever the order and the shard size; a second split joins the first
    assert main(["folder", src, dest, "--split", "test", "--class-names-from", trained_on, "--seed", "5",
                 "--no-progress"]) == 0
    assert sorted(load_manifest(dest).splits) == ["test", "val"]
    assert _samples(dest, "test") == _samples(dest, "val")
    # without --class-names-from: torchvision's sorted folder names
    assert main(["folder", src, str(tmp_path / "own"), "--no-progress"]) == 0
    assert load_manifest(str(tmp_path / "own")).class_names == ["class_b", "class_d"]
    assert _samples(str(tmp_path / "own"), "val")["class_d/x1"] == 1

    # the driver accepts it as an eval set of a run trained on that dataset (same class names)
    from orchestrator.config.tree import EvalSetSpec
    from orchestrator.eval.sets import resolve_eval_sets

    (resolved,) = resolve_eval_sets([EvalSetSpec("v2", dest)], CLASSES, lambda url: {})
    assert (resolved["name"], resolved["split"]) == ("v2", "val")


@pytest.mark.parametrize("case, words", [
    ("stranger-class", ["--class-names-from", "class folder 'class_z'", "not among that dataset's 5 class names"]),
    ("same-key", ["'class_a/p.jpg' and 'class_a/p.png'", "same key 'class_a/p'"]),
    ("no-class-folders", ["SRC_DIR=", "no class sub-folders", "ImageFolder layout"]),
    ("no-dataset-there", ["--class-names-from=", "cannot be used", "manifest"]),
    ("other-classes-at-dest", ["URL=", "other class names"]),
])
def test_bad_input_exits_2_before_writing(tmp_path, trained_on, capsys, case, words):
    layout = {"stranger-class": {"class_a": ["p.png"], "class_z": ["q.png"]},
              "same-key": {"class_a": ["p.png", "p.jpg"]},
              "no-class-folders": {".": ["p.png"]}}.get(case, {"class_a": ["p.png"]})
    src = _folder(tmp_path, layout)
    names_from = str(tmp_path / "nowhere") if case == "no-dataset-there" else trained_on
    dest = tmp_path / "out"
    if case == "other-classes-at-dest":
        dest.mkdir()
        write_manifest(Manifest(FORMAT_VERSION, ["other"], {"train": []}, root=str(dest)), str(dest))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["folder", src, str(dest), "--class-names-from", names_from, "--no-progress"]) == 2
    err = capsys.readouterr().err
    (message,) = [line for line in err.splitlines() if line.startswith("error: ")]
    for word in words:
        assert word in message, message
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
