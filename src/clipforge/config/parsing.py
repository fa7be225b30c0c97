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
from clipforge.io import atomic_write_text


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
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as error:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({_yaml_problem(error)}); "
                "quote a string that holds ':', '[' or '{' (key='\"a: b\"')"
            ) from None
        parsed.append((key.strip(), value))
    return parsed


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What PyYAML says is wrong, and where (1-based line and column), in one line."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path``; a ConfigError naming the file, line and column when it does not parse."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (a bad byte at offset {error.start}); save it as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config or shipped recipe (or start from defaults), apply dotted overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        loaded = read_yaml(path)
        if loaded is None:
            # an empty file would silently train every default: refuse it rather than guess what was meant
            raise ConfigError(
                f"{path} is empty: a config needs its sections (model, data, train, ...); "
                "to train a shipped recipe pass its name, e.g. clipforge train demo"
            )
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        values = loaded
    for key, value in parse_overrides(overrides or []):
        _set_dotted(values, key, value)
    return config_from_dict(values)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (what ``load_config`` reads back to an equal config)."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
