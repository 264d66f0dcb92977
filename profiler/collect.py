"""`python -m profiler.collect`: measure a profile bundle (meta.yaml, transfers.csv, kernels.csv, steps.csv).

Thin entry: parse the flags (`CollectConfig`), check them and fill the per-device defaults into a
`profiler.bench.collection.Plan`, check the output folder, then run the collection and print its
summary. `--resume` skips rows whose key is already in the bundle, so a killed run loses nothing and
duplicates nothing. With `--fetch-model smollm2-135m` a last pass counts InfiniGen's speculated rows on
those real weights against context length into fetch.csv (`profiler.bench.fetch`) and prints their
power-law fit; `--fetch-only` runs just that pass (a workload statistic, so with --resume it may be
added to a bundle timed with other settings or on another device). On cuda the grid is cut until its
first-principles estimate on one H100/H200 fits `--budget-s` (default 300 s, quick 110 s; 0: no cut,
`profiler.bench.budget`); the plan, the estimate and what was left out are printed before anything is
measured and kept in meta.yaml's `budget`; `--dry-run` prints them and stops (no GPU needed). Exit
status: 0 done, 2 bad input (a budget nothing fits too) or an unusable output folder, 130 interrupted.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from infinigen_sim.spec.bundle import BundleError, read_meta
from infinigen_sim.spec.cli import (
    InputError,
    Parser,
    add_dataclass_arguments,
    check_writable,
    dataclass_from_args,
    report_error,
)
from infinigen_sim.spec.models import UnknownModelError, get_model
from infinigen_sim.spec.policies import ALL_POLICIES, PolicyError, make_policy, parse_policy_name
from profiler.bench.budget import Estimate, Fit, estimate, fit, grid_lines
from profiler.bench.collection import Plan, collect, default_grids
from profiler.bench.fetch import DEFAULT_TEXT, FETCH_GRIDS, FetchGrid, FetchPass
from profiler.runtime.cuda_api import CUDA
from profiler.weights.checkpoint import CheckpointError
from profiler.weights.pretrained import PRETRAINED, pretrained_loader
from profiler.weights.skew_file import read_header

PROG = "python -m profiler.collect"
DEFAULT_MODELS = {"cpu": ("tiny-opt", "small-opt"), "cuda": ("opt-6.7b", "opt-13b")}
DEFAULT_REPEATS = {False: (10, 3), True: (5, 1)}  # quick -> (repeats, warm-up calls)
MIN_REPEATS = 5
DEFAULT_BUDGET_S = {False: 300.0, True: 110.0}  # cuda: 5 minutes of GPU time; quick under 2 minutes
_FETCH_CONTEXTS = {quick: ",".join(map(str, grid.contexts)) for quick, grid in FETCH_GRIDS.items()}


@dataclass(frozen=True)
class CollectConfig:
    """The flags of `python -m profiler.collect`; None means the per-device (or --quick) default."""

    device: str | None = field(default=None, metadata={
        "help": "where to measure (default: cuda when available)", "choices": ("cuda", "cpu")})
    models: tuple[str, ...] | None = field(default=None, metadata={
        "help": "zoo models (default: tiny-opt,small-opt on cpu; opt-6.7b,opt-13b on cuda)", "what": "model"})
    policies: tuple[str, ...] = field(default=ALL_POLICIES, metadata={
        "help": "KV policies of the end-to-end steps", "what": "policy"})
    out: str = field(default="profile_bundle", metadata={"help": "bundle folder to write", "metavar": "DIR"})
    quick: bool = field(default=False, metadata={"help": "small grid, 4 KiB..16 MiB copies, fewer repeats"})
    resume: bool = field(default=False, metadata={"help": "continue a bundle: skip rows already present"})
    repeats: int | None = field(default=None, metadata={
        "help": f"timed calls per point (default: {DEFAULT_REPEATS[False][0]}; quick {DEFAULT_REPEATS[True][0]})",
        "unit": "calls", "minimum": MIN_REPEATS})
    warmup: int | None = field(default=None, metadata={
        "help": f"untimed calls first (default: {DEFAULT_REPEATS[False][1]}; quick {DEFAULT_REPEATS[True][1]})",
        "unit": "calls", "minimum": 1})
    seed: int = field(default=0, metadata={"help": "seed of every random input and gather index"})
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads (default: 1 on cpu, which keeps timings stable on a shared box; "
                "torch's choice on cuda)", "minimum": 1})
    fetch_model: str | None = field(default=None, metadata={
        "help": "pretrained model whose InfiniGen speculation fills fetch.csv (default: no fetch pass)",
        "choices": tuple(PRETRAINED)})
    fetch_only: bool = field(default=False, metadata={
        "help": "with --fetch-model: only the fetch pass, no transfers, kernels or steps"})
    fetch_alphas: tuple[float, ...] | None = field(default=None, metadata={
        "help": f"alphas of the fetch pass (default: {make_policy('infinigen').alpha:g})", "what": "alpha",
        "minimum": 0, "allow_inf": True})
    fetch_contexts: tuple[int, ...] | None = field(default=None, metadata={
        "help": f"context lengths of the fetch pass (default: {_FETCH_CONTEXTS[False]}; quick "
                f"{_FETCH_CONTEXTS[True]})", "unit": "tokens", "what": "context length", "minimum": 1})
    fetch_text: str | None = field(default=None, metadata={
        "help": f"text the fetch pass reads windows from (default: {DEFAULT_TEXT.name}, shipped in "
                "profiler/weights/data)", "metavar": "FILE"})
    budget_s: float | None = field(default=None, metadata={
        "help": f"cuda only: cut the grid until its estimate on one H100/H200 fits (default: "
                f"{DEFAULT_BUDGET_S[False]:g}; quick {DEFAULT_BUDGET_S[True]:g}; 0: the whole grid, no cut)",
        "unit": "s", "minimum": 0})
    dry_run: bool = field(default=False, metadata={
        "help": "print the plan, its time estimate and what the budget left out; measure nothing"})
    fetch_skew: str | None = field(default=None, metadata={
        "help": "offline skew calibration the fetch pass speculates with (python -m profiler.accuracy "
                "--calibrate; default: fitted on each window's prompt)", "metavar": "FILE"})


def build_parser() -> Parser:
    parser = Parser(PROG, "Measure a profile bundle: meta.yaml, transfers.csv, kernels.csv, steps.csv "
                          "(and fetch.csv with --fetch-model), in the folder --out.",
                    epilog="Units: copy sizes in bytes, lengths in tokens, times in the bundle in microseconds "
                           "(kernels, transfers) and seconds (steps). Exit status: 0 done, 2 bad input or an unusable "
                           "--out, 130 interrupted (rerun with --resume).")
    add_dataclass_arguments(parser, CollectConfig)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> CollectConfig:
    """The flags as a CollectConfig (argparse exits 2 with one line on a bad flag)."""
    return dataclass_from_args(CollectConfig, build_parser().parse_args(argv))


def resolve(config: CollectConfig) -> Plan:
    """Check the flags and fill the per-device defaults; InputError (one line) on anything unusable.

    On cuda the grid is then cut to the budget (`profiler.bench.budget`); see `budget_fit`."""
    return budget_fit(config, resolve_full(config)).plan


def resolve_full(config: CollectConfig) -> Plan:
    """The plan of the flags with the device's whole grid (no budget applied)."""
    device_type = config.device or ("cuda" if CUDA.is_available() else "cpu")
    if device_type == "cuda" and not CUDA.is_available() and not config.dry_run:
        raise InputError(f"--device cuda: no CUDA device visible to torch {torch.__version__} "
                         "(--dry-run prints the plan and its estimate without one)")
    if device_type == "cpu" and config.budget_s is not None:
        raise InputError("--budget-s: the time estimate is for --device cuda only")
    try:
        models = tuple(dict.fromkeys(get_model(name) for name in config.models or DEFAULT_MODELS[device_type]))
    except UnknownModelError as exc:
        raise InputError(f"--models: {exc}") from None
    try:
        policies = tuple(dict.fromkeys(parse_policy_name(name).value for name in config.policies))
    except PolicyError as exc:
        raise InputError(f"--policies: {exc}") from None
    repeats, warmup = DEFAULT_REPEATS[config.quick]
    device = torch.device(device_type)
    return Plan(device, models, policies, Path(config.out), config.quick, config.resume,
                repeats if config.repeats is None else config.repeats,
                warmup if config.warmup is None else config.warmup, config.seed,
                config.threads or (1 if device_type == "cpu" else torch.get_num_threads()),
                *default_grids(device, models, config.quick), resolve_fetch(config), config.fetch_only)


def budget_fit(config: CollectConfig, plan: Plan) -> Fit:
    """On cuda: the plan cut to --budget-s (or the default budget; 0 keeps the whole grid). On cpu the
    plan as it is, with its estimate for an H100 left empty (CPU timings are not estimated)."""
    if plan.device.type != "cuda" or plan.fetch_only:
        return Fit(plan, Estimate({}), (), True)
    budget = DEFAULT_BUDGET_S[config.quick] if config.budget_s is None else config.budget_s
    if budget == 0:
        return Fit(plan, estimate(plan), (), True)
    fitted = fit(plan, budget)
    if not fitted.fits:
        raise InputError(f"--budget-s {budget:g}: even the smallest grid is {fitted.estimate.line()}; "
                         "raise the budget or pass fewer --models / --policies")
    return fitted


def resolve_fetch(config: CollectConfig) -> FetchPass | None:
    """The fetch pass the flags ask for (None without --fetch-model)."""
    if config.fetch_model is None:
        if config.fetch_only:
            raise InputError("--fetch-only needs --fetch-model")
        return None
    grid = FETCH_GRIDS[config.quick]
    alphas = config.fetch_alphas or (make_policy("infinigen").alpha,)
    contexts = config.fetch_contexts or grid.contexts
    if min(contexts) < grid.steps + 2:
        raise InputError(f"--fetch-contexts: need lengths >= {grid.steps + 2}, got {min(contexts)}")
    positions = get_model(config.fetch_model).max_positions
    if max(contexts) > positions:
        raise InputError(f"--fetch-contexts: {max(contexts)} exceeds {config.fetch_model}'s max_positions {positions}")
    text = Path(config.fetch_text) if config.fetch_text else DEFAULT_TEXT
    if not text.is_file():
        raise InputError(f"--fetch-text {text}: no such file")
    try:
        pretrained_loader(config.fetch_model)  # the packages and the weights are there (loaded later)
    except CheckpointError as exc:
        raise InputError(str(exc)) from None
    if config.fetch_skew is not None:
        try:
            read_header(config.fetch_skew, config.fetch_model)  # the calibration is of this model
        except CheckpointError as exc:
            raise InputError(f"--fetch-skew {exc}") from None
    skew = Path(config.fetch_skew) if config.fetch_skew else None
    return FetchPass(config.fetch_model, alphas, FetchGrid(contexts, grid.windows, grid.steps), text, skew)


def prepare_out(plan: Plan) -> dict[str, Any] | None:
    """Check the output folder; returns the existing meta when resuming a bundle."""
    out = plan.out
    check_writable("--out", out, folder=True)
    if not out.exists() or not any(out.iterdir()):
        return None
    if not plan.resume:
        raise InputError(f"--out {out}: not empty; pass --resume to continue it or choose a new --out")
    meta = read_meta(out)  # BundleError (one line) on a missing meta or another schema_version
    if plan.fetch_only:
        return meta  # fetch rows are a workload statistic keyed by their own parameters
    if meta.get("settings") != plan.settings:
        raise InputError(f"--resume {out}: collected with {meta.get('settings')}, this run is {plan.settings}; "
                         "rerun with the same flags or choose a new --out")
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, its one line already printed)
        return int(exc.code or 0)
    try:
        fitted = budget_fit(config, resolve_full(config))
        plan = fitted.plan
        if config.dry_run:
            print("\n".join(plan_lines(config, fitted)))
            return 0
        existing = prepare_out(plan)
    except (InputError, BundleError) as exc:
        return report_error(PROG, exc)
    if plan.device.type == "cuda":
        print("\n".join(plan_lines(config, fitted)), flush=True)  # before the GPU time is spent
    try:
        print(collect(plan, existing, budget_meta(config, fitted)))
    except CheckpointError as exc:  # the fetch pass's weights are not installed
        return report_error(PROG, exc)
    except KeyboardInterrupt:
        print(f"interrupted: rows so far are in {plan.out}; rerun with --resume", file=sys.stderr)
        return 130
    return 0


def plan_lines(config: CollectConfig, fitted: Fit) -> list[str]:
    """What the collection measures, and on cuda its estimate and what the budget left out."""
    lines = [f"plan ({fitted.plan.device.type}{', quick' if fitted.plan.quick else ''}):", *grid_lines(fitted.plan)]
    if fitted.plan.device.type != "cuda":
        return lines + ["no time estimate: the budget model is for one H100/H200 (--device cuda)"]
    if fitted.plan.budget_s is None:
        return lines + [f"no budget (--budget-s 0): {fitted.estimate.line()}"]
    return lines + fitted.lines(fitted.plan.budget_s)


def budget_meta(config: CollectConfig, fitted: Fit) -> dict[str, Any] | None:
    """meta.yaml's `budget` section: the estimate before measuring and what was left out."""
    if fitted.plan.device.type != "cuda":
        return None
    return {"budget_s": fitted.plan.budget_s, "estimate_s": round(fitted.estimate.total_s, 1),
            "estimate_parts_s": {k: round(v, 1) for k, v in fitted.estimate.parts.items()},
            "left_out": list(fitted.left_out), "model": "first principles (profiler.bench.budget)"}


if __name__ == "__main__":
    sys.exit(main())
