"""Checks of a search space against a config before any trial starts, and the configs a search may run.

`validate_space` checks every key and every value (and every point) against the config, and every combination
of the values that shape the model or the plan against the model registry; each failure names the key (or the
point) and the value. `candidate_configs` gives the configs that decide a search's length and resources.
"""

from __future__ import annotations

import itertools
import math

from orchestrator.config.search_space import POINT_KEY, SearchSpace, SpaceError, apply
from orchestrator.config.tree import Config, ConfigError

# Keys that change the model's shape (checked in combination against the model registry).
MODEL_KEYS_EXTRA = ("reg.dropout", "reg.head_dropout", "reg.stochastic_depth")
# Keys that change how long a trial runs (number of reports) or what it needs from the cluster.
PLAN_KEYS = ("schedule.epochs", "optim.global_batch_size", "optim.micro_batch_size", "scaling.num_workers",
             "eval.every_steps", "checkpoint.every_steps", "train.max_steps")
RESOURCE_KEYS = ("scaling.num_workers", "scaling.cpus_per_worker", "scaling.use_gpu")
MAX_COMBINATIONS = 20_000


def _candidates(space: SearchSpace, key: str) -> list:
    return list(space.points) if key == POINT_KEY else space.params[key].candidates()


def _describe(space: SearchSpace, key: str, value) -> str:
    if key == POINT_KEY:
        return f"point {value!r} ({', '.join(f'{k}={v!r}' for k, v in space.points[value].items())})"
    return f"{key}={value!r}" + (" (x C)" if space.params[key].ratio_of_c else "")


def _combos(space: SearchSpace, keys: list[str]):
    lists = [_candidates(space, k) for k in keys]
    return math.prod(len(v) for v in lists), (dict(zip(keys, c, strict=True)) for c in itertools.product(*lists))


def validate_space(space: SearchSpace, base: Config) -> int:
    """Check every key and value, and every model-shaping combination; returns the number of combinations checked.

    Raises SpaceError naming the key (and, for a combination, every key and value in it).
    """
    for key, p in space.params.items():
        for value in p.candidates():
            try:
                apply(base, {key: value}, space)
            except SpaceError:
                raise
            except ConfigError as e:
                raise SpaceError(f"space key {key}: value {value!r} ({p.describe()}) cannot be used: {e}") from None
    for label in space.points:
        try:
            apply(base, {POINT_KEY: label}, space)
        except SpaceError:
            raise
        except ConfigError as e:
            raise SpaceError(f"space {_describe(space, POINT_KEY, label)} cannot be used: {e}") from None
    shaping = [k for k in space.params if k.startswith("model.") or k in MODEL_KEYS_EXTRA or k in PLAN_KEYS
               or k in RESOURCE_KEYS] + ([POINT_KEY] if space.points else [])
    checked = 0
    if len(shaping) > 1:
        total, combos = _combos(space, shaping)
        if total > MAX_COMBINATIONS:
            shaping = [k for k in shaping if k.startswith("model.") or k == POINT_KEY]
            total, combos = _combos(space, shaping)
        if total <= MAX_COMBINATIONS:
            for combo in combos:
                checked += 1
                try:
                    apply(base, combo, space)
                except ConfigError as e:
                    names = ", ".join(_describe(space, k, v) for k, v in combo.items())
                    reason = str(e).removeprefix("space key ")
                    raise SpaceError(
                        f"space keys {', '.join(combo)}: no model/config can be built for the combination "
                        f"{names}: {reason}"
                    ) from None
    return checked


def candidate_configs(space: SearchSpace, base: Config, keys) -> list[Config]:
    """Configs for every combination of the candidates of `keys` present in the space (base alone if none)."""
    present = [k for k in keys if k in space.params]
    if any(k in keys for values in space.points.values() for k in values):
        present.append(POINT_KEY)
    if not present:
        return [base]
    total, combos = _combos(space, present)
    if total > MAX_COMBINATIONS:
        combos = ({k: _candidates(space, k)[-1] for k in present} for _ in range(1))
    return [apply(base, combo, space) for combo in combos]

