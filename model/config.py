"""The MLP-Mixer hyper-parameters as one validated dataclass.

Names follow the paper (Tolstikhin et al. 2021, Table 1): C = hidden_dim, D_S = tokens_mlp_dim,
D_C = channels_mlp_dim, S = num_tokens = (img_size / patch_size)^2.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

GELU_FORMS = ("exact", "tanh")
INIT_SCHEMES = ("official", "timm")
NEG_LOG_K = "neg_log_k"  # head_bias value meaning -ln(num_classes), as big_vision's i1k recipe (-6.9 for 1000)

_INT_FIELDS = (
    "img_size",
    "patch_size",
    "in_chans",
    "num_classes",
    "depth",
    "hidden_dim",
    "tokens_mlp_dim",
    "channels_mlp_dim",
)
_RATE_FIELDS = ("drop_rate", "head_drop_rate", "drop_path_rate")


@dataclass(kw_only=True)
class MixerConfig:
    img_size: int
    patch_size: int
    in_chans: int = 3
    num_classes: int = 1000
    depth: int
    hidden_dim: int  # C
    tokens_mlp_dim: int  # D_S
    channels_mlp_dim: int  # D_C
    gelu: Literal["exact", "tanh"] = "exact"  # exact erf (timm) or the tanh approximation (JAX/Flax)
    drop_rate: float = 0.0  # dropout inside both MLPs (after the activation and after fc2)
    head_drop_rate: float = 0.0  # dropout on the pooled pre-logits, before the head
    drop_path_rate: float = 0.0  # stochastic depth s: block i of L drops branches with p = s * i / (L - 1)
    init: Literal["official", "timm"] = "official"
    head_bias: float | str | None = None  # None -> 0.0; "neg_log_k" -> -ln(num_classes)

    @property
    def grid_size(self) -> int:
        """Patches along one side of the (square) image."""
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """S, the number of patches (tokens)."""
        return self.grid_size**2

    @property
    def resolved_head_bias(self) -> float:
        if self.head_bias is None:
            return 0.0
        if self.head_bias == NEG_LOG_K:
            return -math.log(self.num_classes)
        return float(self.head_bias)

    def block_drop_path_rates(self) -> list[float]:
        """Per-block stochastic-depth rate, linear from 0 (first block) to drop_path_rate (last), as big_vision."""
        return [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> MixerConfig:
        """Raise ValueError naming the field, the bad value and what is accepted; return self when valid."""
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} is invalid: expected a positive integer")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size={self.img_size!r} is not divisible by patch_size={self.patch_size!r}: "
                f"expected a multiple of {self.patch_size}, e.g. {self.patch_size * max(1, self.grid_size)}"
            )
        for name in _RATE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value!r} is invalid: expected a number in [0, 1)")
        if self.gelu not in GELU_FORMS:
            raise ValueError(f"gelu={self.gelu!r} is invalid: expected one of {list(GELU_FORMS)}")
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"init={self.init!r} is invalid: expected one of {list(INIT_SCHEMES)}")
        bias = self.head_bias
        bias_ok = bias is None or bias == NEG_LOG_K or (
            isinstance(bias, int | float) and not isinstance(bias, bool) and math.isfinite(bias)
        )
        if not bias_ok:
            raise ValueError(
                f"head_bias={bias!r} is invalid: expected null (0.0), a finite number, "
                f"or {NEG_LOG_K!r} for -ln(num_classes)"
            )
        return self
