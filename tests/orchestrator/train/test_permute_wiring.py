"""data.permute reaches the model: the training batches (after augmentation, on the device) and every evaluation
set see one and the same permutation; `orchestrator.evaluate` applies the checkpoint's own."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from orchestrator.train.batches import BatchFetcher, PermutedBatches, build_loaders, input_permutation


def _first_batches(digits, mode: str):
    cfg = copy.deepcopy(digits.cfg)
    cfg.data.permute, cfg.data.permute_seed = mode, 5
    train, sets = build_loaders(cfg, digits.job, digits.model_cfg, 0, 1, torch.device("cpu"))
    fetcher = BatchFetcher(train, torch.device("cpu"), 0, False, permutation=input_permutation(cfg, digits.model_cfg))
    try:
        return fetcher.next(1).x, {name: next(iter(s))[0] for name, s in sets.items()}, sets
    finally:
        fetcher.close()


@pytest.mark.parametrize("mode", ["patch_pixel", "global"])
def test_training_and_evaluation_batches_get_the_same_permutation(digits, mode):
    plain_x, plain_sets, plain_loaders = _first_batches(digits, "none")
    x, sets, loaders = _first_batches(digits, mode)
    perm = input_permutation(copy.deepcopy(digits.cfg), digits.model_cfg)
    assert perm is None and not any(isinstance(s, PermutedBatches) for s in plain_loaders.values())
    assert set(sets) == {"val", "minival"}  # digits holds a minival split out: it is permuted too

    cfg = copy.deepcopy(digits.cfg)
    cfg.data.permute, cfg.data.permute_seed = mode, 5
    perm = input_permutation(cfg, digits.model_cfg)
    assert torch.equal(x, perm(plain_x))  # the same samples and augmentation, then the permutation
    for name, plain in plain_sets.items():
        assert torch.equal(sets[name], perm(plain))
        assert isinstance(loaders[name], PermutedBatches) and len(loaders[name]) == len(plain_loaders[name])


def test_evaluate_applies_the_checkpoints_permutation(digits):
    from orchestrator.evaluate import input_permutation as eval_permutation

    src = SimpleNamespace(config={"data": {"permute": "global", "permute_seed": 5}}, model_cfg=digits.model_cfg)
    cfg = copy.deepcopy(digits.cfg)
    cfg.data.permute, cfg.data.permute_seed = "global", 5
    assert torch.equal(eval_permutation(src).index, input_permutation(cfg, digits.model_cfg).index)
    assert eval_permutation(SimpleNamespace(config=None, model_cfg=digits.model_cfg)) is None
