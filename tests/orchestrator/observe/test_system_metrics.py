"""The per-node system-metrics sampler: MLflow's names under system/node{N}/, GPUs through NVML (faked at the
pynvml boundary on a machine without one), the background thread and its sink."""

from __future__ import annotations

import logging
import socket
import threading
import time
from types import SimpleNamespace

import pynvml
import pytest
from waiting import wait_until

from orchestrator.observe import system_metrics
from orchestrator.observe.system_metrics import SystemMetricsSampler, node_prefix

HOST_KEYS = {  # MLflow's own names (mlflow/system_metrics/metrics/{cpu,disk,network}_monitor.py)
    "cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage",
    "disk_usage_percentage", "disk_usage_megabytes", "disk_available_megabytes",
    "network_receive_megabytes", "network_transmit_megabytes",
}


def _sampler(node=0, sink=None, step=lambda: 0, interval_s=10.0):
    return SystemMetricsSampler(node=node, sink=sink, current_step=step, interval_s=interval_s)


def test_host_metrics_carry_mlflows_names_under_the_node_prefix():
    sample = _sampler(node=3).sample()
    assert node_prefix(3) == "system/node3/"
    assert all(k.startswith("system/node3/") for k in sample)
    names = {k.removeprefix("system/node3/") for k in sample}
    assert HOST_KEYS <= names
    assert 0 <= sample["system/node3/cpu_utilization_percentage"] <= 100
    assert 0 < sample["system/node3/system_memory_usage_percentage"] < 100
    assert sample["system/node3/system_memory_usage_megabytes"] > 1
    assert sample["system/node3/disk_available_megabytes"] > 0
    assert all(isinstance(v, float) for v in sample.values())


def test_network_counters_count_from_the_samplers_start():
    """Like MLflow's network monitor: MB since the sampler started, so 4 MB over loopback shows as >= 4 MB."""
    sampler = _sampler()
    before = sampler.sample()
    assert before["system/node0/network_receive_megabytes"] < 4  # not the counters since boot
    server = socket.create_server(("127.0.0.1", 0))
    received = []

    def drain():
        conn, _ = server.accept()
        while chunk := conn.recv(1 << 20):
            received.append(len(chunk))
        conn.close()

    reader = threading.Thread(target=drain)
    reader.start()
    with socket.create_connection(server.getsockname()) as client:
        client.sendall(b"x" * 4_000_000)
    reader.join()
    server.close()
    after = sampler.sample()
    assert sum(received) == 4_000_000
    assert after["system/node0/network_transmit_megabytes"] >= 4
    assert after["system/node0/network_receive_megabytes"] >= 4


def test_without_nvml_there_are_no_gpu_keys_and_one_debug_line(caplog):
    """This machine has no NVIDIA driver: nvmlInit fails inside the real pynvml."""
    with pytest.raises(pynvml.NVMLError):
        pynvml.nvmlInit()
    with caplog.at_level(logging.DEBUG, logger=system_metrics.__name__):
        sampler = _sampler()
        sample = sampler.sample()
    assert sampler.gpu_count == 0
    assert not [k for k in sample if "gpu_" in k]
    lines = [r for r in caplog.records if r.name == system_metrics.__name__]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG and "NVML" in lines[0].getMessage()


class FakeNvml:
    """Two GPUs behind pynvml's functions; GPU 1 cannot report its power (NVML_ERROR_NOT_SUPPORTED)."""

    GPUS = [  # used MiB, total MiB, utilization %, mW, limit mW, degrees C
        dict(used=20_000e6, total=80_000e6, util=87, power=350_000, limit=700_000, temp=61),
        dict(used=1_000e6, total=80_000e6, util=3, power=None, limit=700_000, temp=35),
    ]

    def __init__(self, monkeypatch):
        self.inits = 0
        calls = {
            "nvmlInit": self.init,
            "nvmlDeviceGetCount": lambda: len(self.GPUS),
            "nvmlDeviceGetHandleByIndex": lambda i: ("handle", i),
            "nvmlDeviceGetUtilizationRates": lambda h: SimpleNamespace(gpu=self.GPUS[h[1]]["util"], memory=10),
            "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(used=self.GPUS[h[1]]["used"],
                                                                  total=self.GPUS[h[1]]["total"], free=0),
            "nvmlDeviceGetPowerUsage": self.power,
            "nvmlDeviceGetEnforcedPowerLimit": lambda h: self.GPUS[h[1]]["limit"],
            "nvmlDeviceGetTemperature": self.temperature,
        }
        for name, fn in calls.items():
            monkeypatch.setattr(pynvml, name, fn)

    def init(self):
        self.inits += 1

    def power(self, handle):
        value = self.GPUS[handle[1]]["power"]
        if value is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def temperature(self, handle, sensor):
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self.GPUS[handle[1]]["temp"]


def test_gpu_metrics_from_nvml_with_mlflows_names(monkeypatch):
    fake = FakeNvml(monkeypatch)
    sampler = _sampler(node=1)
    assert fake.inits == 1 and sampler.gpu_count == 2
    sample = sampler.sample()
    g0 = {k.removeprefix("system/node1/gpu_0_"): v for k, v in sample.items() if "/gpu_0_" in k}
    assert g0 == pytest.approx({
        "utilization_percentage": 87.0,
        "memory_usage_megabytes": 20_000.0,
        "memory_total_megabytes": 80_000.0,
        "memory_usage_percentage": 25.0,
        "power_usage_watts": 350.0,
        "power_usage_percentage": 50.0,
        "temperature_celsius": 61.0,
    })
    g1 = {k.removeprefix("system/node1/gpu_1_"): v for k, v in sample.items() if "/gpu_1_" in k}
    assert g1["utilization_percentage"] == 3.0 and g1["temperature_celsius"] == 35.0
    assert "power_usage_watts" not in g1 and "power_usage_percentage" not in g1  # the failed query only
    assert HOST_KEYS <= {k.removeprefix("system/node1/") for k in sample}


def test_the_thread_sends_samples_with_the_current_step_and_stop_sends_a_last_one():
    received, step = [], [0]
    sampler = _sampler(node=2, sink=lambda metrics, s: received.append((metrics, s)),
                       step=lambda: step[0], interval_s=0.05)
    sampler.start()
    sampler.start()  # idempotent: still one thread
    assert sum(t.name == "system-metrics-node2" for t in threading.enumerate()) == 1
    wait_until(lambda: len(received) >= 3, 10, lambda: f"3 samples sent (got {len(received)})", interval=0.01)
    step[0] = 42
    sampler.stop()
    assert len(received) >= 3
    assert received[-1][1] == 42  # stop() took a last sample, at the step of the moment
    assert all("system/node2/cpu_utilization_percentage" in m for m, _ in received)
    assert not any(t.name == "system-metrics-node2" for t in threading.enumerate())
    count = len(received)
    sampler.stop()  # idempotent: no thread, no further sample
    assert len(received) == count


def test_stop_right_after_start_sends_exactly_the_last_sample():
    received = []
    sampler = _sampler(sink=lambda metrics, s: received.append(s), step=lambda: 7, interval_s=3600)
    sampler.start()
    sampler.stop()
    assert received == [7]


def test_a_failing_sink_does_not_end_the_thread_and_warns_once(caplog):
    calls = []

    def broken(metrics, step):
        calls.append(step)
        raise ConnectionError("tracking relay gone")

    sampler = _sampler(sink=broken, interval_s=0.02)
    with caplog.at_level(logging.WARNING, logger=system_metrics.__name__):
        sampler.start()
        wait_until(lambda: len(calls) >= 3, 10, lambda: f"3 sink calls (got {len(calls)})", interval=0.01)
        sampler.stop()
    assert len(calls) >= 3
    warnings = [r for r in caplog.records if "not sent" in r.getMessage()]
    assert len(warnings) == 1 and "tracking relay gone" in warnings[0].getMessage()


def test_without_a_sink_samples_are_kept_for_the_loop():
    step, calls = [5], [0]

    def current_step():  # read once per sample
        calls[0] += 1
        return step[0]

    sampler = _sampler(sink=None, step=current_step, interval_s=0.02)
    sampler.start()
    wait_until(lambda: calls[0] >= 3, 10, lambda: f"3 samples taken (got {calls[0]})", interval=0.01)
    step[0] = 9
    sampler.stop()
    taken = sampler.take_samples()
    assert len(taken) >= 2 and taken[-1][1] == 9 and taken[0][1] == 5
    assert all("system/node0/cpu_utilization_percentage" in m for m, _ in taken)
    assert sampler.take_samples() == []


@pytest.mark.parametrize("interval", [0, -1.0])
def test_interval_must_be_positive(interval):
    with pytest.raises(ValueError, match="interval_s"):
        _sampler(interval_s=interval)


def test_cpu_utilization_of_the_first_sample_from_the_samplers_thread():
    """The first sample taken in the sampler's thread is the CPU use since the sampler started, not 0.0
    (psutil.cpu_percent keeps its reference per thread: the thread's first call would have none)."""
    sampler = _sampler()
    out = []

    def busy_then_sample():
        t0 = time.process_time()
        while time.process_time() - t0 < 0.3:  # keep one core busy
            sum(range(1000))
        out.append(sampler.sample()["system/node0/cpu_utilization_percentage"])

    thread = threading.Thread(target=busy_then_sample)
    thread.start()
    thread.join()
    assert 0 < out[0] <= 100
