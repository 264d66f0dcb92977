"""A sweep's partial results file: rows appended as chunks of points finish, read back by key to resume.

DIR/results.partial.csv holds a header and one line per finished point. Values are written as Python
prints them (a float by its repr), so they read back bit for bit and a resumed sweep writes the same
results.csv as an uninterrupted one. Each append is whole lines, flushed and fsynced; a kill can only
tear the last line, which `finished_keys` cuts off. Rows are identified by their `key` column; when a
key appears twice the later row wins.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

PARTIAL_NAME = "results.partial.csv"
KEY = "key"
# pandas before 3.1 parses floats exactly only when asked; 3.1 always does, and deprecates asking
_EXACT_FLOATS = {} if tuple(map(int, pd.__version__.split(".")[:2])) >= (3, 1) else {"float_precision": "round_trip"}


def finished_keys(path: Path) -> set[str]:
    """Keys of the complete rows in `path`, after cutting off a torn last line (none when there is no file)."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)  # in place: a kill now loses nothing that was whole
    with path.open(newline="") as handle:
        return {row[KEY] for row in csv.DictReader(handle) if None not in row.values() and row.get(KEY)}


def header(path: Path) -> list[str]:
    """The column names in `path` ([] when missing or empty)."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return next(csv.reader(handle), [])


def append_rows(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Append whole rows (the header first when the file is new), flushed to disk before returning."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="raise", lineterminator="\n")
        if handle.tell() == 0:
            writer.writeheader()
        writer.writerows(rows)
        handle.flush()
        os.fsync(handle.fileno())  # the rows are on disk before their points count as done


def read_rows(path: Path, keys: Sequence[str]) -> pd.DataFrame:
    """The rows of `keys`, in that order; KeyError naming the first key without a row."""
    frame = pd.read_csv(path, **_EXACT_FLOATS)
    frame = frame.drop_duplicates(subset=KEY, keep="last").set_index(KEY, drop=False)
    missing = [k for k in keys if k not in frame.index]
    if missing:
        raise KeyError(f"{path}: no row for {missing[0]} ({len(missing)} missing)")
    return frame.loc[list(keys)].reset_index(drop=True)
