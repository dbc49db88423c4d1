"""Typed configuration: dataclasses filled from a mapping, validated once, errors name the key.

Each stage declares one dataclass for the params it reads; :func:`from_mapping` builds it from the
matching section of ``params.yaml`` and rejects unknown keys, missing keys, wrong types and values
out of range (declared with :func:`param`) with a :class:`ConfigError` whose message names the full
dotted key.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Mapping, TypeVar

from pipeline.errors import PipelineError

T = TypeVar("T")


class ConfigError(PipelineError, ValueError):
    """A parameter is unknown, missing or of the wrong type; the message names the key."""


def param(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with an allowed range (for lists and tuples: of every entry).

    ``param(0.6, gt=0)``: a value that must be > 0. Bounds are checked by :func:`from_mapping`.
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if isinstance(default, (list, dict)):  # mutable: each config gets its own copy
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"bounds": bounds})
    return dataclasses.field(default=default, metadata={"bounds": bounds})


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``mapping``; ``prefix`` is the dotted key of the section."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping, got {type(mapping).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        key = _join(prefix, unknown[0])
        raise ConfigError(f"unknown parameter {key!r} (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        key = _join(prefix, name)
        if name not in mapping:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing parameter {key!r}")
            continue
        values[name] = _coerce(hints[name], mapping[name], key)
        _check_bounds(values[name], field.metadata.get("bounds"), key)
    return cls(**values)


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain JSON-able data (for provenance and fingerprints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_TEST = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b,
               "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def _check_bounds(value: Any, bounds: Mapping[str, float] | None, key: str) -> None:
    if not bounds or value is None:
        return
    for i, v in enumerate(value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        for kind, bound in bounds.items():
            if not _BOUND_TEST[kind](v, bound):
                where = f"{key}[{i}]" if isinstance(value, (list, tuple)) else key
                rule = " and ".join(f"{_BOUND_TEXT[k]} {b:g}" for k, b in bounds.items())
                raise ConfigError(f"parameter {where!r} must be {rule}, got {v!r}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""Numbers in exponent notation that YAML 1.2 (and DVC's ``-S``) reads as floats but PyYAML's
YAML 1.1 reads as strings unless they have a dot (``1e-3``, ``5E+4``)."""


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key!r}: {value!r} does not fit {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"parameter {key!r} must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"parameter {key!r} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"parameter {key!r} must have {len(args)} entries, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        out = [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"parameter {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
            return float(value)  # `lr: 1e-3`: YAML 1.1 (PyYAML) reads it as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"parameter {key!r} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"parameter {key!r} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"parameter {key!r} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"parameter {key!r} must be a string, got {value!r}")
        return value
    raise ConfigError(f"parameter {key!r}: unsupported type {tp}")


def get_dotted(tree: Any, dotted: str) -> Any:
    """``tree["a"]["b"]`` for ``"a.b"`` (KeyError or TypeError when a part is missing)."""
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def set_dotted(tree: Any, dotted: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``"a.b"`` (the parents must exist)."""
    *parents, last = dotted.split(".")
    (get_dotted(tree, ".".join(parents)) if parents else tree)[last] = value
