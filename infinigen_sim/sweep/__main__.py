"""`python -m infinigen_sim.sweep HW_CONFIG [...]`: simulate a grid of points, write results.csv and config.yaml.

Thin entry: parse, expand the grid (`sweep.grid`), run the points on an executor (`sweep.run`: this
process, a local process pool with --jobs N, or Ray tasks with --ray [ADDRESS]), write the outputs
(`sweep.results`), print one table per model. Rows are appended to DIR/results.partial.csv as chunks
finish; results.csv is written from it once every point is done. After a kill, --resume runs only the
points without a row there. Exit 0 done, 2 bad input or an unwritable output, 130 interrupted.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from infinigen_sim.analysis.report import ReportError, write_report
from infinigen_sim.cost.calibrate import CalibrationError, load_calibration
from infinigen_sim.sim import MODES
from infinigen_sim.sim.trace import chrome_trace_json, trace_ops
from infinigen_sim.spec.bundle import BundleError
from infinigen_sim.spec.cli import (
    InputError,
    Parser,
    add_dataclass_arguments,
    check_writable,
    dataclass_from_args,
    report_error,
)
from infinigen_sim.spec.fetch import DEFAULT_FETCH_MODEL
from infinigen_sim.spec.hardware import HardwareError, load_hardware
from infinigen_sim.spec.io import write_text_atomic
from infinigen_sim.spec.models import UnknownModelError
from infinigen_sim.spec.policies import PolicyError, parse_policy_name
from infinigen_sim.spec.runtime import RuntimeConfigError
from infinigen_sim.sweep import results
from infinigen_sim.sweep.executors import LOCAL_RAY, BackendError, make_executor
from infinigen_sim.sweep.grid import POLICY_PREFIX, Point, SweepGrid, expand_points, parse_settings
from infinigen_sim.sweep.point import scenario_for
from infinigen_sim.sweep.run import check_resume, run_sweep_to

PROG = "python -m infinigen_sim.sweep"


@dataclass(frozen=True)
class SweepOptions:
    """How a sweep runs and where it writes."""

    out: str = field(default="results", metadata={"help": "output folder for results.csv and config.yaml",
                                                   "metavar": "DIR"})
    jobs: int = field(default=1, metadata={
        "help": "local worker processes; with --ray and no ADDRESS, the local Ray instance's CPUs (1: all)",
        "minimum": 1})
    mode: str = field(default="fast", metadata={
        "help": "fast: a few layers and steps, extrapolated (within 0.5% of full); full: every event",
        "choices": MODES})
    trace: str | None = field(default=None, metadata={
        "help": "write a Chrome trace (Perfetto) of the first fitting point's full replay to this file",
        "metavar": "FILE.json"})
    ray: str | None = field(default=None, metadata={
        "help": "run the points as Ray tasks, on a new local Ray instance or on the cluster at ADDRESS (auto, "
                "HOST:6379, ray://HOST:10001); give it after HW_CONFIG; needs pip install 'infinigen-sim[dist]'"})
    profile: str | None = field(default=None, metadata={
        "help": "profile bundle folder (python -m profiler.collect): op and copy times from its measurements, "
                "scaled by physics to other cards; adds columns calibration and extrapolated", "metavar": "DIR"})
    resume: bool = field(default=False, metadata={
        "help": "finish an interrupted sweep: skip the points already in DIR/results.partial.csv"})
    report: bool = field(default=False, metadata={
        "help": "also write the capacity-planning report (DIR/report/report.html and report.md)"})


def build_parser() -> Parser:
    parser = Parser(
        PROG, "Simulate KV-offloaded LLM decoding over a grid of points; write DIR/results.csv\n"
              "(times in s, tokens/s, memory in GiB) and DIR/config.yaml.",
        epilog="Units: lengths in tokens, bandwidths in GB/s (1e9 B/s), compute in TFLOP/s, memory in GiB, "
               "latencies in microseconds, times in seconds. Example: --set link.h2d_gbps=16,32,64 "
               "--set policy.alpha=4. Exit status: 0 done, 2 bad input or unwritable output.")
    parser.add_argument("hw_configs", nargs="+", metavar="HW_CONFIG",
                        help="hardware YAML, a path or a bare name in infinigen_sim/hw_configs/ (e.g. a100_pcie4)")
    add_dataclass_arguments(parser, SweepGrid)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE[,VALUE...]",
                        help="override a dotted hardware key (link.h2d_gbps, gpu.fp16_tflops, ...) or a "
                             "policy parameter (policy.alpha, policy.overlap, ...); a comma list sweeps it")
    # --ray alone: a local instance; give it after HW_CONFIG, or as --ray=ADDRESS
    add_dataclass_arguments(parser, SweepOptions, ray={"nargs": "?", "const": LOCAL_RAY, "metavar": "ADDRESS"})
    return parser


def parse_sweep(args: Any) -> tuple[SweepGrid, dict[str, tuple[Any, ...]], list[Point]]:
    """The grid, the --set values and the points the command line asks for; errors name the flag."""
    grid = dataclass_from_args(SweepGrid, args, skip=("policies",),
                               policies=tuple(dict.fromkeys(_policy(p) for p in args.policies)))
    settings = parse_settings(args.set)
    if args.profile is not None:
        load_calibration(args.profile, load_hardware(args.hw_configs[0]))  # a bad bundle fails here, in one line
    return grid, settings, expand_points(args.hw_configs, grid, settings, args.mode, args.profile)


def _policy(name: str) -> str:
    try:
        return parse_policy_name(name).value
    except PolicyError as exc:
        raise InputError(f"--policies: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = dataclass_from_args(SweepOptions, args)
    out_dir = Path(options.out)
    try:
        grid, settings, points = parse_sweep(args)
        config = results.resolved_config(args.hw_configs, grid, settings, points, options.mode)
        done = check_resume(out_dir, points, config, options.resume)
        check_writable("--out", out_dir, folder=True)
        if options.trace:
            check_writable("--trace", options.trace, folder=False)
    except (InputError, HardwareError, PolicyError) as exc:
        return report_error(PROG, exc)
    except UnknownModelError as exc:
        return report_error(PROG, f"--models: {exc}")
    except (BundleError, CalibrationError) as exc:
        return report_error(PROG, f"--profile: {exc}")
    except RuntimeConfigError as exc:
        return report_error(PROG, f"--runtime: {exc}")
    if POLICY_PREFIX + "alpha" in settings:
        print(f"note: policy.alpha does not change simulated fetch counts; they come from the fetch model "
              f"({DEFAULT_FETCH_MODEL.source})", file=sys.stderr)
    if done:
        print(f"resuming: {done} of {len(points)} points already in {out_dir / results.PARTIAL_NAME}",
              file=sys.stderr)
    try:
        frame = _run(options, out_dir, points, config)
        if options.trace:
            _write_trace(Path(options.trace), points)
    except BackendError as exc:
        return report_error(PROG, exc)
    except OSError as exc:
        return report_error(PROG, f"cannot write {exc.filename}: {exc.strerror}")
    except KeyboardInterrupt:
        print(f"interrupted: finished points are in {out_dir / results.PARTIAL_NAME}; "
              f"rerun with --resume to finish", file=sys.stderr)
        return 130
    print(results.summary_table(frame))
    print(f"\nwrote {out_dir / 'results.csv'} ({len(frame)} points) and {out_dir / 'config.yaml'}")
    if options.report:
        try:
            print(f"wrote {write_report(out_dir, out_dir / 'report')}")
        except (ReportError, ValueError) as exc:
            return report_error(PROG, f"--report: {exc}")
    return 0


def _run(options: SweepOptions, out_dir: Path, points: Sequence[Point], config: dict[str, Any]) -> pd.DataFrame:
    """Start the executor, run what is left, write results.csv and config.yaml, drop the partial file."""
    with make_executor(options.jobs, options.ray) as executor:
        results.write_config(out_dir, config)  # before any row: --resume checks the rows against it
        frame = run_sweep_to(out_dir, points, executor, progress=len(points) >= 50 and sys.stderr.isatty())
    results.write_outputs(out_dir, frame, config)
    (out_dir / results.PARTIAL_NAME).unlink(missing_ok=True)
    return frame


def _write_trace(path: Path, points: Sequence[Point]) -> None:
    for point in points:
        sc, _ = scenario_for(point)
        if sc is not None:
            write_text_atomic(path, chrome_trace_json(trace_ops(sc)))
            print(f"trace of {point.key} -> {path}", file=sys.stderr)
            return
    print("no fitting point: no trace written", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
