"""ReaL-style scoring against a case computed by hand, and the label file's checks."""

import json
import math
import re

import pytest
import torch
from torch import nn

from orchestrator.eval.metrics import evaluate
from orchestrator.eval.real import LabelFileError, ReaLSet, load_label_file, parse_label_file

# 6 images, 7 classes; each row ranks the classes 6 (top) .. 0, so every row's logsumexp is the same L
LOGITS = torch.tensor([
    [5, 4, 6, 3, 2, 1, 0],  # a: top-1 2, top-5 {2,0,1,3,4}; ReaL [2]     -> top-1 hit, top-5 hit
    [6, 5, 4, 3, 2, 1, 0],  # b: top-1 0, top-5 {0,1,2,3,4}; ReaL [1, 5]  -> top-1 miss, top-5 hit (1)
    [0, 1, 2, 3, 4, 5, 6],  # c: top-1 6, top-5 {6,5,4,3,2}; ReaL [0]     -> miss, miss
    [5, 4, 3, 6, 2, 1, 0],  # d: ReaL []                                  -> left out
    [0, 1, 2, 3, 6, 4, 5],  # e: top-1 4; ReaL [4, 6]                     -> hit, hit
    [5, 6, 4, 3, 1, 2, 0],  # f: top-1 1, top-5 {1,0,2,3,5}; ReaL [5]     -> miss, hit
], dtype=torch.float32)
SHARD_LABELS = torch.tensor([2, 1, 0, 3, 6, 5])  # their logits: 6, 5, 0, 6, 5, 2 (mean 4)
KEYS = ["a", "b", "c", "d", "e", "f"]
REAL = {"a": [2], "b": [1, 5], "c": [0], "d": [], "e": [4, 6], "f": [5]}
L = math.log(sum(math.exp(k) for k in range(7)))


def _batches(with_keys: bool):
    for lo, hi in ((0, 4), (4, 6)):  # two batches: the sums accumulate across them
        batch = (LOGITS[lo:hi], SHARD_LABELS[lo:hi])
        yield (*batch, KEYS[lo:hi]) if with_keys else batch


def test_real_scoring_matches_the_hand_computed_case():
    out = evaluate(nn.Identity(), ReaLSet(list(_batches(True)), REAL), torch.device("cpu"))
    assert out["scored"] == 5 and out["count"] == 6  # d's empty list leaves it out of top-1/top-5
    assert out["top1"] == pytest.approx(2 / 5)  # a, e
    assert out["top5"] == pytest.approx(4 / 5)  # a, b, e, f
    assert out["loss"] == pytest.approx(L - 4, rel=1e-6)  # cross-entropy against the shard labels, all 6


def test_a_key_without_an_entry_is_left_out_and_plain_sets_score_the_shard_label():
    out = evaluate(nn.Identity(), ReaLSet(list(_batches(True)), {k: v for k, v in REAL.items() if k != "a"}),
                   torch.device("cpu"))
    assert (out["scored"], out["top1"], out["top5"]) == (4, pytest.approx(1 / 4), pytest.approx(3 / 4))
    plain = evaluate(nn.Identity(), list(_batches(False)), torch.device("cpu"))
    assert plain["scored"] == plain["count"] == 6
    assert (plain["top1"], plain["top5"]) == (pytest.approx(2 / 6), pytest.approx(5 / 6))  # a, d / all but c
    assert plain["loss"] == pytest.approx(L - 4, rel=1e-6)


def test_label_file_checks(tmp_path):
    path = tmp_path / "real.json"
    path.write_text(json.dumps(REAL))
    assert load_label_file(str(path), num_classes=7) == {k: tuple(v) for k, v in REAL.items()}
    for text, words in [
        ("{not json", "not JSON"),
        ("[[1], [2]]", "JSON list, not an object"),
        ('{"a": 3}', "entry 'a': 3 is not a list of integers"),
        ('{"a": [1, "2"]}', "is not a list of integers"),
        ('{"a": [true]}', "is not a list of integers"),
        ('{"a": [1, 7]}', "entry 'a' has label 7, outside [0, 7)"),
        ('{"a": [-1]}', "label -1, outside [0, 7)"),
    ]:
        with pytest.raises(LabelFileError, match=re.escape(words)):
            parse_label_file(text, num_classes=7)
    with pytest.raises(LabelFileError, match="no such file"):
        load_label_file(str(tmp_path / "absent.json"))
