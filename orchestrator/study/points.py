"""A study's trials: one labelled point per trial, as the points of a search space (config/search_space.py) that
orchestrator.tune's search runs as a grid.

- model-scale: one point per model of the study file, the same recipe.
- data-scale: models x fractions (data.train_fraction), every point planned for the SAME number of optimizer
  steps: the steps of the 100% point (schedule.epochs at full data, capped by train.max_steps if given) are the
  target; fraction f trains target / steps_per_epoch(f) epochs (the paper's 233/70/23/7 for 3/10/30/100% at 7
  epochs), steps_per_epoch(f) being what the run's planner says for the subset, and train.max_steps = target
  makes the total exact whatever a subset's size rounds to. Checked against the planner before anything starts.
  Evaluation and checkpoints come every full-data epoch (unless eval.every_steps / checkpoint.every_steps are
  given), so every point is evaluated at the same steps.
- permutation: models x data.permute modes, one data.permute_seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.config.load import load_config
from orchestrator.config.search_space import POINT_KEY, SearchSpace, apply
from orchestrator.config.studies import StudyFile
from orchestrator.config.tree import Config, ConfigError
from orchestrator.train.plan import RunPlan

# data-scale: keys the points set that a key=value override still decides (the full-data epochs, a step cap)
DATA_SCALE_INPUTS = ("schedule.epochs", "train.max_steps")


@dataclass
class StudyPlan:
    kind: str
    name: str  # <kind>-<study file>: the study's default name (Tune experiment, MLflow parent run)
    space: SearchSpace
    base: Config
    facets: dict[str, dict[str, Any]]  # label -> what the point varies (model, fraction, mode) and its plan

    def describe(self) -> str:
        keys = [k for k in ("model", "fraction", "mode") if any(k in f for f in self.facets.values())]
        head = f"  {'point':18s} " + " ".join(f"{k:>11s}" for k in keys) + f" {'epochs':>9s} {'steps':>7s} {'train FLOPs':>12s}"
        lines = [head]
        for label, f in self.facets.items():
            lines.append(f"  {label:18s} " + " ".join(f"{f[k]!s:>11s}" for k in keys)
                         + f" {f['epochs']:>9g} {f['steps']:>7d} {f['train_flops']:>12.3g}")
        return "\n".join(lines)


def default_plan_for(allow_unreachable: bool = False) -> Callable[[Config], RunPlan]:
    """The run's plan for a config, as its trial will make it (the dataset's own steps per epoch)."""
    from orchestrator.train.launch import resolve_data
    from orchestrator.train.plan import make_plan

    resolved: dict[str, Any] = {}  # the dataset is read once per distinct data setting, not once per point

    def plan_for(cfg: Config) -> RunPlan:
        key = repr((cfg.data, cfg.optim.global_batch_size, cfg.scaling, cfg.model.num_classes, cfg.run.seed))
        if key not in resolved:
            resolved[key] = resolve_data(cfg, allow_unreachable=allow_unreachable)
        data = resolved[key]
        return make_plan(cfg, data.num_classes, data.train_samples, data.steps_per_epoch)

    return plan_for


def point_label(kind: str, model: str, value=None, single_model: bool = False) -> str:
    """model-scale: the model; data-scale: model@fraction; permutation: the mode (model:mode with several models)."""
    if kind == "model-scale":
        return model
    if kind == "data-scale":
        return f"{model}@{value:g}"
    return value if single_model else f"{model}:{value}"


def point_labels(study_file: StudyFile, kind: str) -> list[str]:
    spec = study_file.study(kind)
    values = {"model-scale": [None], "data-scale": spec.fractions, "permutation": spec.modes}[kind]
    return [point_label(kind, m, v, len(spec.models) == 1) for v in values for m in spec.models]


def check_args(study_file: StudyFile, kind: str, only: list[str] | None, overrides: dict[str, Any]) -> None:
    """--points names points of the study, and no key=value override sets what the points set (checked before
    any data is read)."""
    labels = point_labels(study_file, kind)
    unknown = [label for label in only or [] if label not in labels]
    if unknown:
        raise ConfigError(f"--points {unknown[0]!r} is not a point of the {kind} study of {study_file.source}; "
                          f"its points: {', '.join(labels)}")
    spec = study_file.study(kind)
    keys = {k for m in spec.models for k in study_file.models[m]}
    keys |= {"data-scale": {"data.train_fraction"}, "permutation": {"data.permute", "data.permute_seed"}}.get(kind, set())
    clash = sorted(keys & set(overrides))
    if clash:
        raise ConfigError(f"{clash[0]}={overrides[clash[0]]!r} is not accepted: the {kind} study sets it for each "
                          f"point ({', '.join(labels)}); change the study file instead")


def build_study(study_file: StudyFile, kind: str, overrides: dict[str, Any],
                plan_for: Callable[[Config], RunPlan], only: list[str] | None = None) -> StudyPlan:
    """The study's points (those labelled in `only`, if given) and the base config they apply to (file, section
    and key=value overrides)."""
    spec = study_file.study(kind)
    fixed = {**study_file.overrides, **spec.overrides}
    base = load_config(study_file.config, {**fixed, **overrides})
    models = study_file.models
    points: dict[str, dict[str, Any]] = {}
    facets: dict[str, dict[str, Any]] = {}
    if kind == "model-scale":
        for m in spec.models:
            points[m], facets[m] = dict(models[m]), {"model": m}
    elif kind == "permutation":
        for m in spec.models:
            for mode in spec.modes:
                label = point_label(kind, m, mode, len(spec.models) == 1)
                points[label] = {**models[m], "data.permute": mode, "data.permute_seed": spec.permute_seed}
                facets[label] = {"model": m, "mode": mode}
    else:
        fixed, extra = _equal_steps(base, spec.models, models, spec.fractions, plan_for, fixed, points, facets)
        base = load_config(study_file.config, {**fixed, **extra, **overrides})
        fixed = {**fixed, **extra}
    check_args(study_file, kind, only, overrides)
    if only:
        points = {label: v for label, v in points.items() if label in only}
        facets = {label: f for label, f in facets.items() if label in only}
    point_keys = {k for values in points.values() for k in values}
    space = SearchSpace(name=f"{kind}-{study_file.name}", params={}, config=study_file.config,
                        overrides={k: v for k, v in fixed.items() if k not in point_keys}, points=points,
                        source=study_file.source)
    for label in points:  # each point's own plan (data-scale: also the check that steps are equal)
        plan = plan_for(apply(base, {POINT_KEY: label}, space))
        if plan.checkpoint_every_steps % plan.eval_every_steps:  # a report to Tune without the metric fails the trial
            raise ConfigError(f"checkpoint.every_steps={plan.checkpoint_every_steps} is not accepted for point "
                              f"{label!r}: expected a multiple of its evaluation interval ({plan.eval_every_steps} "
                              "steps; eval.every_steps), so that every report to Tune carries the evaluation")
        facets[label].update(epochs=plan.epochs, steps=plan.total_steps, train_flops=plan.train_flops_total,
                             fwd_gflops_per_image=plan.fwd_gflops_per_image, params=plan.num_params)
    if kind == "data-scale":
        steps = {label: f["steps"] for label, f in facets.items()}
        if len(set(steps.values())) != 1:
            raise ConfigError(f"data-scale points are planned for different step counts {steps}; expected one "
                              "(report this: the planner and the study disagree)")
    return StudyPlan(kind, space.name, space, base, facets)


def _equal_steps(base: Config, chosen: list[str], models: dict, fractions: list[float], plan_for,
                 fixed: dict, points: dict, facets: dict) -> tuple[dict, dict]:
    """Fill data-scale's points: every fraction planned for the 100% point's steps. Returns (the file's fixed
    values without the ones the points now set, what the study adds for every point)."""
    full = plan_for(_with(base, {"data.train_fraction": 1.0}))
    target = full.total_steps
    for f in fractions:
        spe = plan_for(_with(base, {"data.train_fraction": f})).steps_per_epoch
        epochs = math.ceil(target / spe * 1e4) / 1e4  # rounded up: the step cap, not the epochs, ends the run
        for m in chosen:
            label = point_label("data-scale", m, f)
            points[label] = {**models[m], "data.train_fraction": f, "schedule.epochs": epochs,
                             "train.max_steps": target}
            facets[label] = {"model": m, "fraction": f}
    extra = {}
    if base.eval.every_steps == 0:  # per epoch would mean every step at 3%: every full-data epoch instead
        extra["eval.every_steps"] = full.steps_per_epoch
    if base.checkpoint.every_steps == 0:
        extra["checkpoint.every_steps"] = full.steps_per_epoch
    return {k: v for k, v in fixed.items() if k not in DATA_SCALE_INPUTS}, extra


def _with(cfg: Config, values: dict[str, Any]) -> Config:
    return apply(cfg, values)
