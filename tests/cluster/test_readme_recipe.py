"""The README's "Submitting to a cluster" recipe, run as written in a fresh HOME: a token-authenticated head and
a working `ray job submit`.

The commands come from README.md's code block (so this breaks when the README changes). What the test changes,
and only that: the default ports 6379 / 8265 become free ones, `ray start` gets its other listening ports
(client server, dashboard agent, workers) OS-assigned and a private Ray temp dir (RAY_TMPDIR), so it cannot
collide with other Ray instances on the machine, and the submitted job is `python -c` instead of an ImageNet
pretraining. The head is stopped by its processes' pids (never `ray stop`).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster.loopback import free_port
from cluster.processes import node_processes, signal_processes, venv_bin

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
pytestmark = pytest.mark.slow

JOB = 'python -c "print(\'recipe-job-ran\')"'


def readme_recipe() -> list[str]:
    """The shell commands of the README's cluster recipe, continuation lines joined."""
    text = README.read_text()
    m = re.search(r"Submitting to a cluster.*?```bash\n(.*?)```", text, re.S)
    assert m, "README.md has no ```bash block after 'Submitting to a cluster'"
    return [c for c in m.group(1).replace("\\\n", " ").splitlines() if c.strip()]


def test_recipe_is_the_documented_one():
    commands = readme_recipe()
    assert commands[0].startswith("export RAY_AUTH_MODE=token")
    assert any(c.startswith("ray get-auth-token --generate") for c in commands)
    assert any(c.startswith("ray start --head --port 6379 --dashboard-port 8265") for c in commands)
    assert any(c.startswith("until ray job list") for c in commands)
    assert commands[-1].startswith("ray job submit --address http://127.0.0.1:8265 --working-dir . -- ")


def test_readme_recipe_gives_an_authenticated_head_and_a_working_submit():
    gcs, dashboard = free_port(host=""), free_port()
    isolation = (f" --ray-client-server-port {free_port(host='')} --dashboard-agent-listen-port "
                 f"{free_port(host='')} --min-worker-port 0 --max-worker-port 0 --disable-usage-stats")
    script = []
    for command in readme_recipe():
        command = command.replace("6379", str(gcs)).replace("8265", str(dashboard))
        if command.startswith("ray start --head"):
            command = command.split("#")[0].rstrip() + isolation
        if command.startswith("ray job submit"):
            command = command.split(" -- ", 1)[0] + " -- " + JOB
        script.append(command)

    home = Path(tempfile.mkdtemp(prefix="rr-", dir="/tmp"))  # short: Ray's socket paths live under RAY_TMPDIR
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k not in ("MLFLOW_TRACKING_URI",)}
    env.update(HOME=str(home), RAY_TMPDIR=str(home), PATH=f"{venv_bin()}:{env.get('PATH', '')}")
    try:
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(script)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=150)
        output = out.stdout + out.stderr
        assert out.returncode == 0, f"exit {out.returncode}\n{output[-4000:]}"
        assert "recipe-job-ran" in output and "succeeded" in output, output[-4000:]
        assert (home / ".ray" / "auth_token").is_file()
        with pytest.raises(urllib.error.HTTPError) as refused:  # no token: the job API refuses
            urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/jobs/", timeout=10)
        assert refused.value.code == 401
    finally:
        left = signal_processes(node_processes({"temp_dir": str(home / "ray"), "pids": []}), grace_s=5)
        subprocess.run(["rm", "-rf", str(home)], check=False)
    assert not left
