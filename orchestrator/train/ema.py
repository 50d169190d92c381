"""The exponential moving average of the weights (`train.ema_decay`), kept beside the trained model on every rank.

    ema = WeightEma(model, decay=0.9999)      # model: the plain module (state.model), never the DDP/compiled wrapper
    ...                                       # the weights change (a checkpoint's, DDP's broadcast from rank 0)
    ema.reset()                               # start again from the model's current weights
    train_step(...); ema.update()             # after every optimizer step: ema = decay * ema + (1 - decay) * w
    evaluate(ema.module, ...)                 # the averaged weights, a plain MlpMixer in timm's key layout
    state["ema"] = ema.state_dict()           # what a checkpoint holds: the averaged module's state dict

The mechanism is PyTorch's own: `torch.optim.swa_utils.AveragedModel` with `get_ema_multi_avg_fn(decay)`. Its
`update_parameters` copies the weights the first time it is called (while its `n_averaged` is 0) and averages on
every later call (a fused lerp, ema + (1 - decay) * (w - ema): the same formula up to rounding). So the EMA is
primed at construction and at every `reset()` (n_averaged 0, then one update: a copy of the current weights) and
the first optimizer step already averages: ema_1 = decay * w_0 + (1 - decay) * w_1, where w_0 are the weights
the EMA started from (a fresh run's initial weights, a fine-tuning run's initial weights, or the weights of a
checkpoint that held no EMA). No warm-up or bias correction is applied.

Parameters are averaged; buffers are copied from the model at every update (`use_buffers=False`): MLP-Mixer
has LayerNorm only, so it has no buffers, and a copied integer buffer (a BatchNorm's batch count) stays exact.
The copy lives on the model's device (one more copy of the parameters in accelerator memory). Gradients are
all-reduced, so every rank's model, and with it its EMA, is the same: rank 0 writes it into each checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightEma:
    """An EMA of `model`'s parameters, updated by `update()` after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float, timer=None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay} is not in (0, 1)")
        self.model, self.decay, self.timer = model, decay, timer
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
        self.averaged.requires_grad_(False)
        self.averaged.eval()
        self.restored = False  # True once a checkpoint's EMA was loaded (then reset() is not needed)
        self.reset()

    @property
    def module(self) -> nn.Module:
        """The averaged weights as a plain copy of the model (evaluate it, or read its state dict)."""
        return self.averaged.module

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average from the model's current weights (AveragedModel's first update is a copy)."""
        self.averaged.n_averaged.zero_()
        self.averaged.update_parameters(self.model)

    def update(self) -> None:
        """ema = decay * ema + (1 - decay) * w, for every parameter; in the step timer's `optimizer` phase."""
        if self.timer is None:
            self.averaged.update_parameters(self.model)
            return
        with self.timer.phase("optimizer"):
            self.averaged.update_parameters(self.model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged module's state dict: the model's own keys, so the checkpoint's "ema" loads like "model"."""
        return self.module.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """A checkpoint's EMA (strict keys); the next update() averages into it."""
        self.module.load_state_dict(state)
        self.averaged.n_averaged.fill_(max(int(self.averaged.n_averaged), 1))
        self.restored = True
