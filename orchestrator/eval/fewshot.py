"""Few-shot linear evaluation as big_vision does it (the paper's cheap proxy).

Frozen pre-logits, standardised with the shots' own mean/std, plus a constant bias feature; closed-form ridge
regression onto {-1, +1} one-hot targets with l2 = 2^10; k shots per class; accuracy averaged over seeds.
`probe` is the same on a model in training: the shots are drawn from the first examples of each class only (as
big_vision's ImageNet few-shot draws from train[:65000]), so a probe does not read the whole training split.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2 = 2.0**10


def ridge_fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = DEFAULT_L2):
    """Returns (mean, std, W) so that predictions are argmax(((x - mean) / std | 1) @ W)."""
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    targets = torch.full((len(x), num_classes), -1.0, dtype=x.dtype)
    targets[torch.arange(len(x)), y] = 1.0
    gram = z.T @ z + l2 * torch.eye(z.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(gram, z.T @ targets)
    return mean, std, w


def ridge_predict(x: torch.Tensor, mean, std, w) -> torch.Tensor:
    z = (x.double() - mean) / std
    z = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
    return (z @ w).argmax(1)


def sample_shots(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """Indices of `shots` examples of every class (fewer where a class has fewer), chosen by `seed`."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:shots]])
    return torch.cat(picked)


def fewshot_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    shots: Iterable[int] = DEFAULT_SHOTS, seeds: Iterable[int] = (0, 1, 2), l2: float = DEFAULT_L2,
) -> dict[int, float]:
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    out = {}
    for k in shots:
        accs = []
        for seed in seeds:
            idx = sample_shots(train_y, k, seed)
            mean, std, w = ridge_fit(train_x[idx], train_y[idx], num_classes, l2)
            accs.append((ridge_predict(test_x, mean, std, w) == test_y).double().mean().item())
        out[k] = sum(accs) / len(accs)
    return out


@torch.no_grad()
def extract_features(model, batches, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logits (forward_head with pre_logits=True) and labels over an iterable of (images, labels)."""
    model.eval()
    feats, labels = [], []
    for x, y in batches:
        feats.append(model.forward_head(model.forward_features(x.to(device)), pre_logits=True).float().cpu())
        labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels)


POOL_PER_SHOT = 4  # probe: the shots are drawn from the first POOL_PER_SHOT x max(shots) examples of each class


def probe(model, train_batches: Iterable, test_batches: Iterable, device: torch.device, num_classes: int,
          shots: Iterable[int] = DEFAULT_SHOTS, seeds: Iterable[int] = (0, 1, 2),
          autocast_dtype: torch.dtype | None = None) -> dict[int, float]:
    """fewshot_accuracy of a model in training: pre-logits of the first POOL_PER_SHOT x max(shots) examples of each
    class of `train_batches` (read in order until every class has them, or to its end) against all of
    `test_batches`. The model's train/eval mode is kept."""
    shots = list(shots)
    per_class = POOL_PER_SHOT * max(shots)
    was_training = model.training
    try:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            batches = iter(train_batches)
            try:
                train_x, train_y = extract_features(model, _until_full(batches, num_classes, per_class), device)
            finally:
                getattr(batches, "close", lambda: None)()  # a loader's iterator: its worker processes go now
            test_x, test_y = extract_features(model, test_batches, device)
    finally:
        model.train(was_training)
    keep = torch.cat([(train_y == c).nonzero().flatten()[:per_class] for c in train_y.unique().tolist()])
    return fewshot_accuracy(train_x[keep], train_y[keep], test_x, test_y, shots=shots, seeds=seeds)


def _until_full(batches: Iterator, num_classes: int, per_class: int) -> Iterator:
    counts = torch.zeros(num_classes, dtype=torch.long)
    for x, y, *_ in batches:
        yield x, y
        counts += torch.bincount(y.cpu(), minlength=num_classes)[:num_classes]
        if counts.min() >= per_class:
            return
