"""Where fine-tuning and evaluation get their weights: one loader for every kind of checkpoint source.

    from orchestrator.eval.sources import load_source, adapt_for_finetune
    src = load_source("/runs/digits")                  # a run dir: its latest complete checkpoint
    src = load_source("s3://bucket/Mixer-B_16.npz")    # an official JAX/Flax .npz
    src = load_source("mixer_b16.pth")                 # a timm / plain state dict (.pt, .pth, .bin, .safetensors)
    src = load_source("/runs/digits", weights="ema")   # its EMA of the weights (a run with train.ema_decay set)
    model = src.build_model()                          # the checkpoint's own architecture, weights loaded
    adapted = adapt_for_finetune(src, img_size=448, num_classes=10)   # App. C + new head

A source is a local path or any fsspec URL:
- one of this project's checkpoints: a directory with ``state.pt`` (or the ``state.pt`` file itself);
- a run directory (``<storage_path>/<run name>``): its latest *complete* checkpoint: the one Ray Train
  registered last (``ray.train.Result.from_path``), else the newest ``checkpoint_*`` whose ``state.pt`` loads.
  So a checkpoint of a run in progress can be read while the run writes the next one;
- an official .npz (Flax key layout), read with ``np.load(allow_pickle=False)``;
- a state dict in timm's / this project's key layout, read with ``torch.load(weights_only=True)`` (optionally
  wrapped as {"state_dict": ...} or {"model": ...}) or safetensors.
Nothing here executes pickled code. Every failure is a CheckpointError naming the source and the problem.

`weights` chooses which weights of a project checkpoint are read: "raw" (the default, its "model") or "ema" (its
"ema", the exponential moving average kept when the run set train.ema_decay; orchestrator/train/ema.py). Asking
for "ema" from a checkpoint without one (an older run, a run without train.ema_decay, an .npz or a plain state
dict) is a CheckpointError naming `--weights` and what is accepted; a run directory's latest complete checkpoint
is the one asked, never an older one that happens to hold an EMA.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any

import torch

from model import MixerConfig, MlpMixer, adapt_resolution, load_state_dict_checked
from model.state_dict_loading import check_state_dict, config_from_state_dict
from orchestrator.checkpoint.format import (
    FORMAT_VERSION,
    STATE_FILE,
    DamagedCheckpointError,
    UnsafeCheckpointError,
    read_weights,
)
from orchestrator.checkpoint.runs import run_checkpoints
from pipelines.cli import InputError, first_line

_STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHTS = ("raw", "ema")  # which weights of a checkpoint: the trained ones, or their EMA (train.ema_decay)


class CheckpointError(InputError, ValueError):
    """A checkpoint source cannot be used; the message names the source and the problem."""


class NoEmaError(CheckpointError):
    """`--weights ema` from a checkpoint that holds no EMA of the weights."""


@dataclass
class Source:
    url: str  # what the user gave
    resolved: str  # the file or checkpoint directory actually read
    kind: str  # "project" | "npz" | "state_dict"
    model_cfg: MixerConfig  # the architecture the weights were written by
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    config: dict | None = None  # project checkpoints: the resolved training config
    mlflow_run_id: str | None = None  # project checkpoints: the run that wrote it
    step: int | None = None
    weights: str = "raw"  # "raw": the trained weights; "ema": their EMA (train.ema_decay)

    @property
    def model_name(self) -> str | None:
        return (self.config or {}).get("model", {}).get("name")

    def build_model(self) -> MlpMixer:
        """The checkpoint's own model with its weights (head included)."""
        model = MlpMixer(self.model_cfg)
        try:
            load_state_dict_checked(model, self.state_dict)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {self.resolved} does not fit its own architecture: {e}") from None
        return model

    def check(self) -> None:
        """Every key and shape fits the inferred architecture (cheap: no weights are copied)."""
        with torch.device("meta"):
            model = MlpMixer(self.model_cfg)
        try:
            check_state_dict(model, self.state_dict)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {self.url} does not fit the MLP-Mixer its shapes describe: {e}") from None

    def describe(self) -> str:
        c = self.model_cfg
        return (f"{self.kind} checkpoint {self.resolved}: img {c.img_size}, patch {c.patch_size}, depth {c.depth}, "
                f"C {c.hidden_dim}, D_S {c.tokens_mlp_dim}, D_C {c.channels_mlp_dim}, {c.num_classes} classes"
                + (f", step {self.step}" if self.step is not None else "")
                + (", EMA weights" if self.weights == "ema" else ""))


# ------------------------------------------------------------------------------------------ loading ---


def load_source(url: str, storage_options: dict | None = None, weights: str = "raw") -> Source:
    """Read a checkpoint source (see the module docstring); CheckpointError on anything unusable."""
    from pipelines.redaction import redact_url
    from pipelines.storage import get_fs

    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: expected one of {WEIGHTS}")
    url = str(url)
    shown = redact_url(url)
    try:
        fs, path = get_fs(url, storage_options)
        exists = fs.exists(path)
    except Exception as e:
        raise CheckpointError(f"checkpoint {shown} cannot be opened: {type(e).__name__}: {e}") from None
    if not exists:
        raise CheckpointError(f"checkpoint {shown} does not exist")
    src = _load_directory(fs, path, shown, weights) if fs.isdir(path) else _load_file(fs, path, shown, weights)
    src.url = shown  # what the user named; src.resolved is the file actually read
    proto = url.split("://", 1)[0] + "://" if "://" in url else ""
    if proto and not src.resolved.startswith(proto):
        src.resolved = proto + src.resolved
    return src


def _join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name


def _load_directory(fs, path: str, shown: str, weights: str) -> Source:
    if fs.exists(_join(path, STATE_FILE)):
        return _load_project(fs, _join(path, STATE_FILE), shown, weights)
    candidates = [name for name, _ in run_checkpoints(fs, path)]
    if not candidates:
        raise CheckpointError(
            f"checkpoint {shown} is a directory without {STATE_FILE} and without complete checkpoint_* "
            "subdirectories: expected one of this project's checkpoint directories or a run directory"
        )
    problems = []
    for name in candidates:  # newest first; a partly copied state.pt of an in-flight checkpoint is skipped
        try:
            return _load_project(fs, _join(_join(path, name), STATE_FILE), f"{shown.rstrip('/')}/{name}", weights)
        except NoEmaError:
            raise  # the latest complete checkpoint is the one asked for: an older one is not picked for its EMA
        except CheckpointError as e:
            problems.append(str(e))
    raise CheckpointError(f"no checkpoint of run directory {shown} can be loaded: {'; '.join(problems)}")


def _torch_load(fs, path: str, shown: str) -> Any:
    try:
        data = fs.cat_file(path)
    except Exception as e:
        raise CheckpointError(f"checkpoint {shown} cannot be read: {type(e).__name__}: {e}") from None
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load as load_safetensors

            return load_safetensors(data)
        except Exception as e:
            raise CheckpointError(f"checkpoint {shown} is not a readable safetensors file: {e}") from None
    try:
        return read_weights(io.BytesIO(data), shown)
    except (DamagedCheckpointError, UnsafeCheckpointError) as e:
        cause = e.__cause__  # torch's own error
        detail = first_line(cause) if isinstance(e, DamagedCheckpointError) else (
            "it holds pickled objects other than tensors and plain values, which are not executed")
        raise CheckpointError(
            f"checkpoint {shown} cannot be loaded safely with torch.load(weights_only=True): "
            f"{type(cause).__name__}: {detail[:300]}"
        ) from None


def _load_project(fs, path: str, shown: str, weights: str = "raw") -> Source:
    state = _torch_load(fs, path, shown)
    if not isinstance(state, dict) or "model" not in state or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {shown} is not one of this project's checkpoints: expected a dict with "
            f"format_version {FORMAT_VERSION} and 'model'"
        )
    if weights == "ema" and "ema" not in state:
        raise NoEmaError(
            f"--weights ema: checkpoint {shown} holds no EMA of the weights (written with train.ema_decay off); "
            "accepted: --weights raw (the default), or --weights ema with a checkpoint of a run that set "
            "train.ema_decay"
        )
    config = state.get("config")
    sd = _tensor_dict(state["model" if weights == "raw" else "ema"], shown)
    model_cfg = _infer_config(sd, shown, config=config)
    return _checked(Source(shown, path, "project", model_cfg, sd, config=config,
                           mlflow_run_id=state.get("mlflow_run_id"), step=state.get("step"), weights=weights))


def _checked(src: Source) -> Source:
    src.check()
    return src


def _load_file(fs, path: str, shown: str, weights: str = "raw") -> Source:
    head = fs.cat_file(path, start=0, end=4) if fs.size(path) >= 4 else b""
    if path.endswith(".npz") or (head.startswith(b"PK") and not path.endswith(_STATE_DICT_SUFFIXES)):
        _only_raw(weights, "an .npz", shown)
        return _load_npz(fs, path, shown)
    obj = _torch_load(fs, path, shown)
    if isinstance(obj, dict) and obj.get("format_version") == FORMAT_VERSION and "model" in obj:
        return _load_project(fs, path, shown, weights)
    _only_raw(weights, "a plain state dict", shown)
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    sd = _tensor_dict(obj, shown)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # DDP-wrapped state dicts
    return _checked(Source(shown, path, "state_dict", _infer_config(sd, shown), sd))


def _only_raw(weights: str, what: str, shown: str) -> None:
    if weights == "ema":
        raise NoEmaError(
            f"--weights ema: checkpoint {shown} is {what}, which holds one set of weights and no EMA; accepted: "
            "--weights raw (the default), or --weights ema with one of this project's checkpoints of a run that "
            "set train.ema_decay"
        )


def _load_npz(fs, path: str, shown: str) -> Source:
    from model.jax_checkpoint import infer_config as infer_npz_config
    from model.jax_checkpoint import npz_to_state_dict, read_npz

    try:
        arrays = read_npz(io.BytesIO(fs.cat_file(path)))
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {shown} is not a readable .npz (np.load, allow_pickle=False): {type(e).__name__}: "
            f"{first_line(e, 200)}"
        ) from None
    try:
        cfg = infer_npz_config(arrays)
        sd = npz_to_state_dict(arrays, MlpMixer(cfg))
    except ValueError as e:
        raise CheckpointError(f"checkpoint {shown} is not an official Mixer .npz: {e}") from None
    return Source(shown, path, "npz", cfg, sd)


def _tensor_dict(obj: Any, shown: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"checkpoint {shown} is not a checkpoint: expected a state dict (parameter name -> tensor), "
            f"got {type(obj).__name__}"
        )
    return dict(obj)


def _infer_config(sd: dict[str, torch.Tensor], shown: str, config: dict | None = None) -> MixerConfig:
    """The architecture of a state dict in timm's key layout; our own checkpoints add the non-size settings the
    model was trained with (timm's MlpMixer, like our default, uses the exact GELU)."""
    m = (config or {}).get("model", {})
    try:
        return config_from_state_dict(sd, **{k: m[k] for k in ("gelu", "init", "head_bias") if m.get(k) is not None})
    except ValueError as e:
        raise CheckpointError(f"checkpoint {shown} is not an MLP-Mixer state dict: {e}") from None


# ------------------------------------------------------------------------------------ fine-tuning ---


@dataclass
class Adapted:
    model: MlpMixer
    factor: int  # resolution factor K (1: unchanged)
    head_replaced: bool


def target_config(src: Source, *, img_size: int | None = None, expect: dict | None = None) -> MixerConfig:
    """The fine-tuning model's architecture: the source's, at ``img_size`` (an integer multiple), with D_S
    grown by K^2 (App. C). ``expect``: size fields the config asks for (e.g. patch_size); a mismatch with the
    checkpoint is a CheckpointError naming the field."""
    c = src.model_cfg
    img_size = img_size or c.img_size
    if img_size % c.img_size or img_size < c.img_size:
        raise CheckpointError(
            f"model.img_size={img_size} needs resolution factor {img_size}/{c.img_size} = {img_size / c.img_size:.4g} "
            f"from checkpoint {src.url} (trained at {c.img_size} px): expected an integer factor K >= 1, i.e. "
            f"model.img_size in {[c.img_size * k for k in (1, 2, 3, 4)]}"
        )
    factor = img_size // c.img_size
    target = dataclasses.replace(c, img_size=img_size, tokens_mlp_dim=c.tokens_mlp_dim * factor * factor)
    for key, want in (expect or {}).items():
        have = getattr(target, key)
        if want is not None and want != have:
            hint = " (App. C: K^2 x the checkpoint's D_S)" if key == "tokens_mlp_dim" else ""
            raise CheckpointError(
                f"checkpoint {src.url} was written by an incompatible model: model.{key}={want} in the config but "
                f"the checkpoint needs {have}{hint}; remove model.{key} from the config/overrides or use a "
                "matching checkpoint"
            )
    return target


def adapt_for_finetune(src: Source, *, img_size: int | None = None, num_classes: int,
                       keep_head: bool = False, head_bias: Any = None) -> Adapted:
    """The source model at ``img_size`` (App. C token-mixing expansion) with a fresh head for ``num_classes``
    (zero weights, as the paper's fine-tuning), or the checkpoint's head when ``keep_head`` and it fits."""
    target = target_config(src, img_size=img_size)
    model = src.build_model()
    factor = target.img_size // src.model_cfg.img_size
    if factor > 1:
        model = adapt_resolution(model, target.img_size)
    head_replaced = not (keep_head and src.model_cfg.num_classes == num_classes)
    if keep_head and src.model_cfg.num_classes != num_classes:
        raise CheckpointError(
            f"--keep-head: checkpoint {src.url} has a {src.model_cfg.num_classes}-class head but the dataset has "
            f"{num_classes} classes"
        )
    if head_replaced:
        if head_bias is not None:
            model.cfg = dataclasses.replace(model.cfg, head_bias=head_bias)
        model.reset_classifier(num_classes)
    return Adapted(model, factor, head_replaced)
