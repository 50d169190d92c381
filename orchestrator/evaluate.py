"""Evaluate a checkpoint on a shard set: top-1/top-5 and, optionally, the paper's few-shot linear probe.

    python -m orchestrator.evaluate --from ~/.mixer/runs/digits                    # its latest complete checkpoint
    python -m orchestrator.evaluate --from ~/.mixer/runs/digits --fewshot          # + 1/5/10/25-shot, 3 seeds
    python -m orchestrator.evaluate --from Mixer-B_16.npz --data s3://bucket/imagenet1k --split val
    python -m orchestrator.evaluate --from s3://bucket/runs/b16 --data s3://bucket/cifar10 --fewshot --fewshot-only
    python -m orchestrator.evaluate --from ~/.mixer/runs/digits --weights ema      # its EMA (train.ema_decay)

--from is anything orchestrator.finetune accepts (see orchestrator/eval/sources.py). A run directory may belong
to a run in progress: only complete checkpoints are read. --data defaults to the dataset the checkpoint was
trained on (when it records one). Images are preprocessed as in the training run's evaluation (the
checkpoint's model name and data.transform; official .npz/timm weights: inception crop, bicubic, [-1, 1]).

--weights raw (the default) evaluates the checkpoint's trained weights, --weights ema their exponential moving
average (kept by a run that set train.ema_decay; a checkpoint without one exits 2 before anything loads).

Few-shot (big_vision's protocol, orchestrator/eval/fewshot.py): frozen pre-logits of --train-split images (no
augmentation) give k shots per class, ridge regression with l2 = 2^10, tested on --split; mean over seeds.

MLflow: by default a new run in --experiment (default: the checkpoint's own experiment, else mixer-eval),
named eval-<checkpoint>, tagged eval.source / eval.source_checkpoint / eval.source_step and
eval.source_run_id (the run that wrote the checkpoint), with metrics eval/top1, eval/top5, eval/loss and
fewshot/<k>shot at the checkpoint's step. --log-to-source-run instead adds the metrics (eval/<split>/top1, ...,
fewshot/<k>shot) to the run that wrote the checkpoint, at its step, without changing that run's status, so a
run in progress can be followed in place. With --weights ema every metric name starts with ema/ (ema/eval/top1,
ema/fewshot/<k>shot, ...: never mistaken for the raw weights' in the same run) and the run is tagged
eval.weights. --no-tracking logs nothing.
Exit status: 2 for a bad flag, checkpoint, dataset or tracking store (flags are checked before anything loads).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass

from orchestrator.eval.sources import WEIGHTS, Source, load_source
from pipelines.cli import InputError, entry_point
from pipelines.redaction import redact

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "mixer-eval"


class EvalError(InputError, ValueError):
    """The evaluation cannot run as asked; the message names the option to change."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m orchestrator.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="source", required=True, metavar="CHECKPOINT",
                   help="checkpoint dir, run dir, official .npz or state-dict file (path or fsspec URL)")
    p.add_argument("--weights", choices=WEIGHTS, default="raw",
                   help="the checkpoint's trained weights (raw, default) or their EMA (ema: a run that set "
                   "train.ema_decay)")
    p.add_argument("--data", default=None, help="dataset root URL (default: the checkpoint's own dataset)")
    p.add_argument("--split", default="val", help="split to evaluate (and to test few-shot on)")
    p.add_argument("--train-split", default="train", help="split the few-shot examples are drawn from")
    p.add_argument("--fewshot", action="store_true", help="also run the few-shot linear evaluation")
    p.add_argument("--fewshot-only", action="store_true", help="skip top-1 (e.g. a head for other classes)")
    p.add_argument("--shots", default="1,5,10,25", help="comma-separated shots per class")
    p.add_argument("--seeds", type=int, default=3, help="few-shot repetitions (seeds 0..n-1)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--transform", choices=("digits", "inception"), default=None,
                   help="preprocessing preset (default: the checkpoint's data.transform, else inception)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or "
                   "sqlite:///$MIXER_HOME/mlflow.db)")
    p.add_argument("--experiment", default=None, help=f"MLflow experiment (default: the checkpoint's, else "
                   f"{DEFAULT_EXPERIMENT})")
    p.add_argument("--log-to-source-run", action="store_true",
                   help="log into the MLflow run that wrote the checkpoint instead of a new run")
    p.add_argument("--no-tracking", action="store_true", help="print only")
    return p.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    shots = _parse_shots(args.shots)
    src = load_source(args.source, weights=args.weights)
    results = run(args, src, shots)
    print_results(results)
    return 0


def check_args(args: argparse.Namespace) -> None:
    """The flags' own bounds, before the checkpoint, the data or the tracking store is touched."""
    if args.batch_size < 1:
        raise EvalError(f"--batch-size={args.batch_size} is not accepted; expected an integer >= 1")
    if args.seeds < 1:
        raise EvalError(f"--seeds={args.seeds} is not accepted; expected an integer >= 1 (few-shot repetitions)")
    if args.log_to_source_run and args.no_tracking:
        raise EvalError("--log-to-source-run and --no-tracking exclude each other; drop one of them")
    if args.device is not None:
        check_device(args.device)


def check_device(name: str) -> None:
    """--device must name a device torch can use here (cpu, cuda, cuda:N with N < the GPU count, mps)."""
    import torch

    accepted = "cpu, cuda or cuda:N (N < the number of GPUs), mps"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise EvalError(f"--device={name!r} is not accepted; expected {accepted}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise EvalError(f"--device={name!r} is not accepted: this machine has {count} CUDA GPU(s); "
                            f"expected {accepted}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise EvalError(f"--device={name!r} is not accepted: MPS is not available here; expected {accepted}")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise EvalError(f"--device={name!r} is not accepted; expected {accepted}")


def _parse_shots(text: str) -> list[int]:
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        shots = []
    if not shots or min(shots) < 1:
        raise EvalError(f"--shots={text!r} is not accepted; expected positive integers like 1,5,10,25")
    return shots


@dataclass
class Results:
    source: Source
    data_url: str
    split: str
    top: dict | None  # top1, top5, loss, count
    fewshot: dict[int, float] | None
    run_id: str | None
    tracking_uri: str | None
    seconds: float


def data_url_for(args: argparse.Namespace, src: Source) -> str:
    if args.data:
        return args.data
    if src.config is None:
        raise EvalError(f"--data is needed: {src.kind} checkpoint {src.url} does not record its dataset")
    url = src.config.get("data", {}).get("url") or ""
    if url:
        return url
    from orchestrator.config.tree import mixer_home
    from pipelines.digits import ensure_digits_dataset

    return ensure_digits_dataset(str(mixer_home() / "data" / "digits"))


def eval_transform(src: Source, preset: str | None):
    """The eval preprocessing of the training run (orchestrator/train/loop.build_loaders), at the model's size."""
    from model import official_data_config, pretrained_data_config
    from pipelines import transforms

    data_cfg = pretrained_data_config(src.model_name) if src.model_name else official_data_config()
    preset = preset or (src.config or {}).get("data", {}).get("transform") or "inception"
    return transforms.eval_transform(data_cfg, input_size=src.model_cfg.img_size, preset=preset)


def input_permutation(src: Source):
    """The training run's data.permute (its checkpoint's config), so the model sees inputs as it was trained."""
    from pipelines.permute import InputPermutation

    data = (src.config or {}).get("data", {})
    cfg = src.model_cfg
    return InputPermutation.make(data.get("permute", "none"), data.get("permute_seed", 0), cfg.img_size, cfg.img_size,
                                 cfg.patch_size)


def run(args: argparse.Namespace, src: Source, shots: list[int]) -> Results:
    import torch

    from orchestrator.eval.fewshot import extract_features, fewshot_accuracy
    from orchestrator.eval.metrics import evaluate
    from orchestrator.train.batches import permuted
    from pipelines.loader import ShardLoader
    from pipelines.manifest import load_manifest
    from pipelines.storage import resolve_storage_options

    t0 = time.perf_counter()
    url = data_url_for(args, src)
    opts = resolve_storage_options(url if "://" in url else "file://")
    try:
        manifest = load_manifest(url, opts)
    except Exception as e:
        raise EvalError(f"--data {url!r} cannot be used: {type(e).__name__}: {e}") from None
    want = [args.split] + ([args.train_split] if args.fewshot or args.fewshot_only else [])
    for split in want:
        if split not in manifest.splits:
            raise EvalError(f"split {split!r} is not in the dataset at {url}; splits there: {sorted(manifest.splits)}")
    do_top = not args.fewshot_only
    if do_top and manifest.num_classes and manifest.num_classes != src.model_cfg.num_classes:
        raise EvalError(
            f"checkpoint {src.url} has a {src.model_cfg.num_classes}-class head but the dataset at {url} has "
            f"{manifest.num_classes} classes: top-1 is meaningless; use --fewshot --fewshot-only, or fine-tune first"
        )
    tracker = _open_tracking(args, src, url) if not args.no_tracking else None

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = src.build_model().to(device)
    tf = eval_transform(src, args.transform)

    permutation = input_permutation(src)

    def loader(split: str):
        return permuted(ShardLoader(url, split, batch_size=args.batch_size, training=False, transform=tf,
                                    num_workers=0, storage_options=opts), permutation, device)

    top = fewshot = None
    if do_top:
        top = evaluate(model, loader(args.split), device)
    if args.fewshot or args.fewshot_only:
        train_x, train_y = extract_features(model, loader(args.train_split), device)
        test_x, test_y = extract_features(model, loader(args.split), device)
        fewshot = fewshot_accuracy(train_x, train_y, test_x, test_y, shots=shots, seeds=range(args.seeds))
    results = Results(src, url, args.split, top, fewshot, None, None, time.perf_counter() - t0)
    if tracker is not None:
        _log(tracker, args, results)
    return results


def _metrics(results: Results, per_split: bool) -> dict[str, float]:
    weights = "ema/" if results.source.weights == "ema" else ""  # as training logs the EMA's: ema/<name>
    prefix = f"{weights}eval/{results.split}/" if per_split else f"{weights}eval/"
    out = {}
    if results.top:
        out.update({f"{prefix}{k}": results.top[k] for k in ("top1", "top5", "loss")})
    for k, acc in (results.fewshot or {}).items():
        out[f"{weights}fewshot/{k}shot"] = acc
    return out


def _source_run_tracker(tracking_uri: str, run_id: str):
    """A tracker adding to the checkpoint's own run: never started (its status stays as it is), so only the
    metrics go there, through the same redaction, outage handling and unlogged count as every other run."""
    from orchestrator.tracking.tracker import RunTracker

    tracker = RunTracker(tracking_uri, "", "", run_id=run_id)
    try:
        tracker.client.get_run(run_id)
    except Exception as e:
        raise EvalError(f"--log-to-source-run: run {run_id} is not in the MLflow store {redact(tracking_uri)}: "
                        f"{type(e).__name__}; pass --tracking-uri of the training run") from None
    return tracker


def _open_tracking(args: argparse.Namespace, src: Source, data_url: str):
    from orchestrator.config.tree import mixer_home
    from orchestrator.tracking.store import check_tracking_reachable, resolve_tracking_uri
    from orchestrator.tracking.tracker import RunTracker

    uri = resolve_tracking_uri(args.tracking_uri, str(mixer_home()))
    try:
        check_tracking_reachable(uri)  # creates a sqlite store's directory only when usable
    except Exception as e:
        raise EvalError(f"--tracking-uri {uri!r} cannot be used: {e}") from None
    if args.log_to_source_run:
        if not src.mlflow_run_id:
            raise EvalError(f"--log-to-source-run: checkpoint {src.url} records no MLflow run id")
        return _source_run_tracker(uri, src.mlflow_run_id)
    experiment = args.experiment or (src.config or {}).get("tracking", {}).get("experiment") or DEFAULT_EXPERIMENT
    name = src.resolved.rstrip("/").removesuffix("/state.pt").rsplit("/", 1)[-1]
    tags = {
        "eval.source": src.url, "eval.source_kind": src.kind, "eval.source_checkpoint": src.resolved,
        "eval.data": data_url, "eval.split": args.split, "eval.weights": src.weights,
    }
    if src.step is not None:
        tags["eval.source_step"] = str(src.step)
    if src.mlflow_run_id:
        tags["eval.source_run_id"] = src.mlflow_run_id
    if src.model_name:
        tags["model_name"] = src.model_name
    suffix = "-ema" if src.weights == "ema" else ""
    tracker = RunTracker(uri, experiment, f"eval-{name}{suffix}", tags=tags)
    try:
        tracker.start()
    except Exception as e:
        raise EvalError(str(e)) from None
    tracker.log_params({f"model.{k}": v for k, v in src.model_cfg.to_dict().items()} | {
        "eval.batch_size": args.batch_size, "eval.shots": ",".join(map(str, _parse_shots(args.shots))),
        "eval.seeds": args.seeds})
    return tracker


def _log(tracker, args: argparse.Namespace, results: Results) -> None:
    step = int(results.source.step or 0)
    into_source = args.log_to_source_run  # the training run's metrics get the split in their names
    tracker.log_metrics(_metrics(results, per_split=into_source), step)
    tracker.end(None if into_source else "FINISHED")
    results.run_id, results.tracking_uri = tracker.run_id, tracker.tracking_uri
    missing = tracker.unlogged_summary()
    if missing:
        log.warning("not logged to MLflow: %s", missing)


def print_results(r: Results) -> None:
    print(f"checkpoint      {r.source.describe()}")
    print(f"data            {r.data_url} (split {r.split})")
    if r.top:
        print(f"top-1 {r.top['top1']:.4f}  top-5 {r.top['top5']:.4f}  loss {r.top['loss']:.4f}  "
              f"({r.top['count']} images)")
    if r.fewshot:
        print("few-shot        " + "  ".join(f"{k}-shot {acc:.4f}" for k, acc in r.fewshot.items()))
    if r.run_id:
        print(f"MLflow run id   {r.run_id}")
        from orchestrator.tracking.links import mlflow_ui_hint

        print(f"MLflow UI       {mlflow_ui_hint(r.tracking_uri)}")
    print(f"took            {r.seconds:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
