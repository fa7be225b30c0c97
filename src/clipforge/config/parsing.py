"""Reading a run config: a YAML file or shipped recipe, dotted command-line overrides, then validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from clipforge.config.convert import build_dataclass, config_to_dict
from clipforge.config.errors import ConfigError
from clipforge.config.recipes import resolve_config_path
from clipforge.config.schema import Config, DataConfig
from clipforge.config.validation import validate, validate_data


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain values (missing keys keep defaults)."""
    config = build_dataclass(Config, values or {})
    validate(config)
    return config


def data_config_from_dict(
    values: dict[str, Any], overrides: list[str] | None = None, prefix: str = "data"
) -> DataConfig:
    """A :class:`DataConfig` alone (``clipforge eval --data``): ``values`` with ``key=value`` overrides applied
    (``split=test``, ``augment.scale_min=1``), checked with the same schema and rules as the ``data`` section."""
    values = dict(values or {})
    for key, value in parse_overrides(overrides or []):
        _set_dotted(values, key, value)
    data = build_dataclass(DataConfig, values, prefix)
    validate_data(data, prefix)
    return data


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.batch_size=64", "loss.kind=siglip"]`` -> ``[("train.batch_size", 64), ...]``.

    Values are read as YAML scalars, so ``64`` is an int, ``1e-3`` a float, ``null`` None and
    ``[0.5, 0.5, 0.5]`` a list.
    """
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.steps=100")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        parsed.append((key.strip(), value))
    return parsed


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config or shipped recipe (or start from defaults), apply dotted overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        values = loaded or {}
    for key, value in parse_overrides(overrides or []):
        _set_dotted(values, key, value)
    return config_from_dict(values)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (what ``load_config`` reads back to an equal config)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
