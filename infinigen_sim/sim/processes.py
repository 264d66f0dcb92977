"""The SimPy processes of a replay: prefill, decode steps and their layers, and the copies they start.

Decode follows the runtime description's schedule (`spec.runtime.DecodeSchedule`, the point's
`Scenario.runtime`). This project's runtime (fetch_issue layer_start, overlap full): layer i issues
layer i+1's weight (when streamed) and K/V fetch at its start (InfiniGen: after speculating layer i+1
on the GPU, then indices D2H, host gather, H2D); attention waits for its K/V; the new token's K/V goes
back D2H after QKV. Other schedules: after_attention issues the fetch after the layer's attention
(speculation stays at the layer's start); fetch_overlap mlp makes the next layer wait for its fetch
before it starts, none waits at once; own_layer (and policy.overlap off, and the first
sync_fetch_layers) fetches a layer's own K/V and waits for it before computing.

The dispatching host thread (`dispatch`, GPU placement): each decode layer's ops and syncs cost it
`LayerTimes.dispatch`, and a layer's GPU work starts only once it is dispatched; with host syncs
(layer_sync or a host-synchronous speculation) it dispatches a layer only once the GPU finished the
previous one, so host and GPU times add up instead of overlapping. A gather on the main thread, a
pin_memory() relay and a host-synchronous (pageable) copy also occupy it.

Prefill runs the prompt layer by layer; offloaded policies store each layer's K/V D2H (PrefillSchedule:
beside the next layers through two staging buffers, beside the layer's own MLP and then waited for,
or waited for before the layer attends). A measured `skew` (InfiniGen's prefill) runs on the
speculated layers only, as in the runtime.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import simpy

from infinigen_sim.sim.machine import Machine, StepState, Work, WorkList
from infinigen_sim.sim.pricing import LayerTimes, prefill_times
from infinigen_sim.sim.scenario import PREFILL
from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.policies import PolicyName, layer_work


def load_weights(m: Machine, step: int, layer: int, seconds: float) -> Generator:
    """Copy the streamed share of `layer`'s weights host->GPU."""
    yield from m.hold(m.h2d, [Work(Op.H2D, layer, seconds, "weights")], step)


def copy(m: Machine, resource: str, work: Work, step: int, blocks: bool) -> Generator:
    """One copy on `resource`; a host-synchronous one occupies the dispatching thread as long."""
    if blocks:
        with m.resources["dispatch"].request() as req:
            yield req
            yield from m.hold(resource, [work], step)
    else:
        yield from m.hold(resource, [work], step)


def prefetch(m: Machine, st: StepState, layer: int, t: LayerTimes) -> Generator:
    """Copy `layer`'s K/V rows host->GPU; InfiniGen first sends indices down and gathers the rows."""
    work = st.layers[layer]
    if work.gathered and not m.sc.placement.d2h_inline:  # inline: sent on the compute stream already
        yield from m.hold("d2h_link", [Work(Op.D2H, layer, t.indices, "indices")], st.step)
    if st.prev_writes and st.prev_writes[layer] is not None:
        yield st.prev_writes[layer]  # the host copy must hold last step's token before it is read
    ops: WorkList = [Work(Op.JOB, layer, t.job)] if t.job else []  # the job's own Python, on the worker
    if work.gathered:
        host = [*ops, Work(Op.GATHER, layer, t.gather)]
        if t.fetch_memcpy:  # the rows land in a temporary first, then are copied into the pinned staging
            host.append(Work(Op.COMMIT, layer, t.fetch_memcpy, "staging"))
        yield from m.hold(m.gather, host, st.step)
        ops = []
        if st.gathered[layer] is not None:
            st.gathered[layer].succeed()  # the dispatching thread may go on
    elif t.fetch_memcpy:  # a pin_memory() relay of the pageable rows, on the dispatching thread
        yield from m.hold("dispatch", [Work(Op.COMMIT, layer, t.fetch_memcpy, "relay")], st.step)
    fetch = Work(Op.H2D, layer, t.fetch, "kv")
    if ops:  # the job's own Python, then its copy, back to back on the worker (CPU runtime)
        yield from m.hold(m.h2d, [*ops, fetch], st.step)
    else:
        yield from copy(m, m.h2d, fetch, st.step, t.fetch_blocks)


def write_back(m: Machine, step: int, layer: int, t: LayerTimes) -> Generator:
    """Copy the new token's K/V of `layer` GPU->host (INT4: already quantised)."""
    yield from copy(m, "d2h_link", Work(Op.D2H, layer, t.writeback, "row"), step, t.writeback_blocks)


def speculation(m: Machine, st: StepState, layer: int) -> WorkList:
    """InfiniGen: the compute-stream ops that choose `layer`'s rows (run before the host can gather)."""
    work = st.layers[layer]
    if not (work.speculate and work.fetch_bytes > 0):
        return []
    t = m.times(work, st.context_len)
    spec = [Work(Op.SPECULATE, layer, t.speculate), Work(Op.TOPK, layer, t.topk)]
    if m.sc.placement.d2h_inline:  # the chosen indices go to the host before the next kernel
        spec.append(Work(Op.D2H, layer, t.indices, "indices"))
    return spec


def start_fetch(m: Machine, st: StepState, layer: int) -> None:
    """Start `layer`'s K/V copy (its rows already chosen, for InfiniGen)."""
    work = st.layers[layer]
    if work.fetch_bytes > 0:
        if work.gathered and m.sc.runtime.gather.thread == "main":
            st.gathered[layer] = m.env.event()  # the dispatching thread gathers: its next ops wait for it
        st.kv_ready[layer] = m.env.process(prefetch(m, st, layer, m.times(work, st.context_len)))


def issue_fetch(m: Machine, st: StepState, layer: int, gpu_ops: WorkList) -> Generator[Any, Any, WorkList]:
    """Start `layer`'s weight and K/V copies; returns the GPU ops not yet run.

    InfiniGen speculates first: `gpu_ops` (the issuing layer's norm) then speculation and top-k run
    on the compute stream, since the chosen indices must exist before the host can gather.
    """
    t = m.times(st.layers[layer], st.context_len)
    if t.weights > 0:
        st.weights_ready[layer] = m.env.process(load_weights(m, st.step, layer, t.weights))
    spec = speculation(m, st, layer)
    if spec:
        yield from m.hold("gpu", gpu_ops + spec, st.step)
        gpu_ops = []
    start_fetch(m, st, layer)
    return gpu_ops


def own_fetch(m: Machine, st: StepState, layer: int) -> bool:
    """Whether `layer` fetches its own K/V and waits for it (no prefetch during the previous layer)."""
    decode = m.sc.runtime.decode
    return not m.sc.policy.overlap or decode.fetch_issue == "own_layer" or layer < decode.sync_fetch_layers


def decode_layer(m: Machine, st: StepState, layer: int) -> Generator:
    """Layer `layer` of a decode step: issue a fetch, QKV, write back, attend, FFN."""
    m.layer_start_s.append(m.env.now)
    work = st.layers[layer]
    t = m.times(work, st.context_len)
    decode = m.sc.runtime.decode
    dispatched = st.dispatched[layer] if st.dispatched else None
    for ready in (dispatched, st.kv_ready[layer] if decode.fetch_overlap == "mlp" else None):
        if ready is not None:
            yield ready  # dispatched by the host; with overlap `mlp` the previous layer's end joined the fetch
    gpu_ops: WorkList = [Work(Op.NORM, layer, t.norm)]
    nxt = layer + 1 if layer + 1 < len(st.layers) and not own_fetch(m, st, layer + 1) else None
    if own_fetch(m, st, layer):  # fetch its own K/V and wait: copy and compute serialise
        gpu_ops = yield from issue_fetch(m, st, layer, gpu_ops)
        for ready in (st.weights_ready[layer], st.kv_ready[layer]):
            if ready is not None:
                yield ready
    if nxt is not None and decode.fetch_issue == "layer_start":  # hide layer+1's copies behind this layer
        gpu_ops = yield from issue_fetch(m, st, nxt, gpu_ops)
    elif nxt is not None:  # after_attention: layer+1 is speculated now, its copy issued after attention
        gpu_ops += speculation(m, st, nxt)
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
        st.written[layer] = m.env.process(write_back(m, st.step, layer, t))
    if st.kv_ready[layer] is not None:
        yield st.kv_ready[layer]
    yield from attend_and_finish(m, st, layer, nxt, t)


def attend_and_finish(m: Machine, st: StepState, layer: int, nxt: int | None, t: LayerTimes) -> Generator:
    """Attention, then the output projection and MLP; an after_attention schedule issues layer+1's copy
    between them (its host gather, when on the dispatching thread, before the MLP is dispatched)."""
    tail = [Work(Op.DEQUANTIZE, layer, t.dequantize)] if t.dequantize else []
    tail += [Work(Op.ATTENTION, layer, t.attention)] + ([Work(Op.SCORE, layer, t.score)] if t.score else [])
    mlp = [Work(Op.NORM, layer, t.norm), Work(Op.FFN, layer, t.ffn)]
    decode = m.sc.runtime.decode
    if nxt is None or decode.fetch_issue == "layer_start":
        yield from m.hold("gpu", tail + mlp, st.step)
    else:
        yield from m.hold("gpu", tail, st.step)
        nt = m.times(st.layers[nxt], st.context_len)
        if nt.weights > 0:
            st.weights_ready[nxt] = m.env.process(load_weights(m, st.step, nxt, nt.weights))
        start_fetch(m, st, nxt)
        if st.gathered[nxt] is not None:
            yield st.gathered[nxt]
        yield from m.hold("gpu", mlp, st.step)
    if nxt is not None and decode.fetch_overlap == "none" and st.kv_ready[nxt] is not None:
        yield st.kv_ready[nxt]
    if st.layer_done:
        st.layer_done[layer].succeed()


def dispatch(m: Machine, st: StepState) -> Generator:
    """The dispatching host thread: each layer's ops and syncs, in order; with host syncs, a layer only
    once the GPU has finished the previous one."""
    decode, sc = m.sc.runtime.decode, m.sc
    waits = decode.layer_sync or (decode.speculation_sync == "host" and sc.policy.name is PolicyName.INFINIGEN)
    for layer, work in enumerate(st.layers):
        if waits and layer > 0:
            yield st.layer_done[layer - 1]
        yield from m.hold("dispatch", [Work(Op.DISPATCH, layer, m.times(work, st.context_len).dispatch)], st.step)
        st.dispatched[layer].succeed()


def decode_step(m: Machine, st: StepState, next_st: StepState | None = None) -> Generator:
    """One decode step: embed, every layer, final norm and LM head; it ends at sampling. With first_fetch
    previous_tail, the last layer issues `next_st`'s layer-0 fetch as it starts."""
    sc, n_layers = m.sc, len(st.layers)
    tail_issue = next_st is not None and sc.runtime.decode.first_fetch == "previous_tail" and not own_fetch(m, st, 0)
    if any(m.times(work, st.context_len).dispatch > 0 for work in st.layers):
        st.dispatched = [m.env.event() for _ in range(n_layers)]
        st.layer_done = [m.env.event() for _ in range(n_layers)]
        m.env.process(dispatch(m, st))
    embed = sc.costs.compute_s(Op.EMBED, sc.model, sc.batch, 1, 0)
    yield from m.hold("gpu", [Work(Op.EMBED, -1, embed)], st.step)
    if n_layers and not own_fetch(m, st, 0) and st.kv_ready[0] is None:
        yield from issue_fetch(m, st, 0, [])  # nothing runs before layer 0 to hide it
    for layer in range(n_layers):
        if tail_issue and layer == n_layers - 1:
            next_st.prev_writes = st.written  # its layer 0 reads this step's row of layer 0 (written by now)
            yield from issue_fetch(m, next_st, 0, [])
        yield from decode_layer(m, st, layer)
    head = [Work(Op.NORM, n_layers, sc.costs.compute_s(Op.NORM, sc.model, sc.batch, 1, 0)),
            Work(Op.LM_HEAD, n_layers, sc.costs.compute_s(Op.LM_HEAD, sc.model, sc.batch, 1, 0))]
    yield from m.hold("gpu", head, st.step)
    st.end_s = m.env.now


def store_kv(m: Machine, layer: int, seconds: float, blocks: bool) -> Generator:
    """Copy one layer's prompt K/V GPU->host while the next layer computes."""
    yield from copy(m, "d2h_link", Work(Op.D2H, layer, seconds, "prompt"), PREFILL, blocks)


def prefill(m: Machine, n_layers: int) -> Generator:
    """The prompt through `n_layers` layers; it ends when the GPU is done and every store landed."""
    t, overlap, store = prefill_times(m.sc), m.sc.policy.overlap, m.sc.runtime.prefill.store
    blocks = m.sc.pageable_kv
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
        seconds = t.store[layer]
        if seconds > 0 and m.sc.placement.d2h_inline:  # the compute thread stores it before attending
            before.append(Work(Op.D2H, layer, seconds, "prompt"))
        after = [Work(op, layer, s) for op, s in t.after_store]
        if seconds > 0 and not m.sc.placement.d2h_inline and store == "mlp" and overlap:
            yield from m.hold("gpu", before + after[:1], PREFILL)  # attention, then the store beside the MLP
            stores[layer] = m.env.process(store_kv(m, layer, seconds, blocks))
            yield from m.hold("gpu", after[1:], PREFILL)
            yield stores[layer]
            continue
        yield from m.hold("gpu", before, PREFILL)
        if seconds > 0 and not m.sc.placement.d2h_inline:
            stores[layer] = m.env.process(store_kv(m, layer, seconds, blocks))
            if not overlap or store == "serialised":  # copy and compute serialise
                yield stores[layer]
        yield from m.hold("gpu", after, PREFILL)
    yield from m.hold("gpu", [Work(op, n_layers, s) for op, s in t.head], PREFILL)
    for event in stores:
        if event is not None:
            yield event


def generate(m: Machine, marks: dict[int, float]) -> Generator:
    """Prefill, then every decode step back to back; `marks[step]` = when it ended."""
    sc = m.sc
    yield from prefill(m, sc.model.n_layers)
    marks[PREFILL] = m.env.now
    st = step_state(sc, 0, None) if sc.n_decode_steps else None
    for step in range(sc.n_decode_steps):
        nxt = step_state(sc, step + 1, st.written) if step + 1 < sc.n_decode_steps else None
        yield from decode_step(m, st, nxt)
        marks[step] = m.env.now
        st = nxt


def step_state(sc, step: int, prev_writes: list | None) -> StepState:
    """Decode step `step`'s inputs: every layer's work at its context (prompt + step cached tokens)."""
    context = sc.prompt_len + step
    layers = [layer_work(sc.policy, sc.model, layer, sc.batch, context, sc.prompt_len, sc.fetch_model, sc.dtype_bytes)
              for layer in range(sc.model.n_layers)]
    return StepState(step, layers, context, prev_writes)
