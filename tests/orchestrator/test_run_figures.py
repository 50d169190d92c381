"""Honest figures of a run: held vs productive accelerator-hours, and bad/padded/dropped samples per epoch."""

from __future__ import annotations

import pytest

from orchestrator.train.compute import ComputeClock


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_held_and_productive_hours_across_a_restart():
    t = FakeClock()
    first = ComputeClock(accelerators=4, clock=t)
    t.now += 600  # start-up, restore: held, not productive
    with first.step():
        t.now += 1800  # training steps
    t.now += 600  # evaluation and a checkpoint: held, not productive
    assert first.held_hours() == pytest.approx(3000 * 4 / 3600)
    assert first.productive_hours() == pytest.approx(1800 * 4 / 3600)
    saved = first.state()
    assert saved == pytest.approx({"accelerator_hours": 10 / 3, "productive_hours": 2.0})

    t.now += 5000  # the attempt dies after its checkpoint: that time is lost with it
    second = ComputeClock(accelerators=4, clock=t)  # the restarted worker group
    second.resume(saved)
    t.now += 360
    with second.step():
        t.now += 1440
    m = second.metrics()
    assert m["compute/accelerator_hours"] == pytest.approx((3000 + 1800) * 4 / 3600)
    assert m["compute/productive_hours"] == pytest.approx((1800 + 1440) * 4 / 3600)
    assert m["compute/goodput"] == pytest.approx(3240 / 4800)
    # a step that raises still counts; a checkpoint from before productive hours existed resumes from 0
    third = ComputeClock(accelerators=1, clock=t)
    third.resume({"accelerator_hours": 1.0})
    with pytest.raises(RuntimeError), third.step():
        t.now += 3600
        raise RuntimeError
    assert third.metrics() == pytest.approx({"compute/accelerator_hours": 2.0, "compute/productive_hours": 1.0,
                                             "compute/goodput": 0.5})
    assert ComputeClock(2, clock=t).metrics()["compute/goodput"] == 0.0  # nothing held yet


def test_accelerators_held():
    from orchestrator.config.tree import load_config
    from orchestrator.train.plan import accelerators

    cpu = load_config("digits", ["scaling.num_workers=4"])
    gpu = load_config("digits", ["scaling.num_workers=4", "scaling.use_gpu=true"])
    assert accelerators(cpu, 4) == 4 and accelerators(gpu, 4) == 4
