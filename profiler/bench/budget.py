"""How long a CUDA collection takes on one H100/H200, estimated before it starts; the grid that fits a budget.

From first principles, never from published speed results of this or any workload. The card: the
peaks of infinigen_sim/hw_configs/h100_pcie5.yaml (each with its datasheet there; the H100 PCIe is the
slower of the two cards in memory bandwidth and FLOP/s, and both sit on PCIe 5.0 x16) times the
loader's documented efficiencies and its launch cost per kernel. The host: the assumptions below,
each with its reason. Every timed call costs the larger of its host work (HOST_OP_S per torch call,
events included) and its device work (launches, bytes / bandwidth, FLOPs / rate): a pass queues its
calls and synchronises once, so host and device overlap.

  HOST_OP_S       25 us   one eager torch call on the host: Python, dispatcher, launch; the top of the
                          5-25 us CPU path per op tabulated at
                          https://jiahuanglin.xyz/all_lessons/gpu_kernel_serving/18_pytorch_to_kernel.html
  PIN_BPS         4 GB/s  cudaHostAlloc faults in and locks each 4 KiB page: about 1 us a page
                          (a minor fault, ~0.5 us, and zeroing 4 KiB at ~10 GB/s); torch's host
                          allocator then rounds every block up to a power of two (x PIN_ROUNDING)
  HOST_COPY_BPS  10 GB/s  one core streaming memory (a pageable copy is staged through a pinned
                          buffer by the CPU; the gather is one index_select on the copy thread)
  STARTUP_S       30 s    the interpreter, torch's import, the CUDA context, NVML and the host facts
  SKEW_S          50 ms   one layer's skew: torch.linalg.eigh of Hkv (D, D) fp64 matrices, a cuSOLVER
                          call of ~Hkv * D^3 = 67 MFLOP for OPT-6.7B, bound by its launches and syncs
  MARGIN          1.5     on the sum: what the estimate does not see (clock ramp-up, allocator
                          misses, a busy host); the estimate is meant to be an upper bound

`fit(plan, budget_s)` applies CUTS in order, each leaving out a part of the grid (the least useful
to the simulator first: big pageable copies, big gathers, a second model, alternate octaves, ...)
until the estimate fits, and says what it left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from infinigen_sim.spec.hardware import load_hardware
from infinigen_sim.spec.models import ModelSpec
from infinigen_sim.spec.ops import Op, ops_in_pass
from infinigen_sim.spec.policies import PolicyName, kv_memory, make_policy, stored_bytes_per_token
from infinigen_sim.spec.work import op_work
from profiler.bench.collection import Plan, plan_runs
from profiler.bench.kernel_passes import NEW_POS_PAD
from profiler.bench.kernels import OP_POLICY, cold_layers, kernel_tasks
from profiler.bench.transfer_grid import MIB, TransferPoint, transfer_points

CARD = "h100_pcie5"
HOST_OP_S = 25e-6
PIN_BPS = 4e9
PIN_ROUNDING = 1.5  # the mean of next_pow2(x) / x over sizes spread evenly in log space
HOST_COPY_BPS = 10e9
STARTUP_S = 30.0
SKEW_S = 0.05  # torch.linalg.eigh of (Hkv, D, D) fp64 on the GPU: a latency-bound cuSOLVER call with host syncs
MARGIN = 1.5
LLC_BYTES = 50 << 20  # the H100's L2 (datasheet: 50 MB), which the kernel sweep's cold-layer rule reads
DTYPE_BYTES = 2  # fp16 on CUDA
# torch calls per timed call of each op, read off the runtime's code and rounded up (events included)
HOST_OPS = {Op.EMBED: 4, Op.NORM: 3, Op.QKV: 10, Op.FFN: 8, Op.LM_HEAD: 4, Op.QUANTIZE: 40, Op.DEQUANTIZE: 24,
            Op.ATTENTION: 14, Op.SPECULATE: 20, Op.TOPK: 4, Op.SCORE: 16, Op.SKEW: 60, Op.SPAN: 3}
DECODE_OPS_PER_LAYER = {"ideal": 40, "flexgen": 60, "int4": 130, "h2o": 80, "infinigen": 110}  # a whole layer


@dataclass(frozen=True)
class Rates:
    """What one byte, FLOP, kernel or host call costs (seconds), from the card config and the assumptions."""

    hbm_bps: float
    flops: float
    link_bps: float
    link_latency_s: float
    launch_s: float

    @classmethod
    def of(cls, card: str = CARD) -> Rates:
        hw = load_hardware(card)
        return cls(hw.gpu.hbm_gbps * 1e9 * hw.gpu.hbm_efficiency, hw.gpu.fp16_tflops * 1e12 * hw.gpu.compute_efficiency,
                   hw.link.h2d_gbps * 1e9 * hw.link.h2d_efficiency, hw.link.latency_us * 1e-6, hw.gpu.launch_us * 1e-6)

    def device_s(self, nbytes: float, flops: float = 0.0, kernels: int = 1) -> float:
        return kernels * self.launch_s + nbytes / self.hbm_bps + flops / self.flops


@dataclass(frozen=True)
class Estimate:
    """Seconds per part of a collection; `total_s` adds start-up and the margin."""

    parts: dict[str, float]

    @property
    def total_s(self) -> float:
        return STARTUP_S + MARGIN * sum(self.parts.values())

    def line(self) -> str:
        parts = ", ".join(f"{name} {s:.0f} s" for name, s in self.parts.items())
        return (f"estimated {self.total_s:.0f} s on one {CARD} ({parts}; + {STARTUP_S:.0f} s start-up, x{MARGIN} "
                "margin: first principles, profiler.bench.budget)")


# ---- transfers -------------------------------------------------------------------------------
def transfer_point_s(point: TransferPoint, calls: int, rates: Rates) -> float:
    """One point of the copy sweep: its calls, each the copy (and the host gather), and the compute load."""
    if point.direction == "d2d":
        copy = rates.device_s(2 * point.nbytes)
    else:
        link = rates.link_bps if point.memory == "pinned" else min(rates.link_bps, HOST_COPY_BPS)
        copy = rates.link_latency_s + point.nbytes / link
    gather = point.nbytes / HOST_COPY_BPS if point.row_bytes else 0.0
    load = 1.5 * copy if point.concurrent else 0.0  # matmuls queued to cover 1.5 x the copy (transfers.py)
    return calls * (gather + copy + load + 6 * HOST_OP_S)


def transfers_s(plan: Plan, rates: Rates) -> float:
    """The copy sweep: every point, the pinned and pageable pools it allocates, the index permutations."""
    sweep, calls = plan.sweep, plan.warmup + plan.repeats
    points = transfer_points(sweep)
    seconds = sum(transfer_point_s(p, calls, rates) for p in points)
    for memory in sweep.memories:
        host = sweep.pool_bytes + sweep.max_bytes
        seconds += host / (PIN_BPS / PIN_ROUNDING) if memory == "pinned" else host / HOST_COPY_BPS
    permuted = {sweep.pool_bytes // p.row_bytes for p in points if p.row_bytes}
    return seconds + sum(rows * 10e-9 for rows in permuted)  # randperm: ~10 ns an element, one core


# ---- kernels ---------------------------------------------------------------------------------
def entry_s(op: Op, spec: ModelSpec, batch: int, n_tokens: int, kv_len: int, rates: Rates) -> tuple[float, float]:
    """(host, device) seconds of one timed call of `op`."""
    ops = HOST_OPS.get(op, 10)
    if op is Op.SPAN:
        return ops * HOST_OP_S, rates.launch_s
    work = op_work(op, spec, batch, n_tokens, max(kv_len, 1), OP_POLICY.partial_ratio, DTYPE_BYTES)
    return ops * HOST_OP_S, rates.device_s(work.hbm_bytes, work.flops, kernels=max(1, ops // 3))


def task_s(spec: ModelSpec, kernel_pass: str, batch: int, length: int, passes: int, rates: Rates) -> float:
    """One kernel task: its passes (each max(host, device) of its calls over the layers it cycles), set-up."""
    layer_bytes = spec.layer_weight_bytes(DTYPE_BYTES)
    layers = cold_layers(spec.n_layers, layer_bytes, LLC_BYTES)
    if kernel_pass == "prefill":
        layers, n, kv = 1, length, length
    elif kernel_pass == "cache":
        rows = batch * length * spec.kv_bytes_per_token(DTYPE_BYTES)
        layers, n, kv = min(layers, cold_layers(spec.n_layers, rows, LLC_BYTES)), 1, length
    else:
        n, kv = 1, 0
    seconds = 0.0
    for op in ops_in_pass(kernel_pass):
        tokens = length if (kernel_pass == "cache" and op is Op.DEQUANTIZE) else n
        host, device = entry_s(op, spec, batch, tokens, kv, rates)
        seconds += passes * layers * max(host, device)
    if kernel_pass == "prefill":
        seconds += passes * SKEW_S  # InfiniGen's skew: an eigendecomposition per KV head
    if kernel_pass == "cache":  # each policy pass's weight context (untimed QKV and FFN calls between layers,
        for op in (Op.QKV, Op.FFN):  # kernel_passes.in_context): four passes
            seconds += 4 * passes * layers * max(*entry_s(op, spec, batch, 1, 0, rates))
        # four policies' state: K/V-sized buffers zeroed, InfiniGen's prompt drawn and skewed
        rows = batch * (length + NEW_POS_PAD)
        kv_bytes = layers * rows * spec.kv_bytes_per_token(DTYPE_BYTES)
        prompt = 3 * layers * batch * length * spec.n_heads * spec.head_dim * DTYPE_BYTES
        seconds += rates.device_s(4 * kv_bytes + prompt) + 4 * 200 * layers * HOST_OP_S + layers * SKEW_S
    return seconds


def kernels_s(plan: Plan, rates: Rates) -> float:
    """The op sweep: every task of every model, and each model's copy built on the device."""
    passes = plan.warmup + plan.repeats
    seconds = 0.0
    for spec in plan.models:
        layers = cold_layers(spec.n_layers, spec.layer_weight_bytes(DTYPE_BYTES), LLC_BYTES)
        seconds += rates.device_s(3 * layers * spec.layer_weight_bytes(DTYPE_BYTES)) + 1.0  # randn, scale, copy
        for task in kernel_tasks([spec], "float16", plan.kernel_grid):
            seconds += task_s(spec, task.kernel_pass, task.batch_size, task.length, passes, rates)
    return seconds


# ---- steps -----------------------------------------------------------------------------------
def layer_step_s(policy: str, spec: ModelSpec, batch: int, context: int, rates: Rates) -> float:
    """One decode layer: the larger of its host calls, its device work and its host-link copies."""
    p = make_policy(policy)
    host = DECODE_OPS_PER_LAYER[policy] * HOST_OP_S
    kv_token = spec.kv_bytes_per_token(DTYPE_BYTES)
    device = rates.device_s(spec.layer_weight_bytes(DTYPE_BYTES) + batch * context * kv_token, kernels=20)
    if p.name is PolicyName.IDEAL:
        return max(host, device)
    rows = context
    if p.name is PolicyName.H2O:
        rows = min(context, max(1, math.ceil((p.heavy_ratio + p.recent_ratio) * context)))
    elif p.name is PolicyName.INFINIGEN:
        rows = max(1, math.floor(p.max_fetch_ratio * context))  # at the cap; full-fetch layers are few
    fetched = batch * rows * stored_bytes_per_token(p, spec, DTYPE_BYTES)
    link = rates.link_latency_s * 4 + fetched / rates.link_bps
    gather = fetched / HOST_COPY_BPS if p.name is PolicyName.INFINIGEN else 0.0
    return max(host, device, link, gather)


def run_s(policy: str, spec: ModelSpec, batch: int, prompt: int, gen_len: int, generations: int,
          rates: Rates) -> float:
    """One end-to-end run: its pinned host KV allocated once, then `generations` generations."""
    p = make_policy(policy)
    host_kv = kv_memory(p, spec, batch, prompt, gen_len, DTYPE_BYTES).host_bytes
    setup = host_kv * PIN_ROUNDING / PIN_BPS
    prefill_flops = 2.0 * batch * prompt * spec.n_layers * spec.layer_matmul_params
    prefill = rates.device_s(spec.n_layers * batch * prompt * spec.kv_bytes_per_token(DTYPE_BYTES), prefill_flops)
    prefill = max(prefill, spec.n_layers * 60 * HOST_OP_S) + (host_kv / rates.link_bps if host_kv else 0.0)
    decode = sum(spec.n_layers * layer_step_s(policy, spec, batch, prompt + t, rates) for t in range(gen_len - 1))
    return setup + generations * (prefill + decode)


def steps_s(plan: Plan, rates: Rates) -> float:
    """The end-to-end runs: a warm-up and the repeats of each."""
    models = {m.name: m for m in plan.models}
    generations = 1 + plan.step_grid.repeats
    return sum(run_s(r.policy, models[r.model], r.batch_size, r.prompt_len, r.gen_len, generations, rates)
               for r in plan_runs(plan))


def estimate(plan: Plan, rates: Rates | None = None) -> Estimate:
    """The plan's seconds on one H100/H200, part by part (the fetch pass is not estimated: a pretrained
    model's load and its short prompts are host-bound)."""
    rates = rates or Rates.of()
    if plan.fetch_only:
        return Estimate({})
    return Estimate({"transfers": transfers_s(plan, rates), "kernels": kernels_s(plan, rates),
                     "steps": steps_s(plan, rates)})


# ---- cuts ------------------------------------------------------------------------------------
def _octaves_every_other(values: tuple[int, ...]) -> tuple[int, ...]:
    """Every other value, the largest kept."""
    kept = values[::2]
    return kept if values[-1] in kept else (*kept, values[-1])


def _grid(attr: str, **change: object) -> Callable[[Plan], Plan]:
    """A cut of the plan's grid `attr`: each field set to its value, or to its function of the grid."""
    def cut(p: Plan) -> Plan:
        grid = getattr(p, attr)
        return replace(p, **{attr: replace(grid, **{k: v(grid) if callable(v) else v for k, v in change.items()})})
    return cut


def _kernels(**change: object) -> Callable[[Plan], Plan]:
    return _grid("kernel_grid", **change)


def _sweep(**change: object) -> Callable[[Plan], Plan]:
    return _grid("sweep", **change)


def _steps(**change: object) -> Callable[[Plan], Plan]:
    return _grid("step_grid", **change)


def _cap(values: tuple[int, ...], top: int) -> tuple[int, ...]:
    return tuple(v for v in values if v <= top) or values[:1]


CUTS: list[tuple[str, Callable[[Plan], Plan]]] = [
    ("pageable copies above 64 MiB", _sweep(pageable_max_bytes=64 * MIB)),
    ("gathers above 64 MiB", _sweep(gather_max_bytes=64 * MIB)),
    ("every model but the first", lambda p: replace(p, models=p.models[:1])),
    ("every other kv_len octave", _kernels(kv_lens=lambda g: _octaves_every_other(g.kv_lens))),
    ("every other prefill octave", _kernels(prefill_lens=lambda g: _octaves_every_other(g.prefill_lens))),
    ("every other batch octave", _kernels(batches=lambda g: _octaves_every_other(g.batches))),
    ("step prompts but the first", _steps(prompt_lens=lambda g: g.prompt_lens[:1])),
    ("pageable copies above 4 MiB and gathers above 16 MiB",
     _sweep(pageable_max_bytes=4 * MIB, gather_max_bytes=16 * MIB)),
    ("copies above 256 MiB", _sweep(max_bytes=256 * MIB)),
    ("kv_lens above 8192 and prefills above 4096",
     _kernels(kv_lens=lambda g: _cap(g.kv_lens, 8192), prefill_lens=lambda g: _cap(g.prefill_lens, 4096))),
    ("step batches but the largest", _steps(batches=lambda g: g.batches[-1:])),
    ("kernel batches above 16", _kernels(batches=lambda g: _cap(g.batches, 16))),
    ("steps beyond 16 tokens", _steps(gen_len=lambda g: min(g.gen_len, 16))),
    ("policies but ideal, flexgen and infinigen",
     lambda p: replace(p, policies=tuple(x for x in p.policies if x in ("ideal", "flexgen", "infinigen")))),
]


@dataclass(frozen=True)
class Fit:
    """The plan cut to a budget, its estimate and what was left out to get there."""

    plan: Plan
    estimate: Estimate
    left_out: tuple[str, ...]
    fits: bool

    def lines(self, budget_s: float) -> list[str]:
        verdict = "fits" if self.fits else "does NOT fit, even with every cut"
        lines = [f"budget {budget_s:.0f} s: {self.estimate.line()} -> {verdict}"]
        lines.append("left out: " + ("; ".join(self.left_out) if self.left_out else "nothing"))
        return lines


def fit(plan: Plan, budget_s: float, rates: Rates | None = None) -> Fit:
    """Cut `plan` (in CUTS order) until its estimate is within `budget_s` seconds."""
    rates = rates or Rates.of()
    left_out: list[str] = []
    current = plan
    est = estimate(current, rates)
    for what, cut in CUTS:
        if est.total_s <= budget_s:
            break
        cheaper = cut(current)
        est_cheaper = estimate(cheaper, rates)
        if est_cheaper.total_s >= est.total_s:
            continue  # nothing of this grid was left out by this cut
        current, est = cheaper, est_cheaper
        left_out.append(what)
    return Fit(replace(current, budget_s=budget_s), est, tuple(left_out), est.total_s <= budget_s)


def grid_lines(plan: Plan) -> list[str]:
    """What the plan measures, for --dry-run."""
    k, s, t = plan.kernel_grid, plan.step_grid, plan.sweep
    return [f"models: {', '.join(m.name for m in plan.models)}; policies: {', '.join(plan.policies)}; "
            f"repeats {plan.repeats} after {plan.warmup} warm-up",
            f"transfers: {len(transfer_points(t))} points, {t.min_bytes >> 10} KiB..{t.max_bytes >> 20} MiB, "
            f"{'/'.join(t.memories)} (pageable to {(t.pageable_max_bytes or t.max_bytes) >> 20} MiB, gathers to "
            f"{(t.gather_max_bytes or t.max_bytes) >> 20} MiB)",
            f"kernels: {len(kernel_tasks(list(plan.models), 'float16', k))} tasks: batches {list(k.batches)}, "
            f"kv_lens {list(k.kv_lens)}, prefill {list(k.prefill_lens)} (<= {k.max_prefill_tokens} tokens)",
            f"steps: {len(plan_runs(plan))} runs: batches {list(s.batches)}, prompts {list(s.prompt_lens)}, "
            f"gen {s.gen_len}, {s.repeats} repeats"]

