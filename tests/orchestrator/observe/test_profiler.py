"""The profiler window: which steps it covers, the files it writes (a Chrome trace that parses as JSON, the
operators' table, on CUDA a memory snapshot), and nothing at all when it is off."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

from orchestrator.observe.profiler import ProfileWindow, profile_window


def _run(window: ProfileWindow | None, first: int, last: int, device: str = "cpu") -> dict[int, list]:
    """Train a tiny model from `first` to `last` completed steps, calling the window like the loop does;
    returns {step: files returned after it} for the steps that returned files."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    returned, active = {}, {}
    step = first
    while step < last:
        if window:
            window.before_step(step)
            active[step + 1] = window.active
        x, y = torch.randn(16, 32, device=device), torch.randint(0, 10, (16,), device=device)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        step += 1
        if window and (files := window.after_step(step)):
            returned[step] = files
    return {"files": returned, "active": active}


def test_off_is_no_object():
    assert profile_window(None, "/nonexistent", "cpu") is None


def test_the_window_profiles_its_steps_and_writes_a_chrome_trace_and_a_table(tmp_path):
    window = profile_window([2, 4], tmp_path / "profile", "cpu")
    got = _run(window, 0, 6)
    # steps 3 and 4 (from 2 to 4 completed steps) ran under the profiler, the others did not
    assert got["active"] == {1: False, 2: False, 3: True, 4: True, 5: False, 6: False}
    assert list(got["files"]) == [4]  # returned once, when the window closed
    files = got["files"][4]
    assert [f.name for f in files] == ["trace.json", "key_averages.txt"]
    assert all(f.parent == tmp_path / "profile" for f in files)
    trace = json.loads(files[0].read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert "aten::addmm" in names  # the Linear layers' matmuls
    assert {n for n in names if n.startswith("ProfilerStep#")} == {"ProfilerStep#3", "ProfilerStep#4"}
    assert any(e.get("args", {}).get("Input Dims") for e in trace["traceEvents"])  # record_shapes
    assert any(e.get("name") == "[memory]" for e in trace["traceEvents"])  # profile_memory
    table = files[1].read_text()
    assert "aten::addmm" in table and "Self CPU" in table
    assert window.done and not window.active


def test_a_run_resumed_inside_the_window_profiles_the_rest(tmp_path):
    window = ProfileWindow(2, 5, tmp_path, "cpu")
    got = _run(window, 3, 6)  # resumed at 3 completed steps
    assert got["active"] == {4: True, 5: True, 6: False}
    assert list(got["files"]) == [5]


def test_a_run_resumed_after_the_window_profiles_nothing(tmp_path):
    window = ProfileWindow(1, 2, tmp_path / "p", "cpu")
    got = _run(window, 2, 4)
    assert got == {"files": {}, "active": {3: False, 4: False}}
    assert not (tmp_path / "p").exists()


def test_close_inside_the_window_writes_what_was_profiled(tmp_path):
    window = ProfileWindow(0, 10, tmp_path, "cpu")
    _run(window, 0, 3)
    assert window.active
    files = window.close()
    assert json.loads(files[0].read_text())["traceEvents"]
    assert window.close() == []  # once


@pytest.mark.parametrize("start, stop", [(3, 3), (4, 2), (-1, 2)])
def test_a_window_must_be_ordered(start, stop):
    with pytest.raises(ValueError, match="0 <= start < stop"):
        ProfileWindow(start, stop, "/tmp", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device activity, memory snapshot)")
def test_on_cuda_the_trace_has_kernels_and_a_memory_snapshot_is_written(tmp_path):
    window = ProfileWindow(1, 3, tmp_path, "cuda")
    got = _run(window, 0, 4, device="cuda")
    files = got["files"][3]
    assert [f.name for f in files] == ["trace.json", "key_averages.txt", "memory_snapshot.pickle"]
    trace = json.loads(files[0].read_text())
    assert any(e.get("cat") == "kernel" for e in trace["traceEvents"])
    assert "Self CUDA" in files[1].read_text()
    snapshot = pickle.loads(files[2].read_bytes())
    assert snapshot["segments"] and any(snapshot["device_traces"])  # the allocator's history over the window
