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
from pipelines.cli import say


class FewShotProbe:
    def __init__(self, model: torch.nn.Module, loaders: tuple | None, device: torch.device,
                 autocast: torch.dtype | None, every: int, total_steps: int, rank: int, tracker, session,
                 num_classes: int, shots: list[int], timer: StepTimer | None = None):
        self.model, self.loaders, self.device, self.autocast = model, loaders, device, autocast  # loaders: rank 0's
        self.every, self.total_steps, self.rank, self.tracker, self.session = every, total_steps, rank, tracker, session
        self.num_classes, self.shots = num_classes, list(shots)
        self.timer = timer or StepTimer(enabled=False)
        self.seconds = 0.0  # the last probe's wall time, the barrier included (not training throughput)

    def due(self, step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == self.total_steps)

    def maybe_run(self, step: int, skip: bool = False) -> dict[str, float]:
        """`fewshot/<k>shot` on rank 0 when due and not skipped (every rank decides alike), else {}."""
        self.seconds = 0.0
        if skip or not self.due(step):
            return {}
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        with self.timer.phase("eval"):
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
        self.seconds = time.perf_counter() - t0
        return out
