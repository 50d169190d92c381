"""Range and cross-field checks of a Config: each names the key, the bad value and what would be accepted.

The checks across sections live here, with the quantities they need (the worker range, the data's stream slots,
the batch split); the run's plan (orchestrator/train/plan.py) takes them from here.
"""

from __future__ import annotations

import math

from orchestrator.config.tree import Config, ConfigError, model_overrides, require


def validate(cfg: Config) -> None:
    """Range checks and cross-field checks; the model's own sizes are checked by model.get_config."""
    from model import get_config  # the model layer owns its own validation

    r = cfg.run
    require(bool(r.name) and "/" not in r.name, "run.name", r.name, "a non-empty name without '/'")
    o = cfg.optim
    require(o.lr > 0, "optim.lr", o.lr, "a positive number")
    require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas, "two numbers in [0, 1)")
    require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0")
    require(o.clip_norm is None or o.clip_norm > 0, "optim.clip_norm", o.clip_norm, "a positive number or null")
    require(o.momentum >= 0, "optim.momentum", o.momentum, "a number >= 0")
    require(o.global_batch_size > 0, "optim.global_batch_size", o.global_batch_size, "a positive integer")
    s = cfg.scaling
    n = s.num_workers
    require(isinstance(n, int) or len(n) == 2, "scaling.num_workers", n,
            "an integer >= 1, or [min, max] with 1 <= min <= max (elastic)")
    require(s.elastic_resize_interval_s > 0, "scaling.elastic_resize_interval_s", s.elastic_resize_interval_s,
            "a number of seconds > 0")
    require(s.max_preemptions >= -1, "scaling.max_preemptions", s.max_preemptions, "-1 (always) or an integer >= 0")
    require(s.cpus_per_worker >= 0, "scaling.cpus_per_worker", s.cpus_per_worker, "a number >= 0")
    require(s.max_failures >= -1, "scaling.max_failures", s.max_failures, "-1 (forever) or an integer >= 0")
    require(s.startup_timeout_s >= 0, "scaling.startup_timeout_s", s.startup_timeout_s, "a number of seconds >= 0")
    check_batch_split(cfg)
    sc = cfg.schedule
    require(sc.epochs > 0, "schedule.epochs", sc.epochs, "a positive number")
    require(sc.warmup_steps >= 0, "schedule.warmup_steps", sc.warmup_steps, "an integer >= 0")
    require(0 <= sc.end_lr_factor <= 1, "schedule.end_lr_factor", sc.end_lr_factor, "a number in [0, 1]")
    g = cfg.reg
    require(g.randaug_num_ops >= 0, "reg.randaug_num_ops", g.randaug_num_ops, "an integer >= 0")
    require(0 <= g.randaug_magnitude <= 30, "reg.randaug_magnitude", g.randaug_magnitude, "an integer in [0, 30]")
    require(g.mixup_alpha >= 0, "reg.mixup_alpha", g.mixup_alpha, "a number >= 0 (0 disables mixup)")
    for key in ("label_smoothing", "dropout", "head_dropout", "stochastic_depth"):
        v = getattr(g, key)
        require(0 <= v < 1, f"reg.{key}", v, "a number in [0, 1)")
    d = cfg.data
    require(d.loader_workers >= 0, "data.loader_workers", d.loader_workers, "an integer >= 0")
    require(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", d.max_bad_fraction, "a number in [0, 1]")
    require(d.shuffle_buffer >= 1, "data.shuffle_buffer", d.shuffle_buffer, "an integer >= 1")
    require(d.num_train_samples is None or d.num_train_samples >= 1, "data.num_train_samples", d.num_train_samples,
            "null or an integer >= 1")
    require(0 <= d.minival_fraction < 0.5, "data.minival_fraction", d.minival_fraction,
            "a number in [0, 0.5): the share of the training split held out for choices (0: none)")
    require(0 < d.train_fraction <= 1, "data.train_fraction", d.train_fraction,
            "a number in (0, 1]: the share of the training split trained on")
    _check_cache(cfg)
    _check_placement(cfg)
    require(bool(cfg.tracking.experiment.strip()), "tracking.experiment", cfg.tracking.experiment, "a non-empty name")
    require(cfg.eval.every_steps >= 0, "eval.every_steps", cfg.eval.every_steps, "an integer >= 0")
    e = cfg.eval
    require(e.fewshot_every_steps >= 0, "eval.fewshot_every_steps", e.fewshot_every_steps, "an integer >= 0 (0: off)")
    require(len(e.fewshot_shots) >= 1 and all(k >= 1 for k in e.fewshot_shots), "eval.fewshot_shots",
            e.fewshot_shots, "a non-empty list of integers >= 1 (examples per class)")
    ema = cfg.train.ema_decay
    require(ema is None or 0 < ema < 1, "train.ema_decay", ema, "null (off) or a number in (0, 1), e.g. 0.9999")
    require(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", cfg.checkpoint.every_steps, "an integer >= 0")
    require(cfg.checkpoint.num_to_keep >= 1, "checkpoint.num_to_keep", cfg.checkpoint.num_to_keep, "an integer >= 1")
    require(math.isfinite(cfg.checkpoint.sigterm_grace_s) and cfg.checkpoint.sigterm_grace_s > 0,
            "checkpoint.sigterm_grace_s", cfg.checkpoint.sigterm_grace_s,
            "a number of seconds > 0 (below the platform's grace period, e.g. Kubernetes' terminationGracePeriodSeconds)")
    require(cfg.train.log_every_steps >= 1, "train.log_every_steps", cfg.train.log_every_steps, "an integer >= 1")
    require(
        cfg.train.max_steps is None or cfg.train.max_steps >= 1,
        "train.max_steps", cfg.train.max_steps, "null or an integer >= 1",
    )
    _check_observe(cfg)
    try:
        get_config(cfg.model.name, **model_overrides(cfg, num_classes=cfg.model.num_classes or 10))
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def _check_cache(cfg: Config) -> None:
    """data.cache_max_gb > 0; data.cache_dir null (off) or a local directory this user can create or write (checked
    here, on the node that starts the run; every node needs it: a node-local disk, pipelines/shard_cache.py)."""
    from pipelines.storage import StorageError, check_writable_target, protocol_of

    d = cfg.data
    require(d.cache_max_gb > 0, "data.cache_max_gb", d.cache_max_gb, "a number of GB > 0")
    if d.cache_dir is None:
        return
    require(bool(str(d.cache_dir).strip()) and protocol_of(str(d.cache_dir)) in ("file", "local"), "data.cache_dir",
            d.cache_dir, "null (no cache) or a node-local directory path")
    try:
        check_writable_target(str(d.cache_dir), what="data.cache_dir")
    except StorageError as e:
        raise ConfigError(f"{e}; data.cache_dir is null (no cache) or a node-local directory") from None


def augment_on(cfg: Config) -> str:
    """Where the batch augmentation runs: 'device' or 'host' ('auto': the device when training on GPUs)."""
    if cfg.data.augment_on == "auto":
        return "device" if cfg.scaling.use_gpu else "host"
    return cfg.data.augment_on


def _check_placement(cfg: Config) -> None:
    d, where = cfg.data, augment_on(cfg)
    if d.decode_on == "device":
        require(cfg.scaling.use_gpu, "data.decode_on", d.decode_on,
                "'host', or 'device' with scaling.use_gpu: true (decoding on the device needs CUDA)")
        require(d.transform == "inception", "data.decode_on", d.decode_on,
                "'host' with data.transform 'digits' ('device' decodes the inception recipe's JPEG crops)")
        require(where == "device", "data.decode_on", d.decode_on,
                "'host' when data.augment_on is 'host' (a device decode hands its crops to the device stage)")
    if cfg.reg.randaug_impl == "torchvision" and cfg.reg.randaug_magnitude and d.transform == "inception":
        require(where == "host", "reg.randaug_impl", "torchvision",
                "'big_vision' when data.augment_on is 'device' (torchvision's RandAugment draws one op per call, "
                "so on a batch every image would get the same ops), or data.augment_on: host")


PROFILE_WINDOW = "null, or [start, stop] with 0 <= start < stop: the steps start+1 .. stop are profiled"


def _check_observe(cfg: Config) -> None:
    ob = cfg.observe
    require(ob.system_metrics_interval_s > 0, "observe.system_metrics_interval_s", ob.system_metrics_interval_s,
            "a number of seconds > 0")
    require(ob.data_delay_s >= 0, "observe.data_delay_s", ob.data_delay_s, "a number of seconds >= 0 (0: off)")
    p = ob.profile_steps
    require(p is None or (len(p) == 2 and 0 <= p[0] < p[1]), "observe.profile_steps", p, PROFILE_WINDOW)


def check_profile_steps(cfg: Config, total_steps: int) -> None:
    """The profiler window must end inside the run (the plan knows its steps: orchestrator/train/plan.py)."""
    p = cfg.observe.profile_steps
    require(p is None or p[1] <= total_steps, "observe.profile_steps", p,
            f"a window that ends at or before the run's last step, {total_steps} (the planned steps: "
            "schedule.epochs x steps per epoch, capped by train.max_steps)")


def selection_split(cfg: Config) -> str:
    """The evaluated split every choice is made on (Tune's metric, early stopping, the best checkpoint): the
    minival when the run holds one out of the training split, else val (and the report says so)."""
    return "minival" if cfg.data.minival_fraction > 0 else "val"


def worker_range(cfg: Config) -> tuple[int, int]:
    """(min, max) workers: scaling.num_workers N is (N, N); [min, max] is an elastic range."""
    n = cfg.scaling.num_workers
    return (n, n) if isinstance(n, int) else (int(n[0]), int(n[-1]))


def stream_slots(cfg: Config) -> int:
    """The data's canonical stream slots: max workers x loader workers per rank (pipelines/plan.py). The samples
    of a step are a function of (seed, epoch, step) over these slots, whatever the world size."""
    return worker_range(cfg)[1] * max(1, cfg.data.loader_workers)


def check_batch_split(cfg: Config) -> None:
    """The global batch must split evenly over the stream slots (max workers x loader workers), so that every
    world size in the range trains on exactly the configured global batch (ConfigError)."""
    o = cfg.optim
    low, high = worker_range(cfg)
    require(1 <= low <= high, "scaling.num_workers", cfg.scaling.num_workers,
            "an integer >= 1, or [min, max] with 1 <= min <= max")
    require(o.global_batch_size >= high, "optim.global_batch_size", o.global_batch_size,
            f"at least the largest worker count ({high}): every worker needs a sample per step")
    require(o.micro_batch_size is None or o.micro_batch_size > 0, "optim.micro_batch_size", o.micro_batch_size,
            "a positive integer or null")
    slots = stream_slots(cfg)
    require(
        o.global_batch_size % slots == 0,
        "optim.global_batch_size",
        o.global_batch_size,
        f"a multiple of the data's stream slots = max workers x data.loader_workers = {slots} (each slot gives "
        "the same number of samples to every step, so the global batch is the same at every world size)",
    )
