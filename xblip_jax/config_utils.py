"""Turning `ml_collections` config sections into the frozen architecture dataclasses.

A section names a preset and overrides a few fields, e.g.
`model.llm = dict(preset="tiny", hidden_size=128)`. Unknown or ill-typed fields fail with the
full dotted name of the field, so a typo in a config never passes silently.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
  """A config field is unknown, missing or of the wrong type; the message names it."""


def _check_type(name: str, value: Any, annotation: Any) -> Any:
  hint = annotation if not isinstance(annotation, str) else {
      "int": int, "float": float, "bool": bool, "str": str}.get(annotation, None)
  if hint is None:
    return value
  if hint is bool and not isinstance(value, bool):
    raise ConfigError(f"config field {name!r} must be a bool, got {value!r}")
  if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
    raise ConfigError(f"config field {name!r} must be an int, got {value!r}")
  if hint is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"config field {name!r} must be a float, got {value!r}")
    return float(value)
  if hint is str and not isinstance(value, str):
    raise ConfigError(f"config field {name!r} must be a str, got {value!r}")
  return value


def build(cls: type[T], section: Mapping[str, Any] | None, where: str) -> T:
  """`cls.<preset>(**overrides)` from a config section, with field names checked.

  Args:
    cls: a frozen dataclass with classmethod presets.
    section: mapping with an optional `preset` key and field overrides.
    where: the section's dotted name in the config (for error messages).
  """
  section = dict(section or {})
  preset = section.pop("preset", None)
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  for key, value in section.items():
    if key not in fields:
      raise ConfigError(f"unknown config field {where}.{key} for {cls.__name__}; "
                        f"known fields: {', '.join(sorted(fields))}")
    section[key] = _check_type(f"{where}.{key}", value, hints.get(key))
  if preset is None:
    return cls(**section)
  factory = getattr(cls, preset, None)
  if not callable(factory) or preset.startswith("_"):
    raise ConfigError(f"unknown preset {where}.preset={preset!r} for {cls.__name__}")
  base = factory()
  return dataclasses.replace(base, **section)


def require(config: Mapping[str, Any], dotted: str) -> Any:
  """Reads `a.b.c` from a nested config, naming the missing field when absent."""
  node: Any = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError) as e:
      raise ConfigError(f"config field {dotted!r} is missing") from e
  return node
