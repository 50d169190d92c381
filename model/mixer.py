"""MLP-Mixer (Tolstikhin et al. 2021) as plain nn.Modules.

The state_dict layout equals timm's ``MlpMixer`` (stem.proj, blocks.{i}.norm1, blocks.{i}.mlp_tokens.fc1/fc2,
blocks.{i}.norm2, blocks.{i}.mlp_channels.fc1/fc2, norm, head), so timm checkpoints load with strict=True.
The forward API is timm's too: ``forward_features`` returns the normalised token map (B, S, C), ``forward_head``
pools (mean over tokens) and classifies, ``reset_classifier`` replaces the head. Unlike timm, a new head is
initialised as the paper's (zero weight, cfg's head bias), and num_classes must be positive (no Identity head:
``forward_head(x, pre_logits=True)`` gives the features).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from model.config import MixerConfig

LAYER_NORM_EPS = 1e-6  # Flax's default; PyTorch's 1e-5 would not match the official weights
_TRUNC_NORMAL_STD = 0.87962566103423978  # std of a standard normal truncated to (-2, 2)
GLOBAL_POOLS = ("avg", "")  # timm's: mean over tokens, or none (forward_head then works per token)


class PatchStem(nn.Module):
    """P x P convolution with stride P: (B, in_chans, H, W) -> (B, S, C), tokens row-major over the patch grid."""

    def __init__(self, cfg: MixerConfig):
        super().__init__()
        self.img_size = cfg.img_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.hidden_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"input image size {tuple(x.shape[-2:])} does not match img_size={self.img_size}: expected "
                f"(B, C, {self.img_size}, {self.img_size}); build the model for that size or use model.adapt_resolution"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Dense(in -> hidden), GELU, Dense(hidden -> in), mixing along the last dimension (the channel MLP)."""

    def __init__(self, features: int, hidden: int, gelu: str, drop_rate: float):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.act = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.drop1 = nn.Dropout(drop_rate)
        self.fc2 = nn.Linear(hidden, features)
        self.drop2 = nn.Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def left_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A Linear applied along dim 1 of x (B, N, C): y[b] = weight @ x[b] + bias[:, None] -> (B, N_out, C).

    Equivalent to ``F.linear(x.transpose(1, 2), weight, bias).transpose(1, 2)`` without the contiguous copy of
    the transposed activations: the weight is expanded (a view) over the batch and one batched GEMM reads x as
    it lies. Under autocast the (small) weight is cast before it is expanded, so no (B, N_out, N) copy is made.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    return torch.baddbmm(bias.view(1, -1, 1), weight.expand(x.shape[0], -1, -1), x)


class TokenMixingMlp(Mlp):
    """The same MLP applied across tokens (S -> D_S -> S), shared by all channels; x stays (B, S, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop1(self.act(left_linear(x, self.fc1.weight, self.fc1.bias)))
        return self.drop2(left_linear(y, self.fc2.weight, self.fc2.bias))


class MixerBlock(nn.Module):
    """Pre-norm block: x + TokenMLP(LN(x)), then x + ChannelMLP(LN(x))."""

    def __init__(self, cfg: MixerConfig, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_dim, eps=LAYER_NORM_EPS)
        self.mlp_tokens = TokenMixingMlp(cfg.num_tokens, cfg.tokens_mlp_dim, cfg.gelu, cfg.drop_rate)
        # stochastic depth per sample, kept branches scaled by 1 / (1 - p): eval needs no rescaling
        self.drop_path = StochasticDepth(drop_path_rate, mode="row")
        self.norm2 = nn.LayerNorm(cfg.hidden_dim, eps=LAYER_NORM_EPS)
        self.mlp_channels = Mlp(cfg.hidden_dim, cfg.channels_mlp_dim, cfg.gelu, cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x)))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class MlpMixer(nn.Module):
    def __init__(self, cfg: MixerConfig):
        super().__init__()
        self.cfg = cfg = dataclasses.replace(cfg).validate()  # own copy: reset_classifier updates it
        self.global_pool = "avg"
        self.stem = PatchStem(cfg)
        self.blocks = nn.Sequential(*(MixerBlock(cfg, p) for p in cfg.block_drop_path_rates()))
        self.norm = nn.LayerNorm(cfg.hidden_dim, eps=LAYER_NORM_EPS)
        self.head_drop = nn.Dropout(cfg.head_drop_rate)
        self.head = nn.Linear(cfg.hidden_dim, cfg.num_classes)
        self.reset_parameters()

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, H, W) -> normalised token map (B, S, C): stem, blocks, LayerNorm."""
        return self.norm(self.blocks(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Token map (B, S, C) -> logits (B, num_classes), or the pooled pre-logits (B, C) when ``pre_logits``.

        Pooling is the mean over tokens (global_pool 'avg'); with global_pool '' the tokens are kept, as timm.
        """
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_parameters(self) -> None:
        """Initialise every parameter per cfg.init ('official' Flax defaults or timm's scheme)."""
        with torch.no_grad():
            for name, module in self.named_modules():
                if isinstance(module, nn.LayerNorm):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
                elif isinstance(module, nn.Conv2d):
                    lecun_normal_(module.weight)
                    nn.init.zeros_(module.bias)
                elif isinstance(module, nn.Linear) and name != "head":
                    if self.cfg.init == "official":
                        lecun_normal_(module.weight)
                        nn.init.zeros_(module.bias)
                    else:  # timm: xavier-uniform kernels, N(0, 1e-6) biases inside the MLPs
                        nn.init.xavier_uniform_(module.weight)
                        nn.init.normal_(module.bias, std=1e-6)
            self._init_head()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` classes (cfg updated).

        timm's signature: ``global_pool`` 'avg' or '' (no pooling); None keeps the current one.
        """
        pool = self.global_pool if global_pool is None else global_pool
        if pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool={pool!r} is invalid: expected one of {list(GLOBAL_POOLS)}")
        self.cfg, self.global_pool = dataclasses.replace(self.cfg, num_classes=num_classes).validate(), pool
        old = self.head
        self.head = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
        self.head.train(self.training)
        with torch.no_grad():
            self._init_head()

    def _init_head(self) -> None:
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, self.cfg.resolved_head_bias)


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Flax's lecun_normal: truncated normal (at +-2 std), variance 1 / fan_in after truncation."""
    fan_in = weight[0].numel()  # Linear (out, in): in; Conv2d (out, in, kh, kw): in * kh * kw
    std = math.sqrt(1.0 / fan_in) / _TRUNC_NORMAL_STD
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)

