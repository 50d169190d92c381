"""orchestrator.study: the study files, the points (data-scale: equal total steps), bad input (fast); and each
study's digits default end to end in a short version, all three on one local Ray instance (slow).

    pytest -m slow tests/orchestrator/study/test_study.py
"""

from __future__ import annotations

import copy
import csv
import re
import time
from pathlib import Path

import pytest

from model import forward_flops, get_config
from orchestrator.config.load import load_config
from orchestrator.config.studies import STUDY_KINDS, list_study_files, load_study_file, parse_study_file
from orchestrator.config.tree import ConfigError, model_overrides
from orchestrator.study.cli import main
from orchestrator.study.points import build_study, default_plan_for
from orchestrator.train.plan import make_plan

DIGITS_TRAIN = 1437  # the digits training split


@pytest.fixture
def mixer_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("MIXER_HOME", str(home))
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return home


def subset_planner(train_samples: int):
    """A planner whose subsets round as a key-chosen subset does: round(N x f) samples, whole batches per epoch."""
    def plan_for(cfg):
        n = round(train_samples * cfg.data.train_fraction)
        return make_plan(cfg, 10, n, n // cfg.optim.global_batch_size)
    return plan_for


# ---------------------------------------------------------------- fast ------------------------------------


def test_every_study_file_defines_the_three_studies():
    assert {"digits", "i21k", "jft"} <= set(list_study_files())
    for name in list_study_files():
        study_file = load_study_file(name)
        assert set(study_file.studies) == set(STUDY_KINDS), name
        load_config(study_file.config, study_file.overrides)  # the base config builds


def test_the_digits_ladder_spans_30x_in_flops_and_jft_is_the_papers():
    digits = load_study_file("digits")
    flops = []
    for m in digits.study("model-scale").models:
        cfg = load_config("digits", digits.models[m])
        flops.append(forward_flops(get_config(cfg.model.name, **model_overrides(cfg, 10))))
    assert flops == sorted(flops) and flops[-1] / flops[0] >= 29
    jft = load_study_file("jft")
    assert [jft.models[m]["model.name"] for m in jft.study("model-scale").models] == [
        f"mixer_{s}_224" for s in ("s32", "s16", "b32", "b16", "l32", "l16")]
    assert jft.study("data-scale").fractions == [0.03, 0.1, 0.3, 1.0]


def test_equal_total_steps_across_data_scale_points():
    """Every fraction is planned for the 100% point's steps; epochs grow as the subset shrinks (the subset sizes
    round, the step cap makes the totals exact)."""
    study = build_study(load_study_file("digits"), "data-scale", {}, subset_planner(DIGITS_TRAIN))
    steps = {label: f["steps"] for label, f in study.facets.items()}
    assert len(steps) == 8 and len(set(steps.values())) == 1, steps
    target = next(iter(steps.values()))
    assert target == (DIGITS_TRAIN // 32) * 8  # 44 steps per full epoch x 8 epochs at batch 32
    plan_for = subset_planner(DIGITS_TRAIN)
    from orchestrator.config.search_space import POINT_KEY, apply

    for label in study.space.points:
        cfg = apply(study.base, {POINT_KEY: label}, study.space)
        plan = plan_for(cfg)
        assert plan.total_steps == target and cfg.train.max_steps == target
        assert plan.steps_per_epoch * cfg.schedule.epochs >= target  # the cap, not the epochs, ends the run
        assert plan.steps_per_epoch * (cfg.schedule.epochs - 1) < target  # and no epoch more than needed
    epochs = {f["fraction"]: f["epochs"] for f in study.facets.values()}
    assert epochs[1.0] == 8 and epochs[0.3] > epochs[1.0] and epochs[0.03] >= 300
    # every point is evaluated (and checkpointed) every full-data epoch, not every epoch of its subset
    assert study.base.eval.every_steps == study.base.checkpoint.every_steps == DIGITS_TRAIN // 32


def test_the_papers_233_70_23_7_epochs_at_jft_scale():
    study = build_study(load_study_file("jft"), "data-scale", {}, subset_planner(303_000_000), only=["B/32@0.03",
                        "B/32@0.1", "B/32@0.3", "B/32@1"])
    assert [int(f["epochs"]) for f in study.facets.values()] == [233, 70, 23, 7]
    assert len({f["steps"] for f in study.facets.values()}) == 1


def test_equal_steps_with_the_real_planner_and_a_step_cap(mixer_home):
    """The planner a trial uses (the dataset's own steps per epoch), with train.max_steps given: every point
    trains exactly that many steps."""
    study = build_study(load_study_file("digits"), "data-scale", {}, default_plan_for())
    assert len({f["steps"] for f in study.facets.values()}) == 1
    epochs = {f["fraction"]: f["epochs"] for f in study.facets.values()}
    assert epochs[0.03] > epochs[0.1] > epochs[0.3] > epochs[1.0] == 8  # the subsets the trials will read
    capped = build_study(load_study_file("digits"), "data-scale", {"train.max_steps": 5}, default_plan_for())
    assert {f["steps"] for f in capped.facets.values()} == {5}


def test_model_scale_and_permutation_points():
    study_file = load_study_file("digits")
    plain = subset_planner(DIGITS_TRAIN)
    ladder = build_study(study_file, "model-scale", {}, plain)
    assert list(ladder.space.points) == study_file.study("model-scale").models
    assert ladder.space.points["C32-d2"]["model.hidden_dim"] == 32 and ladder.base.schedule.epochs == 20
    perm = build_study(study_file, "permutation", {}, plain)
    assert {label: (v["data.permute"], v["data.permute_seed"]) for label, v in perm.space.points.items()} == {
        "none": ("none", 0), "patch_pixel": ("patch_pixel", 0), "global": ("global", 0)}
    two_models = copy.deepcopy(study_file)
    two_models.studies["permutation"].models = ["C32-d2", "C64-d2"]
    assert len(build_study(two_models, "permutation", {}, plain).space.points) == 6  # C32-d2:none, ...


@pytest.mark.parametrize(
    "tree, words",
    [
        ({"modelscale": {}}, ["'modelscale'", "model-scale"]),
        ({"models": {"a": {"model.depth": 2}}, "model-scale": {"models": ["b"]}}, ["'b'", "a"]),
        ({"models": {"a": {"model.deepth": 2}}}, ["model.deepth", "depth"]),
        ({"models": {"a": {"model.depth": 2}}, "data-scale": {"models": ["a"], "fractions": [0, 0.5]}},
         ["fractions", "(0, 1]"]),
        ({"models": {"a": {"model.depth": 2}}, "permutation": {"models": ["a"], "modes": ["pixels"]}},
         ["'pixels'", "patch_pixel"]),
        ({"overrides": {"optim.lrr": 1}}, ["optim.lrr", "accepted keys"]),
    ],
)
def test_bad_study_files_name_the_key(tree, words):
    with pytest.raises(ConfigError) as e:
        parse_study_file(tree, name="bad")
    for word in words:
        assert word in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["modelscale"], ["'modelscale'", "model-scale", "data-scale", "permutation"]),  # argparse: exit 2 too
        (["model-scale", "--points", "C32-d2,huge"], ["'huge'", "C32-d2, C48-d2"]),
        (["model-scale", "model.hidden_dim=8"], ["model.hidden_dim=8", "sets it for each point"]),
        (["permutation", "data.permute=global"], ["data.permute='global'", "sets it"]),
        (["data-scale", "data.train_fraction=0.5"], ["data.train_fraction=0.5", "sets it"]),
        (["model-scale", "--config", "no_such_file"], ["no_such_file", "digits, i21k, jft"]),
        (["model-scale", "--max-concurrent", "0"], ["--max-concurrent=0"]),
        (["model-scale", "optim.lr=-1"], ["optim.lr=-1.0"]),
    ],
)
def test_bad_input_exits_2_naming_value_and_accepted_before_anything(argv, words, mixer_home, capsys):
    import ray

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    for word in words:
        assert word in err, err
    assert "Traceback" not in err
    assert not ray.is_initialized() and not mixer_home.exists()


def test_checkpoints_between_evaluations_are_refused(mixer_home, capsys):
    """Every report to Tune must carry the evaluation: a checkpoint step that is not an evaluation step is refused."""
    assert main(["model-scale", "--dry-run", "eval.every_steps=10", "checkpoint.every_steps=15"]) == 2
    assert "checkpoint.every_steps=15" in capsys.readouterr().err


def test_a_study_the_file_does_not_define(tmp_path, mixer_home, capsys):
    f = tmp_path / "mine.yaml"
    f.write_text("config: digits\nmodels: {a: {model.depth: 2}}\nmodel-scale: {models: [a]}\n")
    assert main(["permutation", "--config", str(f)]) == 2
    assert "'permutation' is not defined" in capsys.readouterr().err


# ---------------------------------------------------------------- slow: one local Ray for all three -------

SHORT = ["train.max_steps=2", "eval.every_steps=2", "checkpoint.every_steps=2", "train.log_every_steps=1",
         "observe.system_metrics=false", "scaling.cpus_per_worker=0.5"]  # 4 trials at once: start-up overlaps
STUDIES = [  # (study, --points of the short version, the figure that must hold one point per trial)
    ("model-scale", "C32-d2,C128-d4", "accuracy_vs_flops.png"),
    ("data-scale", "C48-d2@0.1,C48-d2@1", "accuracy_vs_data.png"),
    ("permutation", "patch_pixel,global", "permutation.png"),  # both permutations in real runs ('none' is plain)
]


@pytest.fixture(scope="module")
def ray_home(tmp_path_factory):
    """MIXER_HOME, a tracking store and one local Ray instance shared by the three studies (started as the
    entry points start theirs, so its processes see MIXER_HOME)."""
    import ray

    from orchestrator.train.launch import init_ray

    home = tmp_path_factory.mktemp("studies") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXER_HOME", str(home))
        for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            mp.delenv(name, raising=False)
        t0 = time.monotonic()
        init_ray()
        print(f"local Ray started in {time.monotonic() - t0:.0f}s")
        try:
            yield home, f"sqlite:///{home / 'studies.db'}"
        finally:
            ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("study, points, figure", STUDIES, ids=[s[0] for s in STUDIES])
def test_each_studys_digits_default_end_to_end_short(study, points, figure, ray_home, capsys):
    from mlflow.tracking import MlflowClient

    from orchestrator.report import compare as report

    home, uri = ray_home
    t0 = time.monotonic()
    argv = [study, "--points", points, *SHORT, f"tracking.uri={uri}"]
    assert main(argv) == 0, capsys.readouterr().out[-5000:]
    took = time.monotonic() - t0
    out = capsys.readouterr().out
    name = f"{study}-digits"
    trials = len(points.split(","))
    assert f"redraw         python -m orchestrator.report --study {name}" in out

    # the figure and the table, one point / row per trial
    assert (home / "reports" / name / figure).stat().st_size > 10_000
    with open(home / "reports" / name / "study.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == trials and all(r["final_top1"] and r["status"] == "FINISHED" for r in rows), rows
    assert len({r["planned_steps"] for r in rows}) == 1  # data-scale: equal steps (here the cap, 2)

    # MLflow: a parent run named after the study, one nested run per trial, the figures as its artifacts
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mixer-digits-studies")
    parent = next(r for r in client.search_runs([exp.experiment_id], f"tags.`mixer.study` = '{study}'"))
    assert parent.info.run_name == name and parent.data.tags["mixer.kind"] == "study"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.params["tune.point"] for c in children) == sorted(r["point"] for r in rows)
    assert {figure, "study.csv", "study.md"} <= {Path(a.path).name for a in
                                                 client.list_artifacts(parent.info.run_id, "report")}

    # the report redraws it by kind, one point per trial on the figure
    t1 = time.monotonic()
    assert report.main(["--study", study, "--tracking-uri", uri, "--out", str(home / "redrawn" / study)]) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"{re.escape(figure)}\s+\({trials} points\)", printed), printed
    if study == "model-scale":
        for other in ("accuracy_vs_compute.png", "accuracy_vs_throughput.png"):
            assert re.search(rf"{other}\s+\({trials} points\)", printed), printed
        # resumable as a Tune search: nothing left to run, the finished trials are not redone
        assert main([study, "--resume", "--name", name, f"tracking.uri={uri}"]) == 0
        resumed = capsys.readouterr().out
        assert "resuming" in resumed and "started with configuration" not in resumed
        assert len(client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == trials
    print(f"{study}: {trials} trials in {took:.0f}s, report and resume {time.monotonic() - t1:.0f}s")


@pytest.mark.slow
def test_report_names_the_studies_that_exist(ray_home, capsys):
    home, uri = ray_home
    from orchestrator.report import compare as report

    assert report.main(["--study", "no-such-study", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "'no-such-study'" in err and "model-scale, data-scale, permutation" in err
