"""Fast checks of the local cluster launcher's pieces that decide what it starts, prints and kills."""

from __future__ import annotations

import os
import stat

import pytest

from cluster import local_cluster as lc

RAY_DIR = lc.ray_package_dir()


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
    assert lc._is_node_process(cmdline, "/tmp/mxc-ab/n1", RAY_DIR) is expected


def _state(token_path):
    return {
        "gcs_address": "192.0.2.2:40000",
        "dashboard_url": "http://127.0.0.1:40001",
        "token_path": token_path,
    }


def test_client_env_and_submit_line_default_token_path():
    state = _state(str(lc.DEFAULT_TOKEN_PATH))
    assert lc.client_env(state) == {"RAY_AUTH_MODE": "token", "RAY_ADDRESS": "192.0.2.2:40000"}
    line = lc.submit_line(state)
    assert line.startswith("RAY_AUTH_MODE=token ")
    assert line.endswith(
        "job submit --address http://127.0.0.1:40001 --working-dir . -- python -m orchestrator.pretrain"
    )


def test_client_env_names_a_non_default_token_file(tmp_path):
    state = _state(str(tmp_path / "tok"))
    assert lc.client_env(state)["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "tok")
    assert lc.submit_line(state).startswith(f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={tmp_path / 'tok'} ")


def test_token_file_is_created_private_and_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    path = lc.resolve_token(str(tmp_path / "sub" / "tok"))
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert lc.resolve_token(str(path)).read_text() == token  # an existing token is reused


def test_nodes_get_token_mode_and_the_venv_first_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-the-shell")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    env = lc.node_env(tmp_path / "tok")
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "tok")
    assert "RAY_AUTH_TOKEN" not in env and "RAY_ADDRESS" not in env
    assert env["PATH"].split(os.pathsep)[0] == str(lc.venv_bin())


def test_kill_node_refuses_the_head_and_unknown_nodes(tmp_path, capsys):
    state = {
        **_state(None),
        "workers": 1,
        "nodes": [{"index": 0, "role": "head"}, {"index": 1, "role": "worker"}],
    }
    lc.save_state(tmp_path, state)
    assert lc.main(["kill-node", "0", "--state-dir", str(tmp_path)]) == 2
    assert "head" in capsys.readouterr().err
    assert lc.main(["kill-node", "5", "--state-dir", str(tmp_path)]) == 2
    assert "no worker node 5" in capsys.readouterr().err
