"""The loop closes its batch fetcher, the debug key-trace file with it, whatever ends it (orchestrator/train/loop.py)."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

from orchestrator.train import loop
from orchestrator.train.batches import BatchFetcher, KeyTrace


class _Loader:
    """What BatchFetcher reads: one slot per step, endless (x, y, keys) chunks of 2 samples."""

    slots_owned = 1
    batches_consumed = 0

    def __len__(self) -> int:
        return 1000

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for i in range(len(self)):
            self.batches_consumed = i + 1
            yield torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), [f"k{i}a", f"k{i}b"]


class _Observers(contextlib.nullcontext):
    def before_step(self, step: int) -> None:
        pass


def test_a_step_that_raises_still_closes_the_key_trace_file(tmp_path, monkeypatch):
    trace = KeyTrace(str(tmp_path / "trace"), rank=0, world=1)
    fetcher = BatchFetcher(_Loader(), torch.device("cpu"), start_epoch=0, resumed=False, trace=trace)
    run = SimpleNamespace(
        state=SimpleNamespace(step=0, clock=SimpleNamespace(step=contextlib.nullcontext), ema=None,
                              optimizer=None, scheduler=None),
        plan=SimpleNamespace(total_steps=5, micro_batch_size=2),
        tracker=None,
        batches=fetcher,
        observers=_Observers(),
        group=SimpleNamespace(batch_fetched=lambda step: None),
        train_model=None,
        step_kwargs=lambda micro_batches: {},
    )
    monkeypatch.setattr(loop, "build_run", lambda cfg, session, job, entered: run)

    def failing_step(*args, **kwargs):
        raise RuntimeError("the step failed: simulated")

    monkeypatch.setattr(loop, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="the step failed: simulated"):
        loop.run_training(None, None, None)
    assert trace.file.closed
    (line,) = (tmp_path / "trace" / "rank0.jsonl").read_text().splitlines()  # the one batch fetched, kept
    assert json.loads(line)["keys"] == ["k0a", "k0b"] and json.loads(line)["step"] == 1
