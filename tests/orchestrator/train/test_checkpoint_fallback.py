"""A run whose newest checkpoint is damaged resumes from the newest complete earlier one.

- unit: a Ray Train worker tries checkpoints newer than the one Ray hands over first (their reports dropped by a
  restart); how orchestrator.checkpoint itself names a damaged or unsafe state.pt and lists a run's checkpoints
  is tested in tests/orchestrator/checkpoint/test_format.py;
- the loop (LocalSession, no Ray): a truncated newest checkpoint is named with what failed, the run resumes from
  the earlier one with a warning giving the steps done again, and finishes; with every checkpoint damaged it
  fails with that message;
- end to end (slow): `python -m orchestrator.pretrain` with the same run.name after truncating the newest
  checkpoint of a finished Ray Train run: the run finishes, its MLflow run stays FINISHED.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_files import store_with_steps, truncate
from gloo_ranks import leave_group

from orchestrator.checkpoint.format import (
    DamagedCheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from orchestrator.train.checkpoints import LocalCheckpointStore, load_newest_complete

REPO = Path(__file__).resolve().parents[3]




def test_newest_damaged_falls_back_with_a_warning(tmp_path):
    store = store_with_steps(tmp_path / "run", [3, 6, 9])
    truncate(tmp_path / "run" / "checkpoint_00000009")
    warnings: list[str] = []
    state, source = load_newest_complete(store.candidates(), warn=warnings.append)
    assert source.name == "checkpoint_00000006" and state["step"] == 6
    assert "checkpoint_00000009" in warnings[0] and "damaged or truncated" in warnings[0]
    assert "3 step(s) are done again" in warnings[-1] and "checkpoint_00000006" in warnings[-1]


def test_none_loads_fails_naming_each(tmp_path):
    store = store_with_steps(tmp_path / "run", [3, 6])
    for name in ("checkpoint_00000003", "checkpoint_00000006"):
        truncate(tmp_path / "run" / name)
    with pytest.raises(DamagedCheckpointError) as err:
        load_newest_complete(store.candidates(), warn=lambda m: None)
    message = str(err.value)
    assert "no checkpoint of this run can be loaded" in message
    assert "checkpoint_00000003" in message and "checkpoint_00000006" in message
    assert load_newest_complete(LocalCheckpointStore(tmp_path / "empty", 2).candidates()) is None


def test_ray_session_tries_checkpoints_newer_than_the_one_ray_hands_over_first(tmp_path):
    """A group that went down after a checkpoint's upload but before Ray Train's controller took the report
    (Ray 2.60 drops it) leaves a complete checkpoint newer than the registered latest: the resume tries it first,
    then the latest, then the older ones; one cut off mid-upload does not load and the next is taken."""
    import ray.train

    from orchestrator.train.session import RaySession

    run = tmp_path / "run"
    names = {1: "checkpoint_2026-12-03_10-00-01.000000", 2: "checkpoint_2026-12-03_10-00-02.000000",
             3: "checkpoint_2026-12-03_10-00-03.000000", 4: "checkpoint_2026-12-03_10-00-04.000000"}
    for step, name in names.items():
        save_checkpoint(run / name, {"step": step})

    class HandsOverStep2:  # ray.train as a worker of a restarted group sees it: step 2 registered
        Checkpoint = ray.train.Checkpoint

        @staticmethod
        def get_checkpoint():
            return ray.train.Checkpoint(str(run / names[2]))

    session = RaySession.__new__(RaySession)  # no Train worker here: only restore_candidates is used
    session._train = HandsOverStep2()
    assert [c.name for c in session.restore_candidates()] == [names[4], names[3], names[2], names[1]]
    state, source = load_newest_complete(session.restore_candidates(), warn=lambda m: None)
    assert source.name == names[4] and state["step"] == 4
    truncate(run / names[4])  # its upload was cut off by the failure
    warnings: list[str] = []
    state, source = load_newest_complete(session.restore_candidates(), warn=warnings.append)
    assert source.name == names[3] and state["step"] == 3 and names[4] in warnings[0]


def test_loop_resumes_from_the_earlier_checkpoint(tmp_path, monkeypatch, capsys):
    """The training loop itself (LocalSession): a truncated newest checkpoint costs only the steps after the
    earlier one, and the run still ends at its planned step."""
    from orchestrator.config.load import load_config
    from orchestrator.train.launch import resolve_data
    from orchestrator.train.loop import Job, run_training
    from orchestrator.train.session import LocalSession

    monkeypatch.setenv("MIXER_HOME", str(tmp_path / "home"))
    overrides = ["run.name=fallback", "schedule.warmup_steps=2", "scaling.num_workers=1", "data.loader_workers=0",
                 "eval.every_steps=100000", "tracking.enabled=false", "checkpoint.num_to_keep=3"]
    cfg = load_config("digits", ["schedule.epochs=2", *overrides])
    data = resolve_data(cfg)
    job = Job(data.url, data.num_classes, data.train_samples, None, None, data.storage_options)
    run_dir = tmp_path / "run"
    first = run_training(cfg, LocalSession(str(run_dir), num_to_keep=3, device="cpu"), job)
    names = sorted(p.name for p in run_dir.glob("checkpoint_*"))
    assert len(names) >= 2
    truncate(run_dir / names[-1])
    capsys.readouterr()

    again = run_training(cfg, LocalSession(str(run_dir), num_to_keep=3, device="cpu"), job)
    out = capsys.readouterr().out
    earlier_step = int(names[-2].split("_")[1])
    assert f"{names[-1]}" in out and "damaged or truncated" in out
    assert f"resuming from the earlier complete checkpoint {names[-2]}" in out
    assert f"{first['step'] - earlier_step} step(s) are done again" in out
    assert again["step"] == first["step"]
    load_checkpoint(max(run_dir.glob("checkpoint_*")))  # the redone steps wrote a whole newest checkpoint


@pytest.mark.slow
def test_pretrain_resumes_past_a_truncated_newest_checkpoint(tmp_path):
    """Through the real entry point on Ray Train: the finished run, rerun by name after its newest checkpoint was
    truncated, redoes the steps from the earlier checkpoint and ends FINISHED in MLflow (never FAILED)."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(MIXER_HOME=str(home), PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token")
    args = [sys.executable, "-m", "orchestrator.pretrain", "run.name=trunc", "schedule.epochs=2",
            "schedule.warmup_steps=2", "scaling.num_workers=1", "data.loader_workers=0", "checkpoint.num_to_keep=3",
            "train.log_every_steps=5"]

    def pretrain() -> str:
        out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout + out.stderr

    first = pretrain()
    run_id = re.search(r"MLflow run id\s+(\w+)", first).group(1)
    run_dir = home / "runs" / "trunc"
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())  # Ray: checkpoint_<date>
    assert len(checkpoints) >= 2
    truncate(checkpoints[-1])

    second = pretrain()
    assert checkpoints[-1].name in second and "damaged or truncated" in second
    assert f"resuming from the earlier complete checkpoint {checkpoints[-2].name}" in second
    assert "step(s) are done again" in second
    from mlflow.tracking import MlflowClient

    assert MlflowClient(f"sqlite:///{home / 'mlflow.db'}").get_run(run_id).info.status == "FINISHED"


def _agreeing_rank(rank: int, world: int, store: str, run: str, out: str) -> None:
    """One rank of a gloo group restoring through load_agreed. The step-8 checkpoint (the upload of the group
    that went down) lands in the run's storage while rank 0 lists it, a second after the ranks started: a rank
    listing for itself at its start would not see it."""
    import json
    import time

    import torch.distributed as dist

    from orchestrator.train.checkpoints import load_agreed

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    runs = LocalCheckpointStore(run, 10)

    def candidates():
        if rank == 0 and not (Path(run) / "checkpoint_00000008").exists():
            time.sleep(1.0)  # deliberate: the upload lands late, after the other ranks started (the race tested)
            runs.commit(Path(run).parent / "staged_8", 8)  # the late upload lands
        return runs.candidates()

    restored = load_agreed(candidates, rank, world, warn=lambda m: None)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(None if restored is None else [restored[1].name, restored[0]["step"]], f)
    leave_group(dist)  # every rank done with gloo; no teardown (tests/gloo_ranks.py)


@pytest.mark.parametrize("damaged_newest", [False, True], ids=["newest", "newest-damaged"])
def test_every_rank_restores_the_checkpoint_rank_0_chose(tmp_path, damaged_newest):
    """Ranks that would list the run's storage at different moments still restore one checkpoint: rank 0's
    choice (the newest that loads), which a rank listing at its own start would not have seen."""
    import json

    import torch.multiprocessing as mp

    run = tmp_path / "run"
    store_with_steps(run, [4])
    save_checkpoint(tmp_path / "staged_8", {"step": 8, "model": {"w": torch.full((2,), 8.0)}})
    if damaged_newest:
        truncate(tmp_path / "staged_8")
    out = str(tmp_path / "restored")
    mp.spawn(_agreeing_rank, args=(2, str(tmp_path / "store"), str(run), out), nprocs=2, join=True)
    want = ["checkpoint_00000004", 4] if damaged_newest else ["checkpoint_00000008", 8]
    assert [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)] == [want, want]
