"""What one op computes and moves: FLOPs and device-memory bytes, the one op byte model of both worlds.

The simulator's roofline (`cost.physics`) and the measured tables' fitted rooflines (`cost.tables`)
price ops from these figures; the profiler prints achieved GB/s and TFLOP/s against them.

Arguments, for the whole batch of `batch` sequences: `n_tokens` = tokens each sequence pushes through
the op (1 in decode, the prompt in prefill; the K/V rows converted for quantize/dequantize); `kv_len`
= cached tokens each sequence's attention / speculation reads, the new ones included (a decode
attention over K cached rows and the new one has kv_len = K + 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from infinigen_sim.spec.models import ModelSpec
from infinigen_sim.spec.ops import COMPUTE_OPS, Op, parse_op
from infinigen_sim.spec.runtime import KernelStyle

INT4_BYTES = 0.5  # one 4-bit code per K/V element


@dataclass(frozen=True)
class OpWork:
    """FLOPs and device-memory bytes one op moves."""

    flops: float
    hbm_bytes: float


def partial_cols(model: ModelSpec, partial_ratio: float) -> int:
    """Columns InfiniGen keeps per head: ceil(partial_ratio * head_dim)."""
    return math.ceil(partial_ratio * model.head_dim)


def causal_pairs(n_tokens: int, kv_len: int) -> float:
    """(query, key) pairs when `n_tokens` new tokens attend causally within `kv_len` cached ones."""
    old = max(kv_len - n_tokens, 0)
    return n_tokens * old + n_tokens * (n_tokens + 1) / 2


FUSED = KernelStyle()  # the roofline's ideal: every op reads and writes what it must, once


def _work_table(model: ModelSpec, batch: int, n_tokens: int, kv_len: int, partial_ratio: float,
                dtype_bytes: int, style: KernelStyle) -> dict[Op, Callable[[], OpWork]]:
    d, kv, by = model.d_model, model.kv_dim, dtype_bytes
    rows = batch * n_tokens  # token rows flowing through the op
    qkv_params = d * (d + 2 * kv)
    out_ffn_params = model.layer_matmul_params - qkv_params  # W_O + FFN matrices
    cols = partial_cols(model, partial_ratio) * model.n_heads
    kv_cols = partial_cols(model, partial_ratio) * model.n_kv_heads
    scores = batch * n_tokens * model.n_heads * kv_len  # one score per head per (query, key)
    elems = rows * 2 * kv  # K and V elements of `n_tokens` rows
    kv_rows = batch * kv_len * 2 * kv  # K and V elements attention reads
    attention_extra = 2.0 * style.decode_kv_passes * kv_rows if n_tokens == 1 else (
        style.prefill_score_bytes * batch * model.n_heads * n_tokens * kv_len / by
        if style.prefill_attention == "materialised" else 0.0)  # in elements of `by` bytes
    dequant_b = style.dequant_bytes_per_element if style.dequant_bytes_per_element is not None else by + INT4_BYTES
    quant_b = style.quant_bytes_per_element if style.quant_bytes_per_element is not None else by + INT4_BYTES
    partial_copy = 2.0 * batch * kv_len * kv_cols if style.partial_k_copy else 0.0  # read + write, elements
    return {
        Op.EMBED: lambda: OpWork(0.0, 2.0 * rows * d * by),
        Op.NORM: lambda: OpWork(5.0 * rows * d, 2.0 * rows * d * by),
        Op.QKV: lambda: OpWork(2.0 * rows * qkv_params, (qkv_params + rows * (2 * d + 2 * kv)) * by),
        Op.ATTENTION: lambda: OpWork(
            4.0 * model.n_heads * model.head_dim * batch * causal_pairs(n_tokens, kv_len),
            (kv_rows + rows * 2 * d + attention_extra) * by),
        Op.FFN: lambda: OpWork(2.0 * rows * out_ffn_params, (out_ffn_params + rows * (2 * d + model.d_ffn)) * by),
        Op.LM_HEAD: lambda: OpWork(float(model.lm_head_flops(rows)), (model.vocab_size * (d + rows)) * by),
        Op.SPECULATE: lambda: OpWork(
            2.0 * rows * d * cols + 2.0 * batch * n_tokens * cols * kv_len,
            (d * cols + batch * kv_len * kv_cols + scores + partial_copy) * by),
        Op.TOPK: lambda: OpWork(float(scores), scores * by + batch * kv_len * 4.0),
        Op.QUANTIZE: lambda: OpWork(4.0 * elems, elems * quant_b),
        Op.DEQUANTIZE: lambda: OpWork(2.0 * elems, elems * dequant_b),
        # rough shapes for extrapolating measured rows: Q^T Q and a K projection per token; scores
        Op.SKEW: lambda: OpWork(2.0 * rows * (model.n_heads * model.head_dim ** 2 + d * kv),
                                (d * (d + kv) + rows * d) * by),
        Op.SCORE: lambda: OpWork(
            2.0 * model.n_heads * model.head_dim * batch * causal_pairs(n_tokens, kv_len) + scores,
            (batch * kv_len * kv + scores) * by),
    }


def op_work(op: Op | str, model: ModelSpec, batch: int, n_tokens: int, kv_len: int,
            partial_ratio: float = 1.0, dtype_bytes: int = 2, style: KernelStyle = FUSED) -> OpWork:
    """FLOPs and HBM bytes of compute op `op` (see the module docstring for the arguments) in a runtime of
    kernel style `style` (extra passes over K/V, materialised prefill scores, dequantisation traffic)."""
    op = op if op.__class__ is Op else parse_op(op)
    table = _work_table(model, batch, n_tokens, kv_len, partial_ratio, dtype_bytes, style)
    if op not in table:
        raise ValueError(f"op '{op}' is not a compute op; compute ops: {', '.join(o.value for o in COMPUTE_OPS)}")
    return table[op]()
