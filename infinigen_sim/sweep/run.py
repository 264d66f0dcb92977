"""Running a sweep's points on an executor: in chunks, as a frame or appended to the partial results file.

Rows are appended to DIR/results.partial.csv as chunks finish; the caller writes results.csv from it,
in point order, once every point is done. After a kill, --resume runs only the points without a row.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from infinigen_sim.spec.cli import InputError
from infinigen_sim.sweep import results
from infinigen_sim.sweep.executors import Executor, chunk_size, chunked, make_executor
from infinigen_sim.sweep.grid import Point
from infinigen_sim.sweep.point import row_columns, simulate_point

MAX_CHUNK = {"fast": 250, "full": 4}  # points per task, about a second: a fast point takes 2-7 ms, a full ~0.3 s


def iter_rows(points: Sequence[Point], executor: Executor, progress: bool = False,
              already_done: int = 0) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Simulate `points` on `executor` in chunks; yields (index of the chunk's first point, its rows) as
    chunks finish, in any order. The progress bar counts `already_done` points as finished."""
    if not points:
        return
    size = chunk_size(len(points), executor.workers, MAX_CHUNK.get(points[0].mode, MAX_CHUNK["full"]))
    bar = tqdm(total=already_done + len(points), initial=already_done, disable=not progress, file=sys.stderr,
               unit="pt", leave=False)
    with bar, closing(executor.map_chunks(simulate_point, chunked(points, size))) as finished:
        for index, rows in finished:
            bar.update(len(rows))
            yield index * size, rows


def run_sweep(points: Sequence[Point], jobs: int = 1, progress: bool = False,
              executor: Executor | None = None) -> pd.DataFrame:
    """Simulate `points` on `executor` (default: a process pool when jobs > 1); one row per point, in
    point order, with speedup_vs_flexgen."""
    with nullcontext(executor) if executor else make_executor(jobs) as ex:
        parts = dict(iter_rows(points, ex, progress))
    frame = pd.DataFrame([row for start in sorted(parts) for row in parts[start]])
    if not frame.empty:
        results.add_speedup(frame)
    return frame


def run_sweep_to(out_dir: Path, points: Sequence[Point], executor: Executor,
                 progress: bool = False) -> pd.DataFrame:
    """Simulate the points without a row in DIR/results.partial.csv, appending each chunk's rows as it
    finishes; then every point's row read back from that file, in point order, with speedup_vs_flexgen."""
    path = Path(out_dir) / results.PARTIAL_NAME
    if not points:
        return pd.DataFrame()
    done = results.finished_keys(path)
    todo = [point for point in points if point.key not in done]
    columns = row_columns(points[0])
    for _, rows in iter_rows(todo, executor, progress, len(points) - len(todo)):
        results.append_rows(path, rows, columns)
    frame = results.read_rows(path, [point.key for point in points])
    results.add_speedup(frame)
    return frame


def check_resume(out_dir: Path, points: Sequence[Point], config: dict[str, Any], resume: bool) -> int:
    """How many of `points` DIR/results.partial.csv already holds; InputError when that file is
    there without --resume, or was written by another sweep (other columns, hardware, policies or mode)."""
    path = Path(out_dir) / results.PARTIAL_NAME
    if not path.exists():
        return 0
    if not resume:
        raise InputError(f"{path} exists (an interrupted sweep): add --resume to finish it, "
                              f"or choose a new --out")
    done = results.finished_keys(path)
    found = results.header(path)
    if found and points and found != row_columns(points[0]):
        raise InputError(f"--resume: {path} has other columns than this sweep; choose a new --out")
    conflict = results.config_conflict(Path(out_dir) / "config.yaml", config)
    if conflict:
        raise InputError(f"--resume: {out_dir / 'config.yaml'} has another {conflict} than this sweep; "
                              f"rerun with the same config files and arguments, or choose a new --out")
    return sum(point.key in done for point in points)


