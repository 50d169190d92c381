"""The one typed, validated configuration tree of a training run.

A config is built from a preset (a YAML file in orchestrator/config/presets/, or any YAML path) plus
``key=value`` overrides (``optim.lr=3e-3 scaling.num_workers=8``) by orchestrator/config/parse.py; values in
overrides are parsed with yaml.safe_load, so ``true``, ``1e-3``, ``[0.9, 0.999]`` and ``null`` mean what they
look like. Every validation failure raises ConfigError naming the key, the bad value and what would be accepted,
before anything touches Ray, storage or MLflow.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipelines.cli import InputError


def mixer_home() -> Path:
    """Where the embedded default keeps data, runs and the MLflow store (override with MIXER_HOME)."""
    return Path(os.environ.get("MIXER_HOME", Path.home() / ".mixer")).expanduser().resolve()


class ConfigError(InputError, ValueError):
    """A config key has a value that cannot be used; the message names key, value and what is accepted."""


@dataclass
class RunSection:
    name: str = "digits"  # Ray Train run name; re-running with the same name resumes the run
    storage_path: str = ""  # "" -> $MIXER_HOME/runs; local path or s3://bucket/prefix
    seed: int = 0


@dataclass
class ModelSection:
    name: str = "mixer_digits"
    # Overrides of the registry's size fields; None keeps the variant's value.
    img_size: int | None = None
    patch_size: int | None = None
    depth: int | None = None
    hidden_dim: int | None = None  # C
    tokens_mlp_dim: int | None = None  # D_S
    channels_mlp_dim: int | None = None  # D_C
    num_classes: int | None = None  # None -> taken from the dataset manifest
    gelu: Literal["exact", "tanh"] = "exact"
    init: Literal["official", "timm"] = "official"
    head_bias: float | Literal["neg_log_k"] | None = None


@dataclass
class DataSection:
    url: str = ""  # dataset root (with manifest.json); "" -> the embedded digits dataset
    train_split: str = "train"
    val_split: str = "val"
    transform: Literal["inception", "digits"] = "digits"
    loader_workers: int = 1  # DataLoader worker processes per rank
    shuffle_buffer: int = 1000
    max_bad_fraction: float = 0.01
    endpoint_url: str | None = None  # S3-compatible endpoint; None -> AWS_ENDPOINT_URL / FSSPEC_S3_ENDPOINT_URL
    anon: bool = False
    profile: str | None = None
    num_train_samples: int | None = None  # only for --dry-run planning when the dataset is not reachable
    trace_keys_dir: str | None = None  # debug: each rank appends the sample keys of its batches here
    augment_on: Literal["auto", "host", "device"] = "auto"  # batch augmentation; auto: device when use_gpu
    decode_on: Literal["host", "device"] = "host"  # device: JPEGs decoded on the GPU (nvJPEG); needs augment on device
    cache_dir: str | None = None  # node-local shard cache (a local dir on every node); None: read storage each epoch
    cache_max_gb: float = 100.0  # the cache's bound per node; least recently used shards are evicted past it
    # held out of the training split for every choice (Tune, early stopping, best checkpoint): a class-stratified
    # slice chosen by sample key (pipelines/subsets.py), never trained on; evaluated as minival/*
    minival_fraction: float = 0.0
    train_fraction: float = 1.0  # train on this nested, key-chosen subset of the (rest of the) training split
    permute: Literal["none", "patch_pixel", "global"] = "none"  # one fixed input permutation (the paper's study)
    permute_seed: int = 0  # draws data.permute's permutation: the same for every image, rank and resume


@dataclass
class OptimSection:
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    weight_decay: float = 0.1  # decoupled, applied to weights only (not biases or norms)
    clip_norm: float | None = 1.0
    global_batch_size: int = 4096
    micro_batch_size: int | None = None  # per worker and step; None -> global / num_workers


@dataclass
class ScheduleSection:
    epochs: float = 300.0
    warmup_steps: int = 10_000
    decay: Literal["linear", "cosine"] = "linear"
    end_lr_factor: float = 1e-5  # final lr = lr * end_lr_factor (big_vision: 1e-5)


@dataclass
class RegSection:
    randaug_num_ops: int = 2
    randaug_magnitude: int = 15  # 0 disables RandAugment
    randaug_impl: Literal["big_vision", "torchvision"] = "big_vision"  # big_vision: the paper's 16-op version
    mixup_alpha: float = 0.5  # 0 disables mixup
    label_smoothing: float = 0.0
    dropout: float = 0.0
    head_dropout: float = 0.0
    stochastic_depth: float = 0.1
    loss: Literal["softmax", "sigmoid"] = "softmax"


@dataclass
class EvalSetSpec:
    """One more evaluation set (eval.sets), logged as <name>/top1|top5|loss at every evaluation."""

    name: str
    url: str  # dataset root (with manifest.json) whose class indices are the training dataset's
    split: str = "val"
    labels: str | None = None  # ReaL-style label file (JSON: sample key -> list of acceptable labels); path or URL


@dataclass
class EvalSection:
    every_steps: int = 0  # 0 -> once per epoch
    sets: list[EvalSetSpec] = field(default_factory=list)  # more named sets evaluated beside val
    fewshot_every_steps: int = 0  # few-shot linear probe on frozen features every N steps (0: off)
    fewshot_shots: list[int] = field(default_factory=lambda: [1, 5, 10, 25])  # examples per class, per probe


@dataclass
class CheckpointSection:
    every_steps: int = 0  # 0 -> once per epoch
    num_to_keep: int = 2
    # a SIGTERM (to a worker or the driver) is a preemption notice: checkpoint at the next step boundary, wait until
    # it is committed, then restart from it (a worker's) or end the run (the driver's); see train/sigterm.py
    on_sigterm: bool = True
    sigterm_grace_s: float = 25.0  # after the first SIGTERM, exit at once (as a second SIGTERM does) after this


@dataclass
class ScalingSection:
    num_workers: int | list[int] = 2  # N, or [min, max]: elastic (Ray Train starts at min, grows toward max)
    elastic_resize_interval_s: float = 60.0  # how often an elastic run checks whether it can grow
    max_preemptions: int = -1  # restarts after a node preemption notice (-1: always); not counted in max_failures
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 3  # worker-group restarts from the latest checkpoint
    startup_timeout_s: float = 120.0  # how long to wait for the cluster to have room for the workers


@dataclass
class TrainSection:
    bf16: bool = True  # autocast on GPU; ignored on CPU
    compile: bool = False
    log_every_steps: int = 10
    max_steps: int | None = None  # cap the planned steps (smoke runs)
    ema_decay: float | None = None  # EMA of the weights (e.g. 0.9999), evaluated as ema/*; null: off


@dataclass
class TrackingSection:
    enabled: bool = True
    uri: str | None = None  # None -> MLFLOW_TRACKING_URI or sqlite:///$MIXER_HOME/mlflow.db
    experiment: str = "mixer-pretrain"
    parent_run_id: str | None = None  # set by Tune for nested trial runs


@dataclass
class ObserveSection:
    """Where a run's time goes (orchestrator/observe/, README "Where a run's time goes")."""

    system_metrics: bool = True  # CPU, memory, disk, network and GPU metrics of every node, as system/node{N}/...
    system_metrics_interval_s: float = 10.0  # seconds between two samples of a node
    step_breakdown: bool = True  # perf/*: data wait, forward+backward, optimizer, ... per logging window
    profile_steps: list[int] | None = None  # [start, stop]: torch.profiler on rank 0 for steps start+1..stop
    data_delay_s: float = 0.0  # diagnostic: every rank sleeps this long before each batch (counts as data wait)


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    reg: RegSection = field(default_factory=RegSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    train: TrainSection = field(default_factory=TrainSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    observe: ObserveSection = field(default_factory=ObserveSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def resolved_storage_path(self) -> str:
        return self.run.storage_path or str(mixer_home() / "runs")


# ---------------------------------------------------------------- validation ------------------------------


def require(ok: bool, key: str, value: Any, accepted: str) -> None:
    """Unless `ok`: ConfigError naming the key, the bad value and what would be accepted."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not accepted; expected {accepted}")


def model_overrides(cfg: Config, num_classes: int) -> dict[str, Any]:
    """The keyword overrides passed to model.create_model for this config."""
    m = cfg.model
    out: dict[str, Any] = {
        "num_classes": num_classes,
        "gelu": m.gelu,
        "init": m.init,
        "drop_rate": cfg.reg.dropout,
        "head_drop_rate": cfg.reg.head_dropout,
        "drop_path_rate": cfg.reg.stochastic_depth,
    }
    if m.head_bias is not None:
        out["head_bias"] = m.head_bias
    for key in ("img_size", "patch_size", "depth", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim"):
        value = getattr(m, key)
        if value is not None:
            out[key] = value
    return out

