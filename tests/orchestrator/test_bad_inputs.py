"""Every bad input of every entry point: exit 2, one message naming the key or argument, its value and what is
accepted, no traceback, and nothing started or written (no Ray, no MLflow store, no run or output directory).

The entry points run in-process (main(argv)); MIXER_HOME, Ray's temp dir and the default MLflow store all point
under tmp_path and must not exist afterwards. Data-dependent cases read a digits dataset written outside
MIXER_HOME (the embedded default would otherwise be written into MIXER_HOME on first use, by design).
"""

from __future__ import annotations

import pytest

from cluster.loopback import free_port
from orchestrator import evaluate, finetune, pretrain
from orchestrator.report import compare as report
from orchestrator.tune import cli as tune


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A digits dataset and a mixer_digits state dict, both outside any MIXER_HOME."""
    import torch

    from model import create_model
    from pipelines.write_shards import write_dataset

    base = tmp_path_factory.mktemp("bad-inputs-assets")
    data = str(base / "digits")
    write_dataset("digits", data, progress=False)
    weights = base / "mixer_digits.pt"
    torch.save(create_model("mixer_digits", num_classes=10).state_dict(), weights)
    regular = base / "a_regular_file"
    regular.write_text("not a directory")
    return {"data": data, "weights": str(weights), "file": str(regular), "dead": f"http://127.0.0.1:{free_port()}",
            **_eval_set_assets(base, data)}


def _eval_set_assets(base, data: str) -> dict[str, str]:
    """Label files that cannot be used, and a set whose classes are not the training dataset's (eval.sets)."""
    from pipelines.manifest import load_manifest, write_manifest

    files = {"labels_not_json": "{not json", "labels_not_lists": '{"val-00000000": 3}',
             "labels_out_of_range": '{"val-00000000": [10]}', "labels_stranger": '{"val-00000000": [1], "nokey": []}'}
    out = {}
    for name, text in files.items():
        (base / f"{name}.json").write_text(text)
        out[name] = str(base / f"{name}.json")
    other = load_manifest(data)  # the same shards (absolute URLs), other class names
    other.class_names = [f"c{i}" for i in range(len(other.class_names))]
    (base / "other_classes").mkdir()
    write_manifest(other, str(base / "other_classes"))
    return {**out, "other_classes": str(base / "other_classes")}


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """MIXER_HOME, Ray's temp dir and the default tracking store under tmp_path, none of them existing yet."""
    home, ray_tmp = tmp_path / "home", tmp_path / "ray"
    monkeypatch.setenv("MIXER_HOME", str(home))
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "AWS_ENDPOINT_URL",
                 "FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-value")
    return {"home": home, "ray": ray_tmp, "tmp": tmp_path}


def _check(entry, argv, words, isolated, assets, capsys):
    import ray

    fill = {**assets, "tmp": str(isolated["tmp"])}
    argv = [a.format(**fill) for a in argv]
    try:
        code = entry(argv)
    except SystemExit as e:  # argparse's own errors (usage + message) exit 2 too
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\n{out}\n{err}"
    message = [line for line in err.splitlines() if "error: " in line]
    assert len(message) == 1, err
    for word in words:
        assert word.format(**fill) in message[0], message[0]
    assert "Traceback" not in out + err
    assert "testing-secret-value" not in out + err
    assert not ray.is_initialized()
    assert not isolated["home"].exists(), sorted(p.name for p in isolated["home"].rglob("*"))  # no store/runs/data
    assert not isolated["ray"].exists()  # no Ray session dir


DATA = "data.url={data}"
PRETRAIN = [
    ("lr-negative", ["optim.lr=-1"], ["optim.lr=-1.0", "a positive number"]),
    ("unknown-key", ["optim.warmup=5"], ["optim.warmup", "accepted keys"]),
    ("unknown-section", ["optimizer.lr=1"], ["optimizer", "accepted sections"]),
    ("not-key-value", ["optim.lr"], ["'optim.lr'", "section.key=value"]),
    ("wrong-type", ["scaling.num_workers=two"], ["scaling.num_workers='two'", "an integer"]),
    ("bad-literal", ["reg.loss=hinge"], ["reg.loss='hinge'", "['softmax', 'sigmoid']"]),
    ("unknown-preset", ["--config", "no_such_preset"], ["no_such_preset", "digits"]),
    ("momentum-negative", ["optim.momentum=-0.5"], ["optim.momentum=-0.5", "a number >= 0"]),
    ("shuffle-buffer-0", ["data.shuffle_buffer=0"], ["data.shuffle_buffer=0", "an integer >= 1"]),
    ("num-train-samples-0", ["data.num_train_samples=0"], ["data.num_train_samples=0", "null or an integer >= 1"]),
    ("startup-timeout-negative", ["scaling.startup_timeout_s=-1"], ["scaling.startup_timeout_s=-1.0", ">= 0"]),
    ("experiment-empty", ["tracking.experiment="], ["tracking.experiment=''", "a non-empty name"]),
    ("batch-not-divisible", ["optim.global_batch_size=100", "scaling.num_workers=3"],
     ["optim.global_batch_size=100", "a multiple of"]),
    ("batch-larger-than-epoch", [DATA, "optim.global_batch_size=100000"],
     ["optim.global_batch_size=100000", "larger than one epoch", "smaller global batch"]),
    ("model-size", ["model.patch_size=3"], ["patch_size", "3"]),
    ("missing-data", ["data.url={tmp}/nowhere"], ["data.url=", "nowhere"]),
    ("missing-split", [DATA, "data.val_split=test"], ["data.val_split='test'", "splits there"]),
    ("storage-under-a-file", [DATA, "run.storage_path={file}/runs"],
     ["run.storage_path", "{file}/runs", "regular file", "expected a directory"]),
    ("storage-is-a-file", [DATA, "run.storage_path={file}"], ["run.storage_path", "is a regular file"]),
    ("storage-s3-refused", [DATA, "run.storage_path=s3://bucket/runs", "data.endpoint_url={dead}"],
     ["run.storage_path", "s3://bucket/runs", "cannot reach storage"]),
    ("storage-unknown-protocol", [DATA, "run.storage_path=nosuch://x/runs"],
     ["run.storage_path", "nosuch://x/runs", "s3://bucket/prefix"]),
    ("tracking-unreachable", [DATA, "tracking.uri={dead}"], ["tracking.uri", "{dead}", "unreachable"]),
    ("elastic-min-0", ["scaling.num_workers=[0,3]"], ["scaling.num_workers=[0, 3]", "1 <= min <= max"]),
    ("elastic-min-above-max", ["scaling.num_workers=[3,1]"], ["scaling.num_workers=[3, 1]", "1 <= min <= max"]),
    ("elastic-not-a-pair", ["scaling.num_workers=[1,2,3]"], ["scaling.num_workers=[1, 2, 3]", "[min, max]"]),
    ("elastic-batch-below-max", ["scaling.num_workers=[1,3]", "optim.global_batch_size=2"],
     ["optim.global_batch_size=2", "at least the largest worker count (3)"]),
    ("elastic-batch-not-divisible", ["scaling.num_workers=[1,3]", "optim.global_batch_size=100"],
     ["optim.global_batch_size=100", "stream slots", "= 3"]),
    ("resize-interval-0", ["scaling.elastic_resize_interval_s=0"], ["scaling.elastic_resize_interval_s=0.0", "> 0"]),
    ("augment-on-unknown", ["data.augment_on=gpu"], ["data.augment_on='gpu'", "['auto', 'host', 'device']"]),
    ("randaug-impl-unknown", ["reg.randaug_impl=timm"], ["reg.randaug_impl='timm'", "['big_vision', 'torchvision']"]),
    ("decode-on-device-without-cuda", ["data.transform=inception", "data.decode_on=device"],
     ["data.decode_on='device'", "scaling.use_gpu: true", "needs CUDA"]),
    ("decode-on-device-host-augment", ["data.transform=inception", "data.decode_on=device", "scaling.use_gpu=true",
                                       "data.augment_on=host"], ["data.decode_on='device'", "data.augment_on is 'host'"]),
    ("decode-on-device-digits", ["data.decode_on=device", "scaling.use_gpu=true"],
     ["data.decode_on='device'", "data.transform 'digits'"]),
    ("torchvision-randaug-on-device", ["data.transform=inception", "reg.randaug_magnitude=15",
                                       "reg.randaug_impl=torchvision", "data.augment_on=device"],
     ["reg.randaug_impl='torchvision'", "'big_vision'", "data.augment_on: host"]),
    ("cache-max-gb-0", ["data.cache_max_gb=0"], ["data.cache_max_gb=0", "> 0"]),
    ("cache-max-gb-negative", ["data.cache_max_gb=-5"], ["data.cache_max_gb=-5", "> 0"]),
    ("cache-dir-on-s3", ["data.cache_dir=s3://bucket/cache"],
     ["data.cache_dir='s3://bucket/cache'", "node-local directory"]),
    ("cache-dir-under-a-file", ["data.cache_dir={file}/cache"], ["data.cache_dir", "{file}/cache", "regular file"]),
    ("cache-dir-is-a-file", ["data.cache_dir={file}"], ["data.cache_dir", "is a regular file", "null (no cache)"]),
    ("minival-fraction-half", ["data.minival_fraction=0.5"], ["data.minival_fraction=0.5", "[0, 0.5)"]),
    ("minival-fraction-negative", ["data.minival_fraction=-0.1"], ["data.minival_fraction=-0.1", "[0, 0.5)"]),
    ("train-fraction-0", ["data.train_fraction=0"], ["data.train_fraction=0.0", "(0, 1]"]),
    ("train-fraction-above-1", ["data.train_fraction=1.5"], ["data.train_fraction=1.5", "(0, 1]"]),
    ("permute-unknown", ["data.permute=pixels"], ["data.permute='pixels'", "['none', 'patch_pixel', 'global']"]),
    ("ema-decay-1", ["train.ema_decay=1"], ["train.ema_decay=1.0", "(0, 1)"]),
    ("ema-decay-0", ["train.ema_decay=0"], ["train.ema_decay=0.0", "(0, 1)"]),
    ("fewshot-every-negative", ["eval.fewshot_every_steps=-1"], ["eval.fewshot_every_steps=-1", ">= 0"]),
    ("fewshot-shots-0", ["eval.fewshot_shots=[0, 5]"], ["eval.fewshot_shots=[0, 5]", "integers >= 1"]),
    # eval.sets: each field under its own key; the data and label files checked before anything starts
    ("set-not-a-record", ["eval.sets=[v2]"], ["eval.sets[0]='v2'", "a mapping {{name, url"]),
    ("set-name-reserved", ["eval.sets=[{{name: minival, url: /x}}]"], ["eval.sets[0].name='minival'", "other than"]),
    ("set-missing-data", [DATA, "eval.sets=[{{name: v2, url: '{tmp}/nowhere'}}]"],
     ["eval.sets[0].url='{tmp}/nowhere'", "not found", "manifest.json"]),
    ("set-missing-split", [DATA, "eval.sets=[{{name: v2, url: '{data}', split: test}}]"],
     ["eval.sets[0].split='test'", "splits there", "'val'"]),
    ("set-other-classes", [DATA, "eval.sets=[{{name: v2, url: '{other_classes}'}}]"],
     ["eval.sets[0].url='{other_classes}'", "other classes", "c0, c1", "--class-names-from"]),
    ("labels-missing", [DATA, "eval.sets=[{{name: real, url: '{data}', labels: '{tmp}/absent.json'}}]"],
     ["eval.sets[0].labels='{tmp}/absent.json'", "not found", "JSON object mapping"]),
    ("labels-not-json", [DATA, "eval.sets=[{{name: real, url: '{data}', labels: '{labels_not_json}'}}]"],
     ["eval.sets[0].labels='{labels_not_json}'", "not JSON", "lists of class indices"]),
    ("labels-not-lists", [DATA, "eval.sets=[{{name: real, url: '{data}', labels: '{labels_not_lists}'}}]"],
     ["eval.sets[0].labels=", "'val-00000000': 3 is not a list of integers"]),
    ("labels-out-of-range", [DATA, "eval.sets=[{{name: real, url: '{data}', labels: '{labels_out_of_range}'}}]"],
     ["eval.sets[0].labels=", "label 10, outside [0, 10)"]),
    ("labels-stranger-keys", [DATA, "eval.sets=[{{name: real, url: '{data}', labels: '{labels_stranger}'}}]"],
     ["eval.sets[0].labels=", "names 1 key(s) that are not in split 'val'", "'nokey'"]),
]


@pytest.mark.parametrize("case_id, argv, words", PRETRAIN, ids=[c[0] for c in PRETRAIN])
def test_pretrain_bad_input(case_id, argv, words, isolated, assets, capsys):
    _check(pretrain.main, argv, words, isolated, assets, capsys)


FINETUNE = [
    ("missing-from", ["--from", "{tmp}/absent.npz", DATA], ["{tmp}/absent.npz", "does not exist"]),
    ("not-a-checkpoint", ["--from", "{file}", DATA], ["{file}"]),
    ("bad-key", ["--from", "{weights}", "optim.lr=0"], ["optim.lr=0", "a positive number"]),
    ("storage-under-a-file", ["--from", "{weights}", DATA, "run.storage_path={file}/runs"],
     ["run.storage_path", "regular file"]),
    ("resolution-not-a-multiple", ["--from", "{weights}", DATA, "model.img_size=24"],
     ["model.img_size=24", "integer factor", "[16, 32, 48, 64]"]),
    ("batch-larger-than-epoch", ["--from", "{weights}", DATA, "optim.global_batch_size=100000"],
     ["optim.global_batch_size=100000", "larger than one epoch"]),
    ("weights-ema-absent", ["--from", "{weights}", DATA, "--weights", "ema"],
     ["--weights ema", "{weights}", "no EMA", "accepted: --weights raw"]),
    ("weights-choice", ["--from", "{weights}", DATA, "--weights", "average"],
     ["--weights", "'average'", "'raw', 'ema'"]),
]


@pytest.mark.parametrize("case_id, argv, words", FINETUNE, ids=[c[0] for c in FINETUNE])
def test_finetune_bad_input(case_id, argv, words, isolated, assets, capsys):
    _check(finetune.main, argv, words, isolated, assets, capsys)


EVALUATE = [
    ("batch-size-0", ["--from", "{weights}", "--batch-size", "0"], ["--batch-size=0", "integer >= 1"]),
    ("seeds-0", ["--from", "{weights}", "--fewshot", "--seeds", "0"], ["--seeds=0", "integer >= 1"]),
    ("unknown-device", ["--from", "{weights}", "--device", "tpu9"], ["--device='tpu9'", "cpu, cuda"]),
    ("cuda-index-out-of-range", ["--from", "{weights}", "--device", "cuda:99"], ["--device='cuda:99'", "CUDA GPU"]),
    ("shots-0", ["--from", "{weights}", "--shots", "0,5"], ["--shots='0,5'", "positive integers"]),
    ("source-run-without-tracking", ["--from", "{weights}", "--log-to-source-run", "--no-tracking"],
     ["--log-to-source-run", "--no-tracking"]),
    ("missing-from", ["--from", "{tmp}/absent.pt", "--data", "{data}"], ["{tmp}/absent.pt", "does not exist"]),
    ("data-needed", ["--from", "{weights}"], ["--data is needed"]),
    ("missing-data", ["--from", "{weights}", "--data", "{tmp}/nowhere"], ["--data", "nowhere"]),
    ("missing-split", ["--from", "{weights}", "--data", "{data}", "--split", "test"], ["'test'", "splits there"]),
    ("tracking-unreachable", ["--from", "{weights}", "--data", "{data}", "--tracking-uri", "{dead}"],
     ["--tracking-uri", "{dead}", "unreachable"]),
    ("transform-choice", ["--from", "{weights}", "--transform", "bogus"], ["--transform", "bogus", "digits"]),
    ("weights-ema-absent", ["--from", "{weights}", "--data", "{data}", "--weights", "ema"],
     ["--weights ema", "{weights}", "no EMA", "accepted: --weights raw"]),
    ("weights-choice", ["--from", "{weights}", "--weights", "average"],
     ["--weights", "'average'", "'raw', 'ema'"]),
]


@pytest.mark.parametrize("case_id, argv, words", EVALUATE, ids=[c[0] for c in EVALUATE])
def test_evaluate_bad_input(case_id, argv, words, isolated, assets, capsys):
    _check(evaluate.main, argv, words, isolated, assets, capsys)


TUNE = [
    ("num-samples-0", ["--num-samples", "0"], ["--num-samples=0", "integer >= 1"]),
    ("grace-period-0", ["--grace-period", "0"], ["--grace-period=0", "integer >= 1"]),
    ("max-failures-below-forever", ["--max-failures", "-2"], ["--max-failures=-2", "-1 (forever)"]),
    ("reduction-factor-1", ["--reduction-factor", "1"], ["--reduction-factor=1.0", "> 1"]),
    ("unknown-space", ["--space", "no_such_space"], ["no_such_space"]),
    ("search-choice", ["--search", "bayes"], ["--search", "bayes", "optuna"]),
    ("bad-override", ["optim.lr=-1"], ["optim.lr=-1.0", "a positive number"]),
    ("storage-under-a-file", [DATA, "run.storage_path={file}/runs"], ["run.storage_path", "regular file"]),
    ("best-config-under-a-file", [DATA, "--best-config", "{file}/best.yaml"],
     ["--best-config", "{file}/best.yaml", "regular file"]),
]


@pytest.mark.parametrize("case_id, argv, words", TUNE, ids=[c[0] for c in TUNE])
def test_tune_bad_input(case_id, argv, words, isolated, assets, capsys):
    _check(tune.main, argv, words, isolated, assets, capsys)


REPORT = [
    ("no-store", [], ["no MLflow store", "python -m orchestrator.pretrain"]),
    ("tracking-unreachable", ["--tracking-uri", "{dead}"], ["{dead}", "unreachable"]),
    ("out-under-a-file", ["--out", "{file}/report"], ["--out", "{file}/report", "regular file"]),
]


@pytest.mark.parametrize("case_id, argv, words", REPORT, ids=[c[0] for c in REPORT])
def test_report_bad_input(case_id, argv, words, isolated, assets, capsys):
    _check(report.main, argv, words, isolated, assets, capsys)


def test_tune_best_config_must_be_a_yaml_path(isolated, assets, capsys):
    _check(tune.main, ["--best-config", "{tmp}/best.txt"], ["--best-config", "best.txt", ".yaml file path"],
           isolated, assets, capsys)


# ------------------------------------------------------------------ after the start: the MLflow run's end


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('bad-inputs-mlflow')}/mlflow.db"


def test_resume_lookup_finds_a_run_name_with_quotes(sqlite_uri):
    from orchestrator.tracking.run import RUN_NAME_TAG, find_run_id
    from orchestrator.tracking.tracker import RunTracker

    ids = {}
    # the last two match the first one's LIKE pattern: only the exact name may be returned
    for name in ("it's a \"quoted\" run \\ 100%", "it_s a _quoted_ run _ 100_", "it's a \"quoted\" run \\ 1000"):
        tracker = RunTracker(sqlite_uri, "quotes", name, tags={RUN_NAME_TAG: name})
        ids[name] = tracker.start()
        tracker.end("FINISHED")
    for name, run_id in ids.items():
        assert find_run_id(sqlite_uri, "quotes", name) == run_id
    assert find_run_id(sqlite_uri, "quotes", "it's") is None


@pytest.mark.parametrize("where, code, reason", [
    ("fit", 1, "training failed: RuntimeError: worker group died: simulated"),
    ("capacity", 3, "the Ray cluster cannot fit: simulated"),
])
def test_failure_after_the_start_ends_the_run_failed_with_the_reason(where, code, reason, sqlite_uri, isolated,
                                                                      assets, monkeypatch, capsys):
    """After the MLflow run is open, a failure ends it FAILED with failure.reason (Ray itself stubbed out)."""
    from mlflow import MlflowClient

    from orchestrator.train import finish, launch

    class BrokenTrainer:
        def fit(self):
            raise RuntimeError("worker group died: simulated")

    def too_small(cfg):
        if where == "capacity":
            raise launch.ClusterTooSmallError(reason)

    from orchestrator.tracking import relay

    monkeypatch.setattr(launch, "init_ray", lambda: None)
    monkeypatch.setattr(relay, "start_relay", lambda run: None)  # the tracking relay is a Ray actor
    from orchestrator.train import progress

    monkeypatch.setattr(progress, "start_ledger", lambda logged=None: (None, None))  # so is the progress ledger
    monkeypatch.setattr(launch, "check_capacity", too_small)
    monkeypatch.setattr(launch, "build_trainer", lambda cfg, job: BrokenTrainer())
    experiment = f"failures-{where}"
    # through the command, whose entry point maps what the driver (orchestrator/train/driver.py) raises
    code_now = pretrain.main(["--config", "digits", f"data.url={assets['data']}", f"tracking.uri={sqlite_uri}",
                              "run.name=fails", f"run.storage_path={isolated['tmp']}/runs",
                              f"tracking.experiment={experiment}"])
    assert code_now == code
    assert f"error: {reason}" in capsys.readouterr().err
    client = MlflowClient(sqlite_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags[finish.FAILURE_REASON_TAG] == reason
