"""The EMA of the weights (`train.ema_decay`, orchestrator/train/ema.py) from the formula to the CLIs.

- the formula, by hand: ema = decay * ema + (1 - decay) * w after each of 3 optimizer steps, from the weights it
  started on; buffers copied;
- the evaluator measures it beside the raw weights (ema/<set>/*, its own line) and keeps best_top1 the raw one;
- the loop (digits, a few steps, no Ray): one run through four segments sharing a run directory,
  2 ranks (gloo, DDP) from scratch -> 1 rank -> 1 rank with train.ema_decay off -> 1 rank with it on again:
  both ranks hold the same EMA although their models were initialised differently (DDP's broadcast comes
  first), every checkpoint's EMA is the previous one's plus one update with that step's weights, a resume
  restores exactly the saved EMA at another world size, and a checkpoint without one starts it from its
  weights with a note;
- evaluate and finetune read the EMA with --weights ema and exit 2 naming the flag where a checkpoint has none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from gloo_ranks import leave_group
from torch import nn

from orchestrator.train.ema import WeightEma

DECAY = 0.9


# ---------------------------------------------------------------------------------------- the formula ---


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1).double()
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0, 2.0]]))
            self.linear.bias.fill_(3.0)

    def forward(self, x):
        self.seen += 1
        return self.linear(x)


def test_three_steps_follow_the_formula_by_hand():
    """SGD lr 1 on out.sum() at x = [1, 1]: every parameter drops by 1 a step; w: [1, 2] -> [0, 1] -> [-1, 0] ->
    [-2, -1], b: 3 -> 2 -> 1 -> 0. With decay 0.9 from w_0 (AveragedModel's copying first update is spent at
    the start): ema_w = [0.9, 1.9], [0.71, 1.71], [0.439, 1.439]; ema_b = 2.9, 2.71, 2.439."""
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ema = WeightEma(model, DECAY)
    assert torch.equal(ema.module.linear.weight, model.linear.weight)  # starts at w_0
    expected = [([0.9, 1.9], 2.9), ([0.71, 1.71], 2.71), ([0.439, 1.439], 2.439)]
    for step, (w, b) in enumerate(expected, 1):
        model(torch.ones(1, 2, dtype=torch.float64)).sum().backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        assert torch.allclose(ema.module.linear.weight, torch.tensor([w], dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.allclose(ema.module.linear.bias, torch.tensor([b], dtype=torch.float64), rtol=0, atol=1e-12)
        assert ema.module.seen == step  # buffers are copied from the model, not averaged
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert set(ema.state_dict()) == set(model.state_dict())  # the model's own keys: loads like "model"

    restored = WeightEma(_Tiny(), DECAY)
    restored.load_state_dict(ema.state_dict())
    restored.model.load_state_dict(model.state_dict())
    restored.update()  # averages into the loaded EMA (the copying first update is not repeated)
    assert torch.allclose(restored.module.linear.bias, torch.tensor([DECAY * 2.439], dtype=torch.float64))
    with pytest.raises(ValueError, match="not in"):
        WeightEma(model, 1.0)


# ---------------------------------------------------------------------------------------- the evaluator ---


class _Tracker:
    def __init__(self):
        self.metrics: list[tuple[dict, int]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((dict(metrics), step))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits dataset (written once) and a config for short runs that may run at 1 or 2 ranks."""
    from orchestrator.config.load import load_config
    from orchestrator.train.launch import resolve_data
    from orchestrator.train.loop import Job

    home = tmp_path_factory.mktemp("ema-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXER_HOME", str(home))
        cfg = load_config("digits", [
            "scaling.num_workers=[1,2]", "data.loader_workers=0", "tracking.enabled=false", "schedule.epochs=1",
            "schedule.warmup_steps=2", "eval.every_steps=100000", "checkpoint.every_steps=1",
            "checkpoint.num_to_keep=20", "train.log_every_steps=100", f"train.ema_decay={DECAY}",
            "observe.system_metrics=false",
        ])
        data = resolve_data(cfg)
    job = Job(data.url, data.num_classes, data.train_samples, None, None, data.storage_options)
    return SimpleNamespace(cfg=cfg, job=job, home=home)


def test_evaluator_measures_the_ema_beside_the_raw_weights(digits, capsys):
    import copy

    from model import create_model
    from orchestrator.config.tree import model_overrides
    from orchestrator.train.batches import build_loaders
    from orchestrator.train.periodic import Evaluator
    from orchestrator.train.startup import PROGRESS_LINES

    model = create_model(digits.cfg.model.name, **model_overrides(digits.cfg, digits.job.num_classes))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        ema.head.weight.zero_()  # a constant head: its loss is exactly ln(10), unlike the raw model's
        ema.head.bias.zero_()
        model.head.weight.normal_(generator=torch.Generator().manual_seed(0))
    val = build_loaders(digits.cfg, digits.job, model.cfg, 0, 1, torch.device("cpu"))[1]["val"]
    tracker = _Tracker()
    ev = Evaluator(model, {"val": val}, torch.device("cpu"), None, every=5, total_steps=5, rank=0, tracker=tracker,
                   compute=lambda step: {}, ema=ema)
    out = ev.maybe_run(5)
    assert set(out) == {f"{w}val/{k}" for w in ("", "ema/") for k in ("top1", "top5", "loss")}
    assert out["ema/val/loss"] == pytest.approx(torch.log(torch.tensor(10.0)).item(), abs=1e-5)
    assert out["ema/val/loss"] != out["val/loss"] and ev.best_top1 == out["val/top1"]  # best_top1: raw weights
    assert tracker.metrics == [(out, 5)]
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"eval step 5: top-1 [0-9.]+ top-5 [0-9.]+ loss [0-9.]+ \(360 images\)", lines[0])
    assert re.fullmatch(r"eval step 5 ema val: top-1 [0-9.]+ top-5 [0-9.]+ loss [0-9.]+ \(360 images\)", lines[1])
    assert all(re.match(PROGRESS_LINES, line) for line in lines)  # passed whole by Ray's log deduplication


# ------------------------------------------------------------------------------- the loop, 2 and 1 ranks ---


def _segment_rank(rank: int, world: int, store: str, cfg_dict: dict, job: dict, run_dir: str, out: str) -> None:
    """One rank of a gloo group running the loop over a LocalSession with DDP: its model and EMA at the end."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from orchestrator.config.parse import config_from_dict
    from orchestrator.train import loop
    from orchestrator.train.session import LocalSession

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)

    class GlooSession(LocalSession):
        world_rank, world_size = rank, world

        def prepare_model(self, model):
            return DistributedDataParallel(model)  # broadcasts rank 0's weights, as Ray Train's prepare_model

    _run_segment(config_from_dict(cfg_dict), GlooSession(run_dir, num_to_keep=20, device="cpu"),
                 loop.Job(**job), f"{out}.{rank}")
    leave_group(dist)  # every rank done with gloo; no teardown (tests/gloo_ranks.py)


def _run_segment(cfg, session, job, out: str) -> None:
    """run_training, keeping what the Run held: its EMA right after the build (the restored one) and at the end."""
    from orchestrator.train import loop

    built = []
    real_build = loop.build_run

    def build(*args, **kwargs):
        run = real_build(*args, **kwargs)
        built.append(run)
        ema = run.state.ema
        run.start_ema = None if ema is None else {k: v.clone() for k, v in ema.state_dict().items()}
        return run

    loop.build_run = build
    try:
        loop.run_training(cfg, session, job)
    finally:
        loop.build_run = real_build
    state = built[0].state
    torch.save({"start_ema": built[0].start_ema, "model": state.model.state_dict(), "step": state.step,
                "ema": None if state.ema is None else state.ema.state_dict()}, out)


def _with(cfg, **train):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def _state(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / f"checkpoint_{step:08d}" / "state.pt", weights_only=True)


@pytest.fixture(scope="module")
def chain(digits, tmp_path_factory):
    """Four segments of one run: 2 ranks 0 -> 2 (EMA on), 1 rank 2 -> 4 (on), 1 rank 4 -> 5 (off), 1 rank 5 -> 6 (on).
    One spawned group only: its processes' start costs more than the steps."""
    import torch.multiprocessing as mp

    from orchestrator.train.session import LocalSession

    base = tmp_path_factory.mktemp("ema-chain")
    run_dir = base / "run"
    job = dataclasses.asdict(digits.job)

    def two_ranks(cfg, name):
        mp.spawn(_segment_rank, args=(2, str(base / f"store-{name}"), cfg.to_dict(), job, str(run_dir),
                                      str(base / name)), nprocs=2, join=True)
        return [torch.load(f"{base / name}.{r}", weights_only=True) for r in (0, 1)]

    def one_rank(cfg, name):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            _run_segment(cfg, LocalSession(str(run_dir), num_to_keep=20, device="cpu"), digits.job, str(base / name))
        return torch.load(base / name, weights_only=True), printed.getvalue()

    fresh = two_ranks(_with(digits.cfg, max_steps=2), "fresh")
    narrow, narrow_printed = one_rank(_with(digits.cfg, max_steps=4), "narrow")
    off, _ = one_rank(_with(digits.cfg, max_steps=5, ema_decay=None), "off")
    on, on_printed = one_rank(_with(digits.cfg, max_steps=6), "on")
    return SimpleNamespace(run_dir=run_dir, fresh=fresh, narrow=narrow, narrow_printed=narrow_printed, off=off,
                           on=on, on_printed=on_printed, data_url=digits.job.dataset_url, home=digits.home)


def _assert_one_update(run_dir: Path, step: int, previous_ema: dict | None = None) -> None:
    """checkpoint `step`'s EMA = DECAY x the previous EMA (default: checkpoint step-1's) + (1 - DECAY) x its weights."""
    state = _state(run_dir, step)
    previous_ema = previous_ema if previous_ema is not None else _state(run_dir, step - 1)["ema"]
    for name, w in state["model"].items():
        want = DECAY * previous_ema[name] + (1 - DECAY) * w
        assert torch.allclose(state["ema"][name], want, rtol=0, atol=1e-6), (step, name)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_hold_the_same_ema_from_differently_initialised_models(chain):
    rank0, rank1 = chain.fresh
    assert rank0["step"] == rank1["step"] == 2
    assert _equal(rank0["ema"], rank1["ema"]) and _equal(rank0["model"], rank1["model"])
    assert _equal(rank0["ema"], _state(chain.run_dir, 2)["ema"])  # what rank 0 wrote is every rank's
    assert not _equal(rank0["ema"], rank0["model"])
    _assert_one_update(chain.run_dir, 2)  # an update after every step, in the loop


def test_a_resume_restores_the_saved_ema_at_another_world_size_and_goes_on(chain):
    # 1 rank from checkpoint 2 (written by 2 ranks): exactly the saved EMA, then one update a step
    assert _equal(chain.narrow["start_ema"], _state(chain.run_dir, 2)["ema"]) and chain.narrow["step"] == 4
    assert "[resume] from checkpoint_00000002" in chain.narrow_printed and "[ema]" not in chain.narrow_printed
    _assert_one_update(chain.run_dir, 3)
    _assert_one_update(chain.run_dir, 4)


def test_a_checkpoint_without_an_ema_starts_it_from_its_weights_with_a_note(chain):
    assert "ema" not in _state(chain.run_dir, 5) and chain.off["ema"] is None  # train.ema_decay off: none kept
    assert _equal(chain.on["start_ema"], _state(chain.run_dir, 5)["model"])
    assert "[ema] checkpoint_00000005 holds no EMA of the weights" in chain.on_printed
    assert "the EMA starts from its weights at step 5" in chain.on_printed
    _assert_one_update(chain.run_dir, 6, previous_ema=_state(chain.run_dir, 5)["model"])


# ------------------------------------------------------------------------------------ evaluate, finetune ---


def test_evaluate_and_finetune_read_the_ema_with_weights_ema(chain, tmp_path, monkeypatch, capsys):
    from orchestrator import evaluate, finetune
    from orchestrator.eval.sources import load_source

    latest = _state(chain.run_dir, 6)
    assert _equal(load_source(str(chain.run_dir), weights="ema").state_dict, latest["ema"])
    assert _equal(load_source(str(chain.run_dir)).state_dict, latest["model"])

    args = ["--from", str(chain.run_dir), "--data", chain.data_url, "--no-tracking"]
    assert evaluate.main(args + ["--weights", "ema"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint_00000006/state.pt" in out and "step 6, EMA weights" in out
    ema_top1 = float(re.search(r"top-1 ([0-9.]+)", out.split("\ndata")[1]).group(1))
    assert evaluate.main(args) == 0
    out = capsys.readouterr().out
    assert "EMA weights" not in out and float(re.search(r"\ntop-1 ([0-9.]+)", out).group(1)) != ema_top1

    src = load_source(str(chain.run_dir), weights="ema")
    results = evaluate.Results(src, chain.data_url, "val", {"top1": 0.5, "top5": 1.0, "loss": 2.0}, {5: 0.4},
                               None, None, 0.0)
    assert set(evaluate._metrics(results, per_split=False)) == {"ema/eval/top1", "ema/eval/top5", "ema/eval/loss",
                                                                "ema/fewshot/5shot"}
    assert "ema/eval/val/top1" in evaluate._metrics(results, per_split=True)

    monkeypatch.setenv("MIXER_HOME", str(chain.home))
    assert finetune.main(["--from", str(chain.run_dir), "--weights", "ema", "--dry-run"]) == 0
    assert "step 6, EMA weights" in capsys.readouterr().out
    assert finetune.source_tags(src, 2, True)["finetune.source_weights"] == "ema"


def test_weights_ema_without_an_ema_exits_2_naming_the_flag(chain, tmp_path, monkeypatch, capsys):
    from orchestrator import evaluate, finetune

    # a run directory whose latest complete checkpoint has no EMA: never an older one that has
    run = tmp_path / "run"
    run.mkdir()
    for step in (4, 5):
        shutil.copytree(chain.run_dir / f"checkpoint_{step:08d}", run / f"checkpoint_{step:08d}")
    plain = tmp_path / "plain.pt"
    torch.save(_state(chain.run_dir, 6)["model"], plain)
    monkeypatch.setenv("MIXER_HOME", str(chain.home))
    for source, what in ((run, "checkpoint_00000005 holds no EMA"), (plain, "a plain state dict")):
        for main, extra in ((evaluate.main, ["--data", chain.data_url, "--no-tracking"]),
                            (finetune.main, ["--dry-run"])):
            assert main(["--from", str(source), "--weights", "ema", *extra]) == 2
            out, err = capsys.readouterr()
            assert err.startswith("error: --weights ema: ") and what in err, err
            assert "accepted: --weights raw (the default)" in err and "train.ema_decay" in err
            assert "Traceback" not in err and "top-1" not in out
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--from", str(run), "--weights", "average"])
    assert e.value.code == 2 and "invalid choice: 'average'" in capsys.readouterr().err
