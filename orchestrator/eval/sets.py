"""eval.sets on the driver: every set's data and label file checked before anything starts, and what the workers
need to read them.

For each `eval.sets[i]` (orchestrator/config/tree.py EvalSetSpec): the dataset at `url` must be reachable with a
manifest holding `split`, and its class names must be the training dataset's (so that a label index means the same
class to the model); a label file (`labels`) must exist, parse as a JSON object of sample key -> list of class
indices in [0, number of classes) (orchestrator/eval/real.py), and name only keys of that split. Each failure is a
ConfigError (exit 2) naming the key, its value and what is accepted. `resolve_eval_sets` returns one plain dict per
set (`ResolvedEvalSet`), passed to every worker in the Job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.config.tree import ConfigError, EvalSetSpec
from orchestrator.eval.real import load_label_file
from pipelines.manifest import Manifest, load_manifest
from pipelines.redaction import redact_url
from pipelines.sample_index import load_sample_index
from pipelines.storage import check_dataset_reachable

LABELS_ACCEPTED = ("null, or the path/URL of a JSON object mapping the set's sample keys to lists of class indices "
                   "(ReaL style)")


@dataclass
class ResolvedEvalSet:
    """One eval set as the workers read it (plain data: it travels in the Job)."""

    name: str
    url: str
    split: str
    storage_options: dict
    labels: str | None = None  # the label file's URL
    labels_options: dict | None = None


def resolve_eval_sets(specs: Sequence[EvalSetSpec], class_names: Sequence[str],
                      options_for: Callable[[str], dict[str, Any]]) -> list[dict[str, Any]]:
    """Check every set (ConfigError naming eval.sets[i].<field>); `options_for(url)`: the run's storage options for
    a URL (orchestrator/train/launch.py storage_options)."""
    return [asdict(_resolve(f"eval.sets[{i}]", spec, list(class_names), options_for)) for i, spec in enumerate(specs)]


def _resolve(key: str, spec: EvalSetSpec, class_names: list[str],
             options_for: Callable[[str], dict[str, Any]]) -> ResolvedEvalSet:
    url, opts = spec.url, options_for(spec.url)
    try:
        check_dataset_reachable(url, opts, want_file="manifest.json")
        manifest = load_manifest(url, opts)
    except Exception as e:
        raise ConfigError(f"{key}.url={redact_url(url)!r} cannot be used: {e}; expected a dataset root with a "
                          "manifest.json (python -m pipelines.write_shards folder SRC_DIR URL --split val)") from None
    if spec.split not in manifest.splits:
        raise ConfigError(f"{key}.split={spec.split!r} is not in the dataset at {redact_url(url)}; splits there: "
                          f"{sorted(manifest.splits)}")
    if manifest.class_names != class_names:
        raise ConfigError(
            f"{key}.url={redact_url(url)!r} has other classes than the training dataset ({_classes(manifest.class_names)} "
            f"vs {_classes(class_names)}); expected a set whose class indices are the training dataset's: write it "
            "with python -m pipelines.write_shards folder SRC_DIR URL --class-names-from DATA_URL")
    resolved = ResolvedEvalSet(spec.name, url, spec.split, opts)
    if spec.labels is not None:
        resolved.labels, resolved.labels_options = spec.labels, options_for(spec.labels)
        _check_labels(f"{key}.labels", spec.labels, resolved, manifest, len(class_names))
    return resolved


def _check_labels(key: str, labels_url: str, s: ResolvedEvalSet, manifest: Manifest, num_classes: int) -> None:
    where = f"{key}={redact_url(labels_url)!r}"
    try:
        check_dataset_reachable(labels_url, s.labels_options)  # seconds, not the reads' retries, when it is away
        labels = load_label_file(labels_url, s.labels_options, num_classes)
    except Exception as e:  # LabelFileError, or the storage's own error
        raise ConfigError(f"{where} cannot be used: {e}; expected {LABELS_ACCEPTED}") from None
    keys = sample_keys(s.url, s.split, s.storage_options, manifest)
    strangers = sorted(set(labels) - keys)
    if strangers:
        shown = ", ".join(repr(k) for k in strangers[:3]) + (", ..." if len(strangers) > 3 else "")
        raise ConfigError(f"{where} names {len(strangers)} key(s) that are not in split {s.split!r} of "
                          f"{redact_url(s.url)} ({shown}); expected {LABELS_ACCEPTED}")


def sample_keys(url: str, split: str, storage_options: dict, manifest=None) -> set[str]:
    """The sample keys of a split: its sample index (pipelines/sample_index.py; the shards are read once when the
    dataset has none)."""
    return load_sample_index(url, split, storage_options, manifest=manifest).key_set()


def _classes(names: Sequence[str]) -> str:
    shown = ", ".join(map(str, names[:3])) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} classes: {shown}"
