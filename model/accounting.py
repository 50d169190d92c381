"""Parameters and FLOPs of a Mixer from its config alone (no model is built).

MACs count every matmul: stem S * (in_chans P^2 C); per block the token MLP 2 * C * S * D_S and the channel MLP
2 * S * C * D_C; head C * K. LayerNorm, GELU, bias adds and pooling are not matmuls and are left out
(they are < 1% for the paper's variants). Mixer-B/16 at 224 with 1000 classes: 12.602 GMACs.
"""

from __future__ import annotations

from model.config import MixerConfig


def count_params(cfg: MixerConfig, include_head: bool = True) -> int:
    """Exact parameter count; equals sum(p.numel() for p in MlpMixer(cfg).parameters())."""
    cfg.validate()
    c, s = cfg.hidden_dim, cfg.num_tokens
    d_s, d_c = cfg.tokens_mlp_dim, cfg.channels_mlp_dim
    stem = cfg.in_chans * cfg.patch_size**2 * c + c
    block = (
        2 * c  # norm1
        + s * d_s + d_s + d_s * s + s  # token MLP fc1, fc2
        + 2 * c  # norm2
        + c * d_c + d_c + d_c * c + c  # channel MLP fc1, fc2
    )
    pre_head_norm = 2 * c
    head = c * cfg.num_classes + cfg.num_classes
    return stem + cfg.depth * block + pre_head_norm + (head if include_head else 0)


def forward_macs(cfg: MixerConfig) -> int:
    """Multiply-accumulates of one forward pass of one image."""
    cfg.validate()
    c, s = cfg.hidden_dim, cfg.num_tokens
    stem = s * cfg.in_chans * cfg.patch_size**2 * c
    token_mlp = 2 * c * s * cfg.tokens_mlp_dim
    channel_mlp = 2 * s * c * cfg.channels_mlp_dim
    head = c * cfg.num_classes
    return stem + cfg.depth * (token_mlp + channel_mlp) + head


def forward_flops(cfg: MixerConfig) -> int:
    return 2 * forward_macs(cfg)


def train_flops_per_image(cfg: MixerConfig) -> int:
    """Forward plus backward (twice the forward: gradients w.r.t. activations and weights)."""
    return 3 * forward_flops(cfg)
