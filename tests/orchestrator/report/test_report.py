"""orchestrator.report against runs logged in a real (sqlite) MLflow store with the metric-name contract."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest

from orchestrator.report.compare import main, make_report
from orchestrator.report.runs import ReportError
from orchestrator.report.table import pareto_frontier
from orchestrator.tracking.tracker import RunTracker

# name, model, (D_S, D_C, C, depth, patch), params, fwd GFLOPs/img, workers, final top-1, accelerator-hours,
# global img/s, status, few-shot, logs compute metrics
RUNS = [
    ("s32-bs4k", "mixer_s32_224", (256, 2048, 512, 8, 32), 19.1e6, 1.0, 8, 0.684, 10.0, 16000, "FINISHED", True, True),
    ("s16-bs4k", "mixer_s16_224", (256, 2048, 512, 8, 16), 18.5e6, 3.8, 8, 0.731, 25.0, 6400, "FINISHED", True, True),
    ("b32-bs4k", "mixer_b32_224", (384, 3072, 768, 12, 32), 60.3e6, 3.2, 8, 0.702, 30.0, 6000, "FINISHED", False, True),
    ("b16-bs4k", "mixer_b16_224", (384, 3072, 768, 12, 16), 59.9e6, 12.6, 16, 0.765, 80.0, 4200, "FINISHED", True, True),
    ("l16-live", "mixer_l16_224", (512, 4096, 1024, 24, 16), 208.2e6, 44.6, 16, 0.722, 40.0, 1300, "RUNNING", False, True),
    ("no-compute", "mixer_s16_224", (256, 2048, 512, 8, 16), 18.5e6, 3.8, 2, 0.90, None, 600, "FINISHED", False, False),
    ("crashed", "mixer_b16_224", (384, 3072, 768, 12, 16), 59.9e6, 12.6, 4, None, 0.5, 1100, "FAILED", False, True),
]
EXPECTED_FRONTIER = {"s32-bs4k", "s16-bs4k", "b16-bs4k"}
STEPS = 8


def _log_run(uri, experiment, spec, parent_run_id=None):
    name, model, (ds, dc, c, depth, patch), nparams, gflops, workers, top1, hours, img_s, status, fewshot, compute = spec
    t = RunTracker(uri, experiment, name, parent_run_id=parent_run_id,
                   tags={"model_name": model, "world_size": workers, "git_commit": "0" * 40})
    run_id = t.start()
    t.log_params({
        "model.name": model, "model.tokens_mlp_dim": ds, "model.channels_mlp_dim": dc, "model.hidden_dim": c,
        "model.depth": depth, "model.patch_size": patch, "model.img_size": 224, "scaling.num_workers": workers,
        "compute.num_params": int(nparams), "compute.fwd_gflops_per_image": gflops,
        "compute.train_gflops_per_image": 3 * gflops, "compute.accelerator": "NVIDIA H100 80GB HBM3",
        "compute.peak_tflops": 989.0,
    })
    n_steps = 3 if status == "FAILED" else STEPS
    for i in range(1, n_steps + 1):
        step = i * 1000
        frac = i / STEPS
        rate = img_s * (0.5 if i == 1 else (1.0 + 0.02 * math.sin(i)))  # first window is warm-up
        m = {"train/loss": 4.0 * (1 - 0.7 * frac), "train/lr": 1e-3 * (1 - frac), "train/grad_norm": 1.0,
             "train/img_per_s": rate, "train/img_per_s_per_device": rate / workers}
        if compute:
            m.update({"train/mfu": rate / workers * 3 * gflops * 1e9 / 989e12,
                      "compute/flops": 3 * gflops * 1e9 * 4096 * step,
                      "compute/accelerator_hours": hours * frac,
                      "compute/productive_hours": 0.8 * hours * frac, "compute/goodput": 0.8,
                      "perf/data_wait_fraction": 0.1 + 0.01 * i})
            if i == n_steps and status == "FINISHED":  # the run's own figure, logged at its end
                m["perf/run_data_wait_fraction"] = 0.125
        if top1 is not None and i % 2 == 0:
            # rises, with a slight dip at the end so "best" differs from "last"
            acc = top1 * (1 - 0.5 * (1 - frac) ** 2) - (0.004 if i == STEPS else 0.0)
            m.update({"val/top1": acc + (0.004 if i == STEPS - 2 else 0.0), "val/top5": min(1.0, acc + 0.15),
                      "val/loss": 1.5 * (1 - frac) + 0.8})
        if fewshot and i == n_steps:
            m.update({"fewshot/5shot": top1 * 0.7, "fewshot/25shot": top1 * 0.85})
        t.log_metrics(m, step)
    if status != "RUNNING":
        t.end(status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-store")
    uri = f"sqlite:///{root}/mlflow.db"
    ids = {spec[0]: _log_run(uri, "mixer-pretrain", spec) for spec in RUNS}
    _log_run(uri, "single", RUNS[1])
    parent = RunTracker(uri, "mixer-tune", "search")
    pid = parent.start()
    children = {spec[0]: _log_run(uri, "mixer-tune", spec, parent_run_id=pid) for spec in RUNS[:3]}
    _log_run(uri, "mixer-tune", RUNS[3])  # a run of the same experiment outside this search
    parent.end()
    return {"uri": uri, "root": root, "ids": ids, "parent": pid, "children": children}


def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {row["run_name"]: row for row in csv.DictReader(f)}


def _pixels_vary(png: Path) -> bool:
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    return img.shape[0] > 300 and img.shape[1] > 500 and float(img[..., :3].std()) > 0.05


# ------------------------------------------------------------------------------------------ frontier ------


def test_pareto_frontier_constructed_set():
    pts = [
        (1.0, 0.60, "a"),  # cheapest: on it
        (2.0, 0.70, "b"),  # on it
        (2.5, 0.65, "c"),  # beaten by b (cheaper and better)
        (3.0, 0.70, "d"),  # same accuracy as b for more compute: beaten
        (4.0, 0.80, "e"),  # on it
        (4.0, 0.75, "f"),  # same compute as e, less accuracy: beaten
        (9.0, 0.79, "g"),  # beaten by e
        (10.0, 0.85, "h"),  # on it
        (None, 0.99, "i"),  # missing compute: left out
        (0.5, float("nan"), "j"),  # missing accuracy: left out
    ]
    assert [p[2] for p in pareto_frontier(pts)] == ["a", "b", "e", "h"]
    assert pareto_frontier([]) == []
    assert [p[2] for p in pareto_frontier([(1.0, 0.5, "x")])] == ["x"]
    dup = pareto_frontier([(1.0, 0.5, "x"), (1.0, 0.5, "y")])  # equal points do not beat each other
    assert sorted(p[2] for p in dup) == ["x", "y"]
    objs = [{"h": 2, "acc": 0.9}, {"h": 1, "acc": 0.95}]
    assert pareto_frontier(objs, cost=lambda o: o["h"], value=lambda o: o["acc"]) == [objs[1]]


# ------------------------------------------------------------------------------------------ report --------


def test_table_matches_mlflow_and_figures(store, tmp_path, capsys):
    from mlflow import MlflowClient

    out = tmp_path / "rep"
    assert main(["--tracking-uri", store["uri"], "--experiment", "mixer-pretrain", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| run |" in printed and str(out) in printed

    rows = _read_csv(out / "runs.csv")
    assert set(rows) == {spec[0] for spec in RUNS}
    client = MlflowClient(store["uri"])
    for name, run_id in store["ids"].items():
        row, run = rows[name], client.get_run(run_id)
        assert row["run_id"] == run_id and row["status"] == run.info.status
        p = run.data.params
        assert row["model"] == p["model.name"]
        for col, key in [("tokens_mlp_dim", "model.tokens_mlp_dim"), ("channels_mlp_dim", "model.channels_mlp_dim"),
                         ("hidden_dim", "model.hidden_dim"), ("depth", "model.depth"), ("patch_size", "model.patch_size"),
                         ("num_params", "compute.num_params")]:
            assert float(row[col]) == float(p[key]), (name, col)
        assert float(row["fwd_gflops_per_image"]) == pytest.approx(float(p["compute.fwd_gflops_per_image"]))

        def hist(key, rid=run_id):
            return sorted((m.step, m.value) for m in client.get_metric_history(rid, key))

        top1 = hist("val/top1")
        if top1:
            assert float(row["best_top1"]) == pytest.approx(max(v for _, v in top1))
        else:
            assert row["best_top1"] == ""
        hours = hist("compute/accelerator_hours")
        if hours:
            assert float(row["accelerator_hours"]) == pytest.approx(hours[-1][1])
            assert float(row["total_flops"]) == pytest.approx(hist("compute/flops")[-1][1])
            assert float(row["productive_hours"]) == pytest.approx(hist("compute/productive_hours")[-1][1])
            assert float(row["goodput"]) == pytest.approx(hist("compute/goodput")[-1][1])
            assert float(row["mfu"]) == pytest.approx(statistics.median(v for _, v in hist("train/mfu")[1:]))
            windows = statistics.median(v for _, v in hist("perf/data_wait_fraction")[1:])
            assert float(row["data_wait_fraction"]) == pytest.approx(0.125 if run.info.status == "FINISHED"
                                                                     else windows)
        else:
            assert row["accelerator_hours"] == row["total_flops"] == row["mfu"] == row["data_wait_fraction"] == ""
            assert row["productive_hours"] == row["goodput"] == ""
        rates = [v for _, v in hist("train/img_per_s")]
        assert float(row["img_per_s"]) == pytest.approx(statistics.median(rates[1:]))
        per_dev = [v for _, v in hist("train/img_per_s_per_device")]
        assert float(row["img_per_s_per_accelerator"]) == pytest.approx(statistics.median(per_dev[1:]))
        five = hist("fewshot/5shot")
        assert row["fewshot_5shot"] == (repr(five[-1][1]) if five else "")

    assert {n for n, r in rows.items() if r["pareto_frontier"] == "True"} == EXPECTED_FRONTIER
    md = (out / "runs.md").read_text()
    assert "l16-live (running)" in md and "crashed (failed)" in md and "5-shot" in md and "★" in md
    no_compute_line = next(line for line in md.splitlines() if line.startswith("| no-compute"))
    assert "89.60%" in no_compute_line and "★" not in no_compute_line  # best top-1, but off the frontier
    header = md.splitlines()[next(i for i, line in enumerate(md.splitlines()) if line.startswith("| run |"))]
    assert "| MFU | data wait | acc-hours | productive h | goodput |" in header
    s16_line = next(line for line in md.splitlines() if line.startswith("| s16-bs4k"))
    assert "| 12.5% | 25 | 20 | 80% |" in s16_line  # data wait, held, productive, goodput

    for name in ["accuracy_vs_compute.png", "accuracy_vs_throughput.png", "accuracy_vs_params.png",
                 "training_curves.png"]:
        png = out / name
        assert png.stat().st_size > 20_000, name
        assert _pixels_vary(png), name


def test_tune_children_and_report_run(store, tmp_path):
    from mlflow import MlflowClient

    out = tmp_path / "tune"
    rep = make_report(store["uri"], parent_run_id=store["parent"], out_dir=out, log_to_mlflow=True)
    assert {r.run_id for r in rep.rows} == set(store["children"].values())  # experiment inferred, siblings only
    assert {r.run_name for r in rep.frontier} == {"s32-bs4k", "s16-bs4k"}
    client = MlflowClient(store["uri"])
    run = client.get_run(rep.report_run_id)
    assert set(run.data.tags["mixer.report.run_ids"].split(",")) == set(store["children"].values())
    assert run.data.tags["mlflow.parentRunId"] == store["parent"]
    arts = {a.path for a in client.list_artifacts(rep.report_run_id, "report")}
    assert {"report/runs.md", "report/runs.csv", "report/accuracy_vs_compute.png", "report/runs.json"} <= arts
    # the report run is not itself compared by the next report
    again = make_report(store["uri"], parent_run_id=store["parent"], out_dir=tmp_path / "again")
    assert len(again.rows) == 3
    # a filter narrows the runs
    only = make_report(store["uri"], "mixer-tune", filter_string="params.`model.patch_size` = '32'",
                       out_dir=tmp_path / "f")
    assert sorted(r.run_name for r in only.rows) == ["b32-bs4k", "s32-bs4k"]


def test_single_run(store, tmp_path):
    rep = make_report(store["uri"], "single", out_dir=tmp_path / "one")
    assert [r.run_name for r in rep.rows] == ["s16-bs4k"] and [r.run_name for r in rep.frontier] == ["s16-bs4k"]
    assert all(f.stat().st_size > 10_000 for f in rep.files if f.suffix == ".png")
    assert len([f for f in rep.files if f.suffix == ".png"]) == 4


def test_bad_inputs(store, tmp_path, capsys):
    uri = store["uri"]
    assert main(["--tracking-uri", uri, "--experiment", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'nope' does not exist" in err and "'mixer-pretrain'" in err and "'mixer-tune'" in err
    with pytest.raises(ReportError, match="no MLflow run with id"):
        make_report(uri, parent_run_id="0" * 32, out_dir=tmp_path)
    with pytest.raises(ReportError, match="cannot use the filter"):
        make_report(uri, "mixer-pretrain", filter_string="params.x ~~ 3", out_dir=tmp_path)
    with pytest.raises(ReportError, match="no runs to compare"):
        make_report(uri, "mixer-pretrain", filter_string="params.`model.name` = 'mixer_h14_224'", out_dir=tmp_path)
    with pytest.raises(ReportError, match="no MLflow store at"):
        make_report(f"sqlite:///{tmp_path}/missing/mlflow.db", out_dir=tmp_path)
    assert main(["--tracking-uri", "http://127.0.0.1:9", "--out", str(tmp_path)]) == 2
    assert "unreachable" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_no_arguments_reports_the_default_pretrain_experiment(store, tmp_path, monkeypatch, capsys):
    # A plain `python -m orchestrator.pretrain` logs to the default preset's experiment; a plain report reads it.
    from orchestrator.config.load import load_config

    experiment = load_config().tracking.experiment
    assert experiment == "mixer-digits"
    home = tmp_path / "home"
    uri = f"sqlite:///{home}/mlflow.db"
    _log_run(uri, experiment, RUNS[0])
    monkeypatch.setenv("MIXER_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "s32-bs4k" in out and f"wrote {home.resolve()}/reports/{experiment}/" in out


def test_best_top1_is_val_where_the_minival_peaked_and_says_so(tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.report.runs import row_from_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = RunTracker(uri, "honest", "with-minival")
    with_minival = t.start()
    # val peaks at step 3, the minival at step 2: the report shows val at step 2 (val is never selected on)
    for step, minival, val in ((1, 0.50, 0.40), (2, 0.80, 0.60), (3, 0.70, 0.90), (4, 0.80, 0.50)):
        t.log_metrics({"minival/top1": minival, "val/top1": val}, step)
    t.end("FINISHED")
    t = RunTracker(uri, "honest", "val-only")
    val_only = t.start()
    for step, val in ((1, 0.4), (2, 0.7), (3, 0.6)):
        t.log_metrics({"val/top1": val}, step)
    t.end("FINISHED")
    client = MlflowClient(uri)
    row = row_from_run(client, client.get_run(with_minival))
    assert (row.best_top1, row.selected_on) == (0.60, "minival")
    row = row_from_run(client, client.get_run(val_only))
    assert (row.best_top1, row.selected_on) == (0.7, "val")
