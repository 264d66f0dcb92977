"""`python -m infinigen_sim.validate BUNDLE [options]`: the simulator against the runtime it models.

    python -m infinigen_sim.validate BUNDLE [--hw HW_CONFIG] [--runtime NAME|PATH] [--out DIR]
        [--trace RUN.json [--trace-step STEP]]

Thin entry over `infinigen_sim.analysis.validate`: every complete run of BUNDLE/steps.csv replayed from
the bundle's kernels.csv and transfers.csv only; writes validation.csv and validation.md into --out
(default BUNDLE-validation, beside the bundle: a bundle is the profiler's output and is never written
to) once everything succeeded, and prints the summary, whose last line is
`median_abs_error_pct=X p95_abs_error_pct=Y`.
Exit status: 0 done, 2 bad input (bundle, hardware) or an unwritable output.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from infinigen_sim.analysis.timeline import side_by_side_trace
from infinigen_sim.analysis.validate import summary_markdown, validate_bundle
from infinigen_sim.cost.calibrate import CalibrationError
from infinigen_sim.spec.bundle import BundleError
from infinigen_sim.spec.cli import InputError, Parser, check_writable, report_error
from infinigen_sim.spec.hardware import HardwareError, load_hardware
from infinigen_sim.spec.io import write_text_atomic
from infinigen_sim.spec.models import UnknownModelError
from infinigen_sim.spec.runtime import RuntimeConfigError, load_runtime
from infinigen_sim.spec.trace import trace_json

PROG = "python -m infinigen_sim.validate"


def build_parser() -> Parser:
    parser = Parser(PROG, __doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("bundle", metavar="BUNDLE", help="profile bundle folder with steps.csv")
    parser.add_argument("--hw", default=None, metavar="HW_CONFIG",
                        help="hardware config to predict on (default: the profiled box, from the bundle's ceilings)")
    parser.add_argument("--runtime", default=None, metavar="NAME|PATH",
                        help="runtime description to predict with: a name in infinigen_sim/runtimes/ or a YAML path "
                             "(default: the runtime the bundle says it measured, meta.yaml runtime)")
    parser.add_argument("--trace", default=None, metavar="RUN.json",
                        help="a profiler.run --trace file: also write DIR/trace_side_by_side.json, one decode step "
                             "of that run measured and predicted (open in ui.perfetto.dev)")
    parser.add_argument("--trace-step", type=int, default=None, metavar="STEP",
                        help="the decode step of --trace to compare (default: the middle one)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for validation.csv and validation.md (default: BUNDLE-validation)")
    return parser


def default_out(bundle: str | Path) -> Path:
    """BUNDLE-validation, beside the bundle."""
    bundle = Path(bundle).resolve()
    return bundle.with_name(f"{bundle.name}-validation")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else default_out(args.bundle)
    try:
        hw = load_hardware(args.hw) if args.hw else None
        try:
            runtime = load_runtime(args.runtime) if args.runtime else None
        except RuntimeConfigError as exc:
            raise InputError(f"--runtime: {exc}") from None
        if out.resolve().is_relative_to(Path(args.bundle).resolve()):
            raise InputError(f"--out {out}: inside the bundle {args.bundle}, which is never written to")
        check_writable("--out", out, folder=True)
        frame, cal, hw = validate_bundle(args.bundle, hw, runtime)
        trace = side_by_side_trace(cal, hw, args.trace, runtime, args.trace_step) if args.trace else None
    except (BundleError, CalibrationError, HardwareError, UnknownModelError, InputError) as exc:
        return report_error(PROG, exc)
    text = summary_markdown(frame, cal, hw)
    try:
        write_text_atomic(out / "validation.csv", frame.to_csv(index=False, float_format="%.6g"))
        write_text_atomic(out / "validation.md", text)
        if trace is not None:
            write_text_atomic(out / "trace_side_by_side.json", trace_json(trace))
    except OSError as exc:
        return report_error(PROG, f"cannot write {exc.filename}: {exc.strerror}")
    print(text, end="")
    if trace is not None:
        info = trace["otherData"]
        print(f"wrote {out / 'trace_side_by_side.json'}: decode step {info['step']}, measured "
              f"{info['measured_step_us'] / 1e3:.3f} ms, predicted {info['predicted_step_us'] / 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
