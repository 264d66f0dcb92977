"""SimPy replay of prefill and decode on one GPU, its host link and its host CPU.

Resources, each capacity 1 and first come first served: `gpu` (the compute stream: kernels run in
issue order), `h2d_link` and `d2h_link` (the two copy engines), `host_cpu` (the gather thread).
Decode follows the step schedule in `infinigen_sim.policies`: with overlap, layer i issues layer
i+1's weight (when streamed) and K/V fetch at its start (InfiniGen: after speculating layer i+1 on
the GPU, then indices D2H, host gather, H2D); without overlap a layer issues its own fetch and waits
for it before computing. Attention waits for its K/V; the new token's K/V goes back D2H after QKV.
Prefill runs the prompt layer by layer; offloaded policies store each layer's K/V D2H while the
next layer computes, through two staging buffers (layer i waits for the store of layer i-2).

Simultaneous events: SimPy runs events due at the same time in the order they were scheduled and
each resource grants requests in request order, so ties resolve in program order: a layer
requests its weight load before its K/V fetch, and the compute stream runs kernels as issued.

Placement (`Placement`): on a GPU box the copies run on their own copy engines and the gather on a
host thread, as above. The runtime's CPU mode (`CPU_PLACEMENT`) has no copy engines: the copy
worker thread runs the gathers and the host->"device" copies (one FIFO resource, `host_cpu`), and
device->host copies run inline on the compute thread (`gpu`) in program order: the indices after
top-k, the new token's K/V after QKV, each prefill layer's K/V store before its attention. Two
costs of that runtime's Python ride on the compute thread when the cost model prices them: a
`span` after every op (its timer's bookkeeping) and, per offloaded layer, a `handoff` (what handing
its fetch and commit jobs to the worker costs the compute thread); the worker pays a `job` per job.
A measured `skew` (InfiniGen's prefill) runs on the speculated layers only, as in the runtime.

All times are seconds. State lives in a `Machine` (the environment and its resources); a run is
deterministic. `simulate_full` replays every layer of every step; `simulate_fast` replays a few
layers of a few steps and extrapolates (see "fast mode" below).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import simpy

from infinigen_sim.costs import CostModel
from infinigen_sim.models import ModelSpec
from infinigen_sim.policies import (
    DEFAULT_FETCH_MODEL,
    FetchModel,
    LayerWork,
    PolicyConfig,
    PolicyName,
    fetch_tokens,
    h2o_budget,
    layer_work,
    stored_bytes_per_token,
)

RESOURCES = ("gpu", "h2d_link", "d2h_link", "host_cpu")
INDEX_BYTES = 4  # one int32 index per selected row: InfiniGen's indices copied GPU->host
PREFILL = -1  # step id of the prefill in logs and traces


@dataclass(frozen=True)
class Placement:
    """Where copies run: own copy engines (a GPU box) or the compute and worker threads (CPU runtime)."""

    h2d: str = "h2d_link"  # resource that runs host->device copies
    gather: str = "host_cpu"  # resource that runs the host gather
    d2h_inline: bool = False  # device->host copies run on `gpu`, in program order
    handoff: bool = False  # a layer's copy-worker jobs cost the compute thread `costs.handoff_s(bytes)`,
    # each job the worker `costs.job_s()`
    spans: bool = False  # each op on `gpu` is followed by the runtime's timing bookkeeping, `costs.span_s(op)`


GPU_PLACEMENT = Placement()
CPU_PLACEMENT = Placement(h2d="host_cpu", gather="host_cpu", d2h_inline=True, handoff=True, spans=True)


@dataclass(frozen=True)
class Scenario:
    """One point to replay: costs, model, policy and the shape of the request."""

    costs: CostModel
    model: ModelSpec
    policy: PolicyConfig
    batch: int  # sequences decoded together
    prompt_len: int  # tokens
    gen_len: int  # tokens generated; prefill emits the first, gen_len - 1 decode steps the rest
    fetch_model: FetchModel = DEFAULT_FETCH_MODEL
    streamed_weight_bytes: float = 0.0  # per layer, copied host->GPU every step (weights that do not fit)
    dtype_bytes: int = 2  # bytes per K/V element before the policy's own encoding (fp32 on the CPU runtime: 4)
    placement: Placement = GPU_PLACEMENT

    @property
    def n_decode_steps(self) -> int:
        return max(self.gen_len - 1, 0)


@dataclass(frozen=True)
class Op:
    """One timed operation on one resource, as the trace shows it."""

    resource: str
    name: str
    layer: int  # -1: before the first layer (embed); n_layers: after the last (LM head)
    step: int  # PREFILL or the decode step
    start_s: float
    end_s: float


class Recorder:
    """Busy seconds per (step, layer, resource); every `Op` too when `keep_ops`."""

    def __init__(self, keep_ops: bool = False) -> None:
        self.keep_ops = keep_ops
        self.ops: list[Op] = []
        self.busy: dict[tuple[int, int, str], float] = defaultdict(float)

    def add(self, resource: str, name: str, layer: int, step: int, start_s: float, end_s: float) -> None:
        self.busy[step, layer, resource] += end_s - start_s
        if self.keep_ops:
            self.ops.append(Op(resource, name, layer, step, start_s, end_s))

    def busy_s(self, step: int) -> dict[str, float]:
        out = dict.fromkeys(RESOURCES, 0.0)
        for (op_step, _, resource), seconds in self.busy.items():
            if op_step == step:
                out[resource] += seconds
        return out

    def log(self) -> list[tuple[str, float]]:
        """[(event, time)]: "<resource> <name>[layer] start|end", in time order (ties: as recorded)."""
        events = []
        for op in self.ops:
            label = f"{op.resource} {op.name}[{op.layer}]"
            events += [(f"{label} start", op.start_s), (f"{label} end", op.end_s)]
        return sorted(events, key=lambda event: event[1])


class LayerTimes(NamedTuple):
    """Seconds of every op one layer runs in one decode step (0 where the policy skips it)."""

    norm: float
    qkv: float
    quantize: float
    dequantize: float
    attention: float
    ffn: float
    speculate: float
    topk: float
    indices: float
    gather: float
    fetch: float
    writeback: float
    weights: float
    score: float = 0.0  # H2O: the step's score update after attention (when the cost model measured it)
    handoff: float = 0.0  # CPU runtime: what the layer's copy-worker jobs (fetch, commit) cost the compute thread
    job: float = 0.0  # CPU runtime: what one job costs the worker itself


def layer_times(sc: Scenario, work: LayerWork, context_len: int) -> LayerTimes:
    """Durations of `work` at a step whose cache holds `context_len` tokens."""
    cost, model, batch = sc.costs, sc.model, sc.batch
    spec = work.speculate
    return LayerTimes(
        norm=cost.compute_s("norm", model, batch, 1, 0),
        qkv=cost.compute_s("qkv", model, batch, 1, 0),
        quantize=cost.compute_s("quantize", model, batch, 1, 0) if work.quant_elems else 0.0,
        dequantize=cost.compute_s("dequantize", model, batch, work.fetch_tokens, 0) if work.dequant_elems else 0.0,
        attention=cost.compute_s("attention", model, batch, 1, work.attend_tokens),
        ffn=cost.compute_s("ffn", model, batch, 1, 0),
        speculate=cost.compute_s("speculate", model, batch, 1, context_len,
                                 partial_ratio=sc.policy.partial_ratio) if spec else 0.0,
        topk=cost.compute_s("topk", model, batch, 1, context_len) if spec else 0.0,
        indices=cost.d2h_s(batch * work.fetch_tokens * INDEX_BYTES) if work.gathered else 0.0,
        gather=cost.gather_s(work.fetch_bytes, batch * work.fetch_tokens) if work.gathered else 0.0,
        fetch=cost.h2d_s(work.fetch_bytes, work.gathered),
        writeback=cost.d2h_s(work.writeback_bytes),
        weights=cost.h2d_s(sc.streamed_weight_bytes, False),
        score=cost.compute_s("score", model, batch, 1, work.attend_tokens)
        if sc.policy.name is PolicyName.H2O and measured_op(sc, "score") else 0.0,
        handoff=_handoff_price(sc, "handoff_s", work.fetch_bytes) if work.writeback_bytes > 0 else 0.0,
        job=_handoff_price(sc, "job_s") if work.writeback_bytes > 0 else 0.0,
    )


def _handoff_price(sc: Scenario, method: str, *args: float) -> float:
    """Seconds of copy-worker jobs by cost-model method `method` (0 unless the placement hands jobs
    over and the cost model prices them: `handoff_s(nbytes)` and `job_s()` are optional in a CostModel)."""
    price = getattr(sc.costs, method, None)
    return float(price(*args)) if sc.placement.handoff and price is not None else 0.0


OpList = list[tuple[str, int, float]]  # (op name, layer, seconds), run back to back on one resource


class Machine:
    """The simulated box: one environment, its four resources and a recorder."""

    def __init__(self, sc: Scenario, recorder: Recorder | None = None) -> None:
        self.sc = sc
        self.env = simpy.Environment()
        self.resources = {name: simpy.Resource(self.env, capacity=1) for name in RESOURCES}
        self.h2d, self.gather = sc.placement.h2d, sc.placement.gather
        self.recorder = recorder if recorder is not None else Recorder()
        self.layer_start_s: list[float] = []  # when each layer began, in replay order
        self._times: dict[tuple[LayerWork, int], LayerTimes] = {}
        self._span_s: dict[str, float] = {}

    def times(self, work: LayerWork, context_len: int) -> LayerTimes:
        key = (work, context_len)
        if key not in self._times:
            self._times[key] = layer_times(self.sc, work, context_len)
        return self._times[key]

    def span_s(self, op: str) -> float:
        """The runtime's bookkeeping after `op` on the compute thread (0 unless the cost model prices it:
        `span_s()` is optional in a CostModel)."""
        if op not in self._span_s:
            price = getattr(self.sc.costs, "span_s", None)
            self._span_s[op] = float(price(op)) if price is not None else 0.0
        return self._span_s[op]

    def hold(self, resource: str, ops: OpList, step: int) -> Generator[simpy.Event, Any, None]:
        """Run `ops` back to back on `resource` once it is free (one request for the batch of ops)."""
        if resource == "gpu" and self.sc.placement.spans:
            spans = [(op, ("span", op[1], self.span_s(op[0]))) for op in ops]
            ops = [entry for op, span in spans for entry in ((op, span) if span[2] > 0 else (op,))]
        with self.resources[resource].request() as req:
            yield req
            start = self.env.now
            yield self.env.timeout(sum(seconds for _, _, seconds in ops))
        for name, layer, seconds in ops:
            self.recorder.add(resource, name, layer, step, start, start + seconds)
            start += seconds


class StepState:
    """One decode step's inputs and the events its processes signal."""

    def __init__(self, step: int, layers: list[LayerWork], context_len: int,
                 prev_writes: list[simpy.Event | None] | None) -> None:
        self.step = step
        self.layers = layers
        self.context_len = context_len
        self.prev_writes = prev_writes  # last step's write-backs, which this step's fetches read
        self.kv_ready: list[simpy.Event | None] = [None] * len(layers)
        self.weights_ready: list[simpy.Event | None] = [None] * len(layers)
        self.written: list[simpy.Event | None] = [None] * len(layers)
        self.end_s = 0.0


# ---- processes -------------------------------------------------------------------------------
def load_weights(m: Machine, step: int, layer: int, seconds: float) -> Generator:
    """Copy the streamed share of `layer`'s weights host->GPU."""
    yield from m.hold(m.h2d, [("load_weights", layer, seconds)], step)


def prefetch(m: Machine, st: StepState, layer: int, t: LayerTimes) -> Generator:
    """Copy `layer`'s K/V rows host->GPU; InfiniGen first sends indices down and gathers the rows."""
    work = st.layers[layer]
    if work.gathered and not m.sc.placement.d2h_inline:  # inline: sent on the compute stream already
        yield from m.hold("d2h_link", [("indices", layer, t.indices)], st.step)
    if st.prev_writes and st.prev_writes[layer] is not None:
        yield st.prev_writes[layer]  # the host copy must hold last step's token before it is read
    ops: OpList = [("job", layer, t.job)] if t.job else []  # the job's own Python, on the worker
    if work.gathered:
        yield from m.hold(m.gather, [*ops, ("gather", layer, t.gather)], st.step)
        ops = []
    yield from m.hold(m.h2d, [*ops, ("fetch_kv", layer, t.fetch)], st.step)


def write_back(m: Machine, step: int, layer: int, seconds: float) -> Generator:
    """Copy the new token's K/V of `layer` GPU->host (INT4: already quantised)."""
    yield from m.hold("d2h_link", [("writeback_kv", layer, seconds)], step)


def issue_fetch(m: Machine, st: StepState, layer: int, gpu_ops: OpList) -> Generator[Any, Any, OpList]:
    """Start `layer`'s weight and K/V copies; returns the GPU ops not yet run.

    InfiniGen speculates first: `gpu_ops` (the issuing layer's norm) then speculation and top-k run
    on the compute stream, since the chosen indices must exist before the host can gather.
    """
    work = st.layers[layer]
    t = m.times(work, st.context_len)
    if t.weights > 0:
        st.weights_ready[layer] = m.env.process(load_weights(m, st.step, layer, t.weights))
    if work.fetch_bytes <= 0:
        return gpu_ops
    if work.speculate:
        spec = [("speculate", layer, t.speculate), ("topk", layer, t.topk)]
        if m.sc.placement.d2h_inline:  # the chosen indices go to the host before the next kernel
            spec.append(("indices", layer, t.indices))
        yield from m.hold("gpu", gpu_ops + spec, st.step)
        gpu_ops = []
    st.kv_ready[layer] = m.env.process(prefetch(m, st, layer, t))
    return gpu_ops


def decode_layer(m: Machine, st: StepState, layer: int) -> Generator:
    """Layer `layer` of a decode step: issue a fetch, QKV, write back, attend, FFN."""
    m.layer_start_s.append(m.env.now)
    work = st.layers[layer]
    t = m.times(work, st.context_len)
    gpu_ops: OpList = [("norm", layer, t.norm)]
    if not m.sc.policy.overlap:  # fetch its own K/V and wait: copy and compute serialise
        gpu_ops = yield from issue_fetch(m, st, layer, gpu_ops)
        for ready in (st.weights_ready[layer], st.kv_ready[layer]):
            if ready is not None:
                yield ready
    elif layer + 1 < len(st.layers):  # hide layer+1's copies behind this layer's compute
        gpu_ops = yield from issue_fetch(m, st, layer + 1, gpu_ops)
    if st.weights_ready[layer] is not None:
        yield st.weights_ready[layer]
    gpu_ops.append(("qkv", layer, t.qkv))
    if t.quantize:
        gpu_ops.append(("quantize", layer, t.quantize))
    if work.writeback_bytes > 0 and m.sc.placement.d2h_inline:  # the compute thread copies it itself
        gpu_ops.append(("writeback_kv", layer, t.writeback))
    if t.handoff:  # this layer's fetch and commit jobs take the GIL (and the core) from the compute thread
        gpu_ops.append(("handoff", layer, t.handoff))
    yield from m.hold("gpu", gpu_ops, st.step)
    if work.writeback_bytes > 0 and not m.sc.placement.d2h_inline:
        st.written[layer] = m.env.process(write_back(m, st.step, layer, t.writeback))
    if st.kv_ready[layer] is not None:
        yield st.kv_ready[layer]
    tail = [("dequantize", layer, t.dequantize)] if t.dequantize else []
    tail += [("attention", layer, t.attention)] + ([("score", layer, t.score)] if t.score else [])
    tail += [("norm", layer, t.norm), ("ffn", layer, t.ffn)]
    yield from m.hold("gpu", tail, st.step)


def decode_step(m: Machine, st: StepState) -> Generator:
    """One decode step: embed, every layer, final norm and LM head; it ends at sampling."""
    sc, n_layers = m.sc, len(st.layers)
    embed = sc.costs.compute_s("embed", sc.model, sc.batch, 1, 0)
    yield from m.hold("gpu", [("embed", -1, embed)], st.step)
    if sc.policy.overlap and n_layers:
        yield from issue_fetch(m, st, 0, [])  # nothing runs before layer 0 to hide it
    for layer in range(n_layers):
        yield from decode_layer(m, st, layer)
    head = [("norm", n_layers, sc.costs.compute_s("norm", sc.model, sc.batch, 1, 0)),
            ("lm_head", n_layers, sc.costs.compute_s("lm_head", sc.model, sc.batch, 1, 0))]
    yield from m.hold("gpu", head, st.step)
    st.end_s = m.env.now


class PrefillTimes(NamedTuple):
    """Seconds of the prefill ops; every layer runs the same ones."""

    embed: float
    before_store: list[tuple[str, float]]  # norm, QKV (+ InfiniGen partial-K setup, INT4 quantise)
    after_store: list[tuple[str, float]]  # attention, norm, FFN
    store: float  # one layer's prompt K/V, GPU->host (0 for ideal)
    weights: float  # the streamed share of one layer's weights, host->GPU
    head: list[tuple[str, float]]  # final norm and LM head (the first new token)


def measured_op(sc: Scenario, op: str) -> bool:
    """Whether the cost model prices runtime-only op `op` (costs.RUNTIME_OPS; optional in a CostModel)."""
    prices = getattr(sc.costs, "measured_ops", None)
    return prices is not None and op in prices()


def prefill_times(sc: Scenario) -> PrefillTimes:
    """Durations of the prefill of `sc`."""
    cost, model, batch, prompt, policy = sc.costs, sc.model, sc.batch, sc.prompt_len, sc.policy
    norm = cost.compute_s("norm", model, batch, prompt, 0)
    before = [("norm", norm), ("qkv", cost.compute_s("qkv", model, batch, prompt, 0))]
    if policy.name is PolicyName.INFINIGEN and measured_op(sc, "skew"):  # as the runtime measured it
        before.append(("skew", cost.compute_s("skew", model, batch, prompt, 0)))
    elif policy.name is PolicyName.INFINIGEN:  # the prompt's partial K cache: a partial projection per token
        before.append(("speculate", cost.compute_s("speculate", model, batch, prompt, 0,
                                                   partial_ratio=policy.partial_ratio)))
    if policy.name is PolicyName.H2O and measured_op(sc, "score"):  # the prompt's accumulated attention
        before.append(("score", cost.compute_s("score", model, batch, prompt, prompt)))
    if policy.name is PolicyName.INT4:
        before.append(("quantize", cost.compute_s("quantize", model, batch, prompt, 0)))
    stored = prompt if policy.offloaded else 0
    if policy.name is PolicyName.H2O:  # only the heavy-hitter + recent budget is kept
        stored = min(prompt, sum(h2o_budget(policy, prompt)))
    return PrefillTimes(
        embed=cost.compute_s("embed", model, batch, prompt, 0),
        before_store=before,
        after_store=[("attention", cost.compute_s("attention", model, batch, prompt, prompt)),
                     ("norm", norm), ("ffn", cost.compute_s("ffn", model, batch, prompt, 0))],
        store=cost.d2h_s(batch * stored * stored_bytes_per_token(policy, model, sc.dtype_bytes)),
        weights=cost.h2d_s(sc.streamed_weight_bytes, False),
        head=[("norm", cost.compute_s("norm", model, batch, 1, 0)),
              ("lm_head", cost.compute_s("lm_head", model, batch, 1, 0))],
    )


def store_kv(m: Machine, layer: int, seconds: float) -> Generator:
    """Copy one layer's prompt K/V GPU->host while the next layer computes."""
    yield from m.hold("d2h_link", [("store_kv", layer, seconds)], PREFILL)


def prefill(m: Machine, n_layers: int) -> Generator:
    """The prompt through `n_layers` layers; it ends when the GPU is done and every store landed."""
    t, overlap = prefill_times(m.sc), m.sc.policy.overlap
    yield from m.hold("gpu", [("embed", -1, t.embed)], PREFILL)
    weights: list[simpy.Event | None] = [None] * n_layers
    stores: list[simpy.Event | None] = [None] * n_layers
    for layer in range(n_layers):
        m.layer_start_s.append(m.env.now)
        for ahead in (layer, layer + 1) if overlap else (layer,):  # load the next layer's weights now
            if t.weights > 0 and ahead < n_layers and weights[ahead] is None:
                weights[ahead] = m.env.process(load_weights(m, PREFILL, ahead, t.weights))
        for event in (weights[layer], stores[layer - 2] if layer >= 2 else None):  # two staging buffers
            if event is not None:
                yield event
        before = [(op, layer, s) for op, s in t.before_store
                  if op != "skew" or layer >= m.sc.policy.full_fetch_layers]  # the runtime skews speculated layers
        if t.store > 0 and m.sc.placement.d2h_inline:  # the compute thread stores it before attending
            before.append(("store_kv", layer, t.store))
        yield from m.hold("gpu", before, PREFILL)
        if t.store > 0 and not m.sc.placement.d2h_inline:
            stores[layer] = m.env.process(store_kv(m, layer, t.store))
            if not overlap:  # copy and compute serialise
                yield stores[layer]
        yield from m.hold("gpu", [(op, layer, s) for op, s in t.after_store], PREFILL)
    yield from m.hold("gpu", [(op, n_layers, s) for op, s in t.head], PREFILL)
    for event in stores:
        if event is not None:
            yield event


def generate(m: Machine, marks: dict[int, float]) -> Generator:
    """Prefill, then every decode step back to back; `marks[step]` = when it ended."""
    sc = m.sc
    yield from prefill(m, sc.model.n_layers)
    marks[PREFILL] = m.env.now
    prev_writes = None
    for step in range(sc.n_decode_steps):
        context = sc.prompt_len + step
        layers = [layer_work(sc.policy, sc.model, layer, sc.batch, context, sc.prompt_len, sc.fetch_model,
                             sc.dtype_bytes)
                  for layer in range(sc.model.n_layers)]
        st = StepState(step, layers, context, prev_writes)
        yield from decode_step(m, st)
        marks[step] = m.env.now
        prev_writes = st.written


# ---- replay drivers --------------------------------------------------------------------------
@dataclass(frozen=True)
class SimResult:
    """What one replay measured."""

    prefill_s: float
    decode_s: float
    step_s: float  # the middle decode step
    busy_s: dict[str, float]  # seconds each resource worked on the middle decode step (prefill if none)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def bottleneck(self) -> str:
        """The resource busiest over the middle decode step (the first of RESOURCES on a tie)."""
        return max(RESOURCES, key=lambda resource: self.busy_s[resource])


def simulate(sc: Scenario, mode: str = "fast") -> SimResult:
    """Replay `sc` event by event (`full`) or accelerated (`fast`, within 0.5% of full)."""
    if mode == "full":
        return simulate_full(sc)
    if mode == "fast":
        return simulate_fast(sc)
    raise ValueError(f"unknown mode '{mode}'; expected fast or full")


def simulate_full(sc: Scenario, recorder: Recorder | None = None) -> SimResult:
    """Every layer of the prefill and of every decode step, in one environment."""
    m = Machine(sc, recorder)
    marks: dict[int, float] = {}
    m.env.process(generate(m, marks))
    m.env.run()
    n_steps = sc.n_decode_steps
    if n_steps == 0:
        return SimResult(marks[PREFILL], 0.0, 0.0, m.recorder.busy_s(PREFILL))
    mid = (n_steps - 1) // 2
    step_s = marks[mid] - marks[mid - 1]  # marks[-1] is the prefill's end
    return SimResult(marks[PREFILL], marks[n_steps - 1] - marks[PREFILL], step_s, m.recorder.busy_s(mid))


# ---- fast mode -------------------------------------------------------------------------------
# Two facts make a point cheap. (a) Layers with the same work reach a steady period after a few:
# replay KEEP_LAYERS of each run of identical layers and add the cut ones back at the period measured
# between the last kept ones (checked steady, else more are kept). (b) Within one regime (which
# resource bounds which segment) a decode step's time is affine in (context, fetched rows): fit it on
# a few replayed steps, sum it over all steps, and halve the range where the fit misses any sample.
KEEP_LAYERS = 8  # >= 5: the steady check compares two pairs of layer periods before the run's last
STEADY_RTOL = 1e-9  # two consecutive two-layer periods this close count as steady
FIT_RTOL = 1e-4  # largest miss of the step-time fit on its samples, relative to the step time
EXACT_STEPS = 6  # ranges with fewer steps are replayed step by step


def _layer_bounds(sc: Scenario) -> list[tuple[int, int]]:
    """(first layer, layers) of each range whose layers do the same work at every step."""
    n_layers = sc.model.n_layers
    firsts = {0, sc.policy.full_fetch_layers, *(group[0] for group in sc.fetch_model.groups)}
    bounds = sorted(b for b in firsts if 0 <= b < n_layers) + [n_layers]
    return [(lo, hi - lo) for lo, hi in zip(bounds, bounds[1:], strict=False)]


def layer_runs(sc: Scenario, context_len: int) -> list[tuple[LayerWork, int]]:
    """The layers of one decode step as (work, consecutive layers with it)."""
    runs: list[tuple[LayerWork, int]] = []
    for first, count in _layer_bounds(sc):
        work = layer_work(sc.policy, sc.model, first, sc.batch, context_len, sc.prompt_len, sc.fetch_model,
                          sc.dtype_bytes)
        if runs and runs[-1][0] == work:
            runs[-1] = (work, runs[-1][1] + count)
        else:
            runs.append((work, count))
    return runs


def _cut(counts: list[int], keep: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Layers kept per run (an even number cut, so a two-layer cycle keeps its phase), and
    (index of the run's last kept layer, layers cut) for each cut run."""
    kept = [count if count <= keep else keep + (count - keep) % 2 for count in counts]
    ends = [sum(kept[:i + 1]) - 1 for i in range(len(kept))]
    return kept, [(end, count - k) for end, count, k in zip(ends, counts, kept, strict=True) if count > k]


def _two_layer_period(starts: list[float], last: int) -> float | None:
    """Time two layers take before the run's last kept layer, if the two before that took as long."""
    recent, earlier = starts[last] - starts[last - 2], starts[last - 2] - starts[last - 4]
    return recent if abs(recent - earlier) <= STEADY_RTOL * max(abs(recent), 1e-12) else None


def _replay_cut(counts: list[int], replay) -> tuple[float, dict[str, float]]:
    """Replay runs of `counts` identical layers cut to a few each; add the cut layers back.

    `replay(kept)` runs the cut model and returns (end_s, machine, step id). Steady state may be a
    two-layer cycle (InfiniGen's gather and the compute stream alternate), so layers are cut in pairs.
    """
    keep = KEEP_LAYERS
    while True:
        kept, cuts = _cut(counts, keep)
        end_s, m, step = replay(kept)
        periods = [_two_layer_period(m.layer_start_s, last) for last, _ in cuts]
        if None not in periods:
            break
        keep *= 2
    busy = m.recorder.busy_s(step)
    for (last, dropped), period in zip(cuts, periods, strict=True):
        end_s += dropped // 2 * period
        for resource in RESOURCES:
            pair = (m.recorder.busy.get((step, layer, resource), 0.0) for layer in (last - 2, last - 1))
            busy[resource] += dropped // 2 * sum(pair)
    return end_s, busy


def _fast_step(sc: Scenario, context_len: int) -> tuple[float, dict[str, float]]:
    """Time and resource busy seconds of one decode step, replayed alone."""
    runs = layer_runs(sc, context_len)

    def replay(kept: list[int]) -> tuple[float, Machine, int]:
        m = Machine(sc)
        st = StepState(0, [work for (work, _), k in zip(runs, kept, strict=True) for _ in range(k)], context_len, None)
        m.env.process(decode_step(m, st))
        m.env.run()
        return st.end_s, m, 0

    return _replay_cut([count for _, count in runs], replay)


def _fast_prefill(sc: Scenario) -> tuple[float, dict[str, float]]:
    def replay(kept: list[int]) -> tuple[float, Machine, int]:
        m = Machine(sc)
        m.env.process(prefill(m, kept[0]))
        m.env.run()
        return m.env.now, m, PREFILL

    return _replay_cut([sc.model.n_layers], replay)


def _fetched_rows(sc: Scenario, context_len: int) -> int:
    """Rows per sequence fetched over all layers of one step (the second fit variable)."""
    return sum(count * fetch_tokens(sc.policy, first, context_len, sc.prompt_len, sc.fetch_model)
               for first, count in _layer_bounds(sc))


def _sum_steps(step_s, contexts: list[int], fetched: list[int], lo: int, hi: int) -> float:
    """Sum of step_s(s) for lo <= s <= hi from a fit t = a + b*context + c*fetched (see above)."""
    if hi - lo < EXACT_STEPS:
        return math.fsum(step_s(s) for s in range(lo, hi + 1))
    mid = (lo + hi) // 2
    slope = (fetched[hi] - fetched[lo]) / (hi - lo)
    bent = max(range(lo, hi + 1), key=lambda s: abs(fetched[s] - fetched[lo] - slope * (s - lo)))
    picks = {lo, mid, hi, bent}
    picks.add((lo + mid) // 2 if len(picks) < 4 else (mid + hi) // 2)
    span_c = contexts[hi] - contexts[lo]
    span_f = max(fetched[lo:hi + 1]) - min(fetched[lo:hi + 1]) or 1
    features = np.array([[1.0, (contexts[s] - contexts[lo]) / span_c, (fetched[s] - fetched[lo]) / span_f]
                         for s in range(lo, hi + 1)])
    rows = sorted(picks)
    times = np.array([step_s(s) for s in rows])
    coef = np.linalg.lstsq(features[[s - lo for s in rows]], times, rcond=None)[0]
    miss = np.abs(features[[s - lo for s in rows]] @ coef - times).max()
    if miss <= FIT_RTOL * times.max():
        return float(features.sum(axis=0) @ coef)
    return _sum_steps(step_s, contexts, fetched, lo, mid) + _sum_steps(step_s, contexts, fetched, mid + 1, hi)


def simulate_fast(sc: Scenario) -> SimResult:
    """Prefill and decode from a few cut layers and a few replayed steps (see above)."""
    prefill_s, prefill_busy = _fast_prefill(sc)
    n_steps = sc.n_decode_steps
    if n_steps == 0:
        return SimResult(prefill_s, 0.0, 0.0, prefill_busy)
    contexts = [sc.prompt_len + step for step in range(n_steps)]
    fetched = [_fetched_rows(sc, context) for context in contexts]
    replayed: dict[int, tuple[float, dict[str, float]]] = {}

    def step_s(step: int) -> float:
        if step not in replayed:
            replayed[step] = _fast_step(sc, contexts[step])
        return replayed[step][0]

    decode_s = _sum_steps(step_s, contexts, fetched, 0, n_steps - 1)
    mid = (n_steps - 1) // 2
    step_s(mid)
    return SimResult(prefill_s, decode_s, replayed[mid][0], replayed[mid][1])


def trace_ops(sc: Scenario) -> list[Op]:
    """Every op of a full replay of `sc`, for a timeline."""
    recorder = Recorder(keep_ops=True)
    simulate_full(sc, recorder)
    return recorder.ops


_TRACKS = {"gpu": (1, 1), "h2d_link": (1, 2), "d2h_link": (1, 3), "host_cpu": (2, 1)}  # (pid, tid)
_DEVICES = {1: "gpu", 2: "host"}


def chrome_trace(ops: Iterable[Op]) -> dict[str, Any]:
    """Chrome trace JSON (opens in Perfetto): one complete event per op, microseconds,
    pid = device (gpu, host), tid = resource; names come from metadata events."""
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}}
        for pid, name in _DEVICES.items()]
    events += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": resource}}
               for resource, (pid, tid) in _TRACKS.items()]
    for op in ops:
        pid, tid = _TRACKS[op.resource]
        start_us, end_us = round(op.start_s * 1e6, 3), round(op.end_s * 1e6, 3)
        events.append({"name": op.name, "cat": op.resource, "ph": "X", "ts": start_us,
                       "dur": round(end_us - start_us, 3), "pid": pid, "tid": tid,
                       "args": {"layer": op.layer, "step": "prefill" if op.step == PREFILL else op.step}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def chrome_trace_json(ops: Iterable[Op]) -> str:
    return json.dumps(chrome_trace(ops), separators=(",", ":"))
