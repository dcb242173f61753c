"""Training configs: a dataclass per command, filled from YAML and then from command-line flags.

Unknown or mistyped keys are errors that name the key and suggest the nearest one, because a typo
that silently falls back to a default wastes a whole training run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from core.atomic import write_text_atomic

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and key."""


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert `value` to the field's type (YAML and `--set` give strings/ints for floats etc.)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.lower() in ("null", "none"))
        if is_null and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid {hint}")
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return [coerce(v, args[0], where) for v in value]
        if origin is dict:
            if isinstance(value, str):  # a flag: "key=value,key2=value2"
                pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
                if any(len(p) != 2 or not p[0].strip() for p in pairs):
                    raise ValueError
                value = {k.strip(): v.strip() for k, v in pairs}
            if not isinstance(value, dict):
                raise ValueError
            return {coerce(k, args[0], where): coerce(v, args[1], where) for k, v in value.items()}
    except (TypeError, ValueError):
        name = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"{where}: expected {name}, got {value!r}") from None
    return value


def check_key(cls: type, key: str, where: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    """The YAML file at `path` as a dict, or ConfigError in one line naming the file: missing,
    not YAML, not UTF-8, or not a mapping of key: value (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value")
    return data


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> T:
    """Build `cls` from defaults, then the YAML file at `path`, then `overrides` (flags)."""
    values: dict[str, Any] = {}
    types_ = field_types(cls)
    if path is not None:
        path = Path(path)
        data = read_yaml_mapping(path)
        for key, value in data.items():
            check_key(cls, str(key), str(path))
            values[key] = coerce(value, types_[key], f"{path}: {key}")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        check_key(cls, key, "command line")
        values[key] = coerce(value, types_[key], f"--{key.replace('_', '-')}")
    return cls(**values)


def parse_set_options(items: list[str] | None) -> dict[str, str]:
    """`--set key=value` pairs -> dict; the values are coerced later against the dataclass."""
    result = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        result[key.strip().replace("-", "_")] = value.strip()
    return result


def save_config(config: Any, path: str | Path) -> None:
    try:
        write_text_atomic(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        # A failed write() (a full disk) carries no file name: give it one for the message.
        raise OSError(e.errno, e.strerror, str(path)) from e
