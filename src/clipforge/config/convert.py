"""Plain values (YAML, JSON, a checkpoint's dict) -> the config dataclasses, checked field by field.

Every key and value is checked against the dataclass annotations: an unknown key names the allowed keys (with a
did-you-mean), a wrong type names the expected type, a choice field (``Literal``) names its allowed values.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from clipforge.config.errors import ConfigError
from clipforge.io import shown as _shown


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"list of {_type_name(item)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in that type, or raise."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {_shown(value)}")
        return build_dataclass(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}={_shown(value)} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={_shown(value)} has the wrong type; expected {_type_name(tp)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={_shown(value)} has the wrong type; expected {_type_name(tp)}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={_shown(value)} has the wrong type; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={_shown(value)} has the wrong type; expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; everyone writes learning rates that way
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={_shown(value)} has the wrong type; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={_shown(value)} has the wrong type; expected a string")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def build_dataclass(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """``cls`` built from ``values`` (``prefix`` names it in messages), every key and value checked.

    A dataclass that stands for a family of classes (``DataConfig``: one class per data kind) picks the class
    ``values`` asks for with its ``config_class_for``; a key of another member of the family is explained by its
    ``unknown_field_message``.
    """
    choose = getattr(cls, "config_class_for", None)
    if choose is not None:
        cls = choose(values, prefix)
    hints = typing.get_type_hints(cls)
    names = _field_names(cls)
    kwargs = {}
    for key, value in values.items():
        if not isinstance(key, str) or len(key) > 100:
            where = prefix or "the top level"
            raise ConfigError(f"config key {_shown(key)} in {where} is not a field name; {where} allows {names}")
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            explain = getattr(cls, "unknown_field_message", None)
            message = explain(key, value, prefix) if explain is not None else None
            if message:
                raise ConfigError(message)
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {(prefix + '.' if prefix else '') + close[0]!r}?)" if close else ""
            where = prefix or "the top level"
            raise ConfigError(f"unknown config key {_shown(dotted)}{hint}; {where} allows {names}")
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


def _field_names(cls: type) -> list[str]:
    """``cls``'s fields in the order configs list them (its ``ordered_fields`` where it has one)."""
    ordered = getattr(cls, "ordered_fields", None)
    return list(ordered()) if ordered is not None else [f.name for f in dataclasses.fields(cls)]


def config_to_dict(config: Any) -> dict[str, Any]:
    """Nested plain values (YAML/JSON/checkpoint-safe) of a config dataclass: ``dataclasses.asdict``, with each
    section's fields in the order configs list them (a data section: ``kind``, the kind's fields, the shared ones)."""
    return _plain(config)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: _plain(getattr(value, name)) for name in _field_names(type(value))}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return copy.deepcopy(value)
