"""Study files for `python -m orchestrator.study`: the paper's three studies, at one scale per file.

A study file is YAML (a preset in orchestrator/config/studies/ or any path):

    config: digits                      # the base config (preset or file) every trial starts from
    overrides: {scaling.num_workers: 1} # for every trial of every study of the file (CLI key=value wins)
    models:                             # named model sizes, each the config values that make it
      S: {model.hidden_dim: 64, model.depth: 2, model.tokens_mlp_dim: 32, model.channels_mlp_dim: 256}
      L: {model.hidden_dim: 128, model.depth: 4, model.tokens_mlp_dim: 64, model.channels_mlp_dim: 512}
    model-scale:                        # one trial per model, the same recipe
      models: [S, L]
      overrides: {schedule.epochs: 20}
    data-scale:                         # models x fractions of the training split, all at the same steps
      models: [S, L]
      fractions: [0.03, 0.1, 0.3, 1.0]
      overrides: {schedule.epochs: 7}   # the epochs at fraction 1.0; fraction f trains ~epochs / f
    permutation:                        # models x data.permute modes, one permute_seed
      models: [L]
      modes: [none, patch_pixel, global]
      permute_seed: 0

Each study section is optional; every key names a config key (checked here), every value is checked when the
study's trials are built (orchestrator/study/points.py). Errors name the file, the key and what is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config.search_space import SpaceError, check_key, parse_points
from orchestrator.config.tree import ConfigError

STUDY_DIR = Path(__file__).parent / "studies"
DEFAULT_STUDY_FILE = "digits"
STUDY_KINDS = ("model-scale", "data-scale", "permutation")
STUDY_TAG = "mixer.study"  # on a study's parent run: its kind (the run's name is the study's name)
POINTS_FILE = "study/points.json"  # the parent run's artifact: kind, study file, and each point's facets
PERMUTE_MODES = ("none", "patch_pixel", "global")
TOP_LEVEL = ("config", "overrides", "models", *STUDY_KINDS)
SECTION_KEYS = {"model-scale": ("models", "overrides"),
                "data-scale": ("models", "fractions", "overrides"),
                "permutation": ("models", "modes", "permute_seed", "overrides")}


@dataclass
class StudySpec:
    kind: str
    models: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)
    fractions: list[float] = field(default_factory=list)  # data-scale
    modes: list[str] = field(default_factory=list)  # permutation
    permute_seed: int = 0  # permutation


@dataclass
class StudyFile:
    name: str  # the preset's (file's) stem: part of every study's name
    config: str
    overrides: dict[str, Any]
    models: dict[str, dict[str, Any]]  # label -> config values
    studies: dict[str, StudySpec]
    source: str = ""

    def study(self, kind: str) -> StudySpec:
        if kind not in self.studies:
            raise ConfigError(f"study {kind!r} is not defined in the study file {self.source}; it defines: "
                              f"{', '.join(self.studies) or '(none)'}")
        return self.studies[kind]


def list_study_files() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))


def load_study_file(preset_or_file: str | None = None) -> StudyFile:
    source = preset_or_file or DEFAULT_STUDY_FILE
    path = Path(source)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = STUDY_DIR / f"{source}.yaml"
        if not path.exists():
            raise ConfigError(f"--config {source!r} is neither an existing .yaml study file nor a study preset; "
                              f"presets: {', '.join(list_study_files())}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"study file {path} is not valid YAML: {e}") from None
    return parse_study_file(tree, name=path.stem, source=str(path))


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}={value!r} is not accepted; expected a mapping")
    return value


def _values(value: Any, where: str) -> dict[str, Any]:
    """A mapping of config keys (section.key) to values; an unknown key is named with what its section accepts."""
    out = {}
    for key, v in _mapping(value, where).items():
        try:
            check_key(f"{where}.{key}", str(key))
        except SpaceError as e:
            raise ConfigError(str(e).removeprefix("space key ")) from None
        out[str(key)] = v
    return out


def parse_study_file(tree: Any, name: str = "study", source: str = "") -> StudyFile:
    where = f"study file {source or name}"
    if not isinstance(tree, dict):
        raise ConfigError(f"{where} must hold a mapping with {', '.join(TOP_LEVEL)}; got {tree!r}")
    unknown = sorted(set(tree) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"{where}: key {unknown[0]!r} is not accepted; accepted: {', '.join(TOP_LEVEL)}")
    config = tree.get("config", "digits")
    if not isinstance(config, str):
        raise ConfigError(f"{where}: config={config!r} is not accepted; expected a preset name or YAML path")
    overrides = _values(tree.get("overrides"), f"{where}: overrides")
    try:
        models = parse_points(tree.get("models") or None)
    except SpaceError as e:
        raise ConfigError(f"{where}: models: {str(e).removeprefix('space ')}") from None
    studies = {kind: _parse_section(tree[kind], kind, models, where) for kind in STUDY_KINDS if kind in tree}
    return StudyFile(name, config, overrides, models, studies, source or name)


def _parse_section(raw: Any, kind: str, models: dict, where: str) -> StudySpec:
    where = f"{where}, {kind}"
    raw = _mapping(raw, where)
    unknown = sorted(set(raw) - set(SECTION_KEYS[kind]))
    if unknown:
        raise ConfigError(f"{where}: key {unknown[0]!r} is not accepted; accepted: {', '.join(SECTION_KEYS[kind])}")
    chosen = raw.get("models") or []
    if not isinstance(chosen, list) or not chosen or not all(isinstance(m, str) for m in chosen):
        raise ConfigError(f"{where}: models={chosen!r} is not accepted; expected a list of model names from "
                          f"models: ({', '.join(models) or 'none defined'})")
    for m in chosen:
        if m not in models:
            raise ConfigError(f"{where}: model {m!r} is not defined; models: {', '.join(models) or '(none)'}")
    spec = StudySpec(kind, list(chosen), _values(raw.get("overrides"), f"{where}: overrides"))
    if kind == "data-scale":
        fractions = raw.get("fractions")
        if (not isinstance(fractions, list) or not fractions
                or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1 for f in fractions)):
            raise ConfigError(f"{where}: fractions={fractions!r} is not accepted; expected a list of numbers in "
                              "(0, 1] (data.train_fraction of each point)")
        spec.fractions = sorted({float(f) for f in fractions})
    if kind == "permutation":
        modes = raw.get("modes", list(PERMUTE_MODES))
        if not isinstance(modes, list) or not modes or any(m not in PERMUTE_MODES for m in modes):
            raise ConfigError(f"{where}: modes={modes!r} is not accepted; expected a list of {list(PERMUTE_MODES)}")
        seed = raw.get("permute_seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"{where}: permute_seed={seed!r} is not accepted; expected an integer >= 0")
        spec.modes, spec.permute_seed = list(dict.fromkeys(modes)), seed
    return spec
