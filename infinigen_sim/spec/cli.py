"""The one command-line helper of every entry point (sweep, plan, report, validate, collect, run, accuracy).

- `Parser`: argparse with one-line errors (exit 2) and every default in `--help`.
- `add_dataclass_arguments` / `dataclass_from_args`: a frozen config dataclass as flags. Each field's
  metadata gives its help text and optionally its `unit`, `choices`, `metavar`; the flag's type comes
  from the field's resolved annotation (int, float, str, bool, X | None, tuple[int, ...], ...), its
  default from the dataclass (never retyped).
- `comma_list`: an argparse `type` for comma lists of ints, floats or names (duplicates dropped with a
  note on stderr, since a grid axis with a value twice would simulate the point twice).
- `one_line` / `report_error`: what every CLI prints for bad input: one line of at most ERROR_CHARS.
Exit codes, the same in every CLI: 0 done, 1 ran but the target was not met, 2 bad input or an output
that cannot be written.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ERROR_CHARS = 300  # an error line is cut to this many characters
EXIT_OK, EXIT_UNMET, EXIT_BAD_INPUT = 0, 1, 2
_INT = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: str.isdigit accepts '²', which int() rejects


class InputError(ValueError):
    """Input a command cannot use; the message names the flag or file and the key."""


def one_line(message: object, limit: int = ERROR_CHARS) -> str:
    """`message` on one line (white space folded), cut to `limit` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def report_error(prog: str, message: object, code: int = EXIT_BAD_INPUT) -> int:
    """Print `prog: error: message` as one line on stderr; returns `code` for the caller to exit with."""
    print(one_line(f"{prog}: error: {message}"), file=sys.stderr)
    return code


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends every non-empty default to its flag's help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        empty = default is None or default is False or default is argparse.SUPPRESS or (
            isinstance(default, (str, list, tuple)) and not default)
        if "%(default)" in text or empty or not action.option_strings:
            return text
        if isinstance(default, (tuple, list)):
            default = ",".join(str(v) for v in default)
        return f"{text} (default: {str(default).replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and defaults shown in --help."""

    def __init__(self, prog: str, description: str, epilog: str | None = None) -> None:
        super().__init__(prog=prog, description=description, epilog=epilog, formatter_class=_Formatter)

    def error(self, message: str) -> typing.NoReturn:  # argparse prints the usage block too; we do not
        self.exit(EXIT_BAD_INPUT, one_line(f"{self.prog}: error: {message}") + "\n")


def check_writable(flag: str, path: str | Path, folder: bool) -> None:
    """InputError unless `path` (a folder to write into, or a file) could be written; creates nothing.

    Probes the nearest folder that exists with a temporary folder made and removed at once: permission
    bits alone do not tell (root, read-only mounts, /proc)."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise InputError(f"{flag} {path}: exists and is {'not ' if folder else ''}a folder")
    probe = path if folder and path.exists() else path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{flag} {path}: {probe} is not a folder")
    try:
        Path(tempfile.mkdtemp(dir=probe, prefix=".write-probe-")).rmdir()
    except OSError as exc:
        raise InputError(f"{flag} {path}: cannot write in {probe} ({exc.strerror or exc})") from None


# ---- values --------------------------------------------------------------------------------------
def parse_int(text: str, what: str, minimum: int | None = None) -> int:
    """A whole number written in ASCII digits, at least `minimum`; InputError naming `what` otherwise."""
    text = str(text).strip()
    if not _INT.fullmatch(text) or (minimum is not None and int(text) < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise InputError(f"{what}: expected a whole number{bound}, got '{one_line(text, 40)}'")
    return int(text)


def parse_float(text: str, what: str, minimum: float | None = None, allow_inf: bool = False) -> float:
    """A finite number (or inf when allowed), at least `minimum`; InputError naming `what` otherwise."""
    try:
        value = float(str(text).strip())
    except ValueError:
        value = math.nan
    ok = not math.isnan(value) and (allow_inf or math.isfinite(value)) and (minimum is None or value >= minimum)
    if not ok:
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise InputError(f"{what}: expected a number{bound}, got '{one_line(text, 40)}'")
    return value


def comma_list(kind: type = str, minimum: float | None = None, what: str = "value",
               allow_inf: bool = False) -> Callable[[str], tuple]:
    """An argparse `type`: 'a,b,c' -> a tuple of `kind` (int, float or str), duplicates dropped with a note."""
    label = {int: "whole numbers", float: "numbers"}.get(kind, f"{what}s")
    if minimum is not None and kind in (int, float):
        label += f" >= {minimum:g}"

    def parse(text: str) -> tuple:
        items = [item.strip() for item in str(text).split(",")]
        try:
            if not all(items):
                raise InputError("empty item")
            if kind is int:
                values = [parse_int(item, what, None if minimum is None else int(minimum)) for item in items]
            elif kind is float:
                values = [parse_float(item, what, minimum, allow_inf) for item in items]
            else:
                values = items
        except InputError:
            raise argparse.ArgumentTypeError(f"expected a comma list of {label}, got '{one_line(text, 60)}'") from None
        unique = tuple(dict.fromkeys(values))
        if len(unique) < len(values):
            dropped = sorted({str(v) for v in values if values.count(v) > 1})
            print(f"note: dropped repeated {what} {', '.join(dropped)} from '{one_line(text, 60)}'", file=sys.stderr)
        return unique

    parse.__name__ = f"comma list of {label}"  # argparse names the type in its own messages
    return parse


# ---- dataclasses as flags ------------------------------------------------------------------------
def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def field_help(f: dataclasses.Field) -> str:
    """The field's help text with its unit, '%' escaped for argparse (which %-formats help strings)."""
    text = f.metadata.get("help", "")
    unit = f.metadata.get("unit")
    return (f"{text} [{unit}]" if unit else text).replace("%", "%%")


def _kind(annotation: Any) -> tuple[type, bool, bool]:
    """(element type, is a tuple, may be None) of a resolved annotation."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if origin is tuple:
        return typing.get_args(annotation)[0], True, optional
    return annotation, False, optional


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (),
                            **overrides: dict[str, Any]) -> None:
    """One flag per field of dataclass `cls` (except `skip`); `overrides[field]` adds argparse kwargs."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, is_tuple, _ = _kind(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs: dict[str, Any] = {"default": default, "help": field_help(f)}
        if default is None and f.default is dataclasses.MISSING:
            kwargs["required"] = True
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif is_tuple:
            kwargs["type"] = comma_list(kind, f.metadata.get("minimum"), f.metadata.get("what", "value"),
                                        f.metadata.get("allow_inf", False))
            kwargs["metavar"] = f.metadata.get("metavar", "LIST")
        else:
            kwargs["type"] = {int: _int_arg(f), float: _float_arg(f)}.get(kind, str)
        for key in ("choices", "metavar"):
            if key in f.metadata:
                kwargs[key] = f.metadata[key]
        kwargs.update(overrides.get(f.name, {}))
        parser.add_argument(flag_name(f.name), **kwargs)


def _int_arg(f: dataclasses.Field) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            return parse_int(text, "value", f.metadata.get("minimum"))
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value: ")) from None

    parse.__name__ = "whole number"
    return parse


def _float_arg(f: dataclasses.Field) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return parse_float(text, "value", f.metadata.get("minimum"), f.metadata.get("allow_inf", False))
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value: ")) from None

    parse.__name__ = "number"
    return parse


def dataclass_from_args(cls: type, args: argparse.Namespace, skip: Sequence[str] = (), **extra: Any) -> Any:
    """An instance of `cls` from the parsed flags of its fields (those in `skip` from `extra`)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in skip}
    return cls(**values, **extra)
