"""One collection of a profile bundle: what it measures (`Plan`) and the passes that write its tables.

`collect(plan)` writes meta.yaml first (so an interrupted bundle still says what it is), then the
host's per-op dispatch and per-sync costs (`host`), the copy sweep (`transfers`) and, model by model,
the op sweep (`kernels`) and the end-to-end runs (`steps`) - on CPU interleaved in rounds, one state
of a shared box (`run_model`) - and last the fetch pass (`fetch`), each appending rows through
`spec.bundle.append_rows` as they complete. With `plan.resume` rows whose key is already in the bundle
are skipped, so a killed run loses nothing and duplicates nothing. It ends by reading the bundle back
and returning a summary with roofline figures. `python -m profiler.collect` turns flags into a Plan.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from infinigen_sim.spec.bundle import (
    FETCH_COLUMNS,
    FETCH_KEY,
    HOST_COLUMNS,
    HOST_KEY,
    KERNEL_COLUMNS,
    KERNEL_KEY,
    STEP_COLUMNS,
    STEP_KEY,
    TRANSFER_COLUMNS,
    TRANSFER_KEY,
    append_rows,
    done_keys,
    read_bundle,
    row_key,
    write_meta,
)
from infinigen_sim.spec.models import ModelSpec, get_model
from infinigen_sim.spec.policies import make_policy
from profiler.bench import kernels, steps, transfers
from profiler.bench.fetch import FetchBench, FetchPass
from profiler.bench.fetch import summary_lines as fetch_lines
from profiler.bench.host import collect_meta, load_average, utc_now
from profiler.bench.host_costs import host_rows
from profiler.bench.kernels import GRIDS, KernelBench, KernelGrid, KernelRounds, KernelTask, dtype_name, kernel_tasks
from profiler.bench.steps import STEP_GRIDS, StepBench, StepGrid, StepRun, step_runs
from profiler.bench.transfer_grid import (
    BATCH_SEQS,
    REFERENCE_MODEL,
    TransferSweep,
    infinigen_row_bytes,
    make_sweep,
    transfer_points,
)
from profiler.bench.transfers import TransferBench, load_description
from profiler.runtime.engine import RUNTIME_DESCRIPTION


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
    kernel_grid: KernelGrid
    step_grid: StepGrid
    sweep: TransferSweep
    fetch: FetchPass | None = None
    fetch_only: bool = False
    budget_s: float | None = None  # the budget the grids were cut to (profiler.bench.budget), None: not cut

    @property
    def settings(self) -> dict[str, Any]:
        """What decides the numbers; a resumed bundle must have been collected with the same."""
        settings = {"device_type": self.device.type, "models": [m.name for m in self.models], "quick": self.quick,
                    "repeats": self.repeats, "warmup": self.warmup, "seed": self.seed, "threads": self.threads}
        return settings if self.budget_s is None else {**settings, "budget_s": self.budget_s}


def default_grids(device: torch.device, models: tuple[ModelSpec, ...], quick: bool
                  ) -> tuple[KernelGrid, StepGrid, TransferSweep]:
    """The device's kernel, step and copy grids (quick or full) before any budget cuts them."""
    return GRIDS[(device.type, quick)], STEP_GRIDS[(device.type, quick)], make_sweep(device, list(models), quick)


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def plan_meta(plan: Plan) -> dict[str, Any]:
    """meta.yaml: what this collection measures and how."""
    sweep = plan.sweep
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
            "grid": _plain(asdict(plan.kernel_grid)),
            **kernels.describe(plan.device, list(plan.models)),
            "timing": "CUDA events on the compute stream" if cuda else "perf_counter",
        },
        "steps": {"grid": _plain(asdict(plan.step_grid)),
                  "policies": list(plan.policies), "source": "profiler.runtime.engine.Engine.generate",
                  "schedule": "a model's op sweep dealt over the rounds of its runs (collection.run_model)"
                  if not cuda else "a model's op sweep, then its runs"},
        "runtime": RUNTIME_DESCRIPTION,
        "host_costs": {"ops": ["dispatch", "sync"], "source": "profiler.bench.host_costs",
                       "timing": "perf_counter on the collecting (dispatching) thread"},
    }


def run_transfers(plan: Plan, bar: tqdm, generator: torch.Generator) -> None:
    """The copy sweep, skipping points whose rows are all present."""
    path = plan.out / "transfers.csv"
    done = done_keys(path, TRANSFER_KEY) if plan.resume else set()
    sweep = plan.sweep
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


def run_host(plan: Plan, bar: tqdm) -> None:
    """host.csv: the dispatching thread's per-op and per-sync costs, unless already there."""
    path = plan.out / "host.csv"
    done = done_keys(path, HOST_KEY) if plan.resume else set()
    if not {("dispatch", plan.device.type), ("sync", plan.device.type)} <= done:
        bar.set_postfix_str("host dispatch and sync", refresh=False)
        rows = [r for r in host_rows(plan.device, plan.repeats, plan.warmup) if row_key(r, HOST_KEY) not in done]
        append_rows(path, rows, HOST_COLUMNS)
    bar.update()


def run_kernels(plan: Plan, bar: tqdm) -> None:
    """The op sweep, skipping points already present."""
    path = plan.out / "kernels.csv"
    done = done_keys(path, KERNEL_KEY) if plan.resume else set()
    grid = plan.kernel_grid
    bench = KernelBench(plan.device, {m.name: m for m in plan.models}, grid, plan.repeats, plan.warmup, plan.seed)
    for task in kernel_tasks(list(plan.models), dtype_name(plan.device), grid):
        bar.set_postfix_str(task.label, refresh=False)
        append_rows(path, bench.measure(task, done), KERNEL_COLUMNS)
        bar.update()


def run_steps(plan: Plan, bar: tqdm, before_round: Callable[[int], None] = lambda r: None) -> None:
    """End-to-end runs through the runtime engine, skipping finished ones; `before_round(r)` runs before
    each round of the runs (`StepBench.measure_runs`)."""
    path = plan.out / "steps.csv"
    done = done_keys(path, STEP_KEY) if plan.resume else set()
    grid = plan.step_grid
    bench = StepBench(plan.device, {m.name: m for m in plan.models}, plan.seed, grid.repeats)
    runs = plan_runs(plan)
    todo = [run for run in runs if run.final_key not in done]
    bar.update(len(runs) - len(todo))
    for run, rows in bench.measure_runs(todo, before_round):  # in rounds: a model's runs arrive together
        bar.set_postfix_str(run.run_id, refresh=False)
        append_rows(path, [r for r in rows if row_key(r, STEP_KEY) not in done], STEP_COLUMNS)
        bar.update()


def run_model(plan: Plan, bar: tqdm) -> None:
    """One model's op sweep and end-to-end runs (plan.models holds that model).

    CPU, a shared box whose speed drifts by up to 2x over seconds (other tenants): interleaved, so that
    the ops and the runs they are validated against sample the same spells. Every kernel task's timed
    passes are dealt over the runs' rounds (`KernelRounds`, each share after its own warm-up), a round
    of ops right before each round of runs; the tasks' rows are written once their last round ran.
    (On 2026-12-02, one after the other, a model's runs once ran 1.5x slower than its ops measured
    seconds before.) CUDA, a device of its own: the op sweep, then the runs."""
    if plan.device.type != "cpu":
        run_kernels(plan, bar)
        run_steps(plan, bar)
        return
    path = plan.out / "kernels.csv"
    done = done_keys(path, KERNEL_KEY) if plan.resume else set()
    bench = KernelBench(plan.device, {m.name: m for m in plan.models}, plan.kernel_grid, plan.repeats,
                        plan.warmup, plan.seed)
    tasks = kernel_tasks(list(plan.models), dtype_name(plan.device), plan.kernel_grid)
    rounds = KernelRounds(bench, tasks, done, plan.step_grid.repeats)
    bar.update(len(tasks) - len(rounds.todo))

    def before_round(r: int) -> None:
        def on_task(task: KernelTask) -> None:
            bar.set_postfix_str(f"{task.label} (round {r + 1}/{rounds.rounds})", refresh=False)
            bar.update(1 / rounds.rounds)

        rounds.run_round(r, on_task)

    run_steps(plan, bar, before_round)
    for r in rounds.pending():  # runs already done (resumed): the ops' rounds alone
        before_round(r)
    for rows in rounds.rows():
        append_rows(path, rows, KERNEL_COLUMNS)


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
    tasks = kernel_tasks(list(plan.models), dtype_name(plan.device), plan.kernel_grid)
    return 1 + len(transfer_points(plan.sweep)) + len(tasks) + len(plan_runs(plan)) + fetch  # 1: the host pass


def plan_runs(plan: Plan) -> list[StepRun]:
    """End-to-end runs: every policy on every model."""
    return step_runs(list(plan.models), list(plan.policies), plan.step_grid)


def collect(plan: Plan, existing_meta: dict[str, Any] | None = None, budget: dict[str, Any] | None = None) -> str:
    """Measure everything the plan asks for into plan.out (meta.yaml gets `budget` when given: the time
    estimate and what the budget left out); returns the printed summary."""
    torch.manual_seed(plan.seed)
    torch.set_num_threads(plan.threads)
    generator = torch.Generator().manual_seed(plan.seed)
    plan.out.mkdir(parents=True, exist_ok=True)
    if existing_meta:
        meta = {k: v for k, v in existing_meta.items() if k != "schema_version"}
        meta["resumed_utc"] = [*meta.get("resumed_utc", []), utc_now()]
    else:
        timing = {"settings": plan.settings} if plan.fetch_only else plan_meta(plan)
        meta = {**collect_meta(plan.device, {}), **timing, **({"budget": budget} if budget else {})}
    if plan.fetch is not None:
        meta["fetch"] = fetch_meta(plan.fetch, plan.device, meta.get("fetch"))
    write_meta(plan.out, meta)  # first, so that an interrupted bundle still says what it is
    warn_if_busy(meta.get("host", {}))
    with tqdm(total=count_points(plan), unit="point", desc="collect", dynamic_ncols=True) as bar:
        if not plan.fetch_only:
            run_host(plan, bar)
            run_transfers(plan, bar, generator)
            for model in plan.models:  # a model's runs beside its ops: one state of a shared box
                run_model(replace(plan, models=(model,)), bar)
        if plan.fetch is not None:
            run_fetch(plan, bar)
    meta["completed_utc"] = utc_now()
    meta.setdefault("host", {})["load_avg_1_5_15_at_end"] = load_average()
    write_meta(plan.out, meta)
    if plan.fetch_only:
        return "\n".join(fetch_summary(plan, pd.read_csv(plan.out / "fetch.csv")))
    return format_summary(plan)


BUSY_LOAD_PER_CORE = 0.5  # a 1-min load above this share of the cores: other processes share the timings


def warn_if_busy(host: dict[str, Any]) -> None:
    """A note on stderr when other processes load the box: every timing (and a validation against them)
    is inflated by time slices the collection did not get; meta.yaml records the load either way."""
    load, cores = (host.get("load_avg_1_5_15") or [None])[0], host.get("usable_cores")
    if isinstance(load, (int, float)) and isinstance(cores, int) and load > BUSY_LOAD_PER_CORE * cores:
        print(f"note: the box is busy (1-min load {load:.1f} on {cores} usable cores): timings include other "
              f"processes' time slices; collect on an idle box for a bundle to calibrate or validate with",
              file=sys.stderr)


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
    return fetch_lines(rows, spec.n_layers, make_policy("infinigen").full_fetch_layers)


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
