"""The training step and schedule, in plain PyTorch (no Ray)."""

import copy

import pytest
import torch
from gloo_ranks import leave_group
from torch import nn

from orchestrator.config.tree import ScheduleSection
from orchestrator.train.optim import build_scheduler, lr_factor, param_groups
from orchestrator.train.step import classification_loss, train_step


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 5))


def _opt(model):
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_accumulation_equals_one_big_batch():
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 5, (8,))
    a, b = _tiny(), _tiny()
    oa, sa = _opt(a)
    ob, sb = _opt(b)
    ra = train_step(a, [(x, y)], oa, sa, clip_norm=None)
    rb = train_step(b, [(x[:4], y[:4]), (x[4:], y[4:])], ob, sb, clip_norm=None)
    assert torch.allclose(ra.grad_norm, rb.grad_norm, atol=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=False):
        assert torch.allclose(pa, pb, atol=1e-6)
    assert ra.images == rb.images == 8


def test_clipping_bounds_the_update_and_reports_unclipped_norm():
    model = _tiny()
    before = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    x, y = torch.randn(4, 3, 2, 2) * 100, torch.randint(0, 5, (4,))
    r = train_step(model, [(x, y)], opt, sched, clip_norm=0.01)
    assert r.grad_norm > 0.01
    delta = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), before.parameters(), strict=False)))
    assert delta <= 0.01 + 1e-6


def test_weight_decay_only_on_weights():
    groups = param_groups(_tiny(), 0.1)
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_schedule_warmup_then_linear_decay():
    cfg = ScheduleSection(warmup_steps=10, decay="linear", end_lr_factor=0.0)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(55, 100, cfg) == pytest.approx(0.5)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.0)
    cos = ScheduleSection(warmup_steps=0, decay="cosine", end_lr_factor=0.1)
    assert lr_factor(0, 100, cos) == pytest.approx(1.0)
    assert lr_factor(50, 100, cos) == pytest.approx(0.55)
    opt = torch.optim.SGD(_tiny().parameters(), lr=2.0)
    sched = build_scheduler(opt, 100, cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4)


def test_losses_accept_soft_targets():
    logits = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    onehot = torch.nn.functional.one_hot(y, 5).float()
    for kind in ("softmax", "sigmoid"):
        assert torch.allclose(classification_loss(logits, y, kind), classification_loss(logits, onehot, kind))
    # sigmoid cross-entropy sums over classes (big_vision), so it exceeds the mean-over-classes form
    assert classification_loss(logits, y, "sigmoid") > nn.functional.binary_cross_entropy_with_logits(logits, onehot)


def _unequal_share_worker(rank: int, world: int, store: str, out: str) -> None:
    """One rank of a gloo group: its share of a 12-sample global batch over 3 stream slots of 4 (slots k with
    k % world == rank), in micro-batches of at most 4, weighted by samples / global batch x world."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    # a file store: no port to race for on a shared machine
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    x, y = _global_batch()
    mine = [k for k in range(3) if k % world == rank]
    micro = [(x[4 * k: 4 * k + 4], y[4 * k: 4 * k + 4]) for k in mine]
    model = DistributedDataParallel(_tiny())
    opt, sched = _opt(model)
    train_step(model, micro, opt, sched, clip_norm=1.0, weights=[len(mb[1]) / 12 * world for mb in micro])
    if rank == 0:
        torch.save(model.module.state_dict(), out)
    leave_group(dist)  # every rank done with gloo; no teardown (tests/gloo_ranks.py)


def _global_batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(12, 3, 2, 2, generator=g), torch.randint(0, 5, (12,), generator=g)


@pytest.mark.parametrize("world", [2, 3])
def test_unequal_shares_update_equals_one_process_on_the_global_batch(world, tmp_path):
    """2 ranks hold 8 and 4 of the 12 samples (unequal), 3 ranks 4 each: after one DDP step with the loop's
    weights the parameters equal one process's step on all 12 samples (clipping included)."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "ddp.pt")
    mp.spawn(_unequal_share_worker, args=(world, str(tmp_path / "store"), out), nprocs=world, join=True)
    x, y = _global_batch()
    single = _tiny()
    opt, sched = _opt(single)
    train_step(single, [(x, y)], opt, sched, clip_norm=1.0)
    got = torch.load(out, weights_only=True)
    for name, p in single.state_dict().items():
        assert torch.allclose(got[name], p, atol=1e-6), name
