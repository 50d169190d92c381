"""`python -m orchestrator.evaluate` (run in-process through main()) on the shared pretrained digits model.

- top-1 printed and logged (a new MLflow run tagged with the source) equals the training run's final evaluation;
- --log-to-source-run adds the metrics to the training run without changing its status;
- few-shot (1/5/10/25 shots, 3 seeds): far above the 10% chance and rising with shots;
- bad input: a head for other classes, a missing split, a checkpoint that records no dataset.
"""

from __future__ import annotations

import re

import pytest
import torch

from orchestrator import evaluate


def _client(pre):
    from mlflow.tracking import MlflowClient

    return MlflowClient(pre["tracking_uri"])


def test_top1_printed_and_logged_equals_the_training_runs_final_evaluation(home_env, capsys):
    assert evaluate.main(["--from", home_env["run_dir"], "--experiment", "evals"]) == 0
    out = capsys.readouterr().out
    printed = float(re.search(r"top-1 ([0-9.]+)", out).group(1))
    assert printed == pytest.approx(home_env["top1"], abs=5e-5) and "(360 images)" in out

    client = _client(home_env)
    training = client.get_run(home_env["run_id"]).data.metrics["val/top1"]
    assert training == pytest.approx(home_env["top1"], abs=1e-12)
    run = client.get_run(re.search(r"MLflow run id\s+(\w+)", out).group(1))
    assert run.data.metrics["eval/top1"] == pytest.approx(training, abs=1e-12)
    assert run.data.tags["eval.source"] == home_env["run_dir"] and run.data.tags["eval.source_run_id"] == home_env["run_id"]
    assert run.data.tags["eval.source_step"] == str(home_env["step"]) and run.info.status == "FINISHED"
    assert client.get_metric_history(run.info.run_id, "eval/top1")[0].step == home_env["step"]


def test_log_to_source_run_keeps_its_status(home_env, capsys):
    client = _client(home_env)
    status = client.get_run(home_env["run_id"]).info.status
    assert evaluate.main(["--from", home_env["run_dir"], "--log-to-source-run"]) == 0
    capsys.readouterr()
    run = client.get_run(home_env["run_id"])
    assert run.data.metrics["eval/val/top1"] == pytest.approx(home_env["top1"], abs=1e-12)
    assert run.info.status == status


def test_fewshot_far_above_chance_and_rising_with_shots(home_env, capsys):
    assert evaluate.main(["--from", home_env["run_dir"], "--fewshot", "--fewshot-only", "--experiment", "evals"]) == 0
    out = capsys.readouterr().out
    acc = {int(k): float(v) for k, v in re.findall(r"(\d+)-shot ([0-9.]+)", out)}
    print("FIGURES few-shot accuracies:", acc)
    assert set(acc) == {1, 5, 10, 25}
    assert acc[1] > 0.3  # chance is 0.1
    assert acc[1] < acc[5] < acc[25] and acc[10] <= acc[25] + 0.01 and acc[25] > 0.8
    run = _client(home_env).get_run(re.search(r"MLflow run id\s+(\w+)", out).group(1))
    assert run.data.metrics["fewshot/25shot"] == pytest.approx(acc[25], abs=5e-5)
    assert "eval/top1" not in run.data.metrics


def test_bad_input(home_env, tmp_path, capsys):
    from orchestrator.eval.sources import load_source

    src = load_source(home_env["run_dir"])
    sd = dict(src.state_dict)
    sd["head.weight"], sd["head.bias"] = torch.zeros(3, 128), torch.zeros(3)
    torch.save(sd, tmp_path / "three.pt")
    assert evaluate.main(["--from", str(tmp_path / "three.pt"), "--data", home_env["data_url"], "--no-tracking"]) == 2
    err = capsys.readouterr().err
    assert "3-class head" in err and "10 classes" in err and "--fewshot-only" in err

    torch.save(src.state_dict, tmp_path / "plain.pt")
    assert evaluate.main(["--from", str(tmp_path / "plain.pt"), "--no-tracking"]) == 2
    assert "--data is needed" in capsys.readouterr().err

    assert evaluate.main(["--from", home_env["run_dir"], "--split", "test", "--no-tracking"]) == 2
    assert "split 'test' is not in the dataset" in capsys.readouterr().err

    assert evaluate.main(["--from", str(tmp_path / "missing"), "--no-tracking"]) == 2
    assert "does not exist" in capsys.readouterr().err

    assert evaluate.main(["--from", home_env["run_dir"], "--shots", "0,5", "--no-tracking"]) == 2
    assert "--shots" in capsys.readouterr().err


def test_printed_mlflow_command_hides_tracking_credentials(capsys):
    from types import SimpleNamespace

    src = SimpleNamespace(describe=lambda: "timm checkpoint x.pt")
    r = evaluate.Results(src, "/data", "val", None, None, "run1", "http://alice:s3cr3t@mlflow.example:5000", 1.0)
    evaluate.print_results(r)
    out = capsys.readouterr().out
    # an http(s) store is a server with its own UI: its URL, without the credentials, not an `mlflow ui` command
    assert "s3cr3t" not in out and "MLflow UI       http://mlflow.example:5000\n" in out and "mlflow ui" not in out
