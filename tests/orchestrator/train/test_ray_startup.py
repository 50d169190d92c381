"""Ray start-up of the entry points (orchestrator.train.launch.init_ray).

- without RAY_ADDRESS a local instance of our own is started, whatever a stale ``ray_current_cluster`` file (a
  `ray start` head killed hard) names: no hang on a dead address;
- a RAY_ADDRESS (or ``auto`` reading that file) that nothing answers fails within seconds, naming it;
- SIGTERM during the start ends the process within seconds and leaves no Ray process behind;
- the run's progress lines reach the driver whole (Ray's log deduplication would fold them);
- where Ray 2.60 keeps that file (the one thing we read of Ray's own layout) is pinned.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from waiting import wait_until

from cluster.processes import node_processes, signal_processes
from orchestrator.config.tree import ConfigError
from orchestrator.train import launch

REPO = Path(__file__).resolve().parents[3]


def _dead_address() -> str:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def ray_tmp():
    """A private Ray temp dir (short: Ray's socket paths live under it) holding a stale ray_current_cluster."""
    base = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    (base / "ray").mkdir()
    (base / "ray" / "ray_current_cluster").write_text(_dead_address())
    yield base
    _kill_ray_processes_under(base)
    subprocess.run(["rm", "-rf", str(base)], check=False)


def _kill_ray_processes_under(base: Path) -> list[int]:
    """SIGKILL the Ray processes started for our private temp dir (found as `cluster.local_cluster down` finds a
    node's); returns their pids."""
    procs = node_processes({"temp_dir": str(base / "ray"), "pids": []})
    signal_processes(procs, grace_s=0)
    return [p.pid for p in procs]


def test_ray_current_cluster_file_is_where_ray_2_60_reads_it(monkeypatch, tmp_path):
    import ray
    from ray._common.utils import get_ray_address_file  # what ray_current_cluster_file mirrors (Ray 2.60.0)

    for env in ({"RAY_TMPDIR": str(tmp_path)}, {"TMPDIR": str(tmp_path / "t")}, {}):
        monkeypatch.delenv("RAY_TMPDIR", raising=False)
        monkeypatch.delenv("TMPDIR", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert str(launch.ray_current_cluster_file()) == get_ray_address_file(None), (
            f"Ray {ray.__version__} keeps ray_current_cluster elsewhere: update "
            "orchestrator/train/launch.ray_current_cluster_file")


def test_a_dead_ray_address_fails_within_seconds(monkeypatch, ray_tmp):
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    dead = _dead_address()
    for address, named in ((dead, dead), ("auto", str(ray_tmp / "ray" / "ray_current_cluster")),
                           ("not-an-address", "not a Ray address")):
        monkeypatch.setenv("RAY_ADDRESS", address)
        t0 = time.monotonic()
        with pytest.raises(ConfigError) as err:
            launch.init_ray()
        assert time.monotonic() - t0 < 10
        assert f"RAY_ADDRESS={address}" in str(err.value) and named in str(err.value)
        assert "unset it to start a local Ray instance" in str(err.value)
    assert not list(ray_tmp.glob("ray/session_*"))  # nothing was started


def _start_ray(ray_tmp: Path, code: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") and not k.startswith("RAY_DEDUP_LOGS")}
    env.update(RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), RAY_AUTH_MODE="token",
               HOME=str(ray_tmp))  # a fresh ~/.ray: the token a local ray.init writes stays here
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_stale_ray_current_cluster_file_is_not_joined(ray_tmp):
    stale = (ray_tmp / "ray" / "ray_current_cluster").read_text()
    proc = _start_ray(ray_tmp, "import ray\nfrom orchestrator.train.launch import init_ray\ninit_ray()\n"
                               "print('GCS', ray.get_runtime_context().gcs_address, flush=True)\nray.shutdown()\n")
    try:
        out, _ = proc.communicate(timeout=150)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    gcs = next(line.split()[1] for line in out.splitlines() if line.startswith("GCS "))
    assert gcs.rsplit(":", 1)[1] != stale.rsplit(":", 1)[1]
    assert list(ray_tmp.glob("ray/session_*"))  # its own instance, in the private temp dir


@pytest.mark.slow
def test_sigterm_during_start_up_ends_the_process_within_seconds(ray_tmp):
    proc = _start_ray(ray_tmp, "from orchestrator.train.launch import init_ray\ninit_ray()\n"
                               "import time\nprint('STARTED', flush=True)\ntime.sleep(600)\n")  # never reached
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[ray] starting a local Ray instance"):
                break
        # inside ray.init: signal once its first process (the GCS) is up, not after a fixed delay (on a quick
        # moment Ray's whole start took under 3 s and the signal came after it)
        up_by = time.monotonic() + 60
        while not node_processes({"temp_dir": str(ray_tmp / "ray"), "pids": []}) and time.monotonic() < up_by:
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    output = "".join(lines) + rest
    assert "STARTED" not in output, output[-3000:]
    assert proc.returncode != 0 and took < 15, f"exit {proc.returncode} after {took:.1f}s\n{output[-3000:]}"
    node = {"temp_dir": str(ray_tmp / "ray"), "pids": []}
    # the start's Ray processes exit with it: within the 2 s they were always given (the fixture kills leftovers)
    wait_until(lambda: not node_processes(node), 2, lambda: "the Ray processes of the interrupted start to exit; "
               f"left running: {[p.pid for p in node_processes(node)]}")
    assert _kill_ray_processes_under(ray_tmp) == [], "Ray processes of the interrupted start were left running"


_TWO_PRINTERS = """
import time
{setup}
import ray
from orchestrator.train.launch import init_ray
init_ray()

@ray.remote(num_cpus=0)
class Printer:
    def run(self, lines):
        for i in range(lines):
            print(f"step {{i + 1}}/{{lines}} epoch 0 loss 0.{{i}} lr 1e-03 100 img/s ETA 1s", flush=True)
            print(f"Found credentials in environment variables {{i}}", flush=True)
            time.sleep(0.2)  # deliberate: a worker's pace, the lines of both within Ray's 5 s fold window

# two processes printing alike lines, as the old and the new rank 0 of a restarted group do for a moment
ray.get([p.run.remote(6) for p in (Printer.remote(), Printer.remote())])
time.sleep(7)  # past Ray's 5 s fold window: what it folded is printed as "[repeated Nx ...]"
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("kept", [True, False], ids=["kept-whole", "ray-default"])
def test_progress_lines_reach_the_driver_whole(ray_tmp, kept):
    """With keep_progress_lines_whole() (what the entry points call first) every progress line of every worker
    reaches the driver's output; with Ray's default some are folded into "[repeated Nx across cluster]" (the
    control: shows the folding this guards against happens here). Ray's own noise is folded either way."""
    setup = ("from orchestrator.train.startup import keep_progress_lines_whole\nkeep_progress_lines_whole()"
             if kept else "")
    proc = _start_ray(ray_tmp, _TWO_PRINTERS.format(setup=setup))
    try:
        out, _ = proc.communicate(timeout=150)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    step_lines = [line for line in out.splitlines() if "Printer pid=" in line and " step " in line]
    folded = [line for line in step_lines if "repeated" in line]
    if kept:
        assert len(step_lines) == 12 and not folded, "\n".join(step_lines)
    else:
        assert folded and len(step_lines) < 12, "\n".join(step_lines)
    assert any("repeated" in line for line in out.splitlines() if "Found credentials" in line), out[-3000:]
