"""Time the fast path on one core and check every benchmarked point against the full replay.

OPT-13B on the A100 PCIe config, all five policies, batch 1-64, prompts 256-32768 tokens, 128
decode steps (gen_len 129: prefill emits the first token). The fast pass runs pinned to one CPU,
one point after another, exactly as `run_sweep(points, jobs=1)` would; points_per_s counts only
points that fit (and were simulated) against the time of all of them. Then every fitting point is
replayed in full mode (all CPUs) and the largest |fast/full - 1| of total_s, prefill_s and decode_s
is reported. Last line: points_per_s=<float> max_dev_pct=<float>

SIGTERM and SIGINT stop it cleanly: the full pass's worker processes are shut down, exit status 130.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

from infinigen_sim.spec.cli import Parser
from infinigen_sim.spec.policies import ALL_POLICIES
from infinigen_sim.sweep.grid import Point, SweepGrid, expand_points
from infinigen_sim.sweep.point import simulate_point

GRID = SweepGrid(models=("opt-13b",), policies=ALL_POLICIES, batch_sizes=(1, 2, 4, 8, 16, 32, 64),
                 prompt_lens=(256, 512, 1024, 2048, 4096, 8192, 16384, 32768), gen_lens=(129,))
HW = "a100_pcie4"
COMPARED = ("total_s", "prefill_s", "decode_s")


def time_fast(points: list[Point]) -> tuple[list[dict], float]:
    """Rows of the fast pass and its wall time, on one pinned CPU."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if cpus:
        os.sched_setaffinity(0, {min(cpus)})
    try:
        for point in points[:5]:  # warm up imports and allocator
            simulate_point(point)
        start = time.perf_counter()
        rows = [simulate_point(point) for point in points]
        elapsed = time.perf_counter() - start
    finally:
        if cpus:
            os.sched_setaffinity(0, cpus)
    return rows, elapsed


def full_rows(points: list[Point]) -> list[dict]:
    full = [replace(point, mode="full") for point in points]
    # leaving the block terminates the workers, also when a signal stops the pass early
    with multiprocessing.Pool(os.cpu_count() or 1, initializer=_worker_signals) as pool:
        return pool.map(simulate_point, full, chunksize=4)


def _worker_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool's terminate() just ends a worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds: the full pass's pool shuts down


def main(argv: Sequence[str] | None = None) -> int:
    Parser("python experiments/bench_sweep.py", __doc__.split("\n\n")[0],
           epilog="Prints the fast pass's points/s and its largest deviation from the full replay; exit status 0, "
                  "130 when stopped by SIGTERM or SIGINT.").parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    try:
        return bench()
    except KeyboardInterrupt:
        print("interrupted: worker processes shut down", file=sys.stderr)
        return 130


def bench() -> int:
    """The fast pass on one CPU, then the full replay of every fitting point; prints the figures."""
    points = expand_points([HW], GRID, mode="fast")
    rows, elapsed = time_fast(points)
    fitting = [(p, r) for p, r in zip(points, rows, strict=True) if r["fits"]]
    print(f"fast: {len(points)} points ({len(fitting)} fit) in {elapsed:.3f} s on one CPU "
          f"({1e3 * elapsed / len(points):.2f} ms/point)", flush=True)
    start = time.perf_counter()
    full = full_rows([p for p, _ in fitting])
    print(f"full: {len(full)} points in {time.perf_counter() - start:.1f} s", flush=True)
    worst, worst_key = 0.0, ""
    for (point, fast_row), full_row in zip(fitting, full, strict=True):
        for column in COMPARED:
            dev = abs(fast_row[column] / full_row[column] - 1) * 100 if full_row[column] else 0.0
            if dev > worst:
                worst, worst_key = dev, f"{point.key} ({column})"
    print(f"largest deviation: {worst:.6f}% at {worst_key or '-'}", flush=True)
    print(f"points_per_s={len(fitting) / elapsed:.1f} max_dev_pct={worst:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
