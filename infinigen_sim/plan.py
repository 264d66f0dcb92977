"""`python -m infinigen_sim.plan`: the cheapest hardware, KV policy and batch that meet a throughput target.

    python -m infinigen_sim.plan --model llama-3-8b --prompt-len 32768 --gen-len 128 \\
        --target-tokens-per-s 10 [--max-ms-per-token 200] [--runtime NAME|PATH] [--out plan.csv] \\
        a100_pcie4 h100_pcie5 ...
    python -m infinigen_sim.plan --model smollm2-135m --prompt-len 1024 --gen-len 128 \\
        --target-tokens-per-s 100 --max-ppl-increase 5 [--accuracy FILE.csv] a100_pcie4 ...

Thin entry over `infinigen_sim.analysis.plan` (definitions of tokens/s, ms/token and $/Mtok there).
With --max-ppl-increase the accuracy table is --accuracy, else the newest profiles/*/accuracy.csv holding
the model (infinigen_sim.spec.accuracy.find_table), read strictly (spec.accuracy.read_accuracy).
Exit status: 0 when something meets the target, 1 when nothing does, 2 for bad input or an unwritable --out.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from infinigen_sim.analysis.plan import (
    AccuracyPick,
    PlanRequest,
    evaluate,
    pick_settings,
    picks_text,
    plan_csv,
    report_text,
    unmet_text,
)
from infinigen_sim.spec.accuracy import AccuracyError, find_table, read_accuracy
from infinigen_sim.spec.cli import (
    EXIT_UNMET,
    InputError,
    Parser,
    add_dataclass_arguments,
    check_writable,
    report_error,
)
from infinigen_sim.spec.hardware import HardwareError
from infinigen_sim.spec.io import write_text_atomic
from infinigen_sim.spec.models import UnknownModelError, get_model
from infinigen_sim.spec.policies import PolicyError, parse_policy_name
from infinigen_sim.spec.runtime import RuntimeConfigError

PROG = "python -m infinigen_sim.plan"


def build_parser() -> Parser:
    parser = Parser(
        PROG, "Find the cheapest hardware, KV policy and batch size that reach a throughput target, "
              "and the throughput / per-token latency Pareto front.",
        epilog="Units: lengths in tokens, throughput in generated tokens/s, latency in ms per output token, "
               "cost in USD. Exit status: 0 met, 1 nothing meets the target, 2 bad input.")
    parser.add_argument("hw_configs", nargs="+", metavar="HW_CONFIG",
                        help="hardware YAML, a path or a bare name in infinigen_sim/hw_configs/ (e.g. a100_pcie4)")
    add_dataclass_arguments(parser, PlanRequest)
    parser.add_argument("--out", metavar="FILE.csv", help="write every evaluated configuration to this CSV")
    parser.add_argument("--jobs", type=int, default=1, help="local worker processes")
    return parser


def request_from_args(args) -> PlanRequest:
    """Validate the parsed flags into a request; InputError names the flag."""
    for flag, value in (("--target-tokens-per-s", args.target_tokens_per_s), ("--max-ms-per-token",
                                                                              args.max_ms_per_token)):
        if value is not None and not value > 0:
            raise InputError(f"{flag}: expected a positive number, got {value:g}")
    if args.jobs < 1:
        raise InputError(f"--jobs: expected a positive whole number, got {args.jobs}")
    try:
        policies = tuple(dict.fromkeys(parse_policy_name(p).value for p in args.policies))
    except PolicyError as exc:
        raise InputError(f"--policies: {exc}") from None
    if args.accuracy is not None and args.max_ppl_increase is None:
        raise InputError("--accuracy: needs --max-ppl-increase (the limit the table's settings are chosen by)")
    return PlanRequest(args.model, args.prompt_len, args.gen_len, args.target_tokens_per_s, args.max_ms_per_token,
                       policies, args.batch_sizes, args.runtime, args.max_ppl_increase, args.accuracy)


def accuracy_picks(request: PlanRequest) -> tuple[list[AccuracyPick], str] | None:
    """The policies' settings within --max-ppl-increase and the text saying so; None without the flag."""
    if request.max_ppl_increase is None:
        return None
    get_model(request.model)  # an unknown model is named as such, not as a missing table
    path = Path(request.accuracy) if request.accuracy else find_table(request.model)
    if path is None:
        raise InputError(f"--max-ppl-increase: no accuracy table of {request.model} under profiles/*/accuracy.csv; "
                         "pass --accuracy FILE (written by python -m profiler.accuracy --out)")
    try:
        table = read_accuracy(path)
    except AccuracyError as exc:
        raise InputError(f"--accuracy {exc}") from None
    if not (table["model"] == request.model).any():
        held = ", ".join(table["model"].unique())
        raise InputError(f"--accuracy {path}: no rows of {request.model} (it holds {held})")
    picks, notes = pick_settings(table, request.model, request.policies, request.max_ppl_increase, str(path))
    text = picks_text(picks, notes, str(path), table, request)
    if not picks:
        raise InputError(f"--max-ppl-increase {request.max_ppl_increase:g}: no policy of {request.model} has a "
                         f"measured setting within it ({'; '.join(notes)})")
    return picks, text


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        request = request_from_args(args)
        if args.out:
            check_writable("--out", args.out, folder=False)
        chosen = accuracy_picks(request)
        frame = evaluate(args.hw_configs, request, args.jobs, None if chosen is None else chosen[0])
    except (InputError, HardwareError) as exc:
        return report_error(PROG, exc)
    except UnknownModelError as exc:
        return report_error(PROG, f"--model: {exc}")
    except RuntimeConfigError as exc:
        return report_error(PROG, f"--runtime: {exc}")
    code = 0 if frame["meets_target"].any() else EXIT_UNMET
    if chosen is not None:
        print(chosen[1] + "\n", file=sys.stdout if code == 0 else sys.stderr)
    print(report_text(frame, request) if code == 0 else unmet_text(frame, request),
          file=sys.stdout if code == 0 else sys.stderr)
    if args.out:
        try:
            write_text_atomic(Path(args.out), plan_csv(frame))
        except OSError as exc:
            return report_error(PROG, f"cannot write {exc.filename}: {exc.strerror}")
        print(f"\nwrote {args.out} ({len(frame)} configurations)")
    return code


if __name__ == "__main__":
    sys.exit(main())
