"""The one validation layer of config files (hardware and runtime YAML): sections of frozen dataclasses.

A section is a mapping validated into a frozen dataclass whose fields carry their rules in metadata:
  help      what the field is (shown when it is missing)
  unit      the unit, shown in every message about the value
  range     (low, high): the plausible values, inclusive; outside them is an error unless the dotted key
            is listed in the file's `unchecked:` list (a documented way to use an implausible figure on
            purpose; the value must still be a finite number of the right sign)
  choices   the allowed strings of a str field
A number field must be a finite int or float (never a bool; `1e3`, which YAML 1.1 reads as text, is the
number); a whole-number field a whole one; a str
field a non-empty string of at most MAX_TEXT characters. Every message is one line naming the file,
the dotted key and what was expected, at most `cli.ERROR_CHARS` long.

`DottedReader` is the same for a file without a fixed schema (a bundle's meta.yaml): typed reads of the
dotted keys a reader relies on, each failure one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any

from infinigen_sim.spec.cli import one_line

MAX_TEXT = 200  # characters of a name or other text field
_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
UNCHECKED = "unchecked"  # top-level key: dotted keys whose plausibility range is not enforced
MAX_ITEMS = 64  # values of a list in a loosely shaped file (DottedReader)
_ABSENT = object()


def shown(value: Any) -> str:
    """A value as an error message quotes it: short, one line."""
    return one_line(repr(value), 60)


def _kind(annotation: Any) -> tuple[type, bool]:
    """(type, may be None) of a resolved field annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def check_value(where: str, key: str, value: Any, f: dataclasses.Field, kind: type, unchecked: bool,
                error: type[ValueError]) -> Any:
    """`value` of field `f` (dotted `key`) converted to `kind`, or `error` naming file, key and expectation."""
    unit = f.metadata.get("unit", "")
    if kind is str:
        if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT:
            raise error(f"{where}: key '{key}': expected a non-empty text of at most {MAX_TEXT} characters, "
                        f"got {shown(value)}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise error(f"{where}: key '{key}': expected one of {', '.join(choices)}, got {shown(value)}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise error(f"{where}: key '{key}': expected true or false, got {shown(value)}")
        return value
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as text; it is the number it looks like
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value):
        raise error(f"{where}: key '{key}': expected a finite number{_in(unit)}, got {shown(value)}")
    if kind is int and int(value) != value:
        raise error(f"{where}: key '{key}': expected a whole number{_in(unit)}, got {shown(value)}")
    low, high = f.metadata.get("range", (0.0, math.inf))
    if value < 0 or (value == 0 and low > 0):
        sign = "a positive" if low > 0 else "a non-negative"
        raise error(f"{where}: key '{key}': expected {sign} number{_in(unit)}, got {shown(value)}")
    if not unchecked and not low <= value <= high:
        raise error(f"{where}: key '{key}': {value:g}{_unit(unit)} is outside the plausible range "
                    f"{low:g}-{high:g}{_unit(unit)} (list '{key}' under '{UNCHECKED}:' to use it anyway)")
    return kind(value)


def _in(unit: str) -> str:
    return f" (in {unit})" if unit else ""


def _unit(unit: str) -> str:
    return f" {unit}" if unit else ""


def build_section(where: str, section: str, raw: Any, cls: type, unchecked: Collection[str],
                  error: type[ValueError]) -> Any:
    """Dataclass `cls` from mapping `raw` (the file's `section`); unknown and missing keys are errors."""
    if not isinstance(raw, Mapping):
        raise error(f"{where}: key '{section}': expected a mapping, got {shown(raw)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise error(f"{where}: unknown key {shown(f'{section}.{key}')} (expected one of {', '.join(known)})")
    kwargs = {}
    for name, f in known.items():
        key = f"{section}.{name}" if section else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise error(f"{where}: missing key '{key}' ({f.metadata.get('help', '')})")
            continue
        kind, optional = _kind(hints[name])
        if raw[name] is None and optional:
            kwargs[name] = None
        elif dataclasses.is_dataclass(kind):  # a nested section
            kwargs[name] = build_section(where, key, raw[name], kind, unchecked, error)
        else:
            kwargs[name] = check_value(where, key, raw[name], f, kind, key in unchecked, error)
    return cls(**kwargs)


def unchecked_keys(where: str, raw: Mapping[str, Any], error: type[ValueError]) -> frozenset[str]:
    """The file's `unchecked:` list of dotted keys (empty when absent)."""
    value = raw.get(UNCHECKED, [])
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise error(f"{where}: key '{UNCHECKED}': expected a list of dotted keys, got {shown(value)}")
    return frozenset(value)


# ---- loosely shaped files: typed reads of dotted keys ---------------------------------------------
class DottedReader:
    """Typed reads of dotted keys of a loosely shaped file (a bundle's meta.yaml): `error` names the file and
    the dotted key on a missing value or one of another kind."""

    def __init__(self, data: dict[str, Any], where: str, error: type[ValueError]) -> None:
        self.data, self.where, self.error = data, where, error

    def has(self, dotted: str) -> bool:
        return self._get(dotted) is not _ABSENT

    def get(self, dotted: str, default: Any = None) -> Any:
        value = self._get(dotted)
        return default if value is _ABSENT else value

    def mapping(self, dotted: str) -> None:
        """`error` unless the key, when present, holds a mapping."""
        value = self._get(dotted)
        if value is not _ABSENT and not isinstance(value, dict):
            raise self._fail(dotted, "a mapping", value)

    def _get(self, dotted: str) -> Any:
        node: Any = self.data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return _ABSENT
            node = node[part]
        return node

    def _fail(self, dotted: str, expected: str, value: Any) -> ValueError:
        got = "nothing" if value is _ABSENT else one_line(repr(value), 60)
        return self.error(f"{self.where}: key '{dotted}': expected {expected}, got {got}")

    def number(self, dotted: str, whole: bool = True, minimum: float = 1, allow_inf: bool = False) -> Any:
        value = self._get(dotted)
        if not _is_number(value, whole, minimum, allow_inf):
            raise self._fail(dotted, f"{'a whole number' if whole else 'a number'} >= {minimum:g}", value)
        return value

    def text(self, dotted: str, choices: tuple[str, ...] = ()) -> str:
        value = self._get(dotted)
        if not _is_text(value, choices):
            raise self._fail(dotted, f"one of {', '.join(choices)}" if choices else "a non-empty text", value)
        return value

    def numbers(self, dotted: str, whole: bool = True, minimum: float = 1, allow_inf: bool = False,
                most: int = MAX_ITEMS) -> list:
        value = self._get(dotted)
        if not (isinstance(value, list) and 0 < len(value) <= most
                and all(_is_number(v, whole, minimum, allow_inf) for v in value)):
            kind = "whole numbers" if whole else "numbers"
            raise self._fail(dotted, f"a list of 1-{most} {kind} >= {minimum:g}", value)
        return value

    def texts(self, dotted: str, choices: tuple[str, ...] = (), most: int = MAX_ITEMS) -> list[str]:
        value = self._get(dotted)
        if not (isinstance(value, list) and 0 < len(value) <= most and all(_is_text(v, choices) for v in value)):
            what = f"one of {', '.join(choices)}" if choices else "a non-empty text"
            raise self._fail(dotted, f"a list of 1-{most} values, each {what}", value)
        return value


def _is_number(value: Any, whole: bool, minimum: float, allow_inf: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        return False
    return not math.isnan(value) and (allow_inf or math.isfinite(value)) and value >= minimum


def _is_text(value: Any, choices: tuple[str, ...]) -> bool:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT:
        return False
    return not choices or value in choices
