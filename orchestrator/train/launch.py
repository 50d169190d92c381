"""Driver side of a training run: resolve and check everything, then hand the loop to Ray Train.

Order matters: config, data and tracking are checked before any Ray resource is requested; the cluster's
capacity is checked before the worker group is started (Train V2 otherwise waits and retries forever).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.config.checks import stream_slots, worker_range
from orchestrator.config.tree import Config, ConfigError, mixer_home
from orchestrator.train.loop import Job
from orchestrator.train.plan import chunk_size, worker_resources
from pipelines.cli import CapacityError, say

log = logging.getLogger(__name__)


class ClusterTooSmallError(CapacityError, RuntimeError):
    """The Ray cluster cannot fit the requested worker group."""


@dataclass
class ResolvedData:
    url: str
    storage_options: dict
    num_classes: int
    train_samples: int
    steps_per_epoch: int | None  # the data plan's (the same at every world size)
    minival_samples: int = 0  # held out of the training split (data.minival_fraction)


def storage_options(cfg: Config, url: str) -> dict[str, Any]:
    """fsspec options from the config; credentials are never here (they come from the environment)."""
    from pipelines.storage import resolve_storage_options

    given: dict[str, Any] = {}
    if cfg.data.endpoint_url:
        given["endpoint_url"] = cfg.data.endpoint_url
    if cfg.data.anon:
        given["anon"] = True
    if cfg.data.profile:
        given["profile"] = cfg.data.profile
    return resolve_storage_options(url, given)


def resolve_data(cfg: Config, *, allow_unreachable: bool = False) -> ResolvedData:
    """Find the dataset (writing the embedded digits set on first use) and read its manifest."""
    from pipelines.digits import ensure_digits_dataset
    from pipelines.manifest import load_manifest
    from pipelines.storage import check_dataset_reachable

    url = cfg.data.url or ensure_digits_dataset(str(mixer_home() / "data" / "digits"))
    opts = storage_options(cfg, url)
    try:
        check_dataset_reachable(url, opts, want_file="manifest.json")
        manifest = load_manifest(url, storage_options=opts)
    except Exception as e:
        if allow_unreachable and cfg.data.num_train_samples:
            d = cfg.data  # about what the minival and data.train_fraction leave (the exact split needs the data)
            held = round(d.num_train_samples * d.minival_fraction)
            kept = round((d.num_train_samples - held) * d.train_fraction)
            say(f"[dry-run] dataset not checked ({type(e).__name__}: {e}); planning with "
                f"data.num_train_samples={d.num_train_samples}" + (f", about {kept} of them trained on" if
                                                                   kept != d.num_train_samples else ""))
            return ResolvedData(url, opts, cfg.model.num_classes or 1000, kept, None, held)
        raise ConfigError(f"data.url={url!r} cannot be used: {e}") from None
    for split in (cfg.data.train_split, cfg.data.val_split):
        if split not in manifest.splits:
            raise ConfigError(
                f"data.{'train' if split == cfg.data.train_split else 'val'}_split={split!r} is not in the "
                f"dataset at {url}; splits there: {sorted(manifest.splits)}"
            )
    if cfg.model.num_classes is not None and cfg.model.num_classes != manifest.num_classes:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but the dataset at {url} has {manifest.num_classes} "
            "classes; leave model.num_classes unset (null) to take it from the dataset"
        )
    from orchestrator.train.batches import subset_spec
    from orchestrator.train.plan import make_plan
    from pipelines.loader import ShardLoader
    from pipelines.sample_index import load_sample_index
    from pipelines.subsets import select

    probe = ShardLoader(
        url, cfg.data.train_split, batch_size=chunk_size(cfg), slots=stream_slots(cfg), rank=0, world_size=1,
        num_workers=cfg.data.loader_workers, seed=cfg.run.seed, storage_options=opts, subset=subset_spec(cfg),
    )
    train_samples = probe.selection.num_samples if probe.selection else manifest.num_samples(cfg.data.train_split)
    minival = 0
    if cfg.data.minival_fraction > 0:
        index = load_sample_index(url, cfg.data.train_split, opts, manifest=manifest)
        minival = select(index, subset_spec(cfg, "minival")).num_samples
    make_plan(cfg, manifest.num_classes, train_samples)  # the plan words a batch larger than an epoch
    return ResolvedData(url, opts, manifest.num_classes, train_samples, probe.steps_per_epoch, minival)


def resolve_run(cfg: Config, *, allow_unreachable: bool = False):
    """(the resolved dataset, the run's plan): everything checked before any Ray resource is requested.
    Pretraining, fine-tuning and every Tune trial resolve their run with it."""
    from orchestrator.train.plan import make_plan

    if not allow_unreachable:  # a dry run writes nothing
        check_storage_target(cfg)
    data = resolve_data(cfg, allow_unreachable=allow_unreachable)
    return data, make_plan(cfg, data.num_classes, data.train_samples, data.steps_per_epoch, data.minival_samples)


def resolve_tracking(cfg: Config) -> str | None:
    if not cfg.tracking.enabled:
        return None
    from orchestrator.tracking.store import check_tracking_reachable, resolve_tracking_uri
    from pipelines.redaction import redact

    uri = resolve_tracking_uri(cfg.tracking.uri, str(mixer_home()))  # a sqlite dir is made by the check
    try:
        check_tracking_reachable(uri)
    except Exception as e:
        raise ConfigError(f"tracking.uri={redact(uri)!r} cannot be used: {e}") from None
    return uri


def check_storage_target(cfg: Config) -> None:
    """run.storage_path must be writable (a local directory creatable, an S3 bucket answering) before any start."""
    from pipelines.storage import StorageError, check_writable_target

    path = cfg.resolved_storage_path()
    try:
        check_writable_target(path, storage_options(cfg, path), what="run.storage_path")
    except StorageError as e:
        raise ConfigError(str(e)) from None


def storage_target(cfg: Config):
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig.

    pyarrow ignores AWS_ENDPOINT_URL, so an s3:// path on a custom endpoint goes through s3fs.
    """
    check_storage_target(cfg)  # a clear ConfigError before the local directory is made
    path = cfg.resolved_storage_path()
    if not path.startswith("s3://"):
        Path(path).mkdir(parents=True, exist_ok=True)
        return path, None
    opts = storage_options(cfg, path)
    endpoint = opts.get("endpoint_url")
    if not endpoint:
        return path, None
    import pyarrow.fs
    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    return path[len("s3://"):], pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


class RayAddressError(ConfigError):
    """RAY_ADDRESS names a cluster that does not answer."""


def init_ray() -> None:
    """Start this process's own local Ray instance, or join the cluster RAY_ADDRESS names.

    Without RAY_ADDRESS nothing is joined (``address="local"``): a plain ``ray.init()`` would join whatever
    Ray's ``ray_current_cluster`` file names, and a ``ray start`` head killed hard leaves that file behind, so
    every later run would hang on GCS connection retries (in C++, deaf to SIGTERM). Joining is asked for with
    RAY_ADDRESS: ``auto`` (the local cluster ``ray start`` made), ``host:port``, or the address ``ray job
    submit`` gives its entrypoint. Its GCS port is checked first, so a dead address fails in seconds.

    A local instance also tells its processes which dashboard is theirs: Ray Train's PlacementGroupCleaner
    finds the cluster through the state API and, with no address, fails ("Found multiple active Ray
    instances") when another local Ray runs on the same host. Ctrl-C or SIGTERM during the start ends the
    process within seconds (see _ends_on_signal).
    """
    import ray

    from cluster.loopback import free_port

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        check_ray_address(address)
        with _ends_on_signal():
            ray.init(address=address, log_to_driver=True)
        return
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # inherited by every Ray process
    say("[ray] starting a local Ray instance (set RAY_ADDRESS to join a cluster)")
    with _ends_on_signal():
        ray.init(address="local", log_to_driver=True, dashboard_port=port)


@contextlib.contextmanager
def _ends_on_signal(grace_s: float = 5.0) -> Iterator[None]:
    """Make Ctrl-C / SIGTERM end the process while the block (ray.init) runs, even when the Python handler's
    exception is lost.

    ray.init installs a SIGTERM handler that raises SystemExit, but the exception is often raised inside a
    logging at-fork callback of one of the many processes ray.init spawns, where Python only prints
    "Exception ignored" and the start goes on. So the signal is also watched through signal.set_wakeup_fd:
    if the block is still running `grace_s` after one arrived, the processes this one started are killed and
    it exits (128 + signal number); when the exception does get through, they are killed too. Only in the
    main thread (where signals are delivered).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            ready, _, _ = select.select([read_fd], [], [], 0.2)
            got = [n for n in os.read(read_fd, 64) if n in (signal.SIGINT, signal.SIGTERM)] if ready else []
            if got and not done.wait(grace_s):
                _abort_start(signal.Signals(got[0]))

    watcher = threading.Thread(target=watch, name="ray-start-signal-watch", daemon=True)
    watcher.start()
    try:
        yield
    except (KeyboardInterrupt, SystemExit):  # the handler's exception got through: nothing half-started stays
        _stop_started_processes()
        raise
    finally:
        done.set()
        signal.set_wakeup_fd(previous)
        watcher.join(timeout=1)
        os.close(read_fd)
        os.close(write_fd)


def _abort_start(sig: signal.Signals) -> None:
    log.warning("[ray] %s during the Ray start: stopping what was started and exiting", sig.name)
    _stop_started_processes()
    os._exit(128 + sig)


def _stop_started_processes() -> None:
    """SIGKILL this process's descendants: what an interrupted ray.init had started (GCS, raylet, dashboard)."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=5)


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """RayAddressError unless something listens at the GCS port RAY_ADDRESS (or, for ``auto``, Ray's
    ``ray_current_cluster`` file) names. ``auto`` without that file is left to ray.init (it then looks for
    running Ray processes, or says there is none)."""
    import socket

    where = f"RAY_ADDRESS={address}"
    if address == "auto":
        path = ray_current_cluster_file()
        if not path.exists():
            return
        address = path.read_text().strip()
        where += f" (from {path}, written by the last `ray start --head`)"
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise RayAddressError(f"{where} is not a Ray address: expected auto, host:port or ray://host:port, or "
                              "unset it to start a local Ray instance")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RayAddressError(
            f"{where}: no Ray cluster answers at {host}:{port} ({e.strerror or type(e).__name__}); start the "
            "cluster (ray start --head), point RAY_ADDRESS at a live one, or unset it to start a local Ray "
            "instance"
        ) from None


def ray_current_cluster_file() -> Path:
    """Where Ray keeps the address of the last cluster `ray start` made on this machine.

    Checked against Ray 2.60.0, which has no public API for it: ray._common.utils.get_ray_address_file(None)
    is ``<RAY_TMPDIR, else TMPDIR, else /tmp>/ray/ray_current_cluster``.
    tests/orchestrator/train/test_ray_startup.py fails when a Ray upgrade moves it.
    """
    base = os.environ["RAY_TMPDIR"] if "RAY_TMPDIR" in os.environ else os.environ.get("TMPDIR", "/tmp")
    return Path(base) / "ray" / "ray_current_cluster"


def check_capacity(cfg: Config) -> None:
    """Fail with a clear message when the cluster cannot fit the worker group within startup_timeout_s.

    On an autoscaling cluster (KubeRay, cloud launcher) the shortfall is requested from the autoscaler
    first, so a cluster that starts with no GPU nodes can still grow to fit the run.
    """
    import ray
    from ray.autoscaler.sdk import request_resources

    low = worker_range(cfg)[0]  # an elastic run starts once its minimum fits
    need = {k: v * low for k, v in worker_resources(cfg).items()}
    deadline = time.monotonic() + cfg.scaling.startup_timeout_s
    requested = False
    while True:
        total = ray.cluster_resources()
        short = {k: (v, total.get(k, 0.0)) for k, v in need.items() if total.get(k, 0.0) < v}
        if not short:
            if requested:
                request_resources(bundles=[])  # the worker group now holds what it needs
            return
        if not requested:
            request_resources(bundles=[worker_resources(cfg)] * worker_range(cfg)[1])
            requested = True
        if time.monotonic() >= deadline:
            request_resources(bundles=[])
            detail = ", ".join(f"{k}: need {v:g}, cluster has {have:g}" for k, (v, have) in short.items())
            raise ClusterTooSmallError(
                f"the Ray cluster cannot fit scaling.num_workers={cfg.scaling.num_workers} ({low} workers at the "
                f"least; {detail}); lower scaling.num_workers or scaling.cpus_per_worker, or add nodes "
                f"(waited scaling.startup_timeout_s={cfg.scaling.startup_timeout_s:g}s for the cluster to grow)"
            )
        time.sleep(min(2.0, max(deadline - time.monotonic(), 0.1)))


def build_trainer(cfg: Config, job: Job, callbacks: list | None = None):
    """A TorchTrainer for this run; Tune passes its TuneReportCallback in `callbacks`."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.train.loop import train_worker

    storage_path, filesystem = storage_target(cfg)
    low, high = worker_range(cfg)
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "job": asdict(job)},
        scaling_config=ScalingConfig(
            # (min, max): Ray Train V2's elastic group, started at min, grown toward max every interval
            num_workers=low if low == high else (low, high), use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=worker_resources(cfg),
            elastic_resize_monitor_interval_s=cfg.scaling.elastic_resize_interval_s,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            # A finite controller limit: a worker group that cannot start is an error, not an endless retry.
            # preemptions (a drain with reason PREEMPTION) are counted apart from failures
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures, controller_failure_limit=2,
                                         max_preemption_failures=cfg.scaling.max_preemptions),
            callbacks=callbacks or None,
            # Train's print patch duplicates every worker line on the driver; plain prints are enough, and
            # Train's own per-report INFO lines would drown the progress lines.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
