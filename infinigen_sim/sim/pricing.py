"""What every op of a layer costs at one point: the replay's durations, asked of the point's cost model once
per (layer work, context) in decode and once per prefill."""

from __future__ import annotations

from typing import NamedTuple

from infinigen_sim.sim.scenario import INDEX_BYTES, Scenario
from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.policies import LayerWork, PolicyName, h2o_kept, stored_bytes_per_token


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
    fetch_memcpy: float = 0.0  # a host copy before the fetch's DMA: a pin_memory() relay or a gather's temporary
    fetch_blocks: bool = False  # the fetch is host-synchronous (a direct copy from pageable memory)
    writeback_blocks: bool = False  # the new row's D2H is host-synchronous (into pageable memory)
    dispatch: float = 0.0  # what the dispatching host thread pays for the layer's ops and syncs


def measured_op(sc: Scenario, op: Op) -> bool:
    """Whether the cost model prices runtime-only op `op` (spec.ops.MEASURED_OPS)."""
    return op in sc.costs.measured_ops()


def layer_times(sc: Scenario, work: LayerWork, context_len: int) -> LayerTimes:
    """Durations of `work` at a step whose cache holds `context_len` tokens."""
    cost, model, batch = sc.costs, sc.model, sc.batch
    spec = work.speculate
    handoff = sc.placement.handoff and work.writeback_bytes > 0  # the CPU runtime hands the layer's jobs over
    memory, gather = sc.runtime.memory, sc.runtime.gather
    host_model = sc.placement.dispatch  # the CPU runtime's copies are memcpys, priced as measured
    pageable = sc.pageable_kv
    relay = pageable and memory.pageable_copy == "relay" and not work.gathered  # gathered rows: pinned staging
    temporary = host_model and work.gathered and gather.via_temporary
    rows = batch * work.fetch_tokens * model.n_kv_heads * 2  # one per (sequence, KV head) and plane (K, V)
    return LayerTimes(
        norm=cost.compute_s(Op.NORM, model, batch, 1, 0),
        qkv=cost.compute_s(Op.QKV, model, batch, 1, 0),
        quantize=cost.compute_s(Op.QUANTIZE, model, batch, 1, 0) if work.quant_elems else 0.0,
        dequantize=cost.compute_s(Op.DEQUANTIZE, model, batch, work.fetch_tokens, 0) if work.dequant_elems else 0.0,
        attention=cost.compute_s(Op.ATTENTION, model, batch, 1, work.attend_tokens),
        ffn=cost.compute_s(Op.FFN, model, batch, 1, 0),
        speculate=cost.compute_s(Op.SPECULATE, model, batch, 1, context_len,
                                 partial_ratio=sc.policy.partial_ratio) if spec else 0.0,
        topk=cost.compute_s(Op.TOPK, model, batch, 1, context_len) if spec else 0.0,
        indices=cost.d2h_s(batch * work.fetch_tokens * INDEX_BYTES) if work.gathered else 0.0,
        gather=cost.gather_s(work.fetch_bytes, rows) if work.gathered else 0.0,
        fetch=cost.h2d_s(work.fetch_bytes, work.gathered, pageable and not relay and not work.gathered),
        writeback=cost.d2h_s(work.writeback_bytes, pageable),
        weights=cost.h2d_s(sc.streamed_weight_bytes, False),
        score=cost.compute_s(Op.SCORE, model, batch, 1, work.attend_tokens)
        if sc.policy.name is PolicyName.H2O and measured_op(sc, Op.SCORE) else 0.0,
        handoff=float(cost.handoff_s(work.fetch_bytes)) if handoff else 0.0,
        job=float(cost.job_s()) if handoff else 0.0,
        fetch_memcpy=cost.memcpy_s(work.fetch_bytes) if relay or temporary else 0.0,
        fetch_blocks=pageable and not relay and not work.gathered and work.fetch_bytes > 0,
        writeback_blocks=pageable and work.writeback_bytes > 0,
        dispatch=float(cost.dispatch_s(sc.policy.name, model.family.value)) if host_model else 0.0,
    )


class PrefillTimes(NamedTuple):
    """Seconds of the prefill ops; every layer runs the same ones."""

    embed: float
    before_store: list[tuple[Op, float]]  # norm, QKV (+ InfiniGen partial-K setup, INT4 quantise)
    after_store: list[tuple[Op, float]]  # attention, norm, FFN
    store: tuple[float, ...]  # each layer's prompt K/V, GPU->host (0 for ideal)
    weights: float  # the streamed share of one layer's weights, host->GPU
    head: list[tuple[Op, float]]  # final norm and LM head (the first new token)


def prefill_times(sc: Scenario) -> PrefillTimes:
    """Durations of the prefill of `sc`."""
    cost, model, batch, prompt, policy = sc.costs, sc.model, sc.batch, sc.prompt_len, sc.policy
    norm = cost.compute_s(Op.NORM, model, batch, prompt, 0)
    before = [(Op.NORM, norm), (Op.QKV, cost.compute_s(Op.QKV, model, batch, prompt, 0))]
    if policy.name is PolicyName.INFINIGEN and measured_op(sc, Op.SKEW):  # as the runtime measured it
        before.append((Op.SKEW, cost.compute_s(Op.SKEW, model, batch, prompt, 0)))
    elif policy.name is PolicyName.INFINIGEN:  # the prompt's partial K cache: a partial projection per token
        before.append((Op.SPECULATE, cost.compute_s(Op.SPECULATE, model, batch, prompt, 0,
                                                    partial_ratio=policy.partial_ratio)))
    if policy.name is PolicyName.H2O and measured_op(sc, Op.SCORE):  # the prompt's accumulated attention
        before.append((Op.SCORE, cost.compute_s(Op.SCORE, model, batch, prompt, prompt)))
    if policy.name is PolicyName.INT4:
        before.append((Op.QUANTIZE, cost.compute_s(Op.QUANTIZE, model, batch, prompt, 0)))
    pageable = sc.pageable_kv
    per_token = stored_bytes_per_token(policy, model, sc.dtype_bytes)

    def store_s(layer: int) -> float:
        stored = prompt if policy.offloaded else 0
        if policy.name is PolicyName.H2O:  # only the heavy-hitter + recent budget is kept
            stored = h2o_kept(policy, prompt, layer)
        return cost.d2h_s(batch * stored * per_token, pageable)

    distinct = policy.head_layers if policy.name is PolicyName.H2O else 0  # layers with budgets of their own
    stores = [store_s(layer) for layer in range(min(distinct + 1, model.n_layers))]
    return PrefillTimes(
        embed=cost.compute_s(Op.EMBED, model, batch, prompt, 0),
        before_store=before,
        after_store=[(Op.ATTENTION, cost.compute_s(Op.ATTENTION, model, batch, prompt, prompt)),
                     (Op.NORM, norm), (Op.FFN, cost.compute_s(Op.FFN, model, batch, prompt, 0))],
        store=tuple(stores + [stores[-1]] * (model.n_layers - len(stores))),
        weights=cost.h2d_s(sc.streamed_weight_bytes, False),
        head=[(Op.NORM, cost.compute_s(Op.NORM, model, batch, 1, 0)),
              (Op.LM_HEAD, cost.compute_s(Op.LM_HEAD, model, batch, 1, 0))],
    )
