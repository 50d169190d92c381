"""Static checks of everything under cluster/: parses, validates, token auth on, GPUs, no secret values.

.venv/bin/python -m pytest tests/cluster/test_cluster_configs.py -q      # ~2 s
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER = REPO_ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
AWS = CLUSTER / "aws" / "cluster.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
README = CLUSTER / "README.md"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"

YAML_FILES = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _image_tag() -> str:
    """The image the Dockerfile's documented build command produces."""
    m = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", DOCKERFILE.read_text())
    assert m, "cluster/Dockerfile must document its `docker build -f cluster/Dockerfile -t IMAGE .` command"
    return m.group(1)


# ----------------------------------------------------------------------------------------------- parsing


def test_expected_files_exist():
    for path in (KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml", AWS, DOCKERFILE, RUNTIME_ENV, README):
        assert path.is_file(), path
    assert len(YAML_FILES) >= 4


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected mapping document(s)"


# ----------------------------------------------------------------------------------------------- AWS launcher


def test_launcher_config_validates_against_rays_shipped_schema():
    config = _load(AWS)
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    # Ray's own check (schema + node-type consistency), before and after it fills in the AWS defaults.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(copy.deepcopy(config))
    validate_config(prepare_config(copy.deepcopy(config)))


def test_launcher_config_gpu_workers_and_scaling():
    config = _load(AWS)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not re.match(r"(p\d|g\d)", head["node_config"]["InstanceType"]), "head should be a CPU instance"
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert workers
    for name, t in workers.items():
        assert re.match(r"(p4d|p4de|p5|p5e|p5en|g5|g6|g6e)\.", t["node_config"]["InstanceType"]), name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]
    assert "--gpus all" in config["docker"]["worker_run_options"]
    assert config["docker"]["image"] == _image_tag()


def test_launcher_config_token_auth_on_every_ray_start():
    config = _load(AWS)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, key
        for cmd in starts:
            # the variable must be in the environment of `ray start` itself (Ray reads it only from the env)
            assert re.search(r"(^|[\s;&])RAY_AUTH_MODE=token ray start ", cmd), cmd
    # the token reaches every node as ~/.ray/auth_token, copied from the user's machine (never inlined)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("export RAY_AUTH_MODE=token" in c for c in config["setup_commands"])
    assert not any("RAY_AUTH_MODE=disabled" in c for k in config if k.endswith("commands") for c in config[k])


def test_launcher_config_dashboard_not_exposed():
    config = _load(AWS)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in yaml.safe_dump(config)
    # own security groups everywhere: the launcher's default group would open SSH to 0.0.0.0/0
    for name, t in config["available_node_types"].items():
        assert t["node_config"].get("SecurityGroupIds"), f"{name} must name the restricted security group"
    assert "IpPermissions" not in config["provider"].get("security_group", {})
    script = (CLUSTER / "aws" / "security_group.sh").read_text()
    assert '--port 22 --cidr "$ADMIN_CIDR"' in script and "0.0.0.0/0|::/0" in script
    assert not re.search(r"--port (6379|8265|10001)", script)


# ----------------------------------------------------------------------------------------------- KubeRay


def _kuberay(name: str) -> tuple[dict, dict]:
    doc = _load(KUBERAY / name)
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return doc, spec


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


CACHE_MOUNT, CACHE_DIR = "/mnt/cache", "/mnt/cache/mixer-shard-cache"  # the shard cache's volume, and data.cache_dir


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifest(name, kind):
    doc, spec = _kuberay(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert spec["authOptions"] == {"mode": "token"}
    major, minor, *_ = (int(x) for x in spec["rayVersion"].split("."))
    assert (major, minor) >= (2, 52), "token auth needs Ray >= 2.52"
    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", "do not expose the head"

    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for c in _containers(group):
            assert c["image"] == _image_tag()
            env = {e["name"]: e for e in c.get("env", [])}
            for var in SECRET_ENV:
                ref = env[var]["valueFrom"]["secretKeyRef"]
                assert ref["name"] and ref["key"] == var and not ref.get("optional", False), (group, var)
            for var, e in env.items():
                if re.search(r"KEY|SECRET|PASSWORD|TOKEN|URI|USERNAME", var):
                    assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), var
            assert "RAY_AUTH_MODE" not in env, "authOptions sets RAY_AUTH_MODE/RAY_AUTH_TOKEN itself"

    gpu_groups = [g for g in spec["workerGroupSpecs"] if "gpu" in g["groupName"]]
    assert gpu_groups
    for g in gpu_groups:
        limits = _containers(g)[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        tolerations = g["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_rayjob_entrypoint_storage_and_shutdown():
    doc, spec = _kuberay("rayjob.yaml")
    job = doc["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:5] == ["python", "-m", "orchestrator.pretrain", "--config", "imagenet1k_b16"]
    overrides = dict(a.split("=", 1) for a in argv[5:])
    assert overrides["run.storage_path"].startswith("s3://"), "checkpoints must go to shared storage"
    assert overrides["data.url"].startswith("s3://")
    assert "tracking.uri" not in overrides, "the MLflow URI comes from the mixer-mlflow Secret"
    workers = sum(g["maxReplicas"] * int(_containers(g)[0]["resources"]["limits"]["nvidia.com/gpu"])
                  for g in spec["workerGroupSpecs"])  # fmt: skip
    assert int(overrides["scaling.num_workers"]) <= workers
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] > 0
    # The RayJob's cluster is the standalone RayCluster's spec (kept identical on purpose).
    assert spec == _kuberay("raycluster.yaml")[1]


def test_rayjob_entrypoint_is_a_valid_config(monkeypatch):
    """The overrides in the RayJob resolve against the real config tree."""
    import pipelines.storage
    from orchestrator.config.load import load_config

    # data.cache_dir is checked writable where the driver starts: in the head pod, on its /mnt/cache volume, which
    # this machine need not have; recorded here, every other target checked for real
    checked, real = [], pipelines.storage.check_writable_target

    def check(url, *args, **kw):
        if str(url).startswith(CACHE_MOUNT + "/"):
            checked.append(url)
            return None
        return real(url, *args, **kw)

    monkeypatch.setattr(pipelines.storage, "check_writable_target", check)
    argv = shlex.split(_load(KUBERAY / "rayjob.yaml")["spec"]["entrypoint"])
    cfg = load_config(argv[4], argv[5:])
    assert cfg.run.storage_path.startswith("s3://") and cfg.scaling.use_gpu
    assert checked == [cfg.data.cache_dir] == [CACHE_DIR]


# ------------------------------------------------------------------------- the node-local shard cache's volume

def _gib(quantity: str) -> float:
    units = {"Gi": 1, "Ti": 1024, "G": 1e9 / 2**30, "T": 1e12 / 2**30}
    unit = next(u for u in ("Gi", "Ti", "G", "T") if quantity.endswith(u))
    return float(quantity.removesuffix(unit)) * units[unit]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_gpu_workers_mount_a_volume_for_the_shard_cache(name):
    """Not the container's writable layer (the kubelet evicts a pod that fills it): a volume at /mnt/cache with
    room for the preset's data.cache_max_gb (each node's cache fills toward the whole dataset), requested as
    ephemeral storage; the head mounts one too, as the driver checks that data.cache_dir is writable there."""
    from orchestrator.config.load import load_config

    _doc, spec = _kuberay(name)
    cache_gib = load_config("imagenet1k_b16", []).data.cache_max_gb  # GiB (CacheConfig: max_gb * 2**30 bytes)
    groups = [spec["headGroupSpec"], *[g for g in spec["workerGroupSpecs"] if "gpu" in g["groupName"]]]
    for group in groups:
        pod = group["template"]["spec"]
        (container,) = _containers(group)
        (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == CACHE_MOUNT]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert "medium" not in volume["emptyDir"], "on disk, not in memory"
        if group is spec["headGroupSpec"]:
            continue  # the head caches nothing
        size = _gib(volume["emptyDir"]["sizeLimit"])
        assert size >= 1.1 * cache_gib, (size, cache_gib)  # the bound and shards being fetched
        assert _gib(container["resources"]["requests"]["ephemeral-storage"]) >= size


def test_rayjob_puts_the_shard_cache_on_its_volume():
    argv = shlex.split(_load(KUBERAY / "rayjob.yaml")["spec"]["entrypoint"])
    overrides = dict(a.split("=", 1) for a in argv[5:])
    assert overrides["data.cache_dir"] == CACHE_DIR
    assert f"data.cache_dir={CACHE_DIR}" in README.read_text()  # cluster/README.md's RayCluster submission too


@pytest.mark.parametrize("parent_mode", [0o777, 0o1777, 0o2777])
def test_the_cache_dir_may_be_a_private_subdir_of_a_world_writable_volume_root(tmp_path, parent_mode):
    """An emptyDir's root is world-writable (0777; setgid with the pods' fsGroup): the shard cache refuses a
    directory others can write to, but its own 0700 subdirectory there is this user's and is used."""
    from pipelines.shard_cache import _check_private

    root = tmp_path / "mnt-cache"
    root.mkdir()
    root.chmod(parent_mode)
    cache = root / "mixer-shard-cache"
    _check_private(str(cache))  # created 0700, accepted
    assert cache.stat().st_mode & 0o777 == 0o700
    with pytest.raises(PermissionError, match="writable by nobody else"):
        _check_private(str(root))  # the volume root itself is not


# ----------------------------------------------------------------------------------------------- image, runtime env


def test_dockerfile_non_root_cuda_python311_pinned_project():
    text = DOCKERFILE.read_text()
    instructions = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [ln for ln in instructions if ln.upper().startswith("FROM ")]
    assert froms and froms[0].split()[1].startswith("nvidia/cuda:")
    users = [ln.split()[1] for ln in instructions if ln.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0"), "the image must not run as root"
    after_last_user = "\n".join(
        instructions[max(i for i, ln in enumerate(instructions) if ln.startswith("USER ")) :]
    )
    assert "sudo" not in after_last_user
    assert "python3.11" in text
    assert re.search(r"pip install[^\n]* \.", text), (
        "installs the project (its pinned deps from pyproject.toml)"
    )
    for ln in instructions:
        if ln.upper().startswith(("ENV ", "ARG ")):
            assert not re.search(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", ln, re.I), ln
    assert not re.search(r"^\s*(COPY|ADD)\s+[^\n]*(\.aws|\.ray|auth_token|\.env|\.pem)", text, re.M)
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text()
    for pattern in ("**/auth_token", "**/.env", "**/*.pem"):
        assert pattern in ignore


def test_runtime_env_has_no_secret_values():
    env = _load(RUNTIME_ENV)
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # accepted by Ray
    for name in env.get("env_vars", {}):
        assert not re.search(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL|MLFLOW_TRACKING_URI", name), name
    for pattern in (".venv", ".git", "data/", "runs/", "mlflow.db", "auth_token", ".env"):
        assert pattern in env["excludes"]


# ----------------------------------------------------------------------------------------------- secrets scan

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "64-hex token": re.compile(r"\b[0-9a-f]{64}\b"),
    "github token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    "credentials in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@'\"]+:[^\s/@'\"$]+@"),
    "aws secret key value": re.compile(r"aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{30,}", re.I),
}
# `name: value` or `NAME=value` where the name says secret and the value is a literal, not a reference.
LITERAL_ASSIGNMENT = re.compile(
    r"""(?P<key>[A-Za-z0-9_.-]*(password|passwd|secret|token|api[_-]?key|access[_-]?key)[A-Za-z0-9_]*)
        ["']?[ \t]*(?P<op>[:=])[ \t]*(?P<value>[^\s#,]+)""",
    re.I | re.X,
)
# A reference (env var, path, template, YAML block), a placeholder, or a non-secret word.
REFERENCE_VALUE = re.compile(
    r"""^(["']?\$|["']?~|/|<|\{|\||>|\.\.\.|YOUR-|REPLACE|valueFrom|true$|false$|token$|required$)"""
)


def find_secrets(text: str, config_like: bool = True) -> list[str]:
    problems = [
        f"{what}: {m.group(0)[:20]}..." for what, rx in SECRET_PATTERNS.items() for m in rx.finditer(text)
    ]
    if config_like:
        for m in LITERAL_ASSIGNMENT.finditer(text):
            value = m.group("value").strip()
            if value and not REFERENCE_VALUE.match(value):
                problems.append(f"literal value for {m.group('key')}: {value[:6]}...")
    return problems


def test_secret_scanner_catches_secrets():
    fake_key = "AKIA" + "Q" * 16
    assert find_secrets(f"aws_access_key_id = {fake_key}")
    assert find_secrets("password: hunter2hunter2")
    assert find_secrets("MLFLOW_TRACKING_URI=https://alice:s3cr3t@mlflow.example.com")
    assert find_secrets("RAY_AUTH_TOKEN=" + "ab" * 32)
    assert not find_secrets('--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"')
    assert not find_secrets("~/.ray/auth_token: ~/.ray/auth_token")
    assert not find_secrets("authOptions:\n  mode: token\n")


SCANNED = sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_secret_values_under_cluster(path):
    text = path.read_text(errors="replace")
    problems = find_secrets(text, config_like=path.suffix != ".py")
    assert not problems, f"{path.relative_to(REPO_ROOT)}: {problems}"
    if path.suffix in (".yaml", ".yml"):
        for doc in yaml.safe_load_all(text):
            assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), (
                "no Secret objects in manifests"
            )


def test_readme_covers_each_cluster_and_safe_access():
    text = README.read_text()
    for needle in (
        "python -m cluster.local_cluster up",
        "kubectl apply -f cluster/kuberay/rayjob.yaml",
        "ray up cluster/aws/cluster.yaml",
        "kubectl port-forward",
        "ray dashboard cluster/aws/cluster.yaml",
        "ssh -L",
        "RAY_AUTH_MODE=token",
        "KubeRay",
        "1.5.1",
        f"docker build -f cluster/Dockerfile -t {_image_tag()} .",
    ):
        assert needle in text, needle


# ------------------------------------------------------------------------- eviction: preStop drain and grace

def _prestop_deadline(container: dict) -> int:
    """The preStop hook's drain deadline; the hook must be `python -m cluster.drain_self` with one."""
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert isinstance(command, list) and all(isinstance(a, str) for a in command), command
    assert command[:3] == ["python", "-m", "cluster.drain_self"], command
    args = command[3:]
    return int(args[args.index("--deadline-remaining-seconds") + 1])


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_workers_drain_for_preemption_before_sigterm(name):
    from orchestrator.config.tree import CheckpointSection

    _doc, spec = _kuberay(name)
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        grace = pod["terminationGracePeriodSeconds"]  # a pod field, not a container's
        assert isinstance(grace, int)
        for c in _containers(group):
            assert "terminationGracePeriodSeconds" not in c
            deadline = _prestop_deadline(c)
            # the formula in cluster/README.md: the drain deadline covers the notice, the step, the save and the
            # upload with a safety factor; what is left after it covers the workers' own SIGTERM grace
            assert 60 <= deadline < grace
            assert grace - deadline > CheckpointSection().sigterm_grace_s
    head = spec["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for c in head["containers"] for e in c.get("env", [])}
    assert int(env["RAY_JOB_STOP_WAIT_TIME_S"]) > CheckpointSection().sigterm_grace_s  # `ray job stop`: time to
    readme = README.read_text()                                                           # checkpoint first
    assert "terminationGracePeriodSeconds" in readme and "drain_self" in readme


def test_prestop_hook_command_drains_its_own_node_with_reason_preemption(monkeypatch):
    """The hook's command as the manifest runs it: `ray drain-node` for the node its driver is attached to,
    reason PREEMPTION, the manifest's deadline; the GCS address from KubeRay's environment."""
    import subprocess

    from cluster import drain_self

    _doc, spec = _kuberay("raycluster.yaml")
    command = _containers(spec["workerGroupSpecs"][0])[0]["lifecycle"]["preStop"]["exec"]["command"]
    ran = []
    monkeypatch.setattr(drain_self, "own_node_id", lambda address: "ab" * 28)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("FQ_RAY_IP", "mixer-head-svc.default.svc.cluster.local")
    assert drain_self.main([*command[3:], "--no-wait"]) == 0
    (cmd,) = ran
    assert cmd[1:] == ["drain-node", "--address", "mixer-head-svc.default.svc.cluster.local:6379",
                       "--node-id", "ab" * 28, "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message",
                       "Kubernetes is terminating the pod", "--deadline-remaining-seconds",
                       str(_prestop_deadline(_containers(spec["workerGroupSpecs"][0])[0]))]
    assert drain_self.gcs_address({"RAY_ADDRESS": "ray://10.0.0.1:6379"}) == "10.0.0.1:6379"
