"""Fast checks of the local cluster launcher's pieces that decide what it starts, prints and kills."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from cluster import local_cluster as cli
from cluster.local import LocalCluster
from cluster.processes import is_node_process, ray_package_dir, save_state, venv_bin
from cluster.token_auth import DEFAULT_TOKEN_PATH, client_env, node_env, resolve_token, submit_line

RAY_DIR = ray_package_dir()


@pytest.mark.parametrize(
    "cmdline,expected",
    [
        ([f"{RAY_DIR}/core/src/ray/raylet/raylet", "--temp_dir=/tmp/mxc-ab/n1"], True),
        ([f"{RAY_DIR}/core/src/ray/gcs/gcs_server", "--log_dir=/tmp/mxc-ab/n1/session_x/logs"], True),
        (
            [
                "/venv/bin/python3",
                "-u",
                f"{RAY_DIR}/_private/log_monitor.py",
                "--session-dir=/tmp/mxc-ab/n1/s",
            ],
            True,
        ),
        ([f"{RAY_DIR}/core/src/ray/raylet/raylet", "--temp_dir=/tmp/mxc-ab/n10"], False),  # n10 is not n1
        ([f"{RAY_DIR}/core/src/ray/raylet/raylet", "--temp_dir=/tmp/mxc-ab-other/n1"], False),
        (["tail", "-f", "/tmp/mxc-ab/n1/session_latest/logs/raylet.out"], False),  # not a Ray process
        ([], False),
    ],
)
def test_node_process_matching(cmdline, expected):
    assert is_node_process(cmdline, "/tmp/mxc-ab/n1", RAY_DIR) is expected


def _state(token_path):
    return {
        "gcs_address": "192.0.2.2:40000",
        "dashboard_url": "http://127.0.0.1:40001",
        "token_path": token_path,
    }


def test_client_env_and_submit_line_default_token_path():
    state = _state(str(DEFAULT_TOKEN_PATH))
    assert client_env(state) == {"RAY_AUTH_MODE": "token", "RAY_ADDRESS": "192.0.2.2:40000"}
    line = submit_line(state)
    assert line.startswith("RAY_AUTH_MODE=token ")
    assert line.endswith(
        "job submit --address http://127.0.0.1:40001 --working-dir . -- python -m orchestrator.pretrain"
    )


def test_client_env_names_a_non_default_token_file(tmp_path):
    state = _state(str(tmp_path / "tok"))
    assert client_env(state)["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "tok")
    assert submit_line(state).startswith(f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={tmp_path / 'tok'} ")


def test_token_file_is_created_private_and_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    path = resolve_token(str(tmp_path / "sub" / "tok"))
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert resolve_token(str(path)).read_text() == token  # an existing token is reused


def test_nodes_get_token_mode_and_the_venv_first_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-the-shell")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")  # left by a local ray.init
    env = node_env(tmp_path / "tok")
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "tok")
    assert "RAY_AUTH_TOKEN" not in env and "RAY_ADDRESS" not in env and "RAY_API_SERVER_ADDRESS" not in env
    assert env["PATH"].split(os.pathsep)[0] == str(venv_bin())


def test_kill_node_refuses_the_head_and_unknown_nodes(tmp_path, capsys):
    state = {
        **_state(None),
        "workers": 1,
        "nodes": [{"index": 0, "role": "head"}, {"index": 1, "role": "worker"}],
    }
    save_state(tmp_path, state)
    assert cli.main(["kill-node", "0", "--state-dir", str(tmp_path)]) == 2
    assert "head" in capsys.readouterr().err
    assert cli.main(["kill-node", "5", "--state-dir", str(tmp_path)]) == 2
    assert "no worker node 5" in capsys.readouterr().err


def _recorded_cluster(tmp_path, token_path) -> LocalCluster:
    """A cluster as `up` records it, whose processes are long gone."""
    state = {
        **_state(str(token_path)),
        "workers": 1,
        "temp_root": str(tmp_path / "mxc-gone"),
        "nodes": [
            {"index": 0, "role": "head", "temp_dir": str(tmp_path / "mxc-gone" / "n0"), "pids": [], "node_id": "a"},
            {"index": 1, "role": "worker", "temp_dir": str(tmp_path / "mxc-gone" / "n1"), "pids": [], "node_id": "b"},
        ],
    }
    (tmp_path / "state").mkdir()
    save_state(tmp_path / "state", state)
    return LocalCluster(tmp_path / "state")


def test_client_of_a_recorded_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    (tmp_path / "tok").write_text("t" * 64)
    cluster = _recorded_cluster(tmp_path, tmp_path / "tok")
    assert cluster.address == "192.0.2.2:40000" and cluster.token() == "t" * 64 and cluster.num_workers == 1
    env = cluster.env  # what a client subprocess (ray CLI, driver) gets
    assert env["RAY_ADDRESS"] == "192.0.2.2:40000" and env["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:40001"
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "tok")
    cmd = cluster.submit_command(["python", "-c", "1"], "/w", ("--runtime-env", "r.yaml"))
    assert cmd[1:] == ["job", "submit", "--address", "http://127.0.0.1:40001", "--working-dir", "/w",
                       "--runtime-env", "r.yaml", "--", "python", "-c", "1"]  # fmt: skip
    assert cluster.node_id(1) == "b" and cluster.recorded_processes() == []
    report = cluster.report()  # what `up` prints
    assert "RAY_ADDRESS=192.0.2.2:40000" in report and submit_line(cluster.state) in report
    assert f"-m cluster.local_cluster down --state-dir {cluster.state_dir}" in report
    assert cluster.down() == [] and not (cluster.state_dir / "state.json").exists()
    assert cluster.down() == []  # stopping a stopped cluster does nothing


def test_up_command_passes_every_flag_and_prints_the_report(tmp_path, monkeypatch, capsys):
    calls = []
    recorded = _recorded_cluster(tmp_path, tmp_path / "tok")

    def fake_up(state_dir, **kwargs):
        calls.append((state_dir, kwargs))
        return recorded

    monkeypatch.setattr(LocalCluster, "up", staticmethod(fake_up))
    argv = ["up", "--workers", "3", "--cpus-per-node", "2", "--gpus-per-node", "1", "--head-cpus", "1",
            "--object-store-mb", "200", "--token-file", "tf", "--health-check-period-ms", "1000",
            "--temp-root", "/tmp/x", "--state-dir", str(tmp_path / "s")]  # fmt: skip
    assert cli.main(argv) == 0
    assert calls == [(str(tmp_path / "s"), dict(
        workers=3, cpus_per_node=2, gpus_per_node=1, head_cpus=1, object_store_mb=200, token_file="tf",
        health_check_period_ms=1000, temp_root="/tmp/x"))]  # fmt: skip
    assert capsys.readouterr().out == recorded.report() + "\n"


def test_cli_runs_as_a_module(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cluster.local_cluster", "status", "--state-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "no local cluster recorded" in r.stderr
