"""`python -m profiler.collect`: measure a profile bundle (meta.yaml, transfers.csv, kernels.csv, steps.csv).

Thin entry: parse the flags (`CollectConfig`), check them and fill the per-device defaults into a
`profiler.bench.collection.Plan`, check the output folder, then run the collection and print its
summary. `--resume` skips rows whose key is already in the bundle, so a killed run loses nothing and
duplicates nothing. With `--fetch-model smollm2-135m` a last pass counts InfiniGen's speculated rows on
those real weights against context length into fetch.csv (`profiler.bench.fetch`) and prints their
power-law fit; `--fetch-only` runs just that pass (a workload statistic, so with --resume it may be
added to a bundle timed with other settings or on another device). Exit status: 0 done, 2 bad input
or an unusable output folder, 130 interrupted.
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
from profiler.bench.collection import Plan, collect
from profiler.bench.fetch import DEFAULT_TEXT, FETCH_GRIDS, FetchGrid, FetchPass
from profiler.weights.checkpoint import CheckpointError
from profiler.weights.pretrained import PRETRAINED, pretrained_loader
from profiler.weights.skew_file import read_header

PROG = "python -m profiler.collect"
DEFAULT_MODELS = {"cpu": ("tiny-opt", "small-opt"), "cuda": ("opt-6.7b", "opt-13b")}
DEFAULT_REPEATS = {False: (10, 3), True: (5, 1)}  # quick -> (repeats, warm-up calls)
MIN_REPEATS = 5
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
    fetch_skew: str | None = field(default=None, metadata={
        "help": "offline skew calibration the fetch pass speculates with (python -m profiler.accuracy "
                "--calibrate; default: fitted on each window's prompt)", "metavar": "FILE"})


def build_parser() -> Parser:
    parser = Parser(PROG, "Measure a profile bundle: meta.yaml, transfers.csv, kernels.csv, steps.csv "
                          "(and fetch.csv with --fetch-model), in the folder --out.",
                    epilog="Units: copy sizes in bytes, lengths in tokens, times in the bundle in microseconds "
                           "(kernels, transfers) and seconds (steps). Exit status: 0 done, 2 bad input.")
    add_dataclass_arguments(parser, CollectConfig)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> CollectConfig:
    """The flags as a CollectConfig (argparse exits 2 with one line on a bad flag)."""
    return dataclass_from_args(CollectConfig, build_parser().parse_args(argv))


def resolve(config: CollectConfig) -> Plan:
    """Check the flags and fill the per-device defaults; InputError (one line) on anything unusable."""
    device_type = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device cuda: no CUDA device visible to torch {torch.__version__}")
    try:
        models = tuple(dict.fromkeys(get_model(name) for name in config.models or DEFAULT_MODELS[device_type]))
        policies = tuple(dict.fromkeys(parse_policy_name(name).value for name in config.policies))
    except (UnknownModelError, PolicyError) as exc:
        raise InputError(str(exc)) from None
    repeats, warmup = DEFAULT_REPEATS[config.quick]
    return Plan(torch.device(device_type), models, policies, Path(config.out), config.quick, config.resume,
                repeats if config.repeats is None else config.repeats,
                warmup if config.warmup is None else config.warmup, config.seed,
                config.threads or (1 if device_type == "cpu" else torch.get_num_threads()),
                resolve_fetch(config), config.fetch_only)


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
        plan = resolve(config)
        existing = prepare_out(plan)
    except (InputError, BundleError) as exc:
        return report_error(PROG, exc)
    try:
        print(collect(plan, existing))
    except CheckpointError as exc:  # the fetch pass's weights are not installed
        return report_error(PROG, exc)
    except KeyboardInterrupt:
        print(f"interrupted: rows so far are in {plan.out}; rerun with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
