"""Op sweep: each runtime op timed over a batch x length grid, the rows of kernels.csv.

The ops are the runtime's own calls (`profiler.bench.kernel_passes`), timed as a step runs them: a
pass calls every layer's ops in the engine's order, each layer with its own weights and K/V rows, so
an op reads its weights and rows from wherever a step would (memory, not a cache that the previous
call just filled). The model copy has enough layers that the weights read between two calls of one
layer exceed COLD_FACTOR x the last-level cache, at most the model's own layers (on the CPU presets:
all of them); the policy ops' K/V rows likewise. Prefill ops are compute-bound and run on layer 0.
Each op's row is the median over every (pass, layer) sample.

Op names are `infinigen_sim.spec.ops.Op` values, as in steps.csv and the cost model: `ffn` is the
output projection and the MLP; `span` is the engine's bookkeeping around one timed op (an empty
PhaseTimer span). Which pass times an op, and its row's axes, come from `spec.ops` (`ops_in_pass`,
`OPS[op].grid`). Keys:
  n_tokens  tokens each sequence pushes through the op (1 in decode, n in prefill; the K/V rows
            converted for dequantize, which the cache pass times with n_tokens = kv, kv_len = 0)
  kv_len    cached rows attention / speculate / topk / score read (decode attention and score also
            read the new token's row: kv_len + 1, `cost.card.query_kv`); 0 for ops that read no cache
The summary prints achieved GB/s from the one op byte model, `infinigen_sim.spec.work.op_work`.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from infinigen_sim.spec.bundle import KERNEL_KEY, row_key
from infinigen_sim.spec.grids import KERNEL_PASSES, kernel_passes, pass_points
from infinigen_sim.spec.models import ModelSpec
from infinigen_sim.spec.ops import COMPUTE_OPS, OPS, Op, ops_in_pass
from infinigen_sim.spec.policies import make_policy
from infinigen_sim.spec.work import op_work
from profiler.bench.kernel_passes import Pass, PassBuilder, cache_pass, decode_pass, prefill_pass
from profiler.bench.stats import gc_paused, is_oom, release_memory, summarize, synchronize
from profiler.runtime.cuda_api import CUDA
from profiler.runtime.engine import default_dtype
from profiler.runtime.model import Transformer, build_model

KERNEL_OPS = tuple(op for op in OPS if any(op in ops_in_pass(p) for p in KERNEL_PASSES))  # every op measured
OP_POLICY = make_policy("infinigen")  # its defaults carry every op parameter (partial ratio, alpha, int4 group)
NEW_ROW_OPS = (Op.ATTENTION, Op.SCORE)  # decode rows keyed by kv_len cached rows also read the new one
COLD_FACTOR = 4  # bytes read between two calls of one layer's op: at least this many last-level caches
DEFAULT_LLC_BYTES = 32 << 20  # when the device does not say


def octaves(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(lo << k for k in range(int(math.log2(hi // lo)) + 1))


@dataclass(frozen=True)
class KernelGrid:
    """Which (batch, length) points the sweep measures."""

    batches: tuple[int, ...]
    kv_lens: tuple[int, ...]  # decode: cached rows read by attention / speculate / topk / score / dequantize
    prefill_lens: tuple[int, ...]  # prefill: prompt tokens per sequence
    max_prefill_tokens: int  # prefill points with batch x n above this are not measured

    @property
    def longest(self) -> int:
        return max(*self.kv_lens, *self.prefill_lens)


GRIDS = {
    ("cuda", False): KernelGrid(octaves(1, 64), octaves(16, 32768), octaves(128, 32768), 65536),
    ("cuda", True): KernelGrid((1, 8), (16, 128, 2048, 8192), (128, 2048), 16384),
    ("cpu", False): KernelGrid(octaves(1, 4), octaves(16, 2048), octaves(128, 1024), 4096),
    # the quick steps (profiler.bench.steps) run batch 2 at prompts 128 and 256: their points are nodes
    ("cpu", True): KernelGrid((2, 4), (16, 32, 64, 128, 256, 512), (128, 256), 1024),
}


def dtype_name(device: torch.device) -> str:
    """The runtime's dtype on this device: float16 on CUDA, float32 on CPU."""
    return str(default_dtype(device)).removeprefix("torch.")


def last_level_cache_bytes(device: torch.device) -> int:
    """The GPU's L2, or the CPU's largest cache level (sysfs); DEFAULT_LLC_BYTES when neither says."""
    if device.type == "cuda":
        return int(getattr(CUDA.get_device_properties(device), "L2_cache_size", 0)) or DEFAULT_LLC_BYTES
    best = (0, 0)
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level, size = int((index / "level").read_text()), (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        nbytes = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        best = max(best, (level, nbytes))
    return best[1] or DEFAULT_LLC_BYTES


def cold_layers(n_layers: int, layer_bytes: float, llc_bytes: int) -> int:
    """Distinct layers to cycle so the others' bytes exceed COLD_FACTOR x the LLC (at most n_layers)."""
    return max(1, min(n_layers, math.ceil(COLD_FACTOR * llc_bytes / max(layer_bytes, 1.0)) + 1))


def describe(device: torch.device, models: list[ModelSpec]) -> dict:
    """meta.yaml's account of how the ops were run (kernels section)."""
    llc = last_level_cache_bytes(device)
    dtype_bytes = torch.empty(0, dtype=default_dtype(device)).element_size()
    return {
        "ops_source": "profiler.bench.kernel_passes: the runtime's model modules and KV caches (their own PhaseTimer "
                      "spans for the policy ops), every layer of a model copy in the engine's order per pass; "
                      "row = median over passes x layers",
        "last_level_cache_bytes": llc,
        "cold_rule": f"layers cycled: weights (and K/V rows) of the others >= {COLD_FACTOR} x the last-level cache, "
                     "at most the model's layers; prefill ops on layer 0",
        "layers_cycled": {m.name: cold_layers(m.n_layers, m.layer_weight_bytes(dtype_bytes), llc) for m in models},
    }


@dataclass(frozen=True)
class KernelPoint:
    """One op at one grid point: one row of kernels.csv."""

    op: Op
    model: str
    dtype: str
    batch_size: int
    n_tokens: int
    kv_len: int

    def row(self, samples: list[float] | None, status: str = "ok") -> dict:
        row = {"op": self.op.value, "model": self.model, "dtype": self.dtype, "batch_size": self.batch_size,
               "n_tokens": self.n_tokens, "kv_len": self.kv_len, "median_us": "", "p10_us": "", "p90_us": "",
               "repeats": 0, "status": status}
        if samples:
            row.update(summarize(samples).as_row())
        return row

    def key(self) -> tuple[str, ...]:
        return row_key(self.row(None), KERNEL_KEY)


@dataclass(frozen=True)
class KernelTask:
    """Points measured by one pass: a decode step's token ops, its policy ops over kv_len rows, or a prefill."""

    kernel_pass: str  # decode | cache | prefill (spec.ops.ops_in_pass)
    model: str
    batch_size: int
    length: int  # 1 (decode), kv_len (cache) or n (prefill)
    points: tuple[KernelPoint, ...]

    def todo(self, done: set[tuple[str, ...]]) -> list[KernelPoint]:
        """The task's points whose rows are not in `done`."""
        return [p for p in self.points if p.key() not in done]

    @property
    def label(self) -> str:
        length = {"decode": "", "cache": f" kv{self.length}", "prefill": f" n{self.length}"}[self.kernel_pass]
        return f"{self.kernel_pass} {self.model} b{self.batch_size}{length}"


def kernel_tasks(models: list[ModelSpec], dtype: str, grid: KernelGrid) -> list[KernelTask]:
    """Every task of the grid for every model, as `spec.grids` expands it (the same expansion checks a
    bundle's kernels.csv for missing rows): per batch a decode task, a cache task per kv_len and a
    prefill task per prompt length (up to max_prefill_tokens)."""
    tasks = []
    for spec in models:
        for kernel_pass, b, length in kernel_passes(grid):
            points = tuple(KernelPoint(op, spec.name, dtype, b, n_tokens, kv_len)
                           for op, n_tokens, kv_len in pass_points(kernel_pass, length))
            tasks.append(KernelTask(kernel_pass, spec.name, b, length, points))
    return tasks


def kernel_points(models: list[ModelSpec], dtype: str, grid: KernelGrid) -> list[KernelPoint]:
    return [p for task in kernel_tasks(models, dtype, grid) for p in task.points]


def run_passes(p: Pass, device: torch.device, passes: int, warmup: int) -> tuple[dict[Op, list[float]], set[Op]]:
    """({op: microseconds of every call in every timed pass}, ops that ran out of memory).

    Calls timed from outside get CUDA events on the current stream (perf_counter on CPU); all are
    read after the pass, when it has synchronised once. An op that runs out of memory leaves the pass.
    """
    samples: dict[Op, list[float]] = defaultdict(list)
    failed: set[Op] = set()
    entries = list(p.entries)
    cuda = device.type == "cuda"
    for i in range(warmup + passes):
        p.timer.collect(p.n_layers)
        marks = []
        for entry in list(entries):
            try:
                if entry.spans or not entry.op:  # timed by its spans, or context
                    entry.call()
                    continue
                if cuda:
                    start, end = CUDA.Event(enable_timing=True), CUDA.Event(enable_timing=True)
                    start.record()
                    entry.call()
                    end.record()
                    marks.append((entry.op, start, end))
                else:
                    t0 = time.perf_counter()
                    entry.call()
                    marks.append((entry.op, t0, time.perf_counter()))
            except Exception as exc:  # noqa: BLE001 - only allocator exhaustion is recorded, the rest re-raised
                _reraise_unless_oom(exc, device)
                failed.update(entry.ops)
                entries = [e for e in entries if not set(e.ops) & failed]
        synchronize(device)
        per_layer, model = p.timer.collect(p.n_layers)
        if i < warmup:
            continue
        for op, start, end in marks:
            samples[op].append(start.elapsed_time(end) * 1e3 if cuda else (end - start) * 1e6)
        for entry in entries:
            spans = model if entry.layer < 0 else per_layer[entry.layer]
            for op in entry.spans:
                if op.value in spans:
                    samples[op].append(spans[op.value] * 1e6)
    return samples, failed


def _reraise_unless_oom(exc: Exception, device: torch.device) -> None:
    if not is_oom(exc):
        raise exc
    release_memory(device)



class KernelBench:
    """Runs each task's pass on a copy of its model with cold_layers layers and times the calls."""

    def __init__(self, device: torch.device, models: dict[str, ModelSpec], grid: KernelGrid, repeats: int,
                 warmup: int, seed: int) -> None:
        self.device, self.models, self.grid = device, models, grid
        self.repeats, self.warmup, self.seed = repeats, warmup, seed
        self.llc_bytes = last_level_cache_bytes(device)
        self.dtype_bytes = torch.empty(0, dtype=default_dtype(device)).element_size()
        self._model: tuple[str, Transformer] | None = None

    def layers(self, spec: ModelSpec) -> int:
        """Layers of the model copy: enough that its weights run from memory, as in a step."""
        return cold_layers(spec.n_layers, spec.layer_weight_bytes(self.dtype_bytes), self.llc_bytes)

    def kv_layers(self, spec: ModelSpec, batch: int, kv_len: int) -> int:
        """Layers whose K/V rows the cache ops cycle through: enough that they run from memory."""
        rows = batch * kv_len * spec.kv_bytes_per_token(self.dtype_bytes)
        return min(self.layers(spec), cold_layers(spec.n_layers, rows, self.llc_bytes))

    def model(self, name: str) -> Transformer:
        """The model copy, one at a time (the position table holds the longest grid length)."""
        if self._model is None or self._model[0] != name:
            self._model = None
            release_memory(self.device)
            spec = self.models[name]
            spec = replace(spec, n_layers=self.layers(spec),
                           max_positions=max(spec.max_positions, self.grid.longest + 1))
            model = build_model(spec, self.seed, self.device, default_dtype(self.device)).eval()
            self._model = (name, model)
        return self._model[1]

    def build(self, task: KernelTask) -> list[PassBuilder]:
        """The task's passes, not built yet (a cache task has one per policy)."""
        model = self.model(task.model)
        spec, b = self.models[task.model], task.batch_size
        if task.kernel_pass == "decode":
            ops = ops_in_pass("decode")
            return [PassBuilder(ops, lambda: decode_pass(model, b, self.grid.kv_lens[0], self.seed))]
        if task.kernel_pass == "cache":
            return cache_pass(model, self.kv_layers(spec, b, task.length), b, task.length, self.seed)
        return [PassBuilder(ops_in_pass("prefill"), lambda: prefill_pass(model, b, task.length, self.seed))]

    def measure(self, task: KernelTask, done: set[tuple[str, ...]] = frozenset()) -> list[dict]:
        """Rows for the task's points not in `done`, every timed pass in one go; an exhausted allocator
        gives 'oom' rows."""
        todo = task.todo(done)
        return task_rows(todo, *self.samples(task, self.repeats)) if todo else []

    def samples(self, task: KernelTask, passes: int) -> tuple[dict[Op, list[float]], set[Op]]:
        """({op: microseconds}, ops out of memory) of `passes` timed passes of each of the task's passes
        after the warm-up ones. Passes are built, run and dropped one at a time, and the allocators'
        cached blocks (pinned ones too) are handed back after each."""
        samples: dict[Op, list[float]] = {}
        failed: set[Op] = set()
        for builder in self.build(task):
            try:
                with torch.inference_mode():
                    p = builder.build()
                with torch.inference_mode(), gc_paused():
                    got, lost = run_passes(p, self.device, passes, self.warmup)
                samples.update(got)
                failed |= lost
            except Exception as exc:  # noqa: BLE001 - only allocator exhaustion is recorded, the rest re-raised
                _reraise_unless_oom(exc, self.device)
                failed |= set(builder.ops)
            finally:
                p = None  # noqa: F841 - the pass's caches go before the next pass is built
                release_memory(self.device)
        return samples, failed


def task_rows(points: list[KernelPoint], samples: dict[Op, list[float]], failed: set[Op]) -> list[dict]:
    """The points' rows from their ops' samples; 'oom' rows for ops that ran out of memory."""
    return [point.row(None, "oom") if point.op in failed else point.row(samples[point.op]) for point in points]


class KernelRounds:
    """A model's op sweep spread over `rounds` rounds (a share of every task's timed passes each, after
    its own warm-up), run between the rounds of the model's end-to-end runs: on a shared box whose speed
    drifts over seconds the ops and the runs they predict then sample the same spells. Each round runs
    once: asking for one again (or one past the last) does nothing."""

    def __init__(self, bench: KernelBench, tasks: list[KernelTask], done: set[tuple[str, ...]], rounds: int) -> None:
        self.bench, self.rounds = bench, max(1, min(rounds, bench.repeats))
        self.todo = {task: points for task in tasks if (points := task.todo(done))}
        self.got: dict[KernelTask, tuple[dict[Op, list[float]], set[Op]]] = {t: ({}, set()) for t in self.todo}
        self.ran: set[int] = set()

    def pending(self) -> list[int]:
        """The rounds not run yet."""
        return [r for r in range(self.rounds) if r not in self.ran]

    def passes(self, r: int) -> int:
        """Timed passes of round r: the repeats dealt out as evenly as they go."""
        return self.bench.repeats // self.rounds + (r < self.bench.repeats % self.rounds)

    def run_round(self, r: int, on_task: Callable[[KernelTask], None] = lambda task: None) -> None:
        if r in self.ran or r >= self.rounds:
            return
        self.ran.add(r)
        for task in self.todo:
            on_task(task)
            samples, failed = self.bench.samples(task, self.passes(r))
            mine, lost = self.got[task]
            for op, values in samples.items():
                mine.setdefault(op, []).extend(values)
            lost |= failed

    def rows(self) -> Iterator[list[dict]]:
        """Each task's rows; call once every round has run."""
        for task, points in self.todo.items():
            yield task_rows(points, *self.got[task])


# ---- summary ---------------------------------------------------------------------------------
SUMMARY_BATCH, SUMMARY_KV_LEN = 8, 2048  # the decode point the summary shows (or the nearest measured)


def _nearest(values, target: int) -> int:
    return int(min(values, key=lambda v: (abs(math.log2(v) - math.log2(target)), v)))


def decode_rows(frame, model: str):
    """The model's measured rows of one decode step: decode and cache passes (prefill rows left out)."""
    rows = frame[(frame.model == model) & (frame.status == "ok")]
    converted = [op.value for op in ops_in_pass("cache") if OPS[op].grid == "tokens"]  # n_tokens = kv rows
    return rows[(rows.n_tokens == 1) | rows.op.isin(converted)]


def achieved_gbps(op: Op, spec: ModelSpec, batch: int, n_tokens: int, kv_len: int, dtype_bytes: int,
                  median_us: float) -> float | None:
    """Device-memory GB/s the row achieved by spec.work's bytes; None for an op without work (span)."""
    if op not in COMPUTE_OPS:
        return None
    if op in NEW_ROW_OPS and n_tokens == 1:
        kv_len += 1  # the row is keyed by the cached rows before the new one, which it reads too
    work = op_work(op, spec, batch, n_tokens, kv_len, OP_POLICY.partial_ratio, dtype_bytes)
    return work.hbm_bytes / (median_us * 1e3)


def summary_lines(frame, models: dict[str, ModelSpec], dtype_bytes: int, ceiling_gbps: float | None) -> list[str]:
    """Decode ops at the nearest point to (batch 8, kv 2048): time and achieved GB/s vs the memory ceiling."""
    ceiling = f"{ceiling_gbps:.1f} GB/s memory traffic = 2 x d2d copy peak (read + write)" if ceiling_gbps \
        else "none (no d2d peak measured)"
    lines = [f"kernels, decode, nearest measured point to batch {SUMMARY_BATCH}, kv_len {SUMMARY_KV_LEN}; "
             f"GB/s from spec.work.op_work; ceiling: {ceiling}"]
    cache_ops = ops_in_pass("cache")
    for name, spec in models.items():
        decode = decode_rows(frame, name)
        if decode.empty:
            continue
        batch = _nearest(decode.batch_size.unique(), SUMMARY_BATCH)
        decode = decode[decode.batch_size == batch]
        for op in KERNEL_OPS:
            picked = decode[decode.op == op.value]
            if not picked.empty and op in cache_ops:
                length = "kv_len" if OPS[op].grid == "cache" else "n_tokens"
                picked = picked[picked[length] == _nearest(picked[length].unique(), SUMMARY_KV_LEN)]
            for row in picked.itertuples():
                gbps = achieved_gbps(op, spec, batch, int(row.n_tokens), int(row.kv_len), dtype_bytes,
                                     row.median_us)
                share = f"{100 * gbps / ceiling_gbps:5.1f}% of ceiling" if ceiling_gbps and gbps else ""
                rate = f"  {gbps:>8.2f} GB/s  {share}" if gbps is not None else ""
                lines.append(f"  {name:<12} {op.value:<10} b{batch:<3} n{int(row.n_tokens):<5} kv{int(row.kv_len):<6}"
                             f" {row.median_us:>10.1f} us [{row.p10_us:.1f}-{row.p90_us:.1f}]{rate}")
    return lines
