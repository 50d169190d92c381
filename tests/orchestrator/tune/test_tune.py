"""orchestrator.tune: the CLI's checks (fast), the default digits search end to end, and resume (slow, local Ray).

The slow tests drive the real entry point in a subprocess with a temporary MIXER_HOME and sqlite MLflow store:
    pytest -m slow tests/orchestrator/tune/test_tune.py
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from waiting import wait_until

from orchestrator.config.load import load_config
from orchestrator.config.search_space import load_space
from orchestrator.config.tree import ConfigError
from orchestrator.tune.cli import main
from orchestrator.tune.planning import expected_trials, make_scheduler, make_search_alg, num_reports
from orchestrator.tune.results import EXIT_INTERRUPTED
from orchestrator.tune.store import SearchStore, pick_name, store_for
from orchestrator.tune.trial import train_run_finished, trial_config

REPO = Path(__file__).resolve().parents[3]
EXPERIMENT = "mixer-digits-tune"


@pytest.fixture
def mixer_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("MIXER_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return home


# ---------------------------------------------------------------- fast ------------------------------------


@pytest.mark.parametrize(
    "total, every_eval, every_ckpt, expected",
    [(33, 11, 11, 3), (30, 11, 11, 3), (20, 5, 10, 4), (20, 4, 6, 7), (5, 10, 10, 1)],
)
def test_num_reports_matches_the_train_loop(total, every_eval, every_ckpt, expected):
    plan = SimpleNamespace(total_steps=total, eval_every_steps=every_eval, checkpoint_every_steps=every_ckpt)
    brute = sum(1 for s in range(1, total + 1) if s % every_eval == 0 or s % every_ckpt == 0 or s == total)
    assert num_reports(plan) == brute == expected


def test_search_names_are_stable_and_resume_takes_the_latest(tmp_path):
    store = SearchStore(str(tmp_path))
    assert pick_name(store, "tune-digits", False, None) == "tune-digits"
    with pytest.raises(ConfigError, match="--resume"):
        pick_name(store, "tune-digits", True, None)
    (tmp_path / "tune-digits").mkdir()
    assert pick_name(store, "tune-digits", False, None) == "tune-digits-2"
    assert pick_name(store, "tune-digits", True, None) == "tune-digits"
    (tmp_path / "tune-digits-2").mkdir()
    (tmp_path / "tune-digits-10").mkdir()
    (tmp_path / "tune-digitsX").mkdir()
    assert pick_name(store, "tune-digits", False, None) == "tune-digits-3"
    assert pick_name(store, "tune-digits", True, None) == "tune-digits-10"
    assert pick_name(store, "tune-digits", True, "mine") == "mine"
    with pytest.raises(ConfigError, match="--name"):
        pick_name(store, "tune-digits", False, "a/b")
    store.write_sidecar("mine", {"x": 1})
    assert store.read_sidecar("mine") == {"x": 1} and store.read_sidecar("nothing") is None


def test_trial_config_is_base_plus_sample_with_its_own_run_and_parent():
    space = load_space("digits")
    base = load_config(space.config, space.overrides)
    setup = {"name": "tune-digits", "space_name": "digits", "space": space.to_dict(), "base_config": base.to_dict(),
             "train_storage": "/runs/tune-digits/train_runs", "tracking_uri": "sqlite:////x.db", "parent_run_id": "p1"}
    params = {"model.tokens_mlp_dim": 0.25, "model.channels_mlp_dim": 4, "optim.lr": 0.002}
    cfg = trial_config(setup, params, "abc_00001")
    assert cfg.run.name == "tune-digits-abc_00001"  # stable per trial: a retried/resumed trial finds its checkpoints
    assert cfg.run.storage_path == "/runs/tune-digits/train_runs"
    assert (cfg.tracking.parent_run_id, cfg.tracking.uri) == ("p1", "sqlite:////x.db")
    assert (cfg.model.tokens_mlp_dim, cfg.model.channels_mlp_dim) == (32, 512)  # C = 128 for mixer_digits
    assert cfg.optim.lr == 0.002 and cfg.scaling.num_workers == 1
    assert trial_config(setup, params, "abc_00001") == cfg


def test_schedulers_and_search_algorithms():
    asha = make_scheduler("asha", max_t=6, grace_period=1, reduction_factor=2)
    assert (asha._max_t, asha._reduction_factor, asha._stop_last_trials) == (6, 2, False)
    assert make_scheduler("none", 6, 1, 2) is None
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    assert isinstance(make_search_alg("random", 0, 2), BasicVariantGenerator)
    assert isinstance(make_search_alg("grid", 0, None), BasicVariantGenerator)
    assert isinstance(make_search_alg("optuna", 0, 2), OptunaSearch)


def test_dry_run_validates_and_plans_without_ray(mixer_home, capsys):
    import ray

    assert main(["--dry-run", "schedule.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "search tune-digits" in out and "model.tokens_mlp_dim" in out
    assert "4 trial(s); each reports 3 time(s)" in out
    assert not ray.is_initialized()
    assert main(["--dry-run", "--space", "paper_appendix_b", "data.url=/nonexistent",
                      "data.num_train_samples=1281167"]) == 0
    assert "256 trial(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "space_text, args, names",
    [
        ("params:\n  reg.mixupp_alpha: {choice: [0.1]}\n", [], ["reg.mixupp_alpha"]),
        ("params:\n  reg.mixup_alpha: {choice: []}\n", [], ["reg.mixup_alpha", "empty"]),
        ("params:\n  optim.lr: {loguniform: [0.01, 0.001]}\n", [], ["optim.lr", "low"]),
        ("params:\n  model.tokens_mlp_dim: {choice: [0.001], ratio_of: C}\n", [], ["model.tokens_mlp_dim"]),
        ("params:\n  model.img_size: {grid: [16, 12]}\n  model.patch_size: {grid: [4, 8]}\n", [],
         ["model.img_size=12", "model.patch_size=8"]),
        ("params:\n  optim.lr: {loguniform: [0.001, 0.01]}\n", ["--search", "grid"], ["optim.lr", "grid"]),
        ("params:\n  optim.lr: {choice: [0.001]}\n", ["--num-samples", "0"], ["--num-samples"]),
        ("params:\n  optim.lr: {choice: [0.001]}\n", ["optim.lrr=1"], ["optim.lrr"]),
    ],
)
def test_bad_input_exits_2_naming_the_key_before_ray(space_text, args, names, mixer_home, tmp_path, capsys):
    import ray

    f = tmp_path / "space.yaml"
    f.write_text(space_text)
    assert main(["--space", str(f), *args]) == 2
    err = capsys.readouterr().err
    for name in names:
        assert name in err, err
    assert not ray.is_initialized()
    assert not (mixer_home / "runs").exists()  # nothing created before the error


def test_resume_without_a_search_is_a_clear_error(mixer_home, capsys):
    assert main(["--resume"]) == 2
    assert "no search named tune-digits" in capsys.readouterr().err


def test_resume_without_tune_state_is_a_clear_error(mixer_home, capsys):
    """A search that stopped before Tune saved its state: Tuner.can_restore says no, before any Ray."""
    import ray

    SearchStore(str(mixer_home / "runs")).write_sidecar("tune-digits", {"name": "tune-digits"})
    assert main(["--resume"]) == 2
    assert "holds no Tune experiment state" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_expected_trials_per_search_algorithm():
    space = load_space("digits")  # a 2 x 2 grid of D_S x D_C
    assert expected_trials(space, "random", 3) == 12
    assert expected_trials(space, "optuna", 3) == 3


def test_search_store_on_s3_with_a_custom_endpoint(s3_server, s3_bucket, monkeypatch):
    """The store reads and writes through fsspec/s3fs at the endpoint Train runs use, and Tune gets the same
    place as launch.storage_target gives Train (a path without s3:// and a pyarrow filesystem over s3fs)."""
    from pyarrow.fs import FileType

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    store = store_for(load_config("digits", {"run.storage_path": f"s3://{s3_bucket}/searches"}))
    assert store.tune_path == f"{s3_bucket}/searches" and store.tune_filesystem is not None
    assert store.experiment_url("tune-digits") == f"s3://{s3_bucket}/searches/tune-digits" and not store.is_local
    assert pick_name(store, "tune-digits", False, None) == "tune-digits"
    store.write_sidecar("tune-digits", {"x": 1})
    assert store.read_sidecar("tune-digits") == {"x": 1} and store.read_sidecar("nothing") is None
    assert pick_name(store, "tune-digits", False, None) == "tune-digits-2"
    assert pick_name(store, "tune-digits", True, None) == "tune-digits"
    seen_by_tune = store.tune_filesystem.get_file_info(f"{store.tune_experiment_path('tune-digits')}/mixer_search.json")
    assert seen_by_tune.type == FileType.File


# ---------------------------------------------------------------- slow: local Ray -------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_run_finished_reads_the_runs_latest_checkpoint(tmp_path):
    """ray.train.Result.from_path tells a trial whether its Train run already reached its last step (then the
    trial hands Tune the final metrics itself): checked against a real Train V2 run on a local Ray instance."""
    import ray
    from ray.train import Checkpoint, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = load_config("digits", {"run.storage_path": str(tmp_path / "runs"), "run.name": "r"})
    assert not train_run_finished(cfg, 3)  # no such run yet

    def report_three_steps():  # nested: pickled by value for the worker
        import tempfile

        import ray.train

        for step in (1, 2, 3):
            with tempfile.TemporaryDirectory() as d:
                ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(d))

    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        TorchTrainer(report_three_steps, scaling_config=ScalingConfig(num_workers=1),
                     run_config=RunConfig(name="r", storage_path=str(tmp_path / "runs"))).fit()
    finally:
        ray.shutdown()
    assert train_run_finished(cfg, 3)
    assert not train_run_finished(cfg, 4)


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(MIXER_HOME=str(home), PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token")
    return env


def _run_tune(home: Path, args: list[str], log_path: Path, timeout: int) -> tuple[int, str]:
    """Run the CLI with its output in a file (kept when it times out), return (exit code, output)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.tune", *args], cwd=REPO, env=_env(home),
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # let Ray shut its local instance down
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise AssertionError(f"tune timed out after {timeout}s:\n{log_path.read_text()[-6000:]}") from None
    return rc, log_path.read_text()


def _tracking(home: Path) -> str:
    return f"sqlite:///{home / 'tune-mlflow.db'}"


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in runs if r.data.tags.get("mixer.kind") == "tune"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_default_search_end_to_end(tmp_path):
    """The embedded default, shrunk to 3 epochs: 4 trials (D_S x D_C grid), 2 at a time, ASHA on val/top1."""
    home = tmp_path / "home"
    t0 = time.monotonic()
    rc, log = _run_tune(home, ["schedule.epochs=3", f"tracking.uri={_tracking(home)}"], tmp_path / "tune.log", 840)
    took = time.monotonic() - t0
    assert rc == 0, log[-6000:]
    print(f"default search (3 epochs) took {took:.0f}s")

    client, parents, children = _runs(_tracking(home))
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.scheduler"].startswith("ASHA")
    assert "space.model.tokens_mlp_dim" in parent.data.params and "search.algorithm" in parent.data.params
    assert parent.data.metrics["best/top1"] > 0.3 and "best.trial_id" in parent.data.tags
    # chosen on the minival the digits preset holds out; val is reported beside it
    assert parent.data.tags["search.selected_on"] == "minival/top1"
    assert parent.data.params["search.metric"] == "minival/top1 (max)"
    assert "trials compared on minival/top1 (val/top1 reported, never selected on)" in log
    best_child = next(c for c in children if c.info.run_name == parent.data.tags["best.run_name"])
    assert parent.data.metrics["best/selection_top1"] == pytest.approx(best_child.data.metrics["minival/top1"])
    assert {"search/space.yaml", "search/trials.json", "search/best_config.yaml"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "search")}

    # 4 nested children, one per trial, with distinct (D_S, D_C), each with metrics and compute
    assert len(children) == 4
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    widths = {(c.data.params["model.tokens_mlp_dim"], c.data.params["model.channels_mlp_dim"]) for c in children}
    assert widths == {("32", "128"), ("32", "512"), ("128", "128"), ("128", "512")}
    assert all("val/top1" in c.data.metrics and "compute/flops" in c.data.metrics for c in children), [
        (c.info.run_name, sorted(c.data.metrics)) for c in children]
    assert all("compute.train_gflops_per_image" in c.data.params for c in children)
    # ASHA stopped at least one trial before its last evaluation; the rest finished
    statuses = [c.data.tags["mixer.tune_status"] for c in children]
    assert statuses.count("stopped_early") >= 1, statuses
    assert set(statuses) <= {"stopped_early", "completed"}
    assert all(c.info.status != "RUNNING" for c in children)
    assert parent.data.metrics["trials.stopped_early"] >= 1
    assert "stopped early by ASHA" in log

    # the best config is a file pretrain takes unchanged
    m = re.search(r"best config\s+(\S+)", log)
    assert m, log[-3000:]
    best = Path(m.group(1))
    assert best == home / "runs" / "tune-digits" / "best_config.yaml"
    text = best.read_text()
    best_child = next(c for c in children if c.data.tags["mixer.tune_trial_id"] == parent.data.tags["best.trial_id"])
    assert f"tokens_mlp_dim: {best_child.data.params['model.tokens_mlp_dim']}" in text
    dry = subprocess.run([sys.executable, "-m", "orchestrator.pretrain", "--config", str(best), "--dry-run"],
                         cwd=REPO, env=_env(home), capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "tune-digits-best" in dry.stdout


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_interrupted_search_resumes_without_redoing_finished_trials(tmp_path):
    """Ctrl-C after the first trial finished; --resume runs only what is left, and each trial keeps one MLflow run."""
    home = tmp_path / "home"
    uri = _tracking(home)
    args = [sys.executable, "-m", "orchestrator.tune", "--max-concurrent", "1", "schedule.epochs=2",
            f"tracking.uri={uri}"]
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=REPO, env=_env(home), stdout=log, stderr=subprocess.STDOUT)
    try:
        finished = None
        deadline = time.monotonic() + 600
        while finished is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(3)
            # read the store only once the driver has created it (two processes migrating one sqlite file race)
            if "Configuration for experiment" in log_path.read_text():
                try:
                    _, _, children = _runs(uri)
                except Exception:  # the store is being created
                    continue
                done = [c for c in children if c.info.status == "FINISHED"]
                finished = done[0] if done else None
        assert finished is not None, log_path.read_text()[-5000:]
        # Tune has recorded the trial as terminated once its reporter prints it (in the same controller step)
        completed = f"Trial run_trial_{finished.data.tags['mixer.tune_trial_id']} completed after"
        wait_until(lambda: completed in log_path.read_text(), 120,
                   lambda: f"{completed!r} in the log:\n{log_path.read_text()[-5000:]}", interval=0.5)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    first_log = log_path.read_text()
    assert rc == EXIT_INTERRUPTED, first_log[-5000:]
    assert "--resume --name tune-digits" in first_log
    finished_id = finished.data.tags["mixer.tune_trial_id"]
    end_time = finished.info.end_time

    rc, log = _run_tune(home, ["--resume"], tmp_path / "resume.log", 900)
    assert rc == 0, log[-6000:]
    assert "resuming" in log
    assert f"run_trial_{finished_id} started" not in log  # the finished trial was not run again
    client, parents, children = _runs(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4  # one MLflow run per trial, across both driver runs
    again = next(c for c in children if c.info.run_id == finished.info.run_id)
    assert again.info.end_time == end_time and again.data.tags["mixer.tune_status"] == "completed"
    assert all(c.info.status != "RUNNING" for c in children)
    assert len({(c.data.params["model.tokens_mlp_dim"], c.data.params["model.channels_mlp_dim"]) for c in children}) == 4


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_failed_trial_is_retried_and_recorded(tmp_path):
    """A trial that cannot run (its val split does not exist) is retried per FailureConfig, then recorded as
    failed in Tune's summary, the parent run's trials table and a FAILED child run; the other trial finishes."""
    home = tmp_path / "home"
    uri = _tracking(home)
    space = tmp_path / "failing.yaml"
    space.write_text(
        "config: digits\n"
        "overrides: {scaling.num_workers: 1, schedule.epochs: 1, tracking.experiment: mixer-digits-tune}\n"
        "params:\n  data.val_split: {grid: [val, no_such_split]}\n"
    )
    rc, log = _run_tune(home, ["--space", str(space), "--scheduler", "none", "--max-failures", "1",
                               f"tracking.uri={uri}"], tmp_path / "tune.log", 840)
    assert rc == 0, log[-6000:]
    assert "1 failed" in log and "no_such_split" in log
    client, parents, children = _runs(uri)
    assert len(parents) == 1 and len(children) == 2
    failed = [c for c in children if c.data.tags.get("mixer.tune_status") == "failed"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert failed[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert parents[0].data.metrics["trials.failed"] == 1
    import json

    local = client.download_artifacts(parents[0].info.run_id, "search/trials.json", str(tmp_path))
    rows = json.loads(Path(local).read_text())["trials"]
    bad = next(r for r in rows if r["status"] == "ERROR")
    assert bad["num_failures"] == 2  # the first attempt and one retry
    assert "no_such_split" in bad["error"]
