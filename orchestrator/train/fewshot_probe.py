"""The loop's few-shot moment (eval.fewshot_every_steps): big_vision's few-shot linear probe on the frozen pre-logits
of the model in training, every N steps and at the last step.

Rank 0 runs the probe alone (orchestrator/eval/fewshot.py `probe`: shots from the first examples of each class of
the training split, read without augmentation; tested on the whole val split, as `python -m orchestrator.evaluate
--fewshot` does), prints it and logs `fewshot/<k>shot`; every rank then meets at a barrier (session.agree_max), so
the others wait there instead of running ahead into the next step's gradient all-reduce. The time is the step
timer's `eval` phase and is not counted as training throughput.
"""

from __future__ import annotations

import time

import torch

from orchestrator.eval.fewshot import probe
from orchestrator.observe.step_timer import StepTimer
from orchestrator.train.periodic import Periodic
from pipelines.cli import say


class FewShotProbe(Periodic):
    """`seconds`: the last probe's wall time, the barrier included (not training throughput)."""

    def __init__(self, model: torch.nn.Module, loaders: tuple | None, device: torch.device,
                 autocast: torch.dtype | None, every: int, total_steps: int, rank: int, tracker, session,
                 num_classes: int, shots: list[int], timer: StepTimer | None = None):
        super().__init__(every, total_steps, timer)
        self.model, self.loaders, self.device, self.autocast = model, loaders, device, autocast  # loaders: rank 0's
        self.rank, self.tracker, self.session = rank, tracker, session
        self.num_classes, self.shots = num_classes, list(shots)

    def due(self, step: int) -> bool:
        return self.every > 0 and super().due(step)  # 0: off, not even at the last step

    def maybe_run(self, step: int, skip: bool = False) -> dict[str, float]:
        """`fewshot/<k>shot` on rank 0 when due and not skipped (every rank decides alike), else {}."""
        out = self.run_if_due(step, skip, lambda t0: self._probe(step, t0))
        return {} if out is None else out

    def _probe(self, step: int, t0: float) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.rank == 0:
            train, test = self.loaders
            acc = probe(self.model, train, test, self.device, self.num_classes, self.shots,
                        autocast_dtype=self.autocast)
            out = {f"fewshot/{k}shot": a for k, a in acc.items()}
            say(f"fewshot step {step}: " + "  ".join(f"{k}-shot {a:.4f}" for k, a in acc.items())
                + f" ({time.perf_counter() - t0:.1f}s)")
            if self.tracker:
                self.tracker.log_metrics(out, step)
        self.session.agree_max(0)  # a barrier: the other ranks wait for rank 0's probe
        return out
