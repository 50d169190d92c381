"""From YAML and ``key=value`` overrides to a typed Config (orchestrator/config/tree.py): types are checked
here, ranges and cross-section rules by orchestrator/config/checks.py (load_config in load.py does both).

- parse_config(preset_or_file, overrides): a preset name (orchestrator/config/presets/) or a YAML path, plus
  overrides; parse_override("optim.lr=3e-3") reads one with yaml.safe_load, so ``true``, ``1e-3``,
  ``[0.9, 0.999]`` and ``null`` mean what they look like; set_dotted puts one into a tree.
- config_from_dict(tree): a Config from a mapping of sections (a preset, a worker's payload, a saved search),
  each value coerced to its annotation; ConfigError names the key, the bad value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from orchestrator.config.tree import Config, ConfigError

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "digits"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _load_yaml_file(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_config(preset_or_file: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Build a Config from a preset name or YAML path plus overrides: types checked, ranges not yet
    (orchestrator/config/load.py's load_config parses, then validates)."""
    source = preset_or_file or DEFAULT_PRESET
    path = Path(source)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        if (PRESET_DIR / f"{source}.yaml").exists():
            path = PRESET_DIR / f"{source}.yaml"
        else:
            raise ConfigError(
                f"--config {source!r} is neither an existing .yaml file nor a preset; "
                f"presets: {', '.join(list_presets())}"
            )
    tree = _load_yaml_file(path)
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            set_dotted(tree, key, value)
    else:
        for item in overrides or []:
            key, value = parse_override(item)
            set_dotted(tree, key, value)
    return config_from_dict(tree)


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=3e-3)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """tree[section][name] = value for the key "section.name": every override goes in through here (the
    command line's, a search space's fixed overrides and its sampled values)."""
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(
            f"override key {key!r} must be section.key with a section among: "
            f"{', '.join(f.name for f in dataclasses.fields(Config))}"
        )
    section, name = parts
    node = tree.setdefault(section, {})
    if not isinstance(node, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, got {node!r}")
    node[name] = value


def config_from_dict(tree: dict) -> Config:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = set(tree) - set(sections)
    if unknown:
        raise ConfigError(
            f"unknown config section(s) {sorted(unknown)}; accepted sections: {', '.join(sections)}"
        )
    kwargs = {}
    for name, f in sections.items():
        section_cls = f.default_factory  # type: ignore[misc]
        values = tree.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {values!r}")
        kwargs[name] = _build_section(name, section_cls, values)
    return Config(**kwargs)


def _build_section(section: str, cls: type, values: dict) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - fields
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"unknown config key {section}.{key}; accepted keys in {section}: {', '.join(sorted(fields))}")
    out = {}
    for key, value in values.items():
        out[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**out)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the annotation; allow int where float is expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} is not accepted; expected {_describe(hint)}")
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        raise ConfigError(f"{key}={value!r} is not accepted; expected one of {list(typing.get_args(hint))}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} is not accepted; expected a list of {_describe(item)}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}={value!r}: expected null")
    if dataclasses.is_dataclass(hint):
        return _coerce_record(key, value, hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "3e-3" as a string; accept it as a number
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a new annotation kind in the tree
        raise TypeError(f"unsupported annotation {hint} for {key}")
    raise ConfigError(f"{key}={value!r} is not accepted; expected {_describe(hint)}")


def _coerce_record(key: str, value: Any, cls: type) -> Any:
    """A small dataclass (one of eval.sets) from a mapping, each field checked under its own key (eval.sets[1].url)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value!r} is not accepted; expected {_describe(cls)}")
    for name in sorted(set(value) - set(fields))[:1]:
        raise ConfigError(f"unknown config key {key}.{name}; accepted keys in {key}: {', '.join(fields)}")
    for name in [n for n, f in fields.items() if _required(f) and n not in value][:1]:
        raise ConfigError(f"{key}.{name} is missing; expected {_describe(cls)}")
    hints = typing.get_type_hints(cls)
    return cls(**{n: _coerce(f"{key}.{n}", v, hints[n]) for n, v in value.items()})


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + str(list(typing.get_args(hint)))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        fields = [f.name if _required(f) else f"{f.name} (optional)" for f in dataclasses.fields(hint)]
        return "a mapping {" + ", ".join(fields) + "}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
