"""The run plan's batch arithmetic."""

from __future__ import annotations

import pytest

from orchestrator.config.tree import ConfigError, load_config
from orchestrator.train.plan import check_batch_split, make_plan, micro_batch_size, worker_resources


def test_plan_splits_the_global_batch_into_micro_batches_and_accumulation():
    cfg = load_config("digits", ["scaling.num_workers=2", "optim.global_batch_size=128", "optim.micro_batch_size=32"])
    assert micro_batch_size(cfg) == 32
    plan = make_plan(cfg, num_classes=10, train_samples=1437)
    assert (plan.micro_batch_size, plan.grad_accum_steps, plan.global_batch_size) == (32, 2, 128)
    assert plan.model_cfg.num_classes == 10 and plan.num_params > 0
    cfg.optim.micro_batch_size = None
    assert micro_batch_size(cfg) == 64 and make_plan(cfg, 10, 1437).grad_accum_steps == 1

    cfg.scaling.num_workers = 3
    with pytest.raises(ConfigError, match=r"optim\.global_batch_size=128 .*multiple of .* 3 x 42 = 126"):
        check_batch_split(cfg)


def test_worker_resources_are_what_the_trainer_and_the_capacity_check_reserve():
    cfg = load_config("digits", ["scaling.cpus_per_worker=2"])
    assert worker_resources(cfg) == {"CPU": 2.0}
    cfg.scaling.use_gpu = True
    assert worker_resources(cfg) == {"CPU": 2.0, "GPU": 1.0}
