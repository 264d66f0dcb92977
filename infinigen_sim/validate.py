"""`python -m infinigen_sim.validate BUNDLE [--hw HW_CONFIG]`: the simulator against the runtime it models.

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

from infinigen_sim.analysis.validate import summary_markdown, validate_bundle
from infinigen_sim.cost.calibrate import CalibrationError
from infinigen_sim.spec.bundle import BundleError
from infinigen_sim.spec.cli import InputError, Parser, check_writable, report_error
from infinigen_sim.spec.hardware import HardwareError, load_hardware
from infinigen_sim.spec.io import write_text_atomic
from infinigen_sim.spec.models import UnknownModelError

PROG = "python -m infinigen_sim.validate"


def build_parser() -> Parser:
    parser = Parser(PROG, __doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("bundle", metavar="BUNDLE", help="profile bundle folder with steps.csv")
    parser.add_argument("--hw", default=None, metavar="HW_CONFIG",
                        help="hardware config to predict on (default: the profiled box, from the bundle's ceilings)")
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
        if out.resolve().is_relative_to(Path(args.bundle).resolve()):
            raise InputError(f"--out {out}: inside the bundle {args.bundle}, which is never written to")
        check_writable("--out", out, folder=True)
        frame, cal, hw = validate_bundle(args.bundle, hw)
    except (BundleError, CalibrationError, HardwareError, UnknownModelError, InputError) as exc:
        return report_error(PROG, exc)
    text = summary_markdown(frame, cal, hw)
    try:
        write_text_atomic(out / "validation.csv", frame.to_csv(index=False, float_format="%.6g"))
        write_text_atomic(out / "validation.md", text)
    except OSError as exc:
        return report_error(PROG, f"cannot write {exc.filename}: {exc.strerror}")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
