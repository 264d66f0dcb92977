"""Capacity planning: the cheapest hardware, policy and batch that meet a throughput target.

    python -m infinigen_sim.plan --model llama-3-8b --prompt-len 32768 --gen-len 128 \
        --target-tokens-per-s 10 [--max-ms-per-token 200] [--out plan.csv] hw_configs/*.yaml

Every (hardware, policy, batch) is simulated at the one request shape. Definitions:
  tokens_per_s   generated tokens per second of the whole run, batch * gen_len / (prefill_s + decode_s)
                 (the sweep's definition: the prefill counts against throughput)
  ms_per_token   per-sequence time per output token after the first, 1e3 * decode_s / (gen_len - 1):
                 each decode step emits one token for every sequence in the batch (prefill_s, the
                 time to the first token, is reported apart as ttft_s)
  usd_per_mtok   cost_per_hour_usd / 3600 / tokens_per_s * 1e6, dollars per million generated tokens
A configuration meets the target when tokens_per_s >= the target and (if given) ms_per_token <= the
limit. Hardware without a price is ranked after every priced one, marked 'no price'.
Exit status: 0 when something meets the target, 1 when nothing does, 2 for bad input.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import pandas as pd

from infinigen_sim.bundle import write_text_atomic
from infinigen_sim.hardware import HardwareError
from infinigen_sim.models import UnknownModelError
from infinigen_sim.points import SweepGrid, expand_points
from infinigen_sim.policies import ALL_POLICIES, PolicyError, parse_policy_name
from infinigen_sim.sweep import run_sweep

ERROR = "infinigen_sim.plan: error: "
NO_PRICE = "no price"


class PlanInputError(ValueError):
    """A command-line value that cannot be used; the message names the flag."""


@dataclass(frozen=True)
class PlanRequest:
    """What a deployment must deliver, and the space searched for it."""

    model: str = field(metadata={"help": "model name from infinigen_sim.models"})
    prompt_len: int = field(metadata={"help": "prompt length, tokens"})
    gen_len: int = field(metadata={"help": "tokens generated per sequence (>= 2)"})
    target_tokens_per_s: float = field(metadata={"help": "generated tokens/s the deployment must reach"})
    max_ms_per_token: float | None = field(default=None, metadata={
        "help": "per-sequence ms per output token after the first must not exceed this"})
    policies: tuple[str, ...] = field(default=ALL_POLICIES, metadata={"help": "KV policies"})
    batch_sizes: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                                         metadata={"help": "batch sizes searched"})


# ---- search ----------------------------------------------------------------------------------
def evaluate(hw_configs: Sequence[str | Path], request: PlanRequest, jobs: int = 1) -> pd.DataFrame:
    """Every (hardware, policy, batch) at the request's shape, with the plan columns added."""
    grid = SweepGrid(models=(request.model,), policies=request.policies, batch_sizes=request.batch_sizes,
                     prompt_lens=(request.prompt_len,), gen_lens=(request.gen_len,))
    points = expand_points(hw_configs, grid)
    frame = run_sweep(points, jobs)
    prices = {p.hw.name: p.hw.cost_per_hour_usd for p in points}
    return add_plan_columns(frame, prices, request)


def add_plan_columns(frame: pd.DataFrame, prices: dict[str, float | None], request: PlanRequest) -> pd.DataFrame:
    """ttft_s, ms_per_token, cost_per_hour_usd, usd_per_mtok, meets_target, on_pareto, rank."""
    out = frame.copy()
    out["ttft_s"] = out["prefill_s"]
    out["ms_per_token"] = 1e3 * out["decode_s"] / (out["gen_len"] - 1)
    out["cost_per_hour_usd"] = out["hw"].map(lambda name: prices.get(name)).astype(float)
    out["usd_per_mtok"] = out["cost_per_hour_usd"] / 3600 / out["tokens_per_s"] * 1e6
    fast_enough = out["tokens_per_s"] >= request.target_tokens_per_s
    if request.max_ms_per_token is not None:
        fast_enough &= out["ms_per_token"] <= request.max_ms_per_token
    out["meets_target"] = out["fits"] & fast_enough
    out["on_pareto"] = pareto_mask(out)
    order = ranked(out)
    out["rank"] = pd.Series(range(1, len(order) + 1), index=order.index).reindex(out.index).astype("Int64")
    return out


def pareto_mask(frame: pd.DataFrame) -> pd.Series:
    """True where no other fitting point has both more tokens/s and fewer ms per token (ties kept once:
    the first in the frame's order)."""
    mask = pd.Series(False, index=frame.index)
    fits = frame[frame["fits"] & frame["tokens_per_s"].notna()]
    best = -math.inf
    for index, row in fits.sort_values(["ms_per_token", "tokens_per_s"], ascending=[True, False],
                                       kind="stable").iterrows():
        if row["tokens_per_s"] > best:
            mask[index] = True
            best = row["tokens_per_s"]
    return mask


def ranked(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows meeting the target, cheapest first: priced by $/Mtok, then unpriced by tokens/s."""
    meets = frame[frame["meets_target"]]
    priced = meets[meets["usd_per_mtok"].notna()].sort_values(
        ["usd_per_mtok", "tokens_per_s", "key"], ascending=[True, False, True], kind="stable")
    unpriced = meets[meets["usd_per_mtok"].isna()].sort_values(
        ["tokens_per_s", "key"], ascending=[False, True], kind="stable")
    return pd.concat([priced, unpriced])


def best_per_hardware(frame: pd.DataFrame) -> pd.DataFrame:
    """The first-ranked configuration of each hardware that meets the target, in rank order."""
    return ranked(frame).drop_duplicates("hw", keep="first")


# ---- text ------------------------------------------------------------------------------------
_SHOWN = {"hw": "hardware", "policy": "policy", "batch_size": "batch", "tokens_per_s": "tokens/s",
          "ms_per_token": "ms/token", "ttft_s": "ttft s", "cost_per_hour_usd": "$/hour", "usd_per_mtok": "$/Mtok",
          "bottleneck": "bound by"}


def table_text(rows: pd.DataFrame) -> str:
    """Rows as an aligned table; unpriced hardware reads 'no price'."""
    shown = rows[list(_SHOWN)].copy()
    shown["tokens_per_s"] = shown["tokens_per_s"].map(lambda v: f"{v:.4g}")
    shown["ms_per_token"] = shown["ms_per_token"].map(lambda v: f"{v:.4g}")
    shown["ttft_s"] = shown["ttft_s"].map(lambda v: f"{v:.4g}")
    shown["cost_per_hour_usd"] = shown["cost_per_hour_usd"].map(lambda v: NO_PRICE if pd.isna(v) else f"{v:.4g}")
    shown["usd_per_mtok"] = shown["usd_per_mtok"].map(lambda v: NO_PRICE if pd.isna(v) else f"{v:.4g}")
    return shown.rename(columns=_SHOWN).to_string(index=False)


def target_text(request: PlanRequest) -> str:
    limit = f" and <= {request.max_ms_per_token:g} ms/token" if request.max_ms_per_token is not None else ""
    return f">= {request.target_tokens_per_s:g} tokens/s{limit}"


def report_text(frame: pd.DataFrame, request: PlanRequest) -> str:
    """What the command prints when something meets the target."""
    best = best_per_hardware(frame)
    fitting = frame[frame["fits"]]
    pareto = frame[frame["on_pareto"]].sort_values("ms_per_token", kind="stable")
    lines = [
        f"{request.model}, prompt {request.prompt_len} + {request.gen_len} generated tokens; target "
        f"{target_text(request)}",
        f"searched {len(frame)} configurations ({frame['hw'].nunique()} hardware x {len(request.policies)} "
        f"policies x {len(request.batch_sizes)} batch sizes), {len(fitting)} fit in memory, "
        f"{int(frame['meets_target'].sum())} meet the target",
        "tokens/s = batch * gen_len / (prefill + decode); ms/token = per-sequence decode time per output "
        "token after the first; ttft = prefill; $/Mtok = $/hour / 3600 / tokens/s * 1e6",
        "",
        "Cheapest configuration per hardware meeting the target (priced first, by $/Mtok):",
        table_text(best),
        "",
        "Pareto front, throughput vs per-token latency (all fitting configurations; * = meets the target):",
        table_text(pareto.assign(policy=[f"{p}{' *' if m else ''}" for p, m in
                                         zip(pareto["policy"], pareto["meets_target"], strict=True)])),
    ]
    return "\n".join(lines)


def unmet_text(frame: pd.DataFrame, request: PlanRequest) -> str:
    """One line when nothing meets the target: the best throughput reachable, and where."""
    fitting = frame[frame["fits"] & frame["tokens_per_s"].notna()]
    if fitting.empty:
        return (f"no configuration fits in memory for {request.model} at prompt {request.prompt_len} + "
                f"{request.gen_len} (batch sizes {','.join(map(str, request.batch_sizes))})")
    top = fitting.loc[fitting["tokens_per_s"].idxmax()]
    text = (f"no configuration meets {target_text(request)}: best achievable is {top['tokens_per_s']:.4g} tokens/s "
            f"({top['policy']}, batch {top['batch_size']} on {top['hw']}, {top['ms_per_token']:.4g} ms/token)")
    if request.max_ms_per_token is not None:
        within = fitting[fitting["ms_per_token"] <= request.max_ms_per_token]
        if within.empty:
            text += f"; none is within {request.max_ms_per_token:g} ms/token"
        else:
            top = within.loc[within["tokens_per_s"].idxmax()]
            text += (f"; within {request.max_ms_per_token:g} ms/token: {top['tokens_per_s']:.4g} tokens/s "
                     f"({top['policy']}, batch {top['batch_size']} on {top['hw']})")
    return text


CSV_COLUMNS = ["rank", "meets_target", "on_pareto", "hw", "model", "policy", "batch_size", "prompt_len", "gen_len",
               "fits", "tokens_per_s", "ms_per_token", "ttft_s", "cost_per_hour_usd", "usd_per_mtok", "bottleneck",
               "gpu_mem_gib", "host_mem_gib", "weights_streamed_pct", "reason", "key"]


def plan_csv(frame: pd.DataFrame) -> str:
    """Every evaluated configuration: ranked ones first in rank order, then the rest in search order."""
    ordered = pd.concat([ranked(frame), frame[~frame["meets_target"]]])
    return ordered[CSV_COLUMNS].to_csv(index=False, float_format="%.6g")


# ---- command line ----------------------------------------------------------------------------
class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{ERROR}{message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m infinigen_sim.plan",
        description="Find the cheapest hardware, KV policy and batch size that reach a throughput target, "
                    "and the throughput / per-token latency Pareto front.",
        epilog="Units: lengths in tokens, throughput in generated tokens/s, latency in ms per output token, "
               "cost in USD. Exit 1 when nothing meets the target.")
    parser.add_argument("hw_configs", nargs="+", metavar="HW_CONFIG",
                        help="hardware YAML, a path or a bare name in hw_configs/ (e.g. a100_pcie4)")
    for f in fields(PlanRequest):
        flag = f"--{f.name.replace('_', '-')}"
        if f.name in ("policies", "batch_sizes"):
            default = ",".join(str(v) for v in f.default)
            parser.add_argument(flag, default=default, help=f"{f.metadata['help']}; comma list (default {default})")
            continue
        kind = {"model": str, "prompt_len": int, "gen_len": int}.get(f.name, float)
        required = f.name in ("model", "prompt_len", "gen_len", "target_tokens_per_s")
        parser.add_argument(flag, type=kind, required=required, default=None if required else f.default,
                            help=f.metadata["help"])
    parser.add_argument("--out", metavar="FILE.csv", help="write every evaluated configuration to this CSV")
    parser.add_argument("--jobs", type=int, default=1, help="local worker processes (default 1)")
    return parser


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() and int(item) > 0 for item in items):
        raise PlanInputError(f"{flag}: expected a comma list of positive whole numbers, got '{text}'")
    return tuple(int(item) for item in items)


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    """Validate the parsed flags into a request; PlanInputError names the flag."""
    for flag, value in (("--prompt-len", args.prompt_len), ("--target-tokens-per-s", args.target_tokens_per_s),
                        ("--max-ms-per-token", args.max_ms_per_token), ("--jobs", args.jobs)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise PlanInputError(f"{flag}: expected a positive number, got {value:g}")
    if args.gen_len < 2:
        raise PlanInputError(f"--gen-len: expected at least 2 (ms/token needs a decode step), got {args.gen_len}")
    try:
        policies = tuple(parse_policy_name(p.strip()).value for p in args.policies.split(","))
    except PolicyError as exc:
        raise PlanInputError(f"--policies: {exc}") from None
    return PlanRequest(args.model, args.prompt_len, args.gen_len, args.target_tokens_per_s, args.max_ms_per_token,
                       policies, _int_list("--batch-sizes", args.batch_sizes))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        request = request_from_args(args)
        frame = evaluate(args.hw_configs, request, args.jobs)
    except (PlanInputError, HardwareError) as exc:
        return _fail(str(exc))
    except UnknownModelError as exc:
        return _fail(f"--model: {exc}")
    code = 0 if frame["meets_target"].any() else 1
    print(report_text(frame, request) if code == 0 else unmet_text(frame, request),
          file=sys.stdout if code == 0 else sys.stderr)
    if args.out:
        try:
            write_text_atomic(Path(args.out), plan_csv(frame))
        except OSError as exc:
            return _fail(f"cannot write {exc.filename}: {exc.strerror}", 1)
        print(f"\nwrote {args.out} ({len(frame)} configurations)")
    return code


def _fail(message: str, code: int = 2) -> int:
    print(f"{ERROR}{message}".replace("\n", " "), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
