"""The run plan's batch arithmetic."""

from __future__ import annotations

import pytest

from orchestrator.config.checks import check_batch_split
from orchestrator.config.load import load_config
from orchestrator.config.tree import ConfigError
from orchestrator.train.plan import make_plan, micro_batch_size, worker_resources


def test_plan_splits_the_global_batch_into_micro_batches_and_accumulation():
    cfg = load_config("digits", ["scaling.num_workers=2", "optim.global_batch_size=128", "optim.micro_batch_size=32"])
    assert micro_batch_size(cfg) == 32
    plan = make_plan(cfg, num_classes=10, train_samples=1437)
    assert (plan.micro_batch_size, plan.grad_accum_steps, plan.global_batch_size) == (32, 2, 128)
    assert plan.model_cfg.num_classes == 10 and plan.num_params > 0
    cfg.optim.micro_batch_size = None
    assert micro_batch_size(cfg) == 64 and make_plan(cfg, 10, 1437).grad_accum_steps == 1

    cfg.scaling.num_workers = 3  # 128 does not split over 3 stream slots (3 workers x 1 loader worker)
    with pytest.raises(ConfigError, match=r"optim\.global_batch_size=128 .*multiple of the data's stream slots .* = 3"):
        check_batch_split(cfg)


def test_worker_resources_are_what_the_trainer_and_the_capacity_check_reserve():
    cfg = load_config("digits", ["scaling.cpus_per_worker=2"])
    assert worker_resources(cfg) == {"CPU": 2.0}
    cfg.scaling.use_gpu = True
    assert worker_resources(cfg) == {"CPU": 2.0, "GPU": 1.0}


def test_elastic_plan_keeps_the_global_batch_at_every_world_size():
    """[1, 3] workers, 12 samples a step over 3 stream slots of 4: 2 workers share them 8 + 4."""
    cfg = load_config("digits", ["scaling.num_workers=[1,3]", "optim.global_batch_size=12", "optim.micro_batch_size=4"])
    plan = make_plan(cfg, num_classes=10, train_samples=1437)
    assert (plan.min_workers, plan.max_workers, plan.stream_slots, plan.chunk_size) == (1, 3, 3, 4)
    for w in (1, 2, 3):
        assert sum(plan.rank_samples(w, r) for r in range(w)) == 12
    assert [plan.rank_samples(2, r) for r in range(2)] == [8, 4]
    assert [plan.micro_batches(2, r) for r in range(2)] == [2, 1]
    assert plan.steps_per_epoch == 1437 // 12  # the same at every world size
    text = plan.describe()
    assert "1-3 (elastic)" in text and "12 samples in 3 micro-batches" in text
    assert "8 samples in 2 micro-batches or 4 samples in 1 micro-batch per rank (unequal" in text
