"""eval.fewshot_every_steps in the training loop, without Ray (LocalSession): rank 0 probes every N steps and at the
end and logs fewshot/<k>shot (the keys orchestrator/report reads); other ranks only wait at the barrier."""

from __future__ import annotations

import torch

from orchestrator.report.runs import FEWSHOT_PREFIX


def test_probe_every_n_steps_and_at_the_end_logs_fewshot_keys(digits_slice, memory_tracker, tmp_path,
                                                              monkeypatch):
    from orchestrator.config.load import load_config
    from orchestrator.train import setup
    from orchestrator.train.launch import resolve_data
    from orchestrator.train.loop import Job, run_training
    from orchestrator.train.session import LocalSession

    tracker = memory_tracker()
    monkeypatch.setattr(setup, "start_tracker", lambda cfg, job, run_id: tracker)  # rank 0's tracker, in memory
    cfg = load_config("digits", [
        f"data.url={digits_slice}", "scaling.num_workers=1", "data.loader_workers=0",
        "optim.global_batch_size=16", "train.max_steps=3", "eval.every_steps=100", "schedule.warmup_steps=1",
        "data.minival_fraction=0", "eval.fewshot_every_steps=2", "eval.fewshot_shots=[1, 5]",
    ])
    data = resolve_data(cfg)
    job = Job(data.url, data.num_classes, data.train_samples, None, None, data.storage_options)
    final = run_training(cfg, LocalSession(str(tmp_path / "run"), device="cpu"), job)
    probes = [(m, step) for m, step in tracker.metrics if any(k.startswith(FEWSHOT_PREFIX) for k in m)]
    assert [step for _, step in probes] == [2, 3]  # every 2 steps, and the last
    for metrics, _ in probes:
        assert set(metrics) == {"fewshot/1shot", "fewshot/5shot"} and all(0 <= v <= 1 for v in metrics.values())
    assert final["fewshot/5shot"] == probes[-1][0]["fewshot/5shot"]


def test_only_rank_0_probes_and_every_rank_meets_at_the_barrier(memory_tracker):
    from model import create_model
    from orchestrator.train.fewshot_probe import FewShotProbe

    class Session:
        barriers = 0

        def agree_max(self, value):
            Session.barriers += 1
            return value

    model = create_model("mixer_digits", num_classes=3)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(12, 3, 16, 16, generator=g), torch.arange(12) % 3) for _ in range(2)]
    probes = {}
    for rank in (0, 1):
        tracker = memory_tracker()
        probe = FewShotProbe(model, (batches, batches) if rank == 0 else None, torch.device("cpu"), None, every=5,
                             total_steps=12, rank=rank, tracker=tracker, session=Session(), num_classes=3,
                             shots=[1, 2])
        assert [s for s in range(1, 13) if probe.due(s)] == [5, 10, 12]
        assert probe.maybe_run(4) == {} and probe.maybe_run(5, skip=True) == {}
        probes[rank] = (probe.maybe_run(5), tracker.metrics)
    assert set(probes[0][0]) == {"fewshot/1shot", "fewshot/2shot"} and probes[0][1] == [(probes[0][0], 5)]
    assert probes[1] == ({}, [])  # rank 1 waits: no probe, nothing logged
    assert Session.barriers == 2 and model.training  # one barrier per rank; the model's mode kept
    off = FewShotProbe(model, None, torch.device("cpu"), None, every=0, total_steps=12, rank=0, tracker=None,
                       session=Session(), num_classes=3, shots=[1])
    assert not any(off.due(s) for s in range(1, 13))  # 0: off, not even at the end
