"""load_config: a preset or YAML file plus overrides, parsed (tree.py) then validated (checks.py).

    from orchestrator.config.load import load_config
    cfg = load_config("imagenet1k_b16", ["optim.lr=3e-3", "scaling.num_workers=8"])
"""

from __future__ import annotations

from orchestrator.config.checks import validate
from orchestrator.config.parse import parse_config
from orchestrator.config.tree import Config


def load_config(preset_or_file: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Build and validate a Config from a preset name or YAML path plus overrides (ConfigError naming the key)."""
    cfg = parse_config(preset_or_file, overrides)
    validate(cfg)
    return cfg
