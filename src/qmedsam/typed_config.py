"""Configs are data: a mapping (parsed YAML, `--set key=value`) validated into a typed dataclass.

One implementation for every config in qmedsam (quantization specs, training stages): unknown keys are
refused with the closest known name, and each value is checked against the field's annotation
(bool, int, float, str, Literal, Optional, tuple[X, ...] as a list, unions of those) with a message naming
the source and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from qmedsam.errors import UserFacingError

T = TypeVar("T")

_EXPONENT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""A number PyYAML (YAML 1.1) leaves as a string because it has no dot: `1e-4`, `5E3` (`1.0e-4` parses)."""


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return f"one of {list(typing.get_args(hint))}"
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        item = _describe(typing.get_args(hint)[0])
        return "a list of " + (item.removeprefix("a ").removeprefix("an ") + "s" if item.startswith("a") else item)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _accepts(value: Any, hint: Any) -> tuple[bool, Any]:
    if typing.get_origin(hint) is Literal:
        return (isinstance(value, str) and value in typing.get_args(hint)), value
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, converted = _accepts(value, option)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if typing.get_origin(hint) is tuple:  # tuple[X, ...]: a YAML list of X
        if not isinstance(value, list | tuple):
            return False, value
        items = [_accepts(item, typing.get_args(hint)[0]) for item in value]
        return all(ok for ok, _ in items), tuple(converted for _, converted in items)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if hint is float:
        if isinstance(value, str) and _EXPONENT_LITERAL.fullmatch(value.strip()):
            value = float(value)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config field type {hint!r}")  # a programming error in the dataclass


def check_type(value: Any, hint: Any, where: str, error: type[Exception] = UserFacingError) -> Any:
    """`value` converted for a field annotated `hint`, or `error` naming `where` and what was expected."""
    ok, converted = _accepts(value, hint)
    if not ok:
        raise error(f"{where} must be {_describe(hint)}, got {value!r}")
    return converted


def from_mapping(cls: type[T], data: Any, source: str, error: type[Exception] = UserFacingError) -> T:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise `error` naming `source`."""
    if not isinstance(data, Mapping):
        raise error(f"{source}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        hints_text = []
        for key in unknown:
            close = difflib.get_close_matches(key, fields, n=1)
            hints_text.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise error(f"{source}: unknown key(s) {', '.join(hints_text)}; expected some of {sorted(fields)}")
    values = {key: check_type(value, hints[key], f"{source}: key '{key}'", error) for key, value in data.items()}
    try:
        return cls(**values)
    except error as exc:
        raise error(f"{source}: {exc}") from None


def read_yaml_mapping(path: Any, what: str, error: type[Exception] = UserFacingError) -> dict:
    """A YAML file's top-level mapping (empty file -> {}); unreadable or invalid files raise `error`."""
    from pathlib import Path

    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of {what} keys, got {type(data).__name__}")
    return data
