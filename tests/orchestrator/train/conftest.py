"""Set-ups shared by the training loop's tests: the digits at one rank (config, job, model), a small slice of
the digits for runs through the loop, and an in-memory tracker. Module-scoped, as each module had them: one
module's changes to the model do not reach another's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits config and dataset (written once), one rank: `cfg`, `job`, `model` (and its `model_cfg`)."""
    from model import create_model
    from orchestrator.config.load import load_config
    from orchestrator.config.tree import model_overrides
    from orchestrator.train.launch import resolve_data
    from orchestrator.train.loop import Job

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXER_HOME", str(home))
        cfg = load_config("digits", ["scaling.num_workers=1", "data.loader_workers=0",
                                     "tracking.enabled=false"])
        data = resolve_data(cfg)
    job = Job(data.url, data.num_classes, data.train_samples, None, None, data.storage_options)
    model = create_model(cfg.model.name, **model_overrides(cfg, job.num_classes))
    return SimpleNamespace(cfg=cfg, job=job, model=model, model_cfg=model.cfg)


@pytest.fixture(scope="module")
def digits_slice(tmp_path_factory) -> str:
    """The URL of a small slice of the digits: one train shard (256 images), the short val shard (~100)."""
    from orchestrator.config.tree import mixer_home
    from pipelines.digits import ensure_digits_dataset
    from pipelines.manifest import load_manifest, write_manifest

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXER_HOME", str(home))
        full = load_manifest(ensure_digits_dataset(str(mixer_home() / "data" / "digits")))
    full.splits = {"train": full.splits["train"][:1], "val": full.splits["val"][-1:]}  # absolute shard URLs
    (home / "slice").mkdir()
    write_manifest(full, str(home / "slice"))
    return str(home / "slice")


class MemoryTracker:
    """Rank 0's tracker in memory: keeps what log_metrics gets, as (metrics, step); other calls do nothing."""

    def __init__(self):
        self.metrics = []

    def log_metrics(self, metrics, step):
        self.metrics.append((dict(metrics), step))

    def __getattr__(self, name):  # log_params, flush, unlogged_summary, ...: nothing to keep
        return lambda *args, **kwargs: None


@pytest.fixture
def memory_tracker():
    """The MemoryTracker class: call it for each tracker the test needs."""
    return MemoryTracker
