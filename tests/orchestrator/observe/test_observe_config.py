"""The observe section: defaults, and every bad value exits 2 from the entry point before anything starts (one
message naming the key, the bad value and what is accepted; no Ray, no MLflow store, nothing written), in the
style of tests/orchestrator/test_bad_inputs.py."""

from __future__ import annotations

import pytest

from orchestrator import pretrain
from orchestrator.config.load import load_config
from orchestrator.config.tree import ConfigError, ObserveSection
from orchestrator.train.plan import make_plan


def test_defaults_sample_every_10_s_break_steps_down_and_do_not_profile():
    cfg = load_config("digits")
    assert cfg.observe == ObserveSection(system_metrics=True, system_metrics_interval_s=10.0, step_breakdown=True,
                                         profile_steps=None, data_delay_s=0.0)
    cfg = load_config("digits", ["observe.system_metrics=false", "observe.profile_steps=[2, 5]",
                                 "observe.system_metrics_interval_s=0.5", "observe.step_breakdown=false"])
    assert (cfg.observe.system_metrics, cfg.observe.profile_steps, cfg.observe.system_metrics_interval_s,
            cfg.observe.step_breakdown) == (False, [2, 5], 0.5, False)


def test_the_plan_refuses_a_profile_window_past_the_runs_last_step():
    cfg = load_config("digits", ["train.max_steps=12", "observe.profile_steps=[10, 12]"])
    assert make_plan(cfg, 10, 1000).total_steps == 12  # ends on the last step: accepted
    cfg = load_config("digits", ["train.max_steps=12", "observe.profile_steps=[10, 13]"])
    with pytest.raises(ConfigError, match=r"observe.profile_steps=\[10, 13\].*run's last step, 12"):
        make_plan(cfg, 10, 1000)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from pipelines.write_shards import write_dataset

    data = str(tmp_path_factory.mktemp("observe-config") / "digits")
    write_dataset("digits", data, progress=False)
    return data


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    home, ray_tmp = tmp_path / "home", tmp_path / "ray"
    monkeypatch.setenv("MIXER_HOME", str(home))
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return {"home": home, "ray": ray_tmp}


BAD = [
    ("interval-0", ["observe.system_metrics_interval_s=0"],
     ["observe.system_metrics_interval_s=0.0", "a number of seconds > 0"]),
    ("interval-negative", ["observe.system_metrics_interval_s=-5"],
     ["observe.system_metrics_interval_s=-5.0", "a number of seconds > 0"]),
    ("interval-not-a-number", ["observe.system_metrics_interval_s=often"],
     ["observe.system_metrics_interval_s='often'", "a number"]),
    ("profile-reversed", ["observe.profile_steps=[20, 10]"], ["observe.profile_steps=[20, 10]", "0 <= start < stop"]),
    ("profile-empty-window", ["observe.profile_steps=[10, 10]"], ["observe.profile_steps=[10, 10]", "start < stop"]),
    ("profile-negative", ["observe.profile_steps=[-1, 10]"], ["observe.profile_steps=[-1, 10]", "0 <= start"]),
    ("profile-one-number", ["observe.profile_steps=[10]"], ["observe.profile_steps=[10]", "[start, stop]"]),
    ("profile-not-integers", ["observe.profile_steps=[1.5, 3]"], ["observe.profile_steps", "1.5", "an integer"]),
    ("profile-past-the-run", ["{data}", "train.max_steps=5", "observe.profile_steps=[2, 10]"],
     ["observe.profile_steps=[2, 10]", "the run's last step, 5"]),
    ("data-delay-negative", ["observe.data_delay_s=-1"], ["observe.data_delay_s=-1.0", ">= 0"]),
    ("unknown-key", ["observe.gpu_metrics=false"], ["observe.gpu_metrics", "accepted keys in observe",
                                                    "system_metrics_interval_s"]),
]


@pytest.mark.parametrize("case_id, argv, words", BAD, ids=[c[0] for c in BAD])
def test_a_bad_observe_value_exits_2_before_anything_starts(case_id, argv, words, digits, isolated, capsys):
    import ray

    argv = [a.replace("{data}", f"data.url={digits}") for a in argv]
    assert pretrain.main(argv) == 2
    out, err = capsys.readouterr()
    message = [line for line in err.splitlines() if "error: " in line]
    assert len(message) == 1, err
    for word in words:
        assert word in message[0], message[0]
    assert "Traceback" not in out + err
    assert not ray.is_initialized()
    assert not isolated["home"].exists() and not isolated["ray"].exists()
