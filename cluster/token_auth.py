"""Token authentication of a local cluster: which token file, and the environment of its nodes and clients.

Ray reads RAY_AUTH_MODE only from the environment (ray/_private/authentication/authentication_token_setup.py,
AUTH_MODE_ENV_VAR); every node is started with RAY_AUTH_MODE=token, and the token is read, in Ray's order, from
RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. `up` uses --token-file,
else $RAY_AUTH_TOKEN, else $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, and writes a new random token
(mode 0600) to that file if it is missing.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import shutil
from pathlib import Path

from cluster.processes import ClusterError, ray_executable, venv_bin
from pipelines.storage import atomic_write

log = logging.getLogger(__name__)

DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"


def resolve_token(token_file: str | Path | None) -> Path | None:
    """The token file the nodes and clients use (None: the token comes from $RAY_AUTH_TOKEN)."""
    if token_file:
        path = Path(token_file).expanduser().resolve()
    elif os.environ.get("RAY_AUTH_TOKEN"):
        return None
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser().resolve()
    else:
        path = DEFAULT_TOKEN_PATH
    if not path.exists() or not path.read_text().strip():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with atomic_write(path, mode=0o600) as f:
            f.write(secrets.token_hex(32).encode())  # same generator as ray's generate_new_authentication_token
        log.warning("wrote a new Ray auth token to %s", path)
    return path


def read_token(state: dict) -> str:
    if state.get("token_path"):
        return Path(state["token_path"]).read_text().strip()
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        raise ClusterError("this cluster takes its token from $RAY_AUTH_TOKEN, which is not set here")
    return token


def node_env(token_path: Path | None) -> dict[str, str]:
    """The environment of every Ray process the launcher starts (nodes) or drives (clients): this process's,
    with the venv's bin first on PATH, token mode on, the cluster's token file, and no stale cluster address."""
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"
    if token_path is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
        env.pop("RAY_AUTH_TOKEN", None)
    # a stale RAY_ADDRESS would make `ray start --head` misbehave; a stale RAY_API_SERVER_ADDRESS (set by a
    # local ray.init in this process, see orchestrator.train.launch) would send job and state calls elsewhere
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    return env


def client_env(state: dict) -> dict[str, str]:
    """What a client (ray job submit, ray status, ray.init) needs to reach this cluster."""
    env = {"RAY_AUTH_MODE": "token", "RAY_ADDRESS": state["gcs_address"]}
    if state.get("token_path") and Path(state["token_path"]) != DEFAULT_TOKEN_PATH:
        env["RAY_AUTH_TOKEN_PATH"] = state["token_path"]
    return env


def submit_line(state: dict, entrypoint: str = "python -m orchestrator.pretrain") -> str:
    env = client_env(state)
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k != "RAY_ADDRESS")
    ray = "ray" if shutil.which("ray") == str(ray_executable()) else str(ray_executable())
    return f"{prefix} {ray} job submit --address {state['dashboard_url']} --working-dir . -- {entrypoint}"
