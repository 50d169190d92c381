"""Fine-tune a pretrained MLP-Mixer on Ray Train, tracked in MLflow (the paper's fine-tuning protocol).

    python -m orchestrator.finetune --from ~/.mixer/runs/digits             # digits at 2x resolution (default)
    python -m orchestrator.finetune --from s3://bucket/runs/in21k_l16 --config imagenet1k_finetune_448 \\
        data.url=s3://bucket/imagenet1k run.storage_path=s3://bucket/runs scaling.num_workers=32
    python -m orchestrator.finetune --from Mixer-B_16.npz --config imagenet1k_finetune_448 --dry-run
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m orchestrator.finetune --from ...

--from (local path or fsspec URL) is one of this project's checkpoint directories, a run directory (its latest
complete checkpoint), an official JAX .npz, or a timm/plain state dict (.pt/.pth/.bin/.safetensors); see
orchestrator/eval/sources.py. The architecture comes from the checkpoint: size fields set in the config
(e.g. model.patch_size) are expectations that it must meet; model.img_size is the fine-tuning resolution, an
integer multiple K of the checkpoint's (App. C: token-mixing weights become K^2 block-diagonal copies). The
head is replaced by a zero-initialised one for the dataset's classes (--keep-head keeps a fitting one).
--weights ema starts from the checkpoint's EMA of the weights (a run that set train.ema_decay) instead of its
trained weights (--weights raw, the default); a checkpoint without one exits 2 before anything starts.

The adapted weights are written to <run.storage_path>/<run.name>/init_weights.pt and every Ray Train worker
starts from them; from then on it is a training run like pretraining (same checkpoints, recovery, resume by
run name, MLflow tracking). The MLflow run is tagged finetune.source (what --from named),
finetune.source_checkpoint (the file read), finetune.source_weights (raw or ema), finetune.pretrain_run_id (the
MLflow run that wrote the checkpoint, when it says), finetune.resolution_factor and finetune.head_replaced.
Exit status: 2 for a bad config or checkpoint (before any cluster resource is requested), 3 when the cluster
is too small, 1 when training fails.
"""

from __future__ import annotations

import argparse
import sys

from orchestrator.config.checks import validate
from orchestrator.config.load import load_config
from orchestrator.config.parse import list_presets
from orchestrator.config.tree import Config, model_overrides
from orchestrator.eval.sources import (
    WEIGHTS,
    CheckpointError,
    Source,
    adapt_for_finetune,
    load_source,
    target_config,
)
from pipelines.cli import entry_point, say

DEFAULT_PRESET = "digits_finetune"
SIZE_FIELDS = ("patch_size", "depth", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim")
INIT_WEIGHTS_FILE = "init_weights.pt"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.finetune",
        description="Fine-tune a pretrained MLP-Mixer on Ray Train. Overrides are section.key=value.",
        epilog=f"presets: {', '.join(list_presets())}",
    )
    parser.add_argument("--from", dest="source", required=True, metavar="CHECKPOINT",
                        help="checkpoint dir, run dir, official .npz or state-dict file (path or fsspec URL)")
    parser.add_argument("--config", default=None, help=f"preset name or YAML file (default: {DEFAULT_PRESET})")
    parser.add_argument("--keep-head", action="store_true",
                        help="keep the checkpoint's head (its class count must equal the dataset's)")
    parser.add_argument("--weights", choices=WEIGHTS, default="raw",
                        help="the checkpoint's trained weights (raw, default) or their EMA (ema: a run that set "
                        "train.ema_decay)")
    parser.add_argument("--dry-run", action="store_true", help="check the checkpoint, print config and plan, exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=0.01")
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    from orchestrator.train.startup import keep_progress_lines_whole

    keep_progress_lines_whole()  # before anything imports Ray
    args = parse_args(argv)
    cfg = load_config(args.config or DEFAULT_PRESET, args.overrides)
    src, num_classes = prepare(cfg, args.source, allow_unreachable=args.dry_run, weights=args.weights)
    if args.dry_run:
        from orchestrator.train.driver import dry_run

        print(f"# source\n{src.describe()}")
        dry_run(cfg)
        return 0
    finetune(cfg, src, num_classes, keep_head=args.keep_head)
    return 0


def prepare(cfg: Config, source_url: str, *, allow_unreachable: bool = False,
            weights: str = "raw") -> tuple[Source, int]:
    """Load the source and point cfg.model at the fine-tuning architecture (in place); nothing touches Ray."""
    from orchestrator.train.launch import check_storage_target, resolve_data, storage_options

    if not allow_unreachable:  # the adapted weights are written there first
        check_storage_target(cfg)
    src = load_source(source_url, storage_options(cfg, source_url), weights=weights)
    data = resolve_data(cfg, allow_unreachable=allow_unreachable)
    apply_source_architecture(cfg, src)
    return src, data.num_classes


def apply_source_architecture(cfg: Config, src: Source) -> None:
    """Set cfg.model's size fields to the checkpoint's architecture at cfg.model.img_size (App. C)."""
    expect = {k: getattr(cfg.model, k) for k in SIZE_FIELDS if getattr(cfg.model, k) is not None}
    target = target_config(src, img_size=cfg.model.img_size, expect=expect)
    if target.in_chans != 3:
        raise CheckpointError(f"checkpoint {src.url} takes {target.in_chans} input channels: expected 3 (RGB)")
    cfg.model.img_size = target.img_size
    for key in SIZE_FIELDS:
        setattr(cfg.model, key, getattr(target, key))
    cfg.model.gelu = target.gelu  # the official JAX weights use the tanh GELU
    validate(cfg)


def init_weights_url(cfg: Config) -> str:
    from pipelines.storage import join_url

    return join_url(cfg.resolved_storage_path(), cfg.run.name, INIT_WEIGHTS_FILE)


def write_init_weights(cfg: Config, state_dict: dict) -> str:
    """Save the adapted weights into the run's storage (local or fsspec URL); return their URL."""
    import torch

    from orchestrator.train.launch import storage_options
    from pipelines.storage import atomic_write, get_fs

    url = init_weights_url(cfg)
    opts = storage_options(cfg, url)
    fs, path = get_fs(url, opts)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with atomic_write(url, opts) as f:  # whole or not at all
        torch.save(state_dict, f)
    return url


def check_fits_workers(cfg: Config, num_classes: int, state_dict: dict) -> None:
    """The workers build create_model(cfg.model.name, **model_overrides(cfg)): the weights must fit it exactly."""
    import torch

    from model import create_model
    from model.state_dict_loading import check_state_dict

    with torch.device("meta"):
        model = create_model(cfg.model.name, **model_overrides(cfg, num_classes))
    try:
        check_state_dict(model, state_dict)
    except ValueError as e:
        raise CheckpointError(f"adapted weights do not fit the configured model: {e}") from None


def source_tags(src: Source, factor: int, head_replaced: bool) -> dict[str, str]:
    tags = {
        "finetune.source": src.url,
        "finetune.source_kind": src.kind,
        "finetune.source_checkpoint": src.resolved,
        "finetune.source_weights": src.weights,
        "finetune.source_img_size": str(src.model_cfg.img_size),
        "finetune.resolution_factor": str(factor),
        "finetune.head_replaced": str(head_replaced).lower(),
    }
    if src.step is not None:
        tags["finetune.source_step"] = str(src.step)
    if src.mlflow_run_id:
        tags["finetune.pretrain_run_id"] = src.mlflow_run_id
    return tags


def finetune(cfg: Config, src: Source, num_classes: int, *, keep_head: bool = False) -> dict:
    from orchestrator.train.driver import pretrain

    adapted = adapt_for_finetune(src, img_size=cfg.model.img_size, num_classes=num_classes, keep_head=keep_head,
                                 head_bias=cfg.model.head_bias)
    state = adapted.model.state_dict()
    check_fits_workers(cfg, num_classes, state)
    url = write_init_weights(cfg, state)
    say(f"[finetune] from {src.describe()}\n[finetune] resolution x{adapted.factor} -> {cfg.model.img_size} px, "
        f"D_S {src.model_cfg.tokens_mlp_dim} -> {cfg.model.tokens_mlp_dim}, "
        f"head {'replaced' if adapted.head_replaced else 'kept'} ({num_classes} classes); "
        f"initial weights {url}")
    return pretrain(cfg, init_weights_url=url, run_tags=source_tags(src, adapted.factor, adapted.head_replaced))


if __name__ == "__main__":
    sys.exit(main())
