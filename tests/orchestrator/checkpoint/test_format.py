"""orchestrator/checkpoint: how load_checkpoint (format.py) names a state.pt it cannot load: "damaged or truncated"
for a truncated one, "cannot be loaded safely" only for pickled code; run_checkpoints (runs.py) lists a LocalSession
run newest first with the steps from the names. A run falling back past a damaged checkpoint is tested in
tests/orchestrator/train/test_checkpoint_fallback.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoint_files import store_with_steps, truncate

from orchestrator.checkpoint.format import (
    STATE_FILE,
    DamagedCheckpointError,
    load_checkpoint,
)
from orchestrator.checkpoint.runs import run_checkpoints
from pipelines.storage import get_fs


def test_truncated_state_is_called_damaged_and_pickled_code_unsafe(tmp_path):
    store = store_with_steps(tmp_path / "run", [4])
    ckpt = tmp_path / "run" / "checkpoint_00000004"
    truncate(ckpt)
    with pytest.raises(DamagedCheckpointError) as damaged:
        load_checkpoint(ckpt)
    assert "damaged or truncated" in str(damaged.value) and str(ckpt / STATE_FILE) in str(damaged.value)
    assert "weights_only" not in str(damaged.value)

    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"format_version": 1, "x": Path("/")}, evil / STATE_FILE)  # an object weights_only refuses
    with pytest.raises(ValueError) as unsafe:
        load_checkpoint(evil)
    assert "cannot be loaded safely" in str(unsafe.value) and not isinstance(unsafe.value, DamagedCheckpointError)
    assert store.candidates()[0].name == "checkpoint_00000004"


def test_run_checkpoints_lists_newest_first_with_steps(tmp_path):
    store_with_steps(tmp_path / "run", [3, 6, 9])
    (tmp_path / "run" / "checkpoint_00000012").mkdir()  # being written: no state.pt yet, never offered
    fs, path = get_fs(str(tmp_path / "run"))
    assert run_checkpoints(fs, path) == [("checkpoint_00000009", 9), ("checkpoint_00000006", 6),
                                         ("checkpoint_00000003", 3)]
