"""ReaL-style relabelled evaluation ("Are we done with ImageNet?", Beyer et al. 2020): every image of a set has a
list of acceptable labels, possibly empty.

- top-1 counts an image when its top prediction is in its list; top-5 when any of its top 5 is;
- both are taken over the images whose list is non-empty: an empty list (or no entry) leaves the image out;
- the loss stays the cross-entropy against the shard's own label, over all images (orchestrator/eval/metrics.py).

A label file is a JSON object: sample key (the shards' `__key__`) -> list of class indices. `load_label_file` reads
and checks one; `ReaLSet(loader, labels)` is an evaluation set whose loader yields (images, labels, keys)
(pipelines.loader.ShardLoader(return_keys=True)); `evaluate` scores it with `real_hits`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from pipelines.redaction import redact_url, scrub
from pipelines.storage import read_bytes


class LabelFileError(ValueError):
    """A label file that cannot be used; the message says what is wrong with it."""


def parse_label_file(data: bytes | str, num_classes: int | None = None) -> dict[str, tuple[int, ...]]:
    """{key: labels} from a label file's bytes: a JSON object whose values are lists of integers (in
    [0, num_classes) when given); LabelFileError naming the first entry that is not."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LabelFileError(f"it is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise LabelFileError(f"it holds a JSON {type(doc).__name__}, not an object of sample key -> list of labels")
    out: dict[str, tuple[int, ...]] = {}
    for key, labels in doc.items():
        if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise LabelFileError(f"its entry {key!r}: {_short(labels)} is not a list of integers")
        bad = [v for v in labels if v < 0 or (num_classes is not None and v >= num_classes)]
        if bad:
            limit = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            raise LabelFileError(f"its entry {key!r} has label {bad[0]}, outside {limit}")
        out[key] = tuple(labels)
    return out


def load_label_file(url: str, storage_options: Mapping[str, Any] | None = None,
                    num_classes: int | None = None) -> dict[str, tuple[int, ...]]:
    """parse_label_file of the file at `url` (a path or any fsspec URL); LabelFileError when it cannot be read."""
    try:
        data = read_bytes(url, storage_options)
    except FileNotFoundError:
        raise LabelFileError(f"no such file: {redact_url(url)}") from None
    except Exception as e:
        raise LabelFileError(f"cannot read it: {type(e).__name__}: {scrub(str(e), storage_options)}") from None
    return parse_label_file(data, num_classes)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


class ReaLSet:
    """An evaluation set scored against label lists: iterates its loader's (images, labels, keys)."""

    def __init__(self, loader: Iterable[tuple[torch.Tensor, torch.Tensor, Sequence[str]]],
                 labels: Mapping[str, Sequence[int]]):
        self.loader, self.labels = loader, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, Sequence[str]]]:
        return iter(self.loader)


def real_hits(logits: torch.Tensor, keys: Sequence[str], labels: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """(top-1 hits, top-5 hits, images scored) of a batch as a float64 tensor on the logits' device: an image is
    scored when its list is non-empty; a key without an entry counts as an empty list."""
    n, num_classes = logits.shape
    accepted = torch.zeros(n, num_classes, dtype=torch.bool)
    for i, key in enumerate(keys):
        ok = labels.get(key, ())
        if ok:
            accepted[i, list(ok)] = True
    accepted = accepted.to(logits.device)
    top = logits.topk(min(5, num_classes), dim=-1).indices
    hit = accepted.gather(1, top)
    scored = accepted.any(dim=-1)
    return torch.stack([hit[:, 0].sum(), hit.any(dim=-1).sum(), scored.sum()]).double()
