"""The profile bundle: the one contract between the profiler (writer) and the simulator (reader).

Op names in kernels.csv and steps.csv are `spec.ops.Op` values, the vocabulary of both worlds.

A bundle is a folder:
  meta.yaml       schema_version, creation time, device/host/driver facts, repeat counts
  kernels.csv     one row per (op, model, dtype, batch_size, n_tokens, kv_len): measured op time
  transfers.csv   one row per (direction, memory, layout, concurrent, nbytes, row_bytes): copy time
  steps.csv       end-to-end runs, one row per (run, phase, step, layer, op): validation only
  fetch.csv       optional: InfiniGen fetched rows per (model, layer, context_len) from a real model
  trace/          optional Chrome traces
Rows are keyed by their parameters, so an interrupted collection resumes without loss or duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from infinigen_sim.spec.io import ResumableCsv, write_text_atomic

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

TABLES = {
    "kernels.csv": (KERNEL_KEY, KERNEL_COLUMNS),
    "transfers.csv": (TRANSFER_KEY, TRANSFER_COLUMNS),
    "steps.csv": (STEP_KEY, STEP_COLUMNS),
    "fetch.csv": (FETCH_KEY, FETCH_COLUMNS),
}
REQUIRED_FILES = ("meta.yaml", "kernels.csv", "transfers.csv")


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


def _read_table(bundle_dir: Path, name: str, required: bool) -> pd.DataFrame:
    key, columns = TABLES[name]
    path = bundle_dir / name
    if not path.exists():
        if required:
            raise BundleError(f"{path}: missing (a bundle needs {', '.join(REQUIRED_FILES)})")
        return pd.DataFrame(columns=columns)
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise BundleError(f"{path}: missing column '{missing[0]}' (expected {', '.join(columns)})")
    if frame.duplicated(subset=key).any():
        dup = frame[frame.duplicated(subset=key)].iloc[0]
        raise BundleError(f"{path}: duplicate row for key {dict(dup[key])}")
    return frame


def read_meta(bundle_dir: Path) -> dict[str, Any]:
    path = Path(bundle_dir) / "meta.yaml"
    if not path.exists():
        raise BundleError(f"{path}: missing (not a profile bundle?)")
    try:
        meta = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise BundleError(f"{path}: malformed YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: expected a mapping")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{path}: key 'schema_version': expected {SCHEMA_VERSION}, got {version!r} "
            "(re-collect with this version of profiler.collect)"
        )
    return meta


def read_bundle(bundle_dir: str | Path) -> Bundle:
    """Read and check a bundle folder; BundleError names the file and key on any problem."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: no such bundle folder")
    meta = read_meta(bundle_dir)
    return Bundle(
        path=bundle_dir,
        meta=meta,
        kernels=_read_table(bundle_dir, "kernels.csv", required=True),
        transfers=_read_table(bundle_dir, "transfers.csv", required=True),
        steps=_read_table(bundle_dir, "steps.csv", required=False),
        fetch=_read_table(bundle_dir, "fetch.csv", required=False),
    )
