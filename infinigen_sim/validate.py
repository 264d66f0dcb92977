"""`python -m infinigen_sim.validate BUNDLE [--hw HW_CONFIG]`: the simulator against the runtime it models.

Thin entry over `infinigen_sim.analysis.validate`: every complete run of BUNDLE/steps.csv replayed from
the bundle's kernels.csv and transfers.csv only; writes BUNDLE/validation.csv and BUNDLE/validation.md
and prints the summary, whose last line is `median_abs_error_pct=X p95_abs_error_pct=Y`.
Exit status: 0 done, 2 bad input (bundle, hardware) or an unwritable output.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from infinigen_sim.analysis.validate import summary_markdown, validate_bundle
from infinigen_sim.cost.calibrate import CalibrationError
from infinigen_sim.spec.bundle import BundleError
from infinigen_sim.spec.cli import Parser, report_error
from infinigen_sim.spec.hardware import HardwareError, load_hardware
from infinigen_sim.spec.io import write_text_atomic
from infinigen_sim.spec.models import UnknownModelError

PROG = "python -m infinigen_sim.validate"


def build_parser() -> Parser:
    parser = Parser(PROG, __doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("bundle", metavar="BUNDLE", help="profile bundle folder with steps.csv")
    parser.add_argument("--hw", default=None, metavar="HW_CONFIG",
                        help="hardware config to predict on (default: the profiled box, from the bundle's ceilings)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        hw = load_hardware(args.hw) if args.hw else None
        frame, cal, hw = validate_bundle(args.bundle, hw)
    except (BundleError, CalibrationError, HardwareError, UnknownModelError) as exc:
        return report_error(PROG, exc)
    out = Path(args.bundle)
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
