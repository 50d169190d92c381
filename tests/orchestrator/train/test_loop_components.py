"""The training loop's components, each alone: batch fetcher, training state, step logger, evaluator,
checkpointer, group events (orchestrator/train/*.py). The loop itself is driven end to end elsewhere."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from orchestrator.train.batches import BatchFetcher, KeyTrace, build_loaders
from orchestrator.train.compute import ComputeClock
from orchestrator.train.group_events import GroupEvents
from orchestrator.train.periodic import Checkpointer, Evaluator
from orchestrator.train.session import LocalSession
from orchestrator.train.state import TrainingState
from orchestrator.train.step import StepResult
from orchestrator.train.step_log import StepLogger


def _loaders(digits, trace_keys_dir: str | None = None):
    cfg = copy.deepcopy(digits.cfg)
    cfg.data.trace_keys_dir = trace_keys_dir  # the loader returns sample keys only when they are traced
    train, sets = build_loaders(cfg, digits.job, digits.model.cfg, 0, 1, torch.device("cpu"))
    return train, sets["val"]


def test_the_digits_preset_evaluates_val_and_its_minival(digits):
    train, sets = build_loaders(digits.cfg, digits.job, digits.model.cfg, 0, 1, torch.device("cpu"))
    assert list(sets) == ["val", "minival"]
    assert sets["minival"].selection.num_samples == 142  # 10% of every class of the 1437 training samples
    assert train.selection.num_samples == 1437 - 142 == digits.job.train_samples


def test_fetcher_crosses_epochs_and_reports_each_ended_epoch_once(digits, tmp_path):
    train, _ = _loaders(digits, str(tmp_path))
    fetcher = BatchFetcher(train, torch.device("cpu"), start_epoch=0, resumed=False,
                           trace=KeyTrace(str(tmp_path), rank=0, world=1))
    per_epoch = len(train) // train.slots_owned
    ended, epochs = [], []
    for step in range(1, 2 * per_epoch + 2):
        batch = fetcher.next(step)
        assert batch.x.shape[0] == batch.y.shape[0] == train.slots_owned * train.batch_size
        ended += [e for e, _ in batch.ended]
        epochs.append(batch.epoch)
    assert ended == [0, 1]  # each epoch's end seen exactly once, at the step that took its last batch
    assert epochs[per_epoch - 1] == 0 and epochs[per_epoch] == 1 and epochs[-1] == 2
    assert fetcher.unfinished_epoch_counts() is not None  # part-way through epoch 2
    fetcher.close()
    assert fetcher.trace.file.closed  # the debug trace file is closed with the loop
    lines = [json.loads(line) for line in (tmp_path / "rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 2 * per_epoch + 2))
    micro = batch.micro_batches(5)
    assert sum(len(x) for x, _ in micro) == batch.x.shape[0] and all(len(x) <= 5 for x, _ in micro)


def _state(digits, train):
    model = digits.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return TrainingState(model, opt, sched, train, ComputeClock(1), run_id="run-a")


def test_training_state_round_trips_through_a_checkpoint(digits, tmp_path):
    train, _ = _loaders(digits)
    state = _state(digits, train)
    fetcher = BatchFetcher(train, torch.device("cpu"), 0, False)
    for step in range(1, 4):
        fetcher.next(step)
    state.step = 3
    session = LocalSession(str(tmp_path / "run"), device="cpu")
    directory = session.staging_dir()
    state.save(directory, world=1, rank=0, config={"k": 1})
    session.report({"step": 3}, directory)
    expect_next = fetcher.next(4).x

    train2, _ = _loaders(digits)
    fresh = _state(digits, train2)
    fresh.run_id = None
    with torch.no_grad():
        for p in fresh.model.parameters():
            p.zero_()
    printed: list[str] = []
    assert fresh.restore(session, 0, 1, log=printed.append)
    assert fresh.step == 3 and fresh.resumed and fresh.run_id == "run-a"
    assert "[resume]" in printed[0] and "step 3" in printed[0]
    for a, b in zip(fresh.model.state_dict().values(), digits.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    resumed = BatchFetcher(train2, torch.device("cpu"), fresh.start_epoch, fresh.resumed)
    assert torch.equal(resumed.next(4).x, expect_next)  # the data continues where the checkpoint was taken
    assert not _state(digits, _loaders(digits)[0]).restore(LocalSession(str(tmp_path / "none")), 0, 1, print)


class _Tracker:
    def __init__(self):
        self.metrics: list[tuple[dict, int]] = []
        self.tags: list[dict] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((dict(metrics), step))

    def set_tags(self, tags):
        self.tags.append(tags)


def test_step_logger_logs_each_window_and_leaves_evaluation_time_out(digits, capsys):
    plan = SimpleNamespace(global_batch_size=10, total_steps=7, train_flops_per_step=1e6,
                           train_gflops_per_image=1.0)
    tracker = _Tracker()
    log = StepLogger(plan, ComputeClock(1), every=3, rank=0, world=2, tracker=tracker, first_step=0,
                     peak_tflops=None)
    result = StepResult(loss=torch.tensor(0.5), grad_norm=torch.tensor(1.0), lr=1e-3, images=5)
    windows = [s for s in range(1, 8) if log.step_done(s, result, epoch=0) is not None]
    assert windows == [3, 6, 7]  # every 3 steps and the last
    assert [s for _, s in tracker.metrics] == [3, 6, 7]
    m = tracker.metrics[0][0]
    assert m["train/loss"] == 0.5 and m["compute/flops"] == 3e6
    assert m["train/img_per_s_per_device"] == pytest.approx(m["train/img_per_s"] / 2)
    assert "train/mfu" not in m  # no known peak on the CPU
    assert "step 3/7 epoch 0 loss 0.5000" in capsys.readouterr().out
    log.step_done(8, result, 0)  # opens nothing: not a window end
    log.window_images, log.window_t = 10, log.window_t - 1.0
    log.exclude(10.0)  # evaluation took longer than the window: img/s must not count it
    assert log.step_done(9, result, 0)["train/img_per_s"] <= 0.0


def test_evaluator_runs_when_due_and_keeps_the_best(digits):
    _, val = _loaders(digits)
    tracker = _Tracker()
    ev = Evaluator(digits.model, {"val": val}, torch.device("cpu"), None, every=5, total_steps=12, rank=0, tracker=tracker,
                   compute=lambda step: {"compute/flops": float(step)})
    assert [s for s in range(1, 13) if ev.due(s)] == [5, 10, 12]
    assert ev.maybe_run(4) == {} and ev.seconds == 0.0
    ev.seconds = 1.0
    assert ev.maybe_run(5, skip=True) == {} and ev.seconds == 0.0  # skipped: no stale time taken out of a window
    out = ev.maybe_run(5)
    assert set(out) == {"val/top1", "val/top5", "val/loss"} and 0.0 <= out["val/top1"] <= 1.0
    assert ev.best_top1 == out["val/top1"] and ev.seconds > 0
    assert tracker.metrics[-1] == ({**out, "compute/flops": 5.0}, 5)


def test_checkpointer_saves_on_schedule_at_the_end_and_on_preemption(digits, tmp_path):
    train, _ = _loaders(digits)
    session = LocalSession(str(tmp_path / "run"), device="cpu")
    waits = []
    session.wait_for_checkpoints = lambda: waits.append(True)
    state = _state(digits, train)
    ck = Checkpointer(session, state, every=4, total_steps=10, rank=0, world=1, config={})
    assert [s for s in range(1, 11) if ck.due(s, preempted=False)] == [4, 8, 10]
    assert ck.due(3, preempted=True)
    assert ck.maybe_save(3, preempted=False) is None
    state.step = 3
    directory = ck.maybe_save(3, preempted=True)
    ck.report({"step": 3}, directory, preempted=True)
    assert waits == [True]  # a preemption checkpoint is waited for until committed
    assert [c.name for c in session.restore_candidates()] == ["checkpoint_00000003"]


def test_group_events_take_the_first_preemption_notice_once(digits, capsys):
    notices = iter([None, "node n1 drained", "node n1 drained", None])
    session = SimpleNamespace(preemption_notice=lambda: next(notices))
    job = SimpleNamespace(progress_actor=None, startup={"submitted": 0.0})
    events = GroupEvents(session, job, rank=0, world=1, step=0, restored=False, entered=1.0)
    assert [events.preempted(s) for s in range(1, 5)] == [False, True, False, False]
    assert "[preemption] node n1 drained: checkpoint at step 2" in capsys.readouterr().out
    tracker = _Tracker()
    events.ready()
    events.batch_fetched(1)
    events.step_done(1, tracker)
    startup = tracker.metrics[0][0]
    assert "startup/total_s" in startup and tracker.metrics[0][1] == 1
    events.step_done(2, tracker)
    assert len(tracker.metrics) == 1  # the start-up phases are logged once, after the first step


# ------------------------------------------------------------------ observe.* in the components (#21)


class _Phases:
    """A StepTimer stand-in recording the phases opened, in order (what each component times)."""

    enabled = True

    def __init__(self):
        self.opened: list[str] = []

    def phase(self, name):
        import contextlib

        self.opened.append(name)
        return contextlib.nullcontext()

    def timed(self, name, fn):
        def timed_fn(*a, **k):
            self.opened.append(name)
            return fn(*a, **k)
        return timed_fn


def test_fetch_evaluation_and_checkpoint_run_in_their_phases(digits, tmp_path):
    train, val = _loaders(digits)
    timer = _Phases()
    fetcher = BatchFetcher(train, torch.device("cpu"), 0, False, timer=timer)
    fetcher.next(1)
    assert timer.opened == ["data_wait"]
    ev = Evaluator(digits.model, {"val": val}, torch.device("cpu"), None, every=1, total_steps=1, rank=0, tracker=None,
                   compute=dict, timer=timer)
    ev.maybe_run(1)
    session = LocalSession(str(tmp_path / "run"), device="cpu")
    ck = Checkpointer(session, _state(digits, train), every=1, total_steps=1, rank=0, world=1, config={},
                      timer=timer)
    ck.report({"step": 1}, ck.maybe_save(1, preempted=False), preempted=False)
    assert timer.opened == ["data_wait", "eval", "checkpoint", "checkpoint"]


def test_slowed_fetch_and_the_device_stage_timed_apart(digits):
    """observe.data_delay_s delays each of the loader's batches; on the device path the loader's batch stage
    is timed as device_augment, its draws (in the loader's workers) untouched, and it pickles as the bare stage."""
    import pickle
    import time

    from orchestrator.observe.step_timer import StepTimer
    from orchestrator.train.batches import TimedStage, time_device_stage

    train, _ = _loaders(digits)
    t0 = time.perf_counter()
    BatchFetcher(train, torch.device("cpu"), 0, False, delay_s=0.2).next(1)
    assert time.perf_counter() - t0 >= 0.2 * train.slots_owned
    timer = _Phases()
    time_device_stage(train, timer)
    assert not isinstance(train.batch_stage, TimedStage)  # host placement: the stage runs in the loader
    cfg = copy.deepcopy(digits.cfg)
    cfg.data.augment_on = "device"
    device_train, _ = build_loaders(cfg, digits.job, digits.model.cfg, 0, 1, torch.device("cpu"))
    stage = device_train.batch_stage
    time_device_stage(device_train, StepTimer(enabled=False))
    assert device_train.batch_stage is stage  # nothing wraps a disabled timer
    time_device_stage(device_train, timer)
    assert isinstance(device_train.batch_stage, TimedStage) and device_train.batch_stage.draw == stage.draw
    assert type(pickle.loads(pickle.dumps(device_train.batch_stage))) is type(stage)
    BatchFetcher(device_train, torch.device("cpu"), 0, False, timer=timer).next(1)
    assert timer.opened == ["data_wait", "device_augment"]


def test_step_logger_adds_the_breakdown_at_each_window_and_the_run_figures():
    from orchestrator.observe.step_timer import StepTimer

    plan = SimpleNamespace(global_batch_size=10, total_steps=4, train_flops_per_step=1e12,
                           train_gflops_per_image=100.0)
    tracker = _Tracker()
    clock = ComputeClock(1)
    log = StepLogger(plan, clock, every=2, rank=0, world=1, tracker=tracker, first_step=0, peak_tflops=1.0,
                     timer=StepTimer())
    result = StepResult(loss=torch.tensor(0.5), grad_norm=torch.tensor(1.0), lr=1e-3, images=10)
    with clock.step():
        for step in range(1, 5):
            with log.timer.phase("data_wait"):
                pass
            log.step_done(step, result, epoch=0)
    assert [s for _, s in tracker.metrics] == [2, 4]
    assert all(0 <= m["perf/data_wait_fraction"] <= 1 and "perf/optimizer_seconds_max" in m
               for m, _ in tracker.metrics)
    figures = log.run_figures(4)
    assert 0 <= figures["perf/run_data_wait_fraction"] <= 1
    # MFU of the run: 4 steps x 1 TFLOP over the productive seconds, against a 1 TFLOP/s peak
    assert figures["train/run_mfu"] == pytest.approx(4 / (clock.productive_hours() * 3600))
    assert StepLogger(plan, clock, 2, 0, 1, None, 0, None).run_figures(4) == {}  # no timer, no peak


def test_observers_send_kept_samples_log_the_profile_once_and_stop(digits, tmp_path, capsys):
    """Without a relay (rank 0 logs itself) the loop's thread sends the sampler's samples; the profiler's files
    go under profile/ when the window closes, or when the loop stops inside it."""
    from orchestrator.train.observers import build_observers

    cfg = copy.deepcopy(digits.cfg)
    cfg.tracking.enabled = True
    cfg.observe.profile_steps = [1, 3]
    cfg.observe.system_metrics_interval_s = 3600.0
    artifacts = []
    tracker = _Tracker()
    tracker.log_artifact = lambda path, where: artifacts.append((Path(path).name, where))
    session = LocalSession(str(tmp_path / "run"), device="cpu")
    step = [0]
    obs = build_observers(cfg, session, digits.job, "run-x", torch.device("cpu"), tracker, lambda: step[0])
    assert obs.sampler is not None and obs.sampler.sink is None and obs.window is not None
    with obs:
        for s in range(3):
            obs.before_step(s)
            torch.ones(4).sum()
            step[0] = s + 1
            obs.after_step(s + 1)
    assert sorted(artifacts) == [("key_averages.txt", "profile"), ("trace.json", "profile")]
    assert "[profile] steps 2-3: trace.json, key_averages.txt" in capsys.readouterr().out
    assert [s for _, s in tracker.metrics] == [3]  # the sampler's last sample, at the loop's end
    assert "system/node0/cpu_utilization_percentage" in tracker.metrics[0][0]

    artifacts.clear()
    cfg.observe.profile_steps = [0, 10]
    stopped = build_observers(cfg, session, digits.job, "run-x", torch.device("cpu"), tracker, lambda: 1)
    with pytest.raises(RuntimeError, match="the loop failed inside the window"), stopped:
        stopped.before_step(0)
        raise RuntimeError("the loop failed inside the window")
    assert len(artifacts) == 2 and not stopped.sampler._thread  # written, logged, stopped all the same

    cfg.tracking.enabled = False
    cfg.observe.profile_steps = None
    off = build_observers(cfg, session, digits.job, None, torch.device("cpu"), None, lambda: 0)
    assert off.sampler is None and off.window is None


def test_a_preemption_step_checkpoints_first_and_skips_its_evaluation(digits, tmp_path, monkeypatch):
    """The grace after a notice is short: the step that checkpoints for it does not evaluate first (the run's last
    step still does)."""
    from orchestrator.config.load import load_config
    from orchestrator.train.loop import run_training

    monkeypatch.setenv("MIXER_HOME", str(tmp_path / "home"))
    cfg = load_config("digits", ["scaling.num_workers=1", "data.loader_workers=0", "tracking.enabled=false",
                                 "train.max_steps=4", "eval.every_steps=2", "checkpoint.every_steps=100"])
    session = LocalSession(str(tmp_path / "run"), device="cpu")
    asked = []
    session.preemption_notice = lambda: (asked.append(1), "node n1 drained" if len(asked) >= 2 else None)[1]
    run_training(cfg, session, digits.job)
    by_step = {r["step"]: r for r in session.reports}
    assert sorted(by_step) == [2, 4]
    assert "val/top1" not in by_step[2]  # the preemption step: checkpoint, no evaluation
    assert "val/top1" in by_step[4]  # the run's last step evaluates
    assert "checkpoint_00000002" in {c.name for c in session.restore_candidates()}  # the notice's checkpoint


def test_a_failing_profiler_is_a_warning_not_the_end_of_the_run(caplog):
    """Only rank 0 profiles: were its failure an exception, rank 0 alone would fail and the others wait."""
    from orchestrator.train.observers import Observers

    class FullDisk:
        def before_step(self, step):
            pass

        def after_step(self, step):
            raise OSError(28, "No space left on device")

    tracker = _Tracker()
    observers = Observers(sampler=None, window=FullDisk(), tracker=tracker)
    with observers:
        observers.before_step(0)
        observers.after_step(1)  # does not raise
        observers.after_step(2)
    assert observers.window is None  # switched off after the first failure
    assert "[profile] switched off: OSError" in caplog.text and "No space left on device" in caplog.text


def test_evaluator_logs_every_named_set_and_keeps_the_best_of_the_selection_set(digits, capsys):
    _, val = _loaders(digits)
    tracker = _Tracker()
    with pytest.raises(ValueError, match="select_on='minival' is not among the evaluated sets"):
        Evaluator(digits.model, {"val": val}, torch.device("cpu"), None, every=1, total_steps=1, rank=0,
                  tracker=None, compute=dict, select_on="minival")
    ev = Evaluator(digits.model, {"val": val, "other": val}, torch.device("cpu"), None, every=1, total_steps=2,
                   rank=0, tracker=tracker, compute=lambda step: {}, select_on="other")
    ev.best_top1 = 2.0  # not a top-1: shows max() keeps the larger, then a fresh evaluator shows the value comes
    ev.maybe_run(1)     # from the selection set
    assert ev.best_top1 == 2.0
    ev = Evaluator(digits.model, {"val": val, "other": val}, torch.device("cpu"), None, every=1, total_steps=2,
                   rank=0, tracker=tracker, compute=lambda step: {}, select_on="other")
    out = ev.maybe_run(1)
    assert set(out) == {f"{n}/{k}" for n in ("val", "other") for k in ("top1", "top5", "loss")}
    assert ev.best_top1 == out["other/top1"] and tracker.metrics[-1] == (out, 1)
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("eval step 1: top-1") for line in lines)  # the val line reads as it always has
    assert any(line.startswith("eval step 1 other: top-1") for line in lines)
