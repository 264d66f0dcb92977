"""Small file helpers both worlds share: whole-file atomic writes, one resumable CSV, strict YAML reading.

`write_text_atomic` writes a temporary file beside the target and renames it over, so a reader (or a
kill) never sees half a file. `ResumableCsv` is an append-only CSV that survives a kill: each append
is whole lines, flushed and fsynced before it returns, so a kill can only tear the last line, which
`complete_rows` cuts off in place before reading. The profile bundle's tables and a sweep's partial
results are both written through it. `read_yaml` reads a config file (hardware, runtime, bundle meta)
the one strict way: bytes decoded as UTF-8 explicitly, at most MAX_YAML_BYTES, no duplicate keys, no
aliases (so no alias bombs), nesting at most MAX_YAML_DEPTH deep; every failure is one `ValueError`
line naming the file and the line. `resolve_named` and `load_with_bases` find a named config (a shipped
one by bare name, or a path) and merge its `base:` chain.
"""

from __future__ import annotations

import copy
import csv
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from infinigen_sim.spec.schema import shown

MAX_YAML_BYTES = 1 << 20  # a config file; anything larger is not one
MAX_YAML_DEPTH = 12  # mappings and lists nested this deep at most (the hardware schema needs 2)


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 text via a temporary file and rename, so readers never see half a file."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResumableCsv:
    """An append-only CSV of whole rows: a header, then one line per row."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def cut_torn_line(self) -> None:
        """Drop a last line without its newline (a kill mid-append), in place: nothing whole is lost."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            os.truncate(self.path, data.rfind(b"\n") + 1)

    def header(self) -> list[str]:
        """The column names ([] when the file is missing or empty)."""
        if not self.path.exists():
            return []
        with self.path.open(newline="") as handle:
            return next(csv.reader(handle), [])

    def complete_rows(self) -> Iterator[dict[str, str]]:
        """Every whole row as strings, after cutting off a torn last line (none when there is no file)."""
        self.cut_torn_line()
        if not self.path.exists():
            return
        with self.path.open(newline="") as handle:
            yield from (row for row in csv.DictReader(handle) if None not in row.values())

    def append(self, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
        """Append whole rows (the header first when the file is new), on disk before returning."""
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="raise", lineterminator="\n")
            if handle.tell() == 0:
                writer.writeheader()
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())  # the rows are on disk before the caller counts them as done


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader without duplicate keys, aliases or deep nesting (each one a MarkedYAMLError)."""

    depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            raise yaml.MarkedYAMLError(problem="aliases (*name) are not supported",
                                       problem_mark=self.peek_event().start_mark)
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise yaml.MarkedYAMLError(problem=f"nested more than {MAX_YAML_DEPTH} levels deep",
                                           problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                raise yaml.MarkedYAMLError(problem="a mapping key must be a plain value",
                                           problem_mark=key_node.start_mark) from None
            if duplicate:
                raise yaml.MarkedYAMLError(problem=f"duplicate key '{key}'", problem_mark=key_node.start_mark)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str) -> Any:
    """`text` as strict YAML (see the module docstring); ValueError 'where: ...' on one line otherwise."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"{where}: malformed YAML{line}: {' '.join(str(problem).split())}") from None


def read_yaml(path: Path) -> Any:
    """The strict YAML document of file `path`; ValueError naming the file (and line) otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_YAML_BYTES:
        raise ValueError(f"{path}: {len(data)} bytes, larger than a config file can be ({MAX_YAML_BYTES} bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    return parse_yaml(text, str(path))


def read_yaml_mapping(path: Path, error: type[ValueError], expected: str = "a mapping") -> dict:
    """`read_yaml` of a file whose document must be a mapping; `error` (one line) otherwise."""
    try:
        raw = read_yaml(path)
    except ValueError as exc:
        raise error(str(exc)) from None
    if not isinstance(raw, dict):
        shown = repr(raw) if len(repr(raw)) <= 60 else repr(raw)[:57] + "..."
        raise error(f"{path}: expected {expected}, got {shown}")
    return raw


# ---- named config files with `base:` inheritance (hardware configs, runtime descriptions) ---------------
def deep_merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`, mapping by mapping (anything else in `over` replaces)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def _known(folder: Path) -> str:
    return ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))


def resolve_named(name_or_path: str | Path, folder: Path, error: type[ValueError], what: str) -> Path:
    """A config from a path (ending in .yaml/.yml), or a bare name looked up in the shipped `folder`."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        raise error(f"{name_or_path}: no such {what} (known in {folder}: {_known(folder)})")
    return path


def load_with_bases(path: Path, read: Callable[[Path], dict], folder: Path, error: type[ValueError], what: str,
                    _seen: tuple[Path, ...] = ()) -> dict:
    """The mapping `read(path)` with its `base:` chain merged in, base first. A base is a name or a path,
    looked up beside the file, then (a bare name) in the shipped `folder`; cycles are an error."""
    path = path.resolve()
    if path in _seen:
        raise error(f"{path}: key 'base': circular base chain")
    raw = read(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise error(f"{path}: key 'base': expected the name of another {what}, got {shown(base)}")
    beside = path.parent / (base if Path(base).suffix else f"{base}.yaml")
    base_path = beside if beside.is_file() else folder / f"{base}.yaml"
    if not base_path.is_file():
        raise error(f"{path}: key 'base': no {what} {base!r} beside it or in {folder} (known there: "
                    f"{_known(folder)})")
    return deep_merge(load_with_bases(base_path, read, folder, error, what, (*_seen, path)), raw)
