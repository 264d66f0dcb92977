"""The SimPy processes of a replay: prefill, decode steps and their layers, and the copies they start.

Decode follows the step schedule in `infinigen_sim.spec.policies`: with overlap, layer i issues layer
i+1's weight (when streamed) and K/V fetch at its start (InfiniGen: after speculating layer i+1 on
the GPU, then indices D2H, host gather, H2D); without overlap a layer issues its own fetch and waits
for it before computing. Attention waits for its K/V; the new token's K/V goes back D2H after QKV.
Prefill runs the prompt layer by layer; offloaded policies store each layer's K/V D2H while the
next layer computes, through two staging buffers (layer i waits for the store of layer i-2).
A measured `skew` (InfiniGen's prefill) runs on the speculated layers only, as in the runtime.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import simpy

from infinigen_sim.sim.machine import Machine, StepState, Work, WorkList
from infinigen_sim.sim.pricing import LayerTimes, prefill_times
from infinigen_sim.sim.scenario import PREFILL
from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.policies import layer_work


def load_weights(m: Machine, step: int, layer: int, seconds: float) -> Generator:
    """Copy the streamed share of `layer`'s weights host->GPU."""
    yield from m.hold(m.h2d, [Work(Op.H2D, layer, seconds, "weights")], step)


def prefetch(m: Machine, st: StepState, layer: int, t: LayerTimes) -> Generator:
    """Copy `layer`'s K/V rows host->GPU; InfiniGen first sends indices down and gathers the rows."""
    work = st.layers[layer]
    if work.gathered and not m.sc.placement.d2h_inline:  # inline: sent on the compute stream already
        yield from m.hold("d2h_link", [Work(Op.D2H, layer, t.indices, "indices")], st.step)
    if st.prev_writes and st.prev_writes[layer] is not None:
        yield st.prev_writes[layer]  # the host copy must hold last step's token before it is read
    ops: WorkList = [Work(Op.JOB, layer, t.job)] if t.job else []  # the job's own Python, on the worker
    if work.gathered:
        yield from m.hold(m.gather, [*ops, Work(Op.GATHER, layer, t.gather)], st.step)
        ops = []
    yield from m.hold(m.h2d, [*ops, Work(Op.H2D, layer, t.fetch, "kv")], st.step)


def write_back(m: Machine, step: int, layer: int, seconds: float) -> Generator:
    """Copy the new token's K/V of `layer` GPU->host (INT4: already quantised)."""
    yield from m.hold("d2h_link", [Work(Op.D2H, layer, seconds, "row")], step)


def issue_fetch(m: Machine, st: StepState, layer: int, gpu_ops: WorkList) -> Generator[Any, Any, WorkList]:
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
        spec = [Work(Op.SPECULATE, layer, t.speculate), Work(Op.TOPK, layer, t.topk)]
        if m.sc.placement.d2h_inline:  # the chosen indices go to the host before the next kernel
            spec.append(Work(Op.D2H, layer, t.indices, "indices"))
        yield from m.hold("gpu", gpu_ops + spec, st.step)
        gpu_ops = []
    st.kv_ready[layer] = m.env.process(prefetch(m, st, layer, t))
    return gpu_ops


def decode_layer(m: Machine, st: StepState, layer: int) -> Generator:
    """Layer `layer` of a decode step: issue a fetch, QKV, write back, attend, FFN."""
    m.layer_start_s.append(m.env.now)
    work = st.layers[layer]
    t = m.times(work, st.context_len)
    gpu_ops: WorkList = [Work(Op.NORM, layer, t.norm)]
    if not m.sc.policy.overlap:  # fetch its own K/V and wait: copy and compute serialise
        gpu_ops = yield from issue_fetch(m, st, layer, gpu_ops)
        for ready in (st.weights_ready[layer], st.kv_ready[layer]):
            if ready is not None:
                yield ready
    elif layer + 1 < len(st.layers):  # hide layer+1's copies behind this layer's compute
        gpu_ops = yield from issue_fetch(m, st, layer + 1, gpu_ops)
    if st.weights_ready[layer] is not None:
        yield st.weights_ready[layer]
    gpu_ops.append(Work(Op.QKV, layer, t.qkv))
    if t.quantize:
        gpu_ops.append(Work(Op.QUANTIZE, layer, t.quantize))
    if work.writeback_bytes > 0 and m.sc.placement.d2h_inline:  # the compute thread copies it itself
        gpu_ops.append(Work(Op.D2H, layer, t.writeback, "row"))
    if t.handoff:  # this layer's fetch and commit jobs take the GIL (and the core) from the compute thread
        gpu_ops.append(Work(Op.HANDOFF, layer, t.handoff))
    yield from m.hold("gpu", gpu_ops, st.step)
    if work.writeback_bytes > 0 and not m.sc.placement.d2h_inline:
        st.written[layer] = m.env.process(write_back(m, st.step, layer, t.writeback))
    if st.kv_ready[layer] is not None:
        yield st.kv_ready[layer]
    tail = [Work(Op.DEQUANTIZE, layer, t.dequantize)] if t.dequantize else []
    tail += [Work(Op.ATTENTION, layer, t.attention)] + ([Work(Op.SCORE, layer, t.score)] if t.score else [])
    tail += [Work(Op.NORM, layer, t.norm), Work(Op.FFN, layer, t.ffn)]
    yield from m.hold("gpu", tail, st.step)


def decode_step(m: Machine, st: StepState) -> Generator:
    """One decode step: embed, every layer, final norm and LM head; it ends at sampling."""
    sc, n_layers = m.sc, len(st.layers)
    embed = sc.costs.compute_s(Op.EMBED, sc.model, sc.batch, 1, 0)
    yield from m.hold("gpu", [Work(Op.EMBED, -1, embed)], st.step)
    if sc.policy.overlap and n_layers:
        yield from issue_fetch(m, st, 0, [])  # nothing runs before layer 0 to hide it
    for layer in range(n_layers):
        yield from decode_layer(m, st, layer)
    head = [Work(Op.NORM, n_layers, sc.costs.compute_s(Op.NORM, sc.model, sc.batch, 1, 0)),
            Work(Op.LM_HEAD, n_layers, sc.costs.compute_s(Op.LM_HEAD, sc.model, sc.batch, 1, 0))]
    yield from m.hold("gpu", head, st.step)
    st.end_s = m.env.now



def store_kv(m: Machine, layer: int, seconds: float) -> Generator:
    """Copy one layer's prompt K/V GPU->host while the next layer computes."""
    yield from m.hold("d2h_link", [Work(Op.D2H, layer, seconds, "prompt")], PREFILL)


def prefill(m: Machine, n_layers: int) -> Generator:
    """The prompt through `n_layers` layers; it ends when the GPU is done and every store landed."""
    t, overlap = prefill_times(m.sc), m.sc.policy.overlap
    yield from m.hold("gpu", [Work(Op.EMBED, -1, t.embed)], PREFILL)
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
        before = [Work(op, layer, s) for op, s in t.before_store
                  if op is not Op.SKEW or layer >= m.sc.policy.full_fetch_layers]  # the runtime skews speculated layers
        if t.store > 0 and m.sc.placement.d2h_inline:  # the compute thread stores it before attending
            before.append(Work(Op.D2H, layer, t.store, "prompt"))
        yield from m.hold("gpu", before, PREFILL)
        if t.store > 0 and not m.sc.placement.d2h_inline:
            stores[layer] = m.env.process(store_kv(m, layer, t.store))
            if not overlap:  # copy and compute serialise
                yield stores[layer]
        yield from m.hold("gpu", [Work(op, layer, s) for op, s in t.after_store], PREFILL)
    yield from m.hold("gpu", [Work(op, n_layers, s) for op, s in t.head], PREFILL)
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


