"""Import the official Flax MLP-Mixer checkpoints (.npz, e.g. imagenet21k/Mixer-B_16.npz) without pickle.

    from model.jax_checkpoint import load_npz
    result = load_npz("Mixer-B_16.npz", num_classes=10)   # config inferred from the shapes, head replaced
    model = result.model

Key layout (Flax -> timm/ours): stem/kernel (P,P,in,C) HWIO -> stem.proj.weight OIHW; Dense kernels (in,out)
-> Linear weights (out,in); LayerNorm scale -> weight. Note the official models use the tanh GELU, so configs
inferred here say gelu='tanh'.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import torch

from model.config import MixerConfig
from model.mixer import MlpMixer
from model.state_dict_loading import config_from_state_dict, load_state_dict_checked

log = logging.getLogger(__name__)

_TOP_LEVEL = {"stem": "stem.proj", "pre_head_layer_norm": "norm", "head": "head"}
_BLOCK_PARTS = {
    "LayerNorm_0": "norm1",
    "token_mixing/Dense_0": "mlp_tokens.fc1",
    "token_mixing/Dense_1": "mlp_tokens.fc2",
    "LayerNorm_1": "norm2",
    "channel_mixing/Dense_0": "mlp_channels.fc1",
    "channel_mixing/Dense_1": "mlp_channels.fc2",
}
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_BLOCK_KEY = re.compile(r"MixerBlock_(\d+)/(.+)")
_HEAD_KEYS = ("head.weight", "head.bias")


@dataclass
class NpzImport:
    model: MlpMixer
    head_replaced: bool  # True when the checkpoint's head did not fit num_classes and a fresh head was made
    checkpoint_num_classes: int


class NpzError(ValueError):
    """An .npz checkpoint that cannot be used: the message names the file and what is wrong with it."""


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members / an empty zip
_NPY_MAGIC = b"\x93NUMPY"


def _describe_source(source: str | os.PathLike | IO[bytes]) -> str:
    return repr(os.fspath(source)) if isinstance(source, str | os.PathLike) else f"<{type(source).__name__}>"


def read_npz(source: str | os.PathLike | IO[bytes]) -> dict[str, np.ndarray]:
    """All arrays of an .npz file (path or binary file object), loaded with allow_pickle=False.

    Anything that is not a readable .npz of plain arrays (empty, truncated, random bytes, a damaged member, a
    plain .npy, pickled objects) raises NpzError naming the file; numpy's own errors never escape.
    """
    name = _describe_source(source)
    try:
        if isinstance(source, str | os.PathLike):
            with open(source, "rb") as f:
                head = f.read(8)
        else:
            pos = source.tell()
            head = source.read(8)
            source.seek(pos)
    except OSError as e:
        raise NpzError(f"checkpoint {name} cannot be read: {e.strerror or e}") from None
    if not head:
        raise NpzError(f"checkpoint {name} is empty: expected the official Flax .npz")
    if head.startswith(_NPY_MAGIC):
        raise NpzError(f"checkpoint {name} is a single .npy array, not an .npz archive: expected the official Flax .npz")
    if not head.startswith(_ZIP_MAGIC):
        raise NpzError(f"checkpoint {name} is not an .npz archive (no zip signature): expected the official Flax .npz")
    try:
        with np.load(source, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise NpzError(f"checkpoint {name} holds pickled Python objects, which are never loaded "
                           "(allow_pickle=False): expected plain numeric arrays") from None
        raise NpzError(f"checkpoint {name} has a damaged member: {e}") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, TypeError) as e:
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise NpzError(f"checkpoint {name} is a damaged or truncated .npz archive: {detail}") from None


def torch_key(npz_key: str) -> str:
    """The state_dict key of a Flax parameter path, e.g. 'MixerBlock_3/LayerNorm_0/scale' -> 'blocks.3.norm1.weight'."""
    module, _, leaf = npz_key.rpartition("/")
    block = _BLOCK_KEY.fullmatch(module)
    if block and block.group(2) in _BLOCK_PARTS and leaf in _LEAVES:
        return f"blocks.{int(block.group(1))}.{_BLOCK_PARTS[block.group(2)]}.{_LEAVES[leaf]}"
    if module in _TOP_LEVEL and leaf in _LEAVES:
        return f"{_TOP_LEVEL[module]}.{_LEAVES[leaf]}"
    raise ValueError(
        f"checkpoint key {npz_key!r} is not part of the official Mixer layout: expected stem/{{kernel,bias}}, "
        f"MixerBlock_{{i}}/{{{','.join(_BLOCK_PARTS)}}}/{{kernel,scale,bias}}, pre_head_layer_norm/{{scale,bias}}, "
        f"head/{{kernel,bias}}"
    )


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:  # conv kernel HWIO -> OIHW
        return array.transpose(3, 2, 0, 1)
    if array.ndim == 2:  # dense kernel (in, out) -> (out, in)
        return array.T
    return array


def _flax_shape(torch_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(torch_shape) == 4:
        o, i, h, w = torch_shape
        return (h, w, i, o)
    return tuple(reversed(torch_shape)) if len(torch_shape) == 2 else tuple(torch_shape)


def infer_config(arrays: Mapping[str, np.ndarray], **overrides: Any) -> MixerConfig:
    """The MixerConfig an official checkpoint was trained with, read from its shapes (gelu='tanh', as JAX)."""
    in_torch_layout = {torch_key(k): _to_torch_layout(a) for k, a in arrays.items()}  # views, nothing copied
    try:
        return config_from_state_dict(in_torch_layout, **{"gelu": "tanh", **overrides})
    except ValueError as e:
        raise ValueError(f"checkpoint sizes cannot be inferred (keys named in timm's layout): {e}") from None


def infer_config_from_npz(source: str | os.PathLike | IO[bytes], **overrides: Any) -> MixerConfig:
    return infer_config(read_npz(source), **overrides)


def npz_to_state_dict(arrays: Mapping[str, np.ndarray], model: MlpMixer) -> dict[str, torch.Tensor]:
    """Map and check every array against ``model``; ValueError names the key with expected and found shapes."""
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for npz_key, array in arrays.items():
        key = torch_key(npz_key)
        if key not in expected:
            raise ValueError(
                f"checkpoint key {npz_key!r} (-> {key!r}) does not fit the model: it has depth "
                f"{model.cfg.depth} (blocks 0..{model.cfg.depth - 1})"
            )
        want = _flax_shape(tuple(expected[key].shape))
        if tuple(array.shape) != want and key not in _HEAD_KEYS:
            raise ValueError(
                f"checkpoint key {npz_key!r} (-> {key!r}) has shape {tuple(array.shape)}: expected {want}"
            )
        out[key] = torch.from_numpy(np.ascontiguousarray(_to_torch_layout(array), dtype=np.float32))
    return out


def load_npz(
    source: str | os.PathLike | IO[bytes],
    target: MixerConfig | MlpMixer | None = None,
    *,
    num_classes: int | None = None,
) -> NpzImport:
    """Load an official Flax .npz into a Mixer.

    target: a MixerConfig (a model is built from it), an existing MlpMixer (loaded in place), or None (the config
    is inferred from the checkpoint's shapes). num_classes: the classes wanted, default the target's, or the
    checkpoint's when there is no target. When it differs from the checkpoint's head (e.g. the 21843-class
    ImageNet-21k head -> 10 classes), everything but the head is loaded and the head is re-initialised per the
    config (zero weight, cfg's head bias); the result says so and it is logged.
    """
    arrays = read_npz(source)
    try:
        return _load_arrays(arrays, target, num_classes)
    except ValueError as e:  # the layout or the shapes do not fit: the same error type, naming the file
        raise NpzError(f"checkpoint {_describe_source(source)}: {e}") from None


def _load_arrays(arrays: dict[str, np.ndarray], target: MixerConfig | MlpMixer | None,
                 num_classes: int | None) -> NpzImport:
    if "head/kernel" not in arrays:
        raise ValueError("checkpoint key 'head/kernel' is missing: expected the official layout with a head")
    ckpt_classes = int(arrays["head/kernel"].shape[1])

    if target is None:
        target = infer_config(arrays)
        num_classes = num_classes or ckpt_classes
    if isinstance(target, MixerConfig):
        cfg = dataclasses.replace(target, num_classes=num_classes) if num_classes else target
        model = MlpMixer(cfg)
    else:
        model = target
        if num_classes and num_classes != model.num_classes:
            model.reset_classifier(num_classes)

    state = npz_to_state_dict(arrays, model)
    head_replaced = tuple(state["head.weight"].shape) != tuple(model.head.weight.shape)
    if head_replaced:
        if state["head.weight"].shape[1] != model.head.in_features:
            raise ValueError(
                f"checkpoint key 'head/kernel' has shape {tuple(arrays['head/kernel'].shape)}: expected "
                f"({model.head.in_features}, num_classes)"
            )
        for key in _HEAD_KEYS:
            del state[key]
        model.reset_classifier(model.num_classes)
        log.info(
            "npz head replaced: checkpoint has %d classes, model %d; new head initialised (zero weight, bias %g)",
            ckpt_classes, model.num_classes, model.cfg.resolved_head_bias,
        )
    load_state_dict_checked(model, state, allow_missing=_HEAD_KEYS if head_replaced else ())
    return NpzImport(model=model, head_replaced=head_replaced, checkpoint_num_classes=ckpt_classes)
