"""`python -m infinigen_sim.report`: the capacity-planning report (report.html, report.md) of a sweep.

    python -m infinigen_sim.report RESULTS_DIR [--out DIR] [--model M] [--point KEY=VAL,...] [--runtime NAME]
    python -m infinigen_sim.report HW_CONFIG [HW_CONFIG ...] [--out DIR] [--model M] [--point ...]
        [--runtime NAME|PATH,...]

Thin entry over `infinigen_sim.analysis.report`. Given hardware configs, a compact sweep is run first and
its results.csv and config.yaml are written to --out beside the report. Everything is checked and built
before anything is written: a bad --point or --model leaves no file behind.
Exit status: 0 done, 2 bad input or an unwritable output.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from infinigen_sim.analysis.report import (
    COMPACT_GRID,
    POINT_KEYS,
    ReportError,
    build_report,
    compact_results,
    load_results,
    parse_point,
)
from infinigen_sim.analysis.sensitivity import PointError
from infinigen_sim.spec.cli import InputError, Parser, check_writable, comma_list, report_error
from infinigen_sim.spec.hardware import HardwareError
from infinigen_sim.spec.models import UnknownModelError, get_model
from infinigen_sim.spec.policies import PolicyError
from infinigen_sim.spec.runtime import DEFAULT_RUNTIME, RuntimeConfigError, load_runtime
from infinigen_sim.sweep.results import write_outputs

PROG = "python -m infinigen_sim.report"


def build_parser() -> Parser:
    parser = Parser(PROG, "Write report.html and report.md (PNG plots) from a sweep results folder, or from a "
                          "compact sweep of the given hardware configs.",
                    epilog="Exit status: 0 done, 2 bad input or an unwritable output.")
    parser.add_argument("inputs", nargs="+", metavar="RESULTS_DIR|HW_CONFIG",
                        help="one sweep output folder (results.csv + config.yaml), or hardware configs")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder (default: RESULTS_DIR, or ./report for hardware configs)")
    parser.add_argument("--model", help=f"model to report (default: the results' first; {COMPACT_GRID.models[0]} "
                                        "for a compact sweep)")
    parser.add_argument("--point", metavar="KEY=VAL,...",
                        help=f"the chosen point: any of {', '.join(POINT_KEYS)} and --set keys, "
                             "e.g. hw=a100_pcie4,batch_size=16")
    parser.add_argument("--runtime", type=comma_list(str, what="runtime"), metavar="NAME|PATH,...",
                        help=f"runtime descriptions (names in infinigen_sim/runtimes/ or YAML paths): the compact "
                             f"sweep's (default {DEFAULT_RUNTIME}); for a results folder, the one runtime whose rows "
                             f"the chosen point is on (same as --point runtime=NAME)")
    return parser


def runtime_point(point: dict, runtimes: list[str] | None, from_folder: bool) -> dict:
    """--runtime for a results folder: the chosen point's runtime (by the description's name)."""
    if not runtimes or not from_folder:
        return point
    if len(runtimes) > 1:
        raise InputError("--runtime: give one runtime for a results folder (its rows already say theirs)")
    if "runtime" in point:
        raise InputError("--runtime: given twice (also in --point)")
    return {**point, "runtime": load_runtime(runtimes[0]).name}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        point = parse_point(args.point)
        dirs = [Path(i) for i in args.inputs if Path(i).is_dir()]
        if dirs and len(args.inputs) > 1:
            raise ReportError(f"{' '.join(args.inputs)}: give one results folder, or hardware configs, not both "
                              "or several folders")
        out = Path(args.out) if args.out else dirs[0] if dirs else Path("report")
        check_writable("--out", out, folder=True)
        point = runtime_point(point, args.runtime, bool(dirs))
        if dirs:
            results = load_results(dirs[0])
        else:
            results = compact_results(args.inputs, get_model(args.model or COMPACT_GRID.models[0]).name, out,
                                      args.runtime or COMPACT_GRID.runtime)
        doc = build_report(results, args.model, point)
    except (ReportError, HardwareError, PolicyError, PointError, InputError) as exc:
        return report_error(PROG, exc)
    except RuntimeConfigError as exc:
        return report_error(PROG, f"--runtime: {exc}")
    except UnknownModelError as exc:
        return report_error(PROG, f"--model: {exc}")
    try:
        if not dirs:
            write_outputs(out, results.frame, results.config)
        path = doc.write(out)
    except OSError as exc:
        return report_error(PROG, f"cannot write {exc.filename}: {exc.strerror}")
    print(f"wrote {path} and {path.with_name('report.md')} (images in {path.parent / 'images'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
