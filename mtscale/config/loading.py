"""YAML -> nested dataclasses -> ``--set a.b=v`` overrides -> validated config, and back:
unknown keys and ill-typed values are one-line errors naming the dotted field; the one
dotted-key setter (``set_dotted``) serves ``--set``, sweep spaces and trial configs."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mtscale.errors import ConfigError

T = TypeVar("T")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check / convert a YAML value to the annotated type; raise ConfigError naming path."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: found {type(value).__name__}, expected a mapping")
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: found {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: found {value!r}, expected a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (list,):
        (a,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: found {value!r}, expected a list")
        return [_coerce(v, a, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: found {value!r}, expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: found {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: found {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: found {value!r}, expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: found {value!r}, expected a string")
    return value


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise ConfigError naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key, expected one of {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(v, hints[k], f"{path}.{k}" if path else k)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - missing required fields
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain-data (YAML/JSON-safe) form of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def set_dotted(data: dict, key: str, value: Any, where: str = "--set") -> None:
    """``data[a][b][c] = value`` for ``key = "a.b.c"``, creating sections as needed: the one
    dotted-key setter (``--set``, sweep spaces and overrides, trial configs). ``where`` names the
    source in errors."""
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            name = f"{where} {key}" if where.startswith("--") else f"{where}.{key}"
            raise ConfigError(f"{name}: {p} is a value ({nxt!r}), expected a section")
        node = nxt
    node[parts[-1]] = value


def get_dotted(data: dict, key: str) -> Any:
    """``data[a][b][c]`` for ``key = "a.b.c"``; None where a part is missing."""
    node: Any = data
    for p in key.split("."):
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def apply_overrides(data: dict, sets: list[str] | None) -> dict:
    """Apply ``a.b=v`` overrides (v parsed as YAML) to a nested mapping, in place."""
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-3")
        key, raw = item.split("=", 1)
        set_dotted(data, key, yaml.safe_load(raw) if raw != "" else "")
    return data


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping (empty file -> {}); one-line errors otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: found {type(data).__name__} at top level, expected a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None = None, sets: list[str] | None = None) -> T:
    """YAML file (optional) + overrides -> validated ``cls`` instance."""
    data: dict = read_yaml_mapping(path) if path is not None else {}
    apply_overrides(data, sets)
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from mtscale.files import atomic_write

    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
