"""A real `mlflow server` process on loopback that tests kill (SIGKILL, its whole session) and start again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cluster.loopback import free_port

MLFLOW_BIN = str(Path(sys.executable).with_name("mlflow"))


class MlflowServer:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [MLFLOW_BIN, "server", "--backend-store-uri", f"sqlite:///{self.root}/server.db",
             "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1):
                    pass
            except OSError:
                time.sleep(0.2)
                continue
            from mlflow import MlflowClient

            MlflowClient(self.url).search_experiments()  # the server opens its store on the first API call
            return
        self.kill()
        raise RuntimeError(f"mlflow server did not start within {timeout:.0f} s")

    def kill(self) -> None:
        if self.proc is not None:
            try:  # the server's own session (start_new_session): uvicorn and the job runner go with it
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self.proc = None
