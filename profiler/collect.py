"""`python -m profiler.collect`: measure a profile bundle (meta.yaml, transfers.csv, kernels.csv, steps.csv).

Thin entry: parse, seed, write meta, then the copy sweep (`profiler.transfers`) and, model by model,
the op sweep (`profiler.kernels`) and the end-to-end runs (`profiler.steps`), each appending rows through
`bundle.append_rows` as they complete. `--resume` skips rows whose key is already in the bundle, so a
killed run loses nothing and duplicates nothing. Ends by reading the bundle back and printing a
summary with roofline figures. With `--fetch-model smollm2-135m` a last pass counts InfiniGen's
speculated rows on those real weights against context length into fetch.csv (`profiler.fetch_stats`)
and prints their power-law fit; `--fetch-only` runs just that pass (a workload statistic, so with
--resume it may be added to a bundle timed with other settings or on another device).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from infinigen_sim.bundle import (
    FETCH_COLUMNS,
    FETCH_KEY,
    KERNEL_COLUMNS,
    KERNEL_KEY,
    STEP_COLUMNS,
    STEP_KEY,
    TRANSFER_COLUMNS,
    TRANSFER_KEY,
    BundleError,
    append_rows,
    done_keys,
    read_bundle,
    read_meta,
    row_key,
    write_meta,
)
from infinigen_sim.models import ModelSpec, UnknownModelError, get_model
from infinigen_sim.policies import ALL_POLICIES, PolicyError, make_policy, parse_policy_name
from profiler import fetch_stats, kernels, steps, transfers
from profiler.fetch_stats import DEFAULT_TEXT, FETCH_GRIDS, FetchBench, FetchGrid, FetchPass
from profiler.kernels import GRIDS, KernelBench, dtype_name, kernel_tasks
from profiler.nvml import collect_meta, load_average, utc_now
from profiler.runtime.checkpoint import PRETRAINED, CheckpointError, pretrained_loader
from profiler.steps import STEP_GRIDS, StepBench, StepRun, step_runs
from profiler.transfers import (
    BATCH_SEQS,
    REFERENCE_MODEL,
    TransferBench,
    infinigen_row_bytes,
    load_description,
    make_sweep,
    transfer_points,
)

DEFAULT_MODELS = {"cpu": ("tiny-opt", "small-opt"), "cuda": ("opt-6.7b", "opt-13b")}
DEFAULT_REPEATS = {False: (10, 3), True: (5, 1)}  # quick -> (repeats, warm-up calls)
MIN_REPEATS = 5


class UsageError(ValueError):
    """A flag value that cannot be used; reported in one line, exit status 2."""


@dataclass(frozen=True)
class CollectConfig:
    """The command line of `python -m profiler.collect`."""

    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)"})
    models: str | None = field(default=None, metadata={
        "help": "comma-separated zoo models (default: tiny-opt,small-opt on cpu; opt-6.7b,opt-13b on cuda)"})
    policies: str = field(default=",".join(ALL_POLICIES), metadata={
        "help": "comma-separated KV policies for the end-to-end steps"})
    out: str = field(default="profile_bundle", metadata={"help": "bundle folder to write"})
    quick: bool = field(default=False, metadata={"help": "small grid, 4 KiB..16 MiB copies, fewer repeats"})
    resume: bool = field(default=False, metadata={"help": "continue a bundle: skip rows already present"})
    repeats: int | None = field(default=None, metadata={"help": f"timed calls per point, >= {MIN_REPEATS} "
                                                         "(default 10; quick 5)"})
    warmup: int | None = field(default=None, metadata={"help": "untimed calls first, >= 1 (default 3; quick 1)"})
    seed: int = field(default=0, metadata={"help": "seed of every random input and gather index"})
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads (default: 1 on cpu, which keeps timings stable on a shared box; "
                "torch's choice on cuda)"})
    fetch_model: str | None = field(default=None, metadata={
        "help": f"pretrained model ({', '.join(PRETRAINED)}) whose InfiniGen speculation fills fetch.csv "
                "(default: no fetch pass)"})
    fetch_only: bool = field(default=False, metadata={
        "help": "with --fetch-model: only the fetch pass, no transfers, kernels or steps"})
    fetch_alphas: str | None = field(default=None, metadata={
        "help": f"comma-separated alphas of the fetch pass (default {make_policy('infinigen').alpha:g})"})
    fetch_contexts: str | None = field(default=None, metadata={
        "help": "comma-separated context lengths of the fetch pass (default "
                + ",".join(map(str, FETCH_GRIDS[False].contexts)) + "; quick "
                + ",".join(map(str, FETCH_GRIDS[True].contexts)) + ")"})
    fetch_text: str | None = field(default=None, metadata={
        "help": f"text the fetch pass reads windows from (default {DEFAULT_TEXT})"})


@dataclass(frozen=True)
class Plan:
    """A validated configuration: what this collection measures, where it writes."""

    device: torch.device
    models: tuple[ModelSpec, ...]
    policies: tuple[str, ...]
    out: Path
    quick: bool
    resume: bool
    repeats: int
    warmup: int
    seed: int
    threads: int
    fetch: FetchPass | None = None
    fetch_only: bool = False

    @property
    def settings(self) -> dict[str, Any]:
        """What decides the numbers; a resumed bundle must have been collected with the same."""
        return {"device_type": self.device.type, "models": [m.name for m in self.models], "quick": self.quick,
                "repeats": self.repeats, "warmup": self.warmup, "seed": self.seed, "threads": self.threads}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> CollectConfig:
    parser = _Parser(prog="python -m profiler.collect", description=__doc__.splitlines()[0])
    for f in fields(CollectConfig):
        flag, help_text = f"--{f.name.replace('_', '-')}", f.metadata["help"]
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", default=f.default, help=help_text)
        else:
            kind = int if f.type.startswith("int") else str
            parser.add_argument(flag, type=kind, default=f.default, help=help_text)
    return CollectConfig(**vars(parser.parse_args(argv)))


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def resolve(config: CollectConfig) -> Plan:
    """Validate flags and fill per-device defaults; UsageError on anything unusable."""
    device_type = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type not in ("cuda", "cpu"):
        raise UsageError(f"--device {device_type}: expected cuda or cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: no CUDA device visible to torch {torch.__version__}")
    try:
        models = tuple(get_model(name) for name in _split(config.models or ",".join(DEFAULT_MODELS[device_type])))
        policies = tuple(parse_policy_name(name).value for name in _split(config.policies))
    except (UnknownModelError, PolicyError) as exc:
        raise UsageError(str(exc)) from None
    if not models or not policies:
        raise UsageError("--models and --policies need at least one name each")
    repeats, warmup = DEFAULT_REPEATS[config.quick]
    repeats = repeats if config.repeats is None else config.repeats
    warmup = warmup if config.warmup is None else config.warmup
    if repeats < MIN_REPEATS or warmup < 1:
        raise UsageError(f"--repeats must be >= {MIN_REPEATS} and --warmup >= 1 (got {repeats}, {warmup})")
    if config.threads is not None and config.threads < 1:
        raise UsageError(f"--threads must be >= 1 (got {config.threads})")
    return Plan(torch.device(device_type), tuple(dict.fromkeys(models)), policies, Path(config.out),
                config.quick, config.resume, repeats, warmup, config.seed,
                config.threads or (1 if device_type == "cpu" else torch.get_num_threads()),
                resolve_fetch(config), config.fetch_only)


def resolve_fetch(config: CollectConfig) -> FetchPass | None:
    """The fetch pass the flags ask for (None without --fetch-model)."""
    if config.fetch_model is None:
        if config.fetch_only:
            raise UsageError("--fetch-only needs --fetch-model")
        return None
    if config.fetch_model not in PRETRAINED:
        raise UsageError(f"--fetch-model {config.fetch_model}: not a pretrained model ({', '.join(PRETRAINED)})")
    grid = FETCH_GRIDS[config.quick]
    try:
        alphas = tuple(float(a) for a in _split(config.fetch_alphas or str(make_policy("infinigen").alpha)))
        contexts = tuple(int(n) for n in _split(config.fetch_contexts)) if config.fetch_contexts else grid.contexts
    except ValueError as exc:
        raise UsageError(f"--fetch-alphas / --fetch-contexts: {exc}") from None
    if not alphas or any(not a >= 0 for a in alphas):
        raise UsageError(f"--fetch-alphas: need alphas >= 0, got {config.fetch_alphas}")
    if not contexts or min(contexts) < grid.steps + 2:
        raise UsageError(f"--fetch-contexts: need lengths >= {grid.steps + 2}, got {config.fetch_contexts}")
    text = Path(config.fetch_text) if config.fetch_text else DEFAULT_TEXT
    if not text.is_file():
        raise UsageError(f"--fetch-text {text}: no such file")
    try:
        pretrained_loader(config.fetch_model)  # the packages and the weights are there (loaded later)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    return FetchPass(config.fetch_model, alphas, FetchGrid(contexts, grid.windows, grid.steps), text)


def prepare_out(plan: Plan) -> dict[str, Any] | None:
    """Check the output folder; returns the existing meta when resuming a bundle."""
    out = plan.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    if not plan.resume:
        raise UsageError(f"--out {out}: not empty; pass --resume to continue it or choose a new --out")
    meta = read_meta(out)  # BundleError (one line) on a missing meta or another schema_version
    if plan.fetch_only:
        return meta  # fetch rows are a workload statistic keyed by their own parameters
    if meta.get("settings") != plan.settings:
        raise UsageError(f"--resume {out}: collected with {meta.get('settings')}, this run is {plan.settings}; "
                         "rerun with the same flags or choose a new --out")
    return meta


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def plan_meta(plan: Plan) -> dict[str, Any]:
    """meta.yaml: what this collection measures and how."""
    sweep = make_sweep(plan.device, list(plan.models), plan.quick)
    cuda = plan.device.type == "cuda"
    pinned = "measured" if cuda else "not measured: no CUDA device (the CPU runtime copies between pageable tensors)"
    return {
        "settings": plan.settings,
        "repeats": {"timed": plan.repeats, "warmup": plan.warmup, "summary": "median, p10, p90"},
        "transfers": {
            "memory": list(sweep.memories), "pinned": pinned,
            "sizes_bytes": {"min": sweep.min_bytes, "max": sweep.max_bytes, "spacing": "octave"},
            "row_bytes": list(sweep.row_bytes),
            "infinigen_row_bytes": infinigen_row_bytes(),
            "infinigen_row": f"one token's K or V row of one layer of {REFERENCE_MODEL} in fp16",
            "batch_strided_sequences": BATCH_SEQS, "gather_pool_bytes": sweep.pool_bytes,
            "concurrent_load": load_description(plan.device),
            "handoff_model": sweep.handoff_model.name if sweep.handoff_model else "none (copy engines: no handoff)",
            "timing": "CUDA events on the copy stream; host gather by perf_counter" if cuda
            else "perf_counter on the worker thread that copies (host tensor -> host tensor memcpy)",
        },
        "kernels": {
            "dtype": dtype_name(plan.device),
            "grid": _plain(asdict(GRIDS[(plan.device.type, plan.quick)])),
            **kernels.describe(plan.device, list(plan.models)),
            "timing": "CUDA events on the compute stream" if cuda else "perf_counter",
        },
        "steps": {"grid": _plain(asdict(STEP_GRIDS[(plan.device.type, plan.quick)])),
                  "policies": list(plan.policies), "source": "profiler.runtime.engine.Engine.generate"},
    }


def run_transfers(plan: Plan, bar: tqdm, generator: torch.Generator) -> None:
    """The copy sweep, skipping points whose rows are all present."""
    path = plan.out / "transfers.csv"
    done = done_keys(path, TRANSFER_KEY) if plan.resume else set()
    sweep = make_sweep(plan.device, list(plan.models), plan.quick)
    points = transfer_points(sweep)
    todo = [p for p in points if not set(p.keys()) <= done]
    bar.update(len(points) - len(todo))
    if not todo:
        return
    bench = TransferBench(plan.device, sweep, plan.repeats, plan.warmup, generator)
    try:
        for point in todo:
            bar.set_postfix_str(point.label, refresh=False)
            rows = [r for r in bench.measure(point) if row_key(r, TRANSFER_KEY) not in done]
            append_rows(path, rows, TRANSFER_COLUMNS)
            bar.update()
    finally:
        bench.close()


def run_kernels(plan: Plan, bar: tqdm) -> None:
    """The op sweep, skipping points already present."""
    path = plan.out / "kernels.csv"
    done = done_keys(path, KERNEL_KEY) if plan.resume else set()
    grid = GRIDS[(plan.device.type, plan.quick)]
    bench = KernelBench(plan.device, {m.name: m for m in plan.models}, grid, plan.repeats, plan.warmup, plan.seed)
    for task in kernel_tasks(list(plan.models), dtype_name(plan.device), grid):
        bar.set_postfix_str(task.label, refresh=False)
        append_rows(path, bench.measure(task, done), KERNEL_COLUMNS)
        bar.update()


def run_steps(plan: Plan, bar: tqdm) -> None:
    """End-to-end runs through the runtime engine, skipping finished ones."""
    path = plan.out / "steps.csv"
    done = done_keys(path, STEP_KEY) if plan.resume else set()
    grid = STEP_GRIDS[(plan.device.type, plan.quick)]
    bench = StepBench(plan.device, {m.name: m for m in plan.models}, plan.seed, grid.repeats)
    runs = plan_runs(plan)
    todo = [run for run in runs if run.final_key not in done]
    bar.update(len(runs) - len(todo))
    for run, rows in bench.measure_runs(todo):  # in rounds: a model's runs arrive together
        bar.set_postfix_str(run.run_id, refresh=False)
        append_rows(path, [r for r in rows if row_key(r, STEP_KEY) not in done], STEP_COLUMNS)
        bar.update()


def run_fetch(plan: Plan, bar: tqdm) -> None:
    """The fetch pass, skipping (alpha, context) points whose rows are all present."""
    assert plan.fetch is not None
    path = plan.out / "fetch.csv"
    done = done_keys(path, FETCH_KEY) if plan.resume else set()
    n_layers = get_model(plan.fetch.model).n_layers
    units = plan.fetch.units(get_model(plan.fetch.model).max_positions)
    todo = [(a, n) for a, n in units if not set(plan.fetch.keys(a, n, n_layers)) <= done]
    bar.update(len(units) - len(todo))
    if not todo:
        return
    bench = FetchBench.load(plan.fetch, plan.device)
    for alpha, n in todo:
        bar.set_postfix_str(f"fetch {plan.fetch.model} alpha {alpha:g} n {n}", refresh=False)
        append_rows(path, [r for r in bench.measure(alpha, n) if row_key(r, FETCH_KEY) not in done], FETCH_COLUMNS)
        bar.update()


def count_points(plan: Plan) -> int:
    """Progress-bar units: transfer points, kernel tasks, end-to-end runs and fetch points."""
    fetch = len(plan.fetch.units(get_model(plan.fetch.model).max_positions)) if plan.fetch else 0
    if plan.fetch_only:
        return fetch
    sweep = make_sweep(plan.device, list(plan.models), plan.quick)
    tasks = kernel_tasks(list(plan.models), dtype_name(plan.device), GRIDS[(plan.device.type, plan.quick)])
    return len(transfer_points(sweep)) + len(tasks) + len(plan_runs(plan)) + fetch


def plan_runs(plan: Plan) -> list[StepRun]:
    """End-to-end runs: every policy on every model."""
    return step_runs(list(plan.models), list(plan.policies), STEP_GRIDS[(plan.device.type, plan.quick)])


def collect(plan: Plan, existing_meta: dict[str, Any] | None = None) -> str:
    """Measure everything the plan asks for into plan.out; returns the printed summary."""
    torch.manual_seed(plan.seed)
    torch.set_num_threads(plan.threads)
    generator = torch.Generator().manual_seed(plan.seed)
    plan.out.mkdir(parents=True, exist_ok=True)
    if existing_meta:
        meta = {k: v for k, v in existing_meta.items() if k != "schema_version"}
        meta["resumed_utc"] = [*meta.get("resumed_utc", []), utc_now()]
    else:
        timing = {"settings": plan.settings} if plan.fetch_only else plan_meta(plan)
        meta = {**collect_meta(plan.device, {}), **timing}
    if plan.fetch is not None:
        meta["fetch"] = fetch_meta(plan.fetch, plan.device, meta.get("fetch"))
    write_meta(plan.out, meta)  # first, so that an interrupted bundle still says what it is
    with tqdm(total=count_points(plan), unit="point", desc="collect", dynamic_ncols=True) as bar:
        if not plan.fetch_only:
            run_transfers(plan, bar, generator)
            for model in plan.models:  # a model's runs right after its ops: one state of a shared box
                run_kernels(replace(plan, models=(model,)), bar)
                run_steps(replace(plan, models=(model,)), bar)
        if plan.fetch is not None:
            run_fetch(plan, bar)
    meta["completed_utc"] = utc_now()
    meta.setdefault("host", {})["load_avg_1_5_15_at_end"] = load_average()
    write_meta(plan.out, meta)
    if plan.fetch_only:
        return "\n".join(fetch_summary(plan, pd.read_csv(plan.out / "fetch.csv")))
    return format_summary(plan)


def fetch_meta(fetch: FetchPass, device: torch.device, before: dict[str, Any] | None) -> dict[str, Any]:
    """meta.yaml's `fetch` section; a resumed pass of the same model keeps the alphas and contexts before it."""
    meta = {**fetch.describe(), "device_type": device.type}
    if before and before.get("model") == fetch.model:
        for key in ("alphas", "contexts"):
            meta[key] = sorted(set(before.get(key, [])) | set(meta[key]))
    return meta


def fetch_summary(plan: Plan, fetch: pd.DataFrame) -> list[str]:
    """The fetch pass's counts per layer group and context, and their power-law fit."""
    if plan.fetch is None:
        return []
    spec = get_model(plan.fetch.model)
    rows = fetch[fetch["model"] == plan.fetch.model]
    return fetch_stats.summary_lines(rows, spec.n_layers, make_policy("infinigen").full_fetch_layers)


def format_summary(plan: Plan) -> str:
    """The bundle read back (which also checks it): transfer peaks, decode-op rooflines, step totals."""
    bundle = read_bundle(plan.out)
    meta = bundle.meta
    head = (f"profile bundle {plan.out}: {bundle.device_name}, {meta['kernels']['dtype']}, "
            f"{meta['repeats']['timed']} timed repeats after {meta['repeats']['warmup']} warm-up; "
            f"{len(bundle.transfers)} transfer, {len(bundle.kernels)} kernel, {len(bundle.steps)} step rows")
    row_bytes = meta["transfers"]["infinigen_row_bytes"]
    lines = [head, *transfers.summary_lines(bundle.transfers, meta["transfers"]["memory"], row_bytes)]
    d2d = transfers.peak_row(bundle.transfers, "d2d", "device")
    ceiling = None if d2d is None else 2 * float(d2d.gbps)
    dtype_bytes = torch.empty(0, dtype=getattr(torch, meta["kernels"]["dtype"])).element_size()
    models = {m.name: m for m in plan.models}
    lines += kernels.summary_lines(bundle.kernels, models, dtype_bytes, ceiling)
    lines += steps.summary_lines(bundle.steps, models, dtype_bytes, ceiling)
    lines += fetch_summary(plan, bundle.fetch)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        plan = resolve(config)
        existing = prepare_out(plan)
    except (UsageError, BundleError) as exc:
        print(f"python -m profiler.collect: error: {exc}", file=sys.stderr)
        return 2
    try:
        print(collect(plan, existing))
    except CheckpointError as exc:  # the fetch pass's weights are not installed
        print(f"python -m profiler.collect: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: rows so far are in {plan.out}; rerun with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
