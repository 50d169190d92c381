import torch

from orchestrator.eval.fewshot import fewshot_accuracy, ridge_fit, ridge_predict, sample_shots


def _blobs(n_per_class, classes=5, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=g)
    return x, y


def test_ridge_solves_separable_problem_and_matches_closed_form():
    x, y = _blobs(20)
    mean, std, w = ridge_fit(x, y, 5, l2=1e-3)
    assert (ridge_predict(x, mean, std, w) == y).all()
    z = torch.cat([(x.double() - mean) / std, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    t = -torch.ones(len(x), 5, dtype=torch.float64)
    t[torch.arange(len(x)), y] = 1
    grad = z.T @ (z @ w - t) + 1e-3 * w  # normal equations hold at the solution
    assert grad.abs().max() < 1e-6


def test_shots_sampling_per_class_and_seeded():
    _, y = _blobs(30)
    idx = sample_shots(y, 5, seed=1)
    assert torch.bincount(y[idx]).tolist() == [5] * 5
    assert torch.equal(idx, sample_shots(y, 5, seed=1))
    assert not torch.equal(idx, sample_shots(y, 5, seed=2))


def test_fewshot_accuracy_above_chance_and_rises_with_shots():
    xtr, ytr = _blobs(40, seed=0)
    xte, yte = _blobs(40, seed=0)
    xte = xte + torch.randn_like(xte) * 2.0
    acc = fewshot_accuracy(xtr, ytr, xte, yte, shots=(1, 25))
    assert acc[1] > 0.3 and acc[25] > 0.8
    assert acc[25] >= acc[1]
