"""The step-time breakdown: phases per logging window, nesting, the data-wait fraction, the reduction over ranks
(two gloo processes), the train_step hook, and on CUDA the event timing (run where a GPU is)."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

from orchestrator.observe.step_timer import PHASES, StepTimer, delayed
from orchestrator.train.step import train_step

KEYS = {f"perf/{p}_seconds_{s}" for p in (*PHASES, "other") for s in ("mean", "max")} | {
    "perf/step_seconds", "perf/data_wait_fraction", "perf/data_wait_fraction_mean"}


def _steps(timer: StepTimer, n: int, wait_s: float, compute_s: float) -> None:
    for _ in range(n):
        with timer.phase("data_wait"):
            time.sleep(wait_s)
        with timer.phase("forward_backward"):
            time.sleep(compute_s)
        timer.step_done()


def test_a_window_gives_every_phase_per_step_and_the_data_wait_fraction():
    timer = StepTimer("cpu")
    _steps(timer, 4, wait_s=0.04, compute_s=0.005)
    m = timer.window_metrics()
    assert set(m) == KEYS
    assert 0.04 <= m["perf/data_wait_seconds_mean"] < 0.04 + 0.03  # a sleep is never shorter; slack for load
    assert 0.005 <= m["perf/forward_backward_seconds_max"] < m["perf/data_wait_seconds_mean"]
    assert m["perf/optimizer_seconds_mean"] == 0.0 and m["perf/eval_seconds_max"] == 0.0
    assert m["perf/step_seconds"] >= 0.045
    assert 0.5 < m["perf/data_wait_fraction"] <= 1.0
    phases = sum(m[f"perf/{p}_seconds_mean"] for p in (*PHASES, "other"))
    assert phases == pytest.approx(m["perf/step_seconds"], rel=1e-6)  # the phases and `other` add up


def test_each_window_starts_afresh():
    timer = StepTimer("cpu")
    _steps(timer, 2, wait_s=0.05, compute_s=0.0)
    first = timer.window_metrics()
    _steps(timer, 2, wait_s=0.0, compute_s=0.02)
    second = timer.window_metrics()
    assert first["perf/data_wait_fraction"] > 0.8
    assert second["perf/data_wait_fraction"] < 0.2
    assert 0.02 <= second["perf/forward_backward_seconds_mean"] < 0.02 + 0.03
    # the run's figure weighs the windows by their wall time
    assert 0.3 < timer.run_data_wait_fraction() < 0.9


def test_a_nested_phase_is_taken_out_of_the_outer_one():
    """A loader's device stage inside data_wait counts as device_augment only."""
    timer = StepTimer("cpu")
    stage = timer.timed("device_augment", lambda x: (time.sleep(0.04), x)[1])
    for _ in range(2):
        with timer.phase("data_wait"):
            time.sleep(0.01)
            assert stage(3) == 3
        timer.step_done()
    m = timer.window_metrics()
    assert 0.04 <= m["perf/device_augment_seconds_mean"] < 0.04 + 0.03
    assert 0.01 <= m["perf/data_wait_seconds_mean"] < m["perf/device_augment_seconds_mean"]


def test_eval_and_checkpoint_are_spread_over_the_windows_steps():
    timer = StepTimer("cpu")
    _steps(timer, 4, wait_s=0.0, compute_s=0.0)
    with timer.phase("eval"):
        time.sleep(0.08)
    m = timer.window_metrics()
    assert 0.02 <= m["perf/eval_seconds_mean"] < 0.02 + 0.02  # 0.08 s over 4 steps


def test_a_slowed_loader_raises_the_data_wait_fraction():
    def fraction(delay_s: float) -> float:
        timer = StepTimer("cpu")
        stream = delayed(iter(range(6)), delay_s)
        for _ in range(6):
            with timer.phase("data_wait"):
                next(stream)
            with timer.phase("forward_backward"):
                time.sleep(0.01)
            timer.step_done()
        return timer.window_metrics()["perf/data_wait_fraction"]

    normal, slowed = fraction(0.0), fraction(0.03)
    assert 0 <= normal < 0.2
    assert normal + 0.3 < slowed <= 1
    stream = iter([1])
    assert delayed(stream, 0) is stream  # off: the stream itself


def test_disabled_costs_nothing_and_reports_nothing():
    timer = StepTimer("cpu", enabled=False)
    assert timer.phase("data_wait") is timer.phase("eval")  # one shared no-op
    fn = len
    assert timer.timed("device_augment", fn) is fn
    t0 = time.perf_counter()
    for _ in range(10_000):
        with timer.phase("data_wait"):
            pass
        timer.step_done()
    assert (time.perf_counter() - t0) / 10_000 < 50e-6
    assert timer.window_metrics() == {}
    assert timer.run_data_wait_fraction() is None


def test_an_unknown_phase_names_the_phases():
    with pytest.raises(ValueError, match="data_wait, forward_backward"):
        StepTimer("cpu").phase("allreduce")


# ------------------------------------------------------------------ the train_step hook


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 5))


class SlowOptimizer(torch.optim.SGD):
    def step(self, closure=None):
        time.sleep(0.3)
        return super().step(closure)


def test_train_step_times_forward_backward_and_optimizer_apart_and_computes_the_same():
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 5, (8,))
    results = []
    for timer in (None, StepTimer("cpu")):
        model = _tiny()
        opt = SlowOptimizer(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        r = train_step(model, [(x[:4], y[:4]), (x[4:], y[4:])], opt, sched, timer=timer)
        results.append((r, [p.detach().clone() for p in model.parameters()]))
        if timer is not None:
            timer.step_done()
            m = timer.window_metrics()
            assert m["perf/optimizer_seconds_mean"] >= 0.3  # the slow optimizer, not forward+backward
            assert 0 < m["perf/forward_backward_seconds_mean"] < m["perf/optimizer_seconds_mean"]
    (ra, pa), (rb, pb) = results
    assert torch.equal(ra.loss, rb.loss) and torch.equal(ra.grad_norm, rb.grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb, strict=True))


# ------------------------------------------------------------------ over ranks


def _rank(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        timer = StepTimer("cpu")
        _steps(timer, 3, wait_s=0.04 * rank, compute_s=0.01)  # rank 1 is starved, rank 0 is not
        out.put((rank, timer.window_metrics()))
    finally:
        dist.destroy_process_group()


def test_window_figures_are_the_mean_and_max_over_ranks():
    import torch.multiprocessing as mp

    from cluster.loopback import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert got[0] == got[1]  # every rank gets the reduced figures
    m = got[0]
    assert 0.04 <= m["perf/data_wait_seconds_max"] < 0.04 + 0.03  # rank 1's
    assert m["perf/data_wait_seconds_mean"] == pytest.approx(m["perf/data_wait_seconds_max"] / 2, abs=0.005)
    assert m["perf/data_wait_fraction"] > 0.5  # the headline: the most starved rank
    assert m["perf/data_wait_fraction_mean"] == pytest.approx(m["perf/data_wait_fraction"] / 2, abs=0.1)


# ------------------------------------------------------------------ CUDA: events, one sync per window

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the event timing path)")


def _busy_gpu(seconds: float) -> None:
    """Queue roughly `seconds` of GPU work without waiting for it."""
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    per = (time.perf_counter() - t0) / 10
    for _ in range(max(1, int(seconds / per))):
        a @ a


@cuda
def test_cuda_data_wait_is_the_time_the_gpu_waited_not_the_hosts():
    timer = StepTimer("cuda")
    # the GPU has nothing to do while the host fetches: it waits the whole 50 ms
    with timer.phase("data_wait"):
        time.sleep(0.05)
    timer.step_done()
    idle = timer.window_metrics()
    assert idle["perf/data_wait_seconds_mean"] == pytest.approx(0.05, abs=0.02)
    # the GPU is busy for ~0.3 s: a 50 ms fetch on the host is hidden, the GPU never waited for it
    _busy_gpu(0.3)
    with timer.phase("data_wait"):
        time.sleep(0.05)
    with timer.phase("forward_backward"):
        _busy_gpu(0.05)
    timer.step_done()
    busy = timer.window_metrics()
    assert busy["perf/data_wait_seconds_mean"] < 0.01
    assert busy["perf/data_wait_fraction"] < 0.05


@cuda
def test_cuda_timing_waits_once_per_window(monkeypatch):
    syncs = []
    original = torch.cuda.Event.synchronize
    monkeypatch.setattr(torch.cuda.Event, "synchronize", lambda self: (syncs.append(1), original(self))[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: pytest.fail("a device-wide sync"))
    timer = StepTimer("cuda")
    host = torch.randn(256, 256).pin_memory()
    for _ in range(20):
        with timer.phase("data_wait"):
            y = host.to("cuda", non_blocking=True)
        with timer.phase("forward_backward"):
            y @ y
        timer.step_done()
    assert syncs == []
    m = timer.window_metrics()
    assert syncs == [1]
    assert m["perf/forward_backward_seconds_mean"] > 0 and 0 <= m["perf/data_wait_fraction"] <= 1
