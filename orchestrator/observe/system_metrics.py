"""Per-node system metrics (CPU, memory, disk, network, and every GPU of the node), sampled in a background thread.

    sampler = SystemMetricsSampler(node=node_rank, sink=tracker.log_metrics, current_step=lambda: step,
                                   interval_s=cfg.observe.system_metrics_interval_s)
    sampler.start()      # one sampler per node: the local rank 0 of each node
    ...                  # every interval_s: sink({"system/node0/cpu_utilization_percentage": 12.5, ...}, step)
    sampler.stop()       # joins the thread and sends one last sample

Names are MLflow's own system-metrics names (mlflow/system_metrics/metrics/*.py, MLflow 3.17.2), under
``system/node{N}/`` so every node of a cluster has its own keys in the one run:

    cpu_utilization_percentage, system_memory_usage_megabytes, system_memory_usage_percentage,
    disk_usage_percentage, disk_usage_megabytes, disk_available_megabytes,
    network_receive_megabytes, network_transmit_megabytes       (MB since the sampler started, as MLflow's)
    gpu_{i}_utilization_percentage, gpu_{i}_memory_usage_megabytes, gpu_{i}_memory_usage_percentage,
    gpu_{i}_power_usage_watts, gpu_{i}_power_usage_percentage   (of the enforced power limit)

and, where MLflow has no name, ours in the same style: disk_read_megabytes, disk_write_megabytes (MB since the
sampler started, like the network counters), gpu_{i}_memory_total_megabytes, gpu_{i}_temperature_celsius.

GPUs come from NVML (package nvidia-ml-py, module pynvml), which sees every GPU of the node whatever
CUDA_VISIBLE_DEVICES says; `i` is NVML's index. Without the library or a driver (nvmlInit fails) there are no
GPU keys, no error, and one debug log line. A GPU query that fails leaves that one key out of that sample.

The step given with each sample is `current_step()`, the run's global step at sampling time, so the system
metrics chart beside the training metrics. The sink is called from the sampler's thread: it must be safe to
call from there (RelayedTracker.log_metrics is: a Ray actor call; a RunTracker that the loop also uses is not:
give the sampler no sink and have the loop send `take_samples()` instead).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable

import psutil

logger = logging.getLogger(__name__)

MB = 1e6  # MLflow's system metrics use 1e6 bytes
MAX_KEPT_SAMPLES = 10_000  # samples kept for take_samples() when there is no sink (10 s apart: ~28 hours)

MetricsSink = Callable[[dict[str, float], int], None]


def node_prefix(node: int) -> str:
    """The key prefix of node `node`'s system metrics: ``system/node{node}/``."""
    return f"system/node{node}/"


class HostMetrics:
    """psutil's view of this machine: CPU and memory now, disk usage now, disk and network I/O since creation."""

    def __init__(self, disk_path: str = os.sep):
        self.disk_path = disk_path
        # CPU % since the previous sample, from psutil.cpu_times() held here: psutil.cpu_percent() keeps its
        # reference per thread (psutil 7), so the sampler thread's first reading would be 0.0
        self._cpu = psutil.cpu_times()
        self._net0 = psutil.net_io_counters()
        self._disk0 = psutil.disk_io_counters()  # None where the OS gives no disk counters (some containers)

    def sample(self) -> dict[str, float]:
        memory = psutil.virtual_memory()
        usage = psutil.disk_usage(self.disk_path)
        out = {
            "cpu_utilization_percentage": self._cpu_percent(),
            "system_memory_usage_megabytes": memory.used / MB,
            "system_memory_usage_percentage": memory.used / memory.total * 100,
            "disk_usage_percentage": usage.percent,
            "disk_usage_megabytes": usage.used / MB,
            "disk_available_megabytes": usage.free / MB,
        }
        net = psutil.net_io_counters()
        if net is not None and self._net0 is not None:
            out["network_receive_megabytes"] = (net.bytes_recv - self._net0.bytes_recv) / MB
            out["network_transmit_megabytes"] = (net.bytes_sent - self._net0.bytes_sent) / MB
        disk = psutil.disk_io_counters()
        if disk is not None and self._disk0 is not None:
            out["disk_read_megabytes"] = (disk.read_bytes - self._disk0.read_bytes) / MB
            out["disk_write_megabytes"] = (disk.write_bytes - self._disk0.write_bytes) / MB
        return out


    def _cpu_percent(self) -> float:
        """Busy share of all CPUs since the previous call (or creation), as psutil.cpu_percent counts it."""
        before, self._cpu = self._cpu, psutil.cpu_times()
        total = _cpu_total(self._cpu) - _cpu_total(before)
        idle = _cpu_idle(self._cpu) - _cpu_idle(before)
        return min(max(100.0 * (total - idle) / total, 0.0), 100.0) if total > 0 else 0.0


def _cpu_total(times) -> float:
    # on Linux guest time is counted in user/nice already (psutil's _cpu_tot_time subtracts it the same way)
    return sum(times) - getattr(times, "guest", 0) - getattr(times, "guest_nice", 0)


def _cpu_idle(times) -> float:
    return times.idle + getattr(times, "iowait", 0)  # Linux: I/O wait is idle time not counted in idle


class GpuMetrics:
    """Every GPU NVML sees on this node. `GpuMetrics.open()` is None when there is no NVML (no library, no driver)."""

    def __init__(self, nvml, handles: list):
        self._nvml, self._handles = nvml, handles
        self._failed: set[str] = set()  # queries that failed once: logged once, at debug level

    @classmethod
    def open(cls) -> GpuMetrics | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as e:  # ImportError, or pynvml.NVMLError (no library, no driver, no device)
            logger.debug("no GPU metrics: NVML is not available (%s: %s)", type(e).__name__, e)
            return None
        return cls(pynvml, handles) if handles else None

    @property
    def count(self) -> int:
        return len(self._handles)

    def sample(self) -> dict[str, float]:
        nvml, out = self._nvml, {}
        for i, handle in enumerate(self._handles):
            g = f"gpu_{i}_"
            memory = self._query(i, "memory", nvml.nvmlDeviceGetMemoryInfo, handle)
            if memory is not None:
                out[g + "memory_usage_megabytes"] = memory.used / MB
                out[g + "memory_total_megabytes"] = memory.total / MB
                out[g + "memory_usage_percentage"] = memory.used / memory.total * 100
            rates = self._query(i, "utilization", nvml.nvmlDeviceGetUtilizationRates, handle)
            if rates is not None:
                out[g + "utilization_percentage"] = float(rates.gpu)
            milliwatts = self._query(i, "power", nvml.nvmlDeviceGetPowerUsage, handle)
            if milliwatts is not None:
                out[g + "power_usage_watts"] = milliwatts / 1000
                limit = self._query(i, "power limit", nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
                if limit:
                    out[g + "power_usage_percentage"] = milliwatts / limit * 100
            celsius = self._query(i, "temperature", nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
            if celsius is not None:
                out[g + "temperature_celsius"] = float(celsius)
        return out

    def _query(self, index: int, what: str, query: Callable, *args):
        try:
            return query(*args)
        except Exception as e:  # pynvml.NVMLError: e.g. a query this GPU does not support
            if (index, what) not in self._failed:
                self._failed.add((index, what))
                logger.debug("GPU %d: no %s reading (%s: %s)", index, what, type(e).__name__, e)
            return None


class SystemMetricsSampler:
    """Samples this node every `interval_s` seconds in a daemon thread and hands each sample to `sink`.

    start() and stop() may be called any number of times; stop() joins the thread and takes a last sample.
    With sink=None the samples are kept (the newest MAX_KEPT_SAMPLES) for `take_samples()`.
    """

    def __init__(self, node: int, sink: MetricsSink | None, current_step: Callable[[], int],
                 interval_s: float = 10.0, disk_path: str = os.sep):
        if not interval_s > 0:
            raise ValueError(f"interval_s={interval_s!r}: expected a number of seconds > 0")
        self.node, self.sink, self.current_step, self.interval_s = node, sink, current_step, interval_s
        self.prefix = node_prefix(node)
        self._host = HostMetrics(disk_path)
        self._gpus = GpuMetrics.open()
        self._kept: collections.deque = collections.deque(maxlen=MAX_KEPT_SAMPLES)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sink_failed = False

    @property
    def gpu_count(self) -> int:
        return self._gpus.count if self._gpus else 0

    def sample(self) -> dict[str, float]:
        """One reading of this node, with the ``system/node{N}/`` keys."""
        metrics = self._host.sample()
        if self._gpus:
            metrics.update(self._gpus.sample())
        return {self.prefix + k: float(v) for k, v in metrics.items()}

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"system-metrics-node{self.node}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._emit()

    def take_samples(self) -> list[tuple[dict[str, float], int]]:
        """The kept (metrics, step) samples, oldest first, removed from the sampler (sink=None only)."""
        out = []
        while self._kept:
            out.append(self._kept.popleft())
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._emit()

    def _emit(self) -> None:
        try:
            metrics, step = self.sample(), int(self.current_step())
        except Exception as e:  # a sampling failure must not end the thread or reach the training loop
            logger.warning("system metrics of node %d not sampled: %s: %s", self.node, type(e).__name__, e)
            return
        if self.sink is None:
            self._kept.append((metrics, step))
            return
        try:
            self.sink(metrics, step)
        except Exception as e:
            if not self._sink_failed:
                self._sink_failed = True
                logger.warning("system metrics of node %d not sent: %s: %s", self.node, type(e).__name__, e)
