"""Points per second of a 10,000-point sweep on the local process pool and on a local Ray instance.

The grid: the A100 PCIe config, four models, all five policies, batch 1-16, prompts 512-8192 tokens,
128 generated, and 20 host-link bandwidths (--set link.h2d_gbps). Both backends get every CPU of this
machine and run the command line's path (`run_sweep_to`: chunks of points as tasks, rows appended to
DIR/results.partial.csv as they finish, read back in point order), each into its own temporary folder;
every results.csv must be byte-identical. The two alternate, REPEATS times each, and the best run of
each counts (the box may be shared; Ray's idle daemons are up during the pool's runs too). Ray's
start-up (ray.init) is timed apart: ray_points_per_s excludes it; the line before the last gives the
figure including it. A pool's start-up is inside its runs, and the first Ray run includes the workers'
first imports. Last line: local_points_per_s=<float> ray_points_per_s=<float>

SIGTERM and SIGINT stop it cleanly: the pool and the local Ray instance (its raylet, GCS and workers) are
shut down and the temporary folders removed; exit status 130.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from infinigen_sim.spec.cli import InputError, Parser, parse_int
from infinigen_sim.spec.policies import ALL_POLICIES
from infinigen_sim.sweep.executors import LOCAL_RAY, BackendError, Executor, PoolExecutor, RayExecutor, available_cpus
from infinigen_sim.sweep.grid import Point, SweepGrid, expand_points
from infinigen_sim.sweep.results import resolved_config, write_outputs
from infinigen_sim.sweep.run import run_sweep_to

HW = "a100_pcie4"
GRID = SweepGrid(models=("opt-6.7b", "opt-13b", "llama-2-7b", "llama-3-8b"), policies=ALL_POLICIES,
                 batch_sizes=(1, 2, 4, 8, 16), prompt_lens=(512, 1024, 2048, 4096, 8192), gen_lens=(128,))
SETTINGS = {"link.h2d_gbps": tuple(range(8, 68, 3))}  # 20 values, 8-65 GB/s
REPEATS = 2


def timed_sweep(executor: Executor, points: list[Point], out_dir: Path) -> tuple[float, int, bytes]:
    """Seconds to run every point on `executor` the CLI's way, how many fit, and the results.csv it writes."""
    start = time.perf_counter()
    frame = run_sweep_to(out_dir, points, executor)
    elapsed = time.perf_counter() - start
    write_outputs(out_dir, frame, resolved_config([HW], GRID, SETTINGS, points, "fast"))
    return elapsed, int(frame["fits"].sum()), (out_dir / "results.csv").read_bytes()


def build_parser() -> Parser:
    return Parser("python experiments/bench_ray.py", __doc__.split("\n\n")[0],
                  epilog="Prints points/s of both backends; exit status 0 when every results.csv is identical, "
                         "1 when they differ, 2 when Ray cannot start, 130 when stopped by SIGTERM or SIGINT.")


def _positive(text: str) -> int:
    try:
        return parse_int(text, "--repeats", minimum=1)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--repeats: ")) from None


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds the with-blocks: the pool and Ray shut down, temporary folders go


def _catch_stop_signals() -> None:
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--repeats", type=_positive, default=REPEATS, help="runs of each backend; the best counts")
    args = parser.parse_args(argv)
    _catch_stop_signals()
    try:
        return bench(args.repeats)
    except KeyboardInterrupt:
        print("interrupted: Ray and the pool shut down", file=sys.stderr)
        return 130
    finally:
        _shutdown_ray()  # also when the signal came during ray.init, before RayExecutor owned the instance


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def bench(repeats: int) -> int:
    """The two backends, alternating `repeats` times each; 0 when every results.csv is identical."""
    points = expand_points([HW], GRID, SETTINGS)
    workers = available_cpus()
    print(f"{len(points)} points: {HW}, {len(GRID.models)} models x {len(GRID.policies)} policies x "
          f"{len(GRID.batch_sizes)} batches x {len(GRID.prompt_lens)} prompts x "
          f"{len(SETTINGS['link.h2d_gbps'])} link.h2d_gbps values; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs", flush=True)
    start = time.perf_counter()
    try:
        ray = RayExecutor(LOCAL_RAY, num_cpus=workers)
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    init_s = time.perf_counter() - start
    _catch_stop_signals()  # Ray's core installed its own SIGTERM handler, which aborts without shutting down
    print(f"Ray started in {init_s:.2f} s", flush=True)
    local_s, ray_s, outputs = [], [], set()
    with ray, tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            with PoolExecutor(workers) as pool:
                elapsed, fits, csv = timed_sweep(pool, points, Path(tmp) / f"local{rep}")
            local_s.append(elapsed)
            outputs.add(csv)
            elapsed, _, csv = timed_sweep(ray, points, Path(tmp) / f"ray{rep}")
            ray_s.append(elapsed)
            outputs.add(csv)
            print(f"run {rep + 1}: {pool.name} {local_s[-1]:.2f} s, {ray.name} {ray_s[-1]:.2f} s", flush=True)
    print(f"rows identical: {'yes' if len(outputs) == 1 else 'NO'} ({len(points)} rows, {fits} fit and were "
          f"simulated; results.csv sha256 {hashlib.sha256(csv).hexdigest()[:16]}, "
          f"{2 * repeats} runs)")
    print(f"workers: local pool {pool.workers} processes, local Ray {ray.workers} CPUs (ray.init(num_cpus="
          f"{workers})); best of {repeats}; ray_points_per_s excludes Ray start-up ({init_s:.2f} s), "
          f"including it: {len(points) / (init_s + min(ray_s)):.1f} points/s")
    print(f"local_points_per_s={len(points) / min(local_s):.1f} ray_points_per_s={len(points) / min(ray_s):.1f}")
    return 0 if len(outputs) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
