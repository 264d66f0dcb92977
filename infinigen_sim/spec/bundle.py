"""The profile bundle: the one contract between the profiler (writer) and the simulator (reader).

Op names in kernels.csv and steps.csv are `spec.ops.Op` values, the vocabulary of both worlds.

A bundle is a folder:
  meta.yaml       schema_version, creation time, device/host/driver facts, repeat counts
  kernels.csv     one row per (op, model, dtype, batch_size, n_tokens, kv_len): measured op time
  transfers.csv   one row per (direction, memory, layout, concurrent, nbytes, row_bytes): copy time
  steps.csv       end-to-end runs, one row per (run, phase, step, layer, op): validation only
  fetch.csv       optional: InfiniGen fetched rows per (model, layer, context_len) from a real model
  host.csv        optional: the host's per-op dispatch and per-sync costs (ops `dispatch`, `sync`) on the
                  thread that dispatches the model, what a runtime description's host costs are made of
  trace/          optional Chrome traces
Rows are keyed by their parameters, so an interrupted collection resumes without loss or duplicates.

`read_bundle` refuses (BundleError, one line naming file, line and column or key) a meta without
`completed_utc`, a torn last line, a cell that is not of its column's type (the missing cells of a
row with fewer fields than the header read as empty), a measured ('ok') row whose median is not
positive or not between its p10 and p90, a duplicate key, and a table missing a row of the grid
meta.yaml records (`check_coverage`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from infinigen_sim.spec.cli import one_line
from infinigen_sim.spec.grids import expected_keys
from infinigen_sim.spec.io import ResumableCsv, read_yaml_mapping, write_text_atomic
from infinigen_sim.spec.policies import ALL_POLICIES
from infinigen_sim.spec.schema import DottedReader

SCHEMA_VERSION = 2  # 2: one op vocabulary (spec.ops): `ffn` is the output projection + MLP, no `o_proj` rows

KERNEL_KEY = ["op", "model", "dtype", "batch_size", "n_tokens", "kv_len"]
KERNEL_COLUMNS = [*KERNEL_KEY, "median_us", "p10_us", "p90_us", "repeats", "status"]
TRANSFER_KEY = ["direction", "memory", "layout", "concurrent", "nbytes", "row_bytes"]
TRANSFER_COLUMNS = [*TRANSFER_KEY, "rows", "median_us", "p10_us", "p90_us", "gbps", "repeats", "status"]
STEP_KEY = ["run_id", "phase", "step", "layer", "op"]
STEP_COLUMNS = [
    "run_id", "model", "policy", "batch_size", "prompt_len", "gen_len", "alpha", "overlap",
    "phase", "step", "layer", "op", "seconds", "context_len", "fetched_tokens",
]
FETCH_KEY = ["model", "source", "alpha", "layer", "context_len"]
FETCH_COLUMNS = [*FETCH_KEY, "fetched_tokens", "samples"]
HOST_KEY = ["op", "device"]
HOST_COLUMNS = [*HOST_KEY, "median_us", "p10_us", "p90_us", "repeats", "status"]

TABLES = {
    "kernels.csv": (KERNEL_KEY, KERNEL_COLUMNS),
    "transfers.csv": (TRANSFER_KEY, TRANSFER_COLUMNS),
    "steps.csv": (STEP_KEY, STEP_COLUMNS),
    "fetch.csv": (FETCH_KEY, FETCH_COLUMNS),
    "host.csv": (HOST_KEY, HOST_COLUMNS),
}
REQUIRED_FILES = ("meta.yaml", "kernels.csv", "transfers.csv")
WALL_OP = "wall"  # steps.csv: the op of a step's wall-time row
COMPLETED = "completed_utc"  # meta.yaml: set when a collection finished; a bundle without it is not used


class BundleError(ValueError):
    """A profile bundle that cannot be read; the message names the file and the key."""


@dataclass
class Bundle:
    """A profile bundle read into memory."""

    path: Path
    meta: dict[str, Any]
    kernels: pd.DataFrame
    transfers: pd.DataFrame
    steps: pd.DataFrame
    fetch: pd.DataFrame
    host: pd.DataFrame

    @property
    def device_name(self) -> str:
        return str(self.meta.get("device", {}).get("name", "unknown"))


def write_meta(bundle_dir: Path, meta: dict[str, Any]) -> None:
    meta = {"schema_version": SCHEMA_VERSION, **meta}
    write_text_atomic(Path(bundle_dir) / "meta.yaml", yaml.safe_dump(meta, sort_keys=False))


def append_rows(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Append complete rows to a bundle table (header on first write); whole lines, on disk on return."""
    ResumableCsv(path).append(rows, columns)


def row_key(row: dict[str, Any], key: list[str]) -> tuple[str, ...]:
    """A row's identity as strings, equal whether it came from memory or back from the CSV."""
    return tuple(_norm(row[k]) for k in key)


def _norm(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def done_keys(path: Path, key: list[str]) -> set[tuple[str, ...]]:
    """Keys of the complete rows already in `path` (a torn last line is cut off, to be rewritten)."""
    return {row_key(r, key) for r in ResumableCsv(path).complete_rows()}


@dataclass(frozen=True)
class Column:
    """How one CSV column parses: its kind and the values it may hold."""

    kind: str  # str | int | float | bool
    minimum: float | None = None  # numbers: at least this
    choices: tuple[str, ...] = ()  # str: one of these ('' = any non-empty text)
    timing: bool = False  # a measured time: may be empty only where the row's status is not 'ok'
    allow_inf: bool = False  # alpha: inf means "no threshold"

    def describe(self) -> str:
        if self.kind == "str":
            return f"one of {', '.join(self.choices)}" if self.choices else "a non-empty text"
        if self.kind == "bool":
            return "True or False"
        what = "a whole number" if self.kind == "int" else "a finite number" if not self.allow_inf else "a number"
        return what + (f" >= {self.minimum:g}" if self.minimum is not None else "")


TEXT, COUNT, SIZE, WHOLE = Column("str"), Column("int", 1), Column("int", 0), Column("int")
TIME_US, SECONDS = Column("float", 0, timing=True), Column("float", 0)
STATUS, POLICY = Column("str", choices=("ok", "oom")), Column("str", choices=ALL_POLICIES)
COLUMNS: dict[str, dict[str, Column]] = {
    "kernels.csv": {"op": TEXT, "model": TEXT, "dtype": TEXT, "batch_size": COUNT, "n_tokens": COUNT, "kv_len": SIZE,
                    "median_us": TIME_US, "p10_us": TIME_US, "p90_us": TIME_US, "repeats": SIZE, "status": STATUS},
    "transfers.csv": {"direction": Column("str", choices=("h2d", "d2h", "d2d", "h2h")),
                      "memory": Column("str", choices=("pinned", "pageable", "device")), "layout": TEXT,
                      "concurrent": Column("bool"), "nbytes": SIZE, "row_bytes": SIZE, "rows": SIZE,
                      "median_us": TIME_US, "p10_us": TIME_US, "p90_us": TIME_US,
                      "gbps": Column("float", 0, timing=True), "repeats": SIZE, "status": STATUS},
    "steps.csv": {"run_id": TEXT, "model": TEXT, "policy": POLICY, "batch_size": COUNT, "prompt_len": COUNT,
                  "gen_len": COUNT, "alpha": Column("float", 0, allow_inf=True), "overlap": Column("bool"),
                  "phase": Column("str", choices=("prefill", "decode")), "step": WHOLE, "layer": WHOLE, "op": TEXT,
                  "seconds": SECONDS, "context_len": SIZE, "fetched_tokens": SIZE},
    "fetch.csv": {"model": TEXT, "source": TEXT, "alpha": Column("float", 0, allow_inf=True), "layer": SIZE,
                  "context_len": COUNT, "fetched_tokens": Column("float", 0), "samples": COUNT},
    "host.csv": {"op": Column("str", choices=("dispatch", "sync")), "device": Column("str", choices=("cpu", "cuda")),
                 "median_us": TIME_US, "p10_us": TIME_US, "p90_us": TIME_US, "repeats": SIZE, "status": STATUS},
}
MAX_WHOLE = 2**53  # a whole-number cell above this is no count of anything (and not exact as a float)
_TIMING_OPTIONAL = {"gbps"}  # empty for copies that move no bytes of their own (handoff rows)


def _cell_error(path: Path, line: int, column: str, spec: Column, value: str) -> BundleError:
    return BundleError(f"{path}: line {line}, column '{column}': expected {spec.describe()}, "
                       f"got {one_line(repr(value), 40)}")


def _parse_column(path: Path, frame: pd.DataFrame, column: str, spec: Column, ok: np.ndarray) -> np.ndarray:
    """The column converted to its kind; BundleError naming file, line and column at the first bad cell.
    (numpy on the whole column: a table's columns are parsed on every read, pandas' per-call cost is not
    worth it here)"""
    text = np.char.strip(frame[column].to_numpy(dtype=str))
    empty = text == ""
    if spec.kind == "str":
        bad = empty | (~np.isin(text, spec.choices) if spec.choices else False)
        values = text.astype(object)
    elif spec.kind == "bool":
        bad = ~np.isin(text, ("True", "False", "true", "false"))
        values = np.char.lower(text) == "true"
    else:
        values = pd.to_numeric(text, errors="coerce").astype(float)
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(values)
            bad = np.isnan(values) | ~(finite | (spec.allow_inf & (values == np.inf)))
            if spec.minimum is not None:
                bad |= values < spec.minimum
            if spec.kind == "int":
                bad |= finite & ((values != np.round(values)) | (np.abs(values) > MAX_WHOLE))
        if spec.timing:  # empty is how an out-of-memory point reads; a measured one needs its time
            optional = ~ok | (column in _TIMING_OPTIONAL)
            bad = (bad & ~empty) | (empty & ~optional)
    if np.any(bad):
        first = int(np.argmax(bad))
        raise _cell_error(path, first + 2, column, spec, str(frame[column].iloc[first]))
    if spec.kind == "int":
        return values.astype("int64")
    return values


def _read_table(bundle_dir: Path, name: str, required: bool) -> pd.DataFrame:
    """One bundle table, every column parsed with its declared type; a torn or damaged file is an error."""
    key, columns = TABLES[name]
    path = bundle_dir / name
    if not path.exists():
        if required:
            raise BundleError(f"{path}: missing (a bundle needs {', '.join(REQUIRED_FILES)})")
        return pd.DataFrame(columns=columns)
    data = path.read_bytes()
    if not data.strip():
        raise BundleError(f"{path}: empty (no header)")
    if not data.endswith(b"\n"):
        lines = data.count(b"\n") + 1
        raise BundleError(f"{path}: line {lines} is cut short (no newline at the end): written by a collection "
                          "that was killed; finish it with profiler.collect --resume")
    try:
        frame = pd.read_csv(io.StringIO(data.decode("utf-8")), dtype=str, keep_default_na=False)
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: not UTF-8 text (byte offset {exc.start})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise BundleError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise BundleError(f"{path}: missing column '{missing[0]}' (expected {', '.join(columns)})")
    ok = np.char.strip(frame["status"].to_numpy(dtype=str)) == "ok" if "status" in frame.columns \
        else np.ones(len(frame), dtype=bool)
    parsed = pd.DataFrame({c: _parse_column(path, frame, c, COLUMNS[name][c], ok) for c in columns}, index=frame.index)
    if "median_us" in parsed:
        _check_measured(path, parsed, ok)
    if name == "steps.csv":
        wall = (parsed["op"].to_numpy() == WALL_OP) & ~(parsed["seconds"].to_numpy() > 0)
        if wall.any():
            first = int(wall.argmax())
            raise BundleError(f"{path}: line {first + 2}, column 'seconds': expected > 0 on a '{WALL_OP}' row "
                              f"(a step's wall time), got {parsed['seconds'].iloc[first]:g}")
    if parsed.duplicated(subset=key).any():
        dup = parsed[parsed.duplicated(subset=key)].iloc[0]
        raise BundleError(f"{path}: duplicate row for key {dict(dup[key])}")
    return parsed


def _check_measured(path: Path, parsed: pd.DataFrame, ok: np.ndarray) -> None:
    """A measured ('ok') row has repeats and a positive median between its p10 and its p90 (summaries of one
    sample set); an 'oom' row has no times (it measured nothing)."""
    median, p10, p90 = (parsed[c].to_numpy() for c in ("median_us", "p10_us", "p90_us"))
    checks = [(ok & ~(median > 0), "column 'median_us': expected > 0 on a measured ('ok') row"),
              (ok & ~((p10 <= median) & (median <= p90)), "expected p10_us <= median_us <= p90_us"),
              (ok & (parsed["repeats"].to_numpy() < 1), "column 'repeats': expected >= 1 on a measured ('ok') row"),
              (~ok & ~(np.isnan(median) & np.isnan(p10) & np.isnan(p90)), "expected no times on an 'oom' row")]
    for bad, what in checks:
        if bad.any():
            first = int(bad.argmax())
            row = parsed.iloc[first]
            raise BundleError(f"{path}: line {first + 2}, {what}, got p10_us={row['p10_us']:g} "
                              f"median_us={row['median_us']:g} p90_us={row['p90_us']:g} repeats={row['repeats']}")


def read_meta(bundle_dir: Path) -> dict[str, Any]:
    path = Path(bundle_dir) / "meta.yaml"
    if not path.exists():
        raise BundleError(f"{path}: missing (not a profile bundle?)")
    meta = read_yaml_mapping(path, BundleError)
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{path}: key 'schema_version': expected {SCHEMA_VERSION}, got {one_line(repr(version), 40)} "
            "(re-collect with this version of profiler.collect)"
        )
    for section in ("device", "host", "kernels", "transfers", "settings", "fetch", "steps"):
        DottedReader(meta, str(path), BundleError).mapping(section)
    return meta


KERNEL_DTYPES = ("float16", "bfloat16", "float32")
UNAVAILABLE = "unavailable"  # how profiler.collect writes a fact it could not read


def check_facts(meta: dict[str, Any], where: str) -> None:
    """The facts of a finished bundle's meta.yaml that the calibration reads: the device's type and name, the
    kernels' dtype, and memory sizes and core counts (each a positive number, or 'unavailable (why)')."""
    m = DottedReader(meta, where, BundleError)
    m.text("device.type", ("cpu", "cuda"))
    m.text("device.name")
    m.text("kernels.dtype", KERNEL_DTYPES)
    for dotted, whole in (("device.memory_gib", False), ("host.memory_gib", False), ("host.physical_cores", True)):
        value = m.get(dotted)
        if value is not None and not (isinstance(value, str) and value.startswith(UNAVAILABLE)):
            m.number(dotted, whole=whole, minimum=1 if whole else 1e-3)


def read_bundle(bundle_dir: str | Path) -> Bundle:
    """Read and check a bundle folder; BundleError names the file and key on any problem."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: no such bundle folder")
    meta = read_meta(bundle_dir)
    if not meta.get(COMPLETED):
        raise BundleError(f"{bundle_dir / 'meta.yaml'}: key '{COMPLETED}' missing: the collection did not finish "
                          "(finish it with profiler.collect --resume, or collect a new bundle)")
    if "repeats" not in meta and not (bundle_dir / "kernels.csv").exists() and (bundle_dir / "fetch.csv").exists():
        raise BundleError(f"{bundle_dir}: a --fetch-only bundle (fetch.csv, no timing tables): add its pass to a timed "
                          "bundle with profiler.collect --fetch-only --resume --out THAT_BUNDLE")
    check_facts(meta, str(bundle_dir / "meta.yaml"))
    bundle = Bundle(
        path=bundle_dir,
        meta=meta,
        kernels=_read_table(bundle_dir, "kernels.csv", required=True),
        transfers=_read_table(bundle_dir, "transfers.csv", required=True),
        steps=_read_table(bundle_dir, "steps.csv", required=False),
        fetch=_read_table(bundle_dir, "fetch.csv", required=False),
        host=_read_table(bundle_dir, "host.csv", required=False),
    )
    check_coverage(bundle)
    return bundle


def check_coverage(bundle: Bundle) -> None:
    """Every row of the grid the bundle's meta.yaml records is in its table (`spec.grids.expected_keys`):
    kernels.csv, the contiguous copies of transfers.csv and fetch.csv. A section the meta lacks is not checked."""
    expected = expected_keys(bundle.meta, str(bundle.path / "meta.yaml"), BundleError)
    for name, (section, keys) in expected.items():
        key = TABLES[name][0]
        frame = getattr(bundle, name.removesuffix(".csv"))
        present = set(zip(*(frame[c].map(_norm) for c in key), strict=True)) if len(frame) else set()
        for wanted in keys:  # lazily: the first missing key stops it, so a damaged meta stays cheap
            if wanted not in present:
                shown = ", ".join(f"{k}={v}" for k, v in zip(key, wanted, strict=True))
                raise BundleError(f"{bundle.path / name}: no row for {shown} of meta.yaml's {section} (cut short "
                                  "or deleted; finish it with profiler.collect --resume)")
