"""Search spaces for `python -m orchestrator.tune`: parse, validate, turn into Ray Tune domains.

A space is a YAML file (a preset in orchestrator/config/spaces/ or any path):

    config: digits                 # optional: the base config (preset or file) when --config is not given
    num_samples: 1                 # optional: default for --num-samples
    overrides:                     # optional: fixed config values for every trial (CLI key=value wins)
      schedule.epochs: 4
    params:                        # the searched keys, dotted like the config's overrides
      model.tokens_mlp_dim: {grid: [0.25, 1.0], ratio_of: C}   # D_S = ratio x C (model.hidden_dim)
      model.channels_mlp_dim: {choice: [2, 4], ratio_of: C}    # D_C = ratio x C
      optim.lr: {loguniform: [0.0003, 0.01]}
      reg.mixup_alpha: {choice: [0.0, 0.2, 0.5, 0.8]}
      reg.randaug_magnitude: {randint: [0, 20]}                 # both ends included
      reg.dropout: {uniform: [0.0, 0.1]}
    points:                        # optional: labelled sets of values taken together (one grid axis, crossed
      small: {model.hidden_dim: 64, model.depth: 2}     # with the grids): a ladder of model sizes, a study's
      large: {model.hidden_dim: 128, model.depth: 4}    # points (orchestrator.study builds its spaces so)

Kinds: `choice` (sampled), `grid` (every value, crossed with the other grids), `uniform`, `loguniform`,
`randint` (ranges [low, high]). `ratio_of: C` is accepted for model.tokens_mlp_dim (D_S) and
model.channels_mlp_dim (D_C): the value is a multiple of the trial's hidden width C, rounded to an integer.
orchestrator/config/space_checks.py checks every key and value against the config (and every combination of
the values that shape the model against the model registry) before any trial starts; each failure names the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config.checks import validate
from orchestrator.config.parse import config_from_dict, set_dotted
from orchestrator.config.tree import Config, ConfigError

SPACE_DIR = Path(__file__).parent / "spaces"
DEFAULT_SPACE = "digits"

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
RANGE_KINDS = ("uniform", "loguniform", "randint")
RATIO_KEYS = {"model.tokens_mlp_dim": "D_S", "model.channels_mlp_dim": "D_C"}
RATIO_BASES = ("C", "hidden_dim", "model.hidden_dim")
TOP_LEVEL = ("config", "num_samples", "overrides", "params", "points")
POINT_KEY = "point"  # the Tune parameter holding a point's label
# Set per trial or per search by orchestrator.tune; searching them would break resume or tracking.
NOT_SEARCHABLE = ("run.name", "run.storage_path", "tracking.uri", "tracking.experiment", "tracking.parent_run_id",
                  "tracking.enabled", "data.url")


class SpaceError(ConfigError):
    """A search space cannot be used; the message names the key, the bad value and what is accepted."""


@dataclass(frozen=True)
class Param:
    key: str
    kind: str
    values: tuple = ()  # choice / grid
    low: float | int | None = None  # ranges
    high: float | int | None = None
    ratio_of_c: bool = False

    def candidates(self) -> list:
        """The values validation tries: every listed value, or both ends of a range."""
        if self.kind in RANGE_KINDS:
            return [self.low] if self.low == self.high else [self.low, self.high]
        return list(self.values)

    def describe(self) -> str:
        body = f"{self.kind} {list(self.values)}" if self.kind not in RANGE_KINDS else f"{self.kind} [{self.low}, {self.high}]"
        return body + (" x C" if self.ratio_of_c else "")

    def to_dict(self) -> dict:
        out: dict[str, Any] = {self.kind: list(self.values) if self.kind not in RANGE_KINDS else [self.low, self.high]}
        if self.ratio_of_c:
            out["ratio_of"] = "C"
        return out


@dataclass
class SearchSpace:
    name: str
    params: dict[str, Param]
    config: str | None = None
    num_samples: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    points: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> {section.key: value}

    def tune_keys(self) -> list[str]:
        """The keys of a Tune trial's config that belong to the space (the point's label under POINT_KEY)."""
        return list(self.params) + ([POINT_KEY] if self.points else [])

    def value_keys(self) -> list[str]:
        """The config keys a trial's values set: the searched keys, then every key the points set."""
        keys = list(self.params)
        for values in self.points.values():
            keys += [k for k in values if k not in keys]
        return keys

    def expand(self, values: dict[str, Any]) -> dict[str, Any]:
        """A trial's values with its point's label replaced by the point's config values."""
        if POINT_KEY not in values:
            return dict(values)
        rest = {k: v for k, v in values.items() if k != POINT_KEY}
        label = values[POINT_KEY]
        if label not in self.points:
            raise SpaceError(f"space point {label!r} is not among the space's points: {', '.join(self.points)}")
        return {**self.points[label], **rest}

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        if self.config is not None:
            out["config"] = self.config
        if self.num_samples is not None:
            out["num_samples"] = self.num_samples
        if self.overrides:
            out["overrides"] = dict(self.overrides)
        out["params"] = {k: p.to_dict() for k, p in self.params.items()}
        if self.points:
            out["points"] = {label: dict(values) for label, values in self.points.items()}
        return out

    def grid_size(self, search: str = "random") -> int:
        """How many points the grid part of the space has (every choice counts too under --search grid)."""
        kinds = ("grid", "choice") if search == "grid" else ("grid",)
        return math.prod(len(p.values) for p in self.params.values() if p.kind in kinds) * max(1, len(self.points))

    def to_tune(self, search: str) -> dict[str, Any]:
        """Ray Tune's param_space: one domain per key (random: grids cross, choices sample; optuna: all sampled)."""
        from ray import tune

        out: dict[str, Any] = {}
        for key, p in self.params.items():
            if p.kind in RANGE_KINDS and search == "grid":
                raise SpaceError(
                    f"space key {key}: a {p.kind} range cannot be grid-searched; use --search random or optuna, "
                    "or give the values as grid/choice"
                )
            if p.kind == "grid" or (p.kind == "choice" and search == "grid"):
                out[key] = tune.choice(list(p.values)) if search == "optuna" else tune.grid_search(list(p.values))
            elif p.kind == "choice":
                out[key] = tune.choice(list(p.values))
            elif p.kind == "uniform":
                out[key] = tune.uniform(p.low, p.high)
            elif p.kind == "loguniform":
                out[key] = tune.loguniform(p.low, p.high)
            elif p.kind == "randint":
                out[key] = tune.randint(int(p.low), int(p.high) + 1)  # Tune's upper end is exclusive
        if self.points:  # one grid axis (optuna: a choice) over the labels
            labels = list(self.points)
            out[POINT_KEY] = tune.choice(labels) if search == "optuna" else tune.grid_search(labels)
        return out


# ---------------------------------------------------------------- loading ---------------------------------


def list_spaces() -> list[str]:
    return sorted(p.stem for p in SPACE_DIR.glob("*.yaml"))


def space_path(preset_or_file: str | None) -> Path:
    source = preset_or_file or DEFAULT_SPACE
    path = Path(source)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    if (SPACE_DIR / f"{source}.yaml").exists():
        return SPACE_DIR / f"{source}.yaml"
    raise SpaceError(
        f"--space {source!r} is neither an existing .yaml file nor a space preset; presets: {', '.join(list_spaces())}"
    )


def load_space(preset_or_file: str | None = None) -> SearchSpace:
    """Parse a space preset or YAML file (not yet validated against a config: see validate_space)."""
    path = space_path(preset_or_file)
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"space file {path} is not valid YAML: {e}") from None
    return parse_space(tree, name=path.stem, source=str(path))


def _number(value: Any) -> Any:
    """YAML 1.1 reads 3e-3 as a string; accept it as the number it looks like."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_space(tree: Any, name: str = "space", source: str = "") -> SearchSpace:
    if not isinstance(tree, dict):
        raise SpaceError(f"space {name}: the file must hold a mapping with {', '.join(TOP_LEVEL)}; got {tree!r}")
    unknown = sorted(set(tree) - set(TOP_LEVEL))
    if unknown:
        raise SpaceError(f"space key {unknown[0]!r} is not accepted at the top level; accepted: {', '.join(TOP_LEVEL)}")
    config = tree.get("config")
    if config is not None and not isinstance(config, str):
        raise SpaceError(f"space key config={config!r} is not accepted; expected a preset name or YAML path")
    num_samples = tree.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1):
        raise SpaceError(f"space key num_samples={num_samples!r} is not accepted; expected an integer >= 1")
    overrides = tree.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SpaceError(f"space key overrides={overrides!r} is not accepted; expected a mapping of section.key: value")
    points = parse_points(tree.get("points"))
    raw_params = tree.get("params") if "params" in tree or not points else {}
    if not isinstance(raw_params, dict) or not (raw_params or points):
        raise SpaceError(
            f"space key params={raw_params!r} is not accepted; expected a non-empty mapping of "
            "section.key: {choice|grid|uniform|loguniform|randint: ...} (or points:)"
        )
    params = {str(k): parse_param(str(k), v) for k, v in raw_params.items()}
    for key in overrides:
        check_key(f"overrides.{key}", str(key))
        if key in params:
            raise SpaceError(f"space key {key} is both searched (params) and fixed (overrides); keep one")
    for label, values in points.items():
        for key in values:
            if key in params or key in overrides:
                where = "searched (params)" if key in params else "fixed (overrides)"
                raise SpaceError(f"space key {key} is set by point {label!r} and {where}; keep one")
    return SearchSpace(name=name, params=params, config=config, num_samples=num_samples,
                       overrides={str(k): v for k, v in overrides.items()}, source=source, points=points)


def parse_points(raw: Any) -> dict[str, dict[str, Any]]:
    """`points:` label -> {section.key: value}; every key a config key that may be searched."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(f"space key points={raw!r} is not accepted; expected a mapping of label: {{section.key: value}}")
    points = {}
    for label, values in raw.items():
        if not isinstance(values, dict) or not values:
            raise SpaceError(f"space point {label!r}: {values!r} is not accepted; expected a mapping of section.key: value")
        for key in values:
            check_key(f"points.{label}.{key}", str(key))
            if key in NOT_SEARCHABLE or key == "data.minival_fraction":
                raise SpaceError(f"space point {label!r}: {key} cannot be set per trial: orchestrator.tune sets it"
                                 if key in NOT_SEARCHABLE else f"space point {label!r}: {key} cannot be set per "
                                 "trial: it decides the held-out split every trial is compared on")
        points[str(label)] = {str(k): _number(v) for k, v in values.items()}
    return points


def check_key(where: str, key: str) -> None:
    """A dotted key must name a field of the config tree."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in sections:
        raise SpaceError(
            f"space key {where}: unknown config key {key!r}; keys are section.key with a section among: "
            f"{', '.join(sections)}"
        )
    section, name = parts
    fields = {f.name for f in dataclasses.fields(sections[section].default_factory())}  # type: ignore[misc]
    if name not in fields:
        raise SpaceError(
            f"space key {where}: unknown config key {key!r}; accepted keys in {section}: {', '.join(sorted(fields))}"
        )


def parse_param(key: str, spec: Any) -> Param:
    check_key(key, key)
    if key in NOT_SEARCHABLE:
        raise SpaceError(f"space key {key} cannot be searched: orchestrator.tune sets it for every trial")
    if key == "data.minival_fraction":
        raise SpaceError(f"space key {key} cannot be searched: it decides the held-out split every trial is "
                         "compared on; set it once (in the base config or the space's overrides)")
    if not isinstance(spec, dict):
        raise SpaceError(
            f"space key {key}: {spec!r} is not accepted; expected a mapping like {{choice: [a, b]}} or "
            f"{{loguniform: [low, high]}} (kinds: {', '.join(KINDS)}); put fixed values under overrides:"
        )
    extra = sorted(set(spec) - set(KINDS) - {"ratio_of"})
    if extra:
        raise SpaceError(f"space key {key}: {extra[0]!r} is not accepted; expected one of {', '.join(KINDS)} (+ ratio_of)")
    kinds = [k for k in KINDS if k in spec]
    if len(kinds) != 1:
        raise SpaceError(f"space key {key}: give exactly one of {', '.join(KINDS)}; got {kinds or 'none'}")
    kind = kinds[0]
    raw = spec[kind]
    ratio = "ratio_of" in spec
    if ratio:
        if spec["ratio_of"] not in RATIO_BASES:
            raise SpaceError(f"space key {key}: ratio_of={spec['ratio_of']!r} is not accepted; expected C")
        if key not in RATIO_KEYS:
            raise SpaceError(
                f"space key {key}: ratio_of is accepted only for {', '.join(RATIO_KEYS)} (D_S, D_C as multiples of C)"
            )
    if kind in ("choice", "grid"):
        if not isinstance(raw, list):
            raise SpaceError(f"space key {key}: {kind}={raw!r} is not accepted; expected a list of values")
        if not raw:
            raise SpaceError(f"space key {key}: {kind} is empty; give at least one value")
        values = tuple(_number(v) for v in raw)
        if ratio:
            bad = [v for v in values if not _is_number(v) or v <= 0]
            if bad:
                raise SpaceError(f"space key {key}: ratio {bad[0]!r} is not accepted; expected positive numbers (x C)")
        return Param(key, kind, values=values, ratio_of_c=ratio)
    if not isinstance(raw, list) or len(raw) != 2 or not all(_is_number(_number(v)) for v in raw):
        raise SpaceError(f"space key {key}: {kind}={raw!r} is not accepted; expected [low, high] (two numbers)")
    low, high = (_number(v) for v in raw)
    if low > high:
        raise SpaceError(f"space key {key}: {kind} low {low} > high {high}; expected low <= high")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"space key {key}: loguniform low {low} is not accepted; expected low > 0")
    if kind == "randint" and not all(isinstance(v, int) for v in (low, high)):
        raise SpaceError(f"space key {key}: randint [{low}, {high}] is not accepted; expected two integers")
    if kind == "uniform" and ratio is False:
        low, high = float(low), float(high)
    if ratio and low <= 0:
        raise SpaceError(f"space key {key}: ratio {low} is not accepted; expected positive numbers (x C)")
    return Param(key, kind, low=low, high=high, ratio_of_c=ratio)


# ---------------------------------------------------------------- trial configs ---------------------------


def hidden_dim(cfg: Config) -> int:
    """C of this config's model (the override, else the registry variant's value)."""
    if cfg.model.hidden_dim is not None:
        return cfg.model.hidden_dim
    from model import get_config

    try:
        return get_config(cfg.model.name).hidden_dim
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from None


def apply(base: Config, values: dict[str, Any], space: SearchSpace | None = None) -> Config:
    """base + sampled values (ratios of C resolved to integers), validated; errors name the key."""
    tree = base.to_dict()
    if space is not None:
        values = space.expand(values)
    ratios = {k: v for k, v in values.items() if space is not None and k in space.params and space.params[k].ratio_of_c}
    for key, value in values.items():
        if key not in ratios:
            set_dotted(tree, key, value)
    if ratios:
        c = hidden_dim(config_from_dict(tree))
        for key, ratio in ratios.items():
            dim = int(round(ratio * c))
            if dim < 1:
                raise SpaceError(
                    f"space key {key}: ratio {ratio} of C={c} gives {RATIO_KEYS[key]}={dim}; expected a width >= 1"
                )
            set_dotted(tree, key, dim)
    cfg = config_from_dict(tree)
    validate(cfg)
    return cfg


def resolved_values(cfg: Config, keys) -> dict[str, Any]:
    """The trial's actual values for `keys` (ratios appear as the integer widths they resolved to)."""
    d = cfg.to_dict()
    return {k: d[k.split(".")[0]][k.split(".")[1]] for k in keys}
