"""The training loop's components, each alone: batch fetcher, training state, step logger, evaluator,
checkpointer, group events (orchestrator/train/*.py). The loop itself is driven end to end elsewhere."""

from __future__ import annotations

import copy
import json
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


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits config and dataset (written once), one rank."""
    from model import create_model
    from orchestrator.config.load import load_config
    from orchestrator.config.tree import model_overrides
    from orchestrator.train.launch import resolve_data
    from orchestrator.train.loop import Job

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXER_HOME", str(home))
        cfg = load_config("digits", ["scaling.num_workers=1", "data.loader_workers=0", "tracking.enabled=false"])
        data = resolve_data(cfg)
    job = Job(data.url, data.num_classes, data.train_samples, None, None, data.storage_options)
    model = create_model(cfg.model.name, **model_overrides(cfg, job.num_classes))
    return SimpleNamespace(cfg=cfg, job=job, model=model)


def _loaders(digits, trace_keys_dir: str | None = None):
    cfg = copy.deepcopy(digits.cfg)
    cfg.data.trace_keys_dir = trace_keys_dir  # the loader returns sample keys only when they are traced
    return build_loaders(cfg, digits.job, digits.model.cfg, 0, 1, torch.device("cpu"))


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
    ev = Evaluator(digits.model, val, torch.device("cpu"), None, every=5, total_steps=12, rank=0, tracker=tracker,
                   compute=lambda step: {"compute/flops": float(step)})
    assert [s for s in range(1, 13) if ev.due(s)] == [5, 10, 12]
    assert ev.maybe_run(4) == {} and ev.seconds == 0.0
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
