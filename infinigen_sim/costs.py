"""What a point costs: op and transfer times behind one interface, and the memory it needs.

`CostModel` is the interface the SimPy replay (`pipeline.py`) asks for every duration. The default,
`PhysicsCosts`, is a roofline over the hardware YAML; a measured profile bundle (`bundle.py`) will
plug in as another `CostModel` keyed the same way as its `kernels.csv` / `transfers.csv` tables.

Op names are the runtime's phases (`profiler.runtime`):
  embed       token (+ position) embedding of the new tokens
  norm        one LayerNorm / RMSNorm (a layer runs two)
  qkv         the Q, K and V projections
  attention   scores, softmax and weighted sum over `kv_len` K/V rows (memory-bound in decode)
  ffn         the output projection W_O and the feed-forward block
  lm_head     the vocabulary projection
  speculate   InfiniGen: partial query projection (d_model x partial_ratio*head_dim*n_heads) and
              partial scores against `kv_len` rows of the partial K cache
  topk        InfiniGen: threshold (max - alpha) and select over the speculated scores
  quantize    INT4: group-wise 4-bit quantisation of `n_tokens` K/V rows
  dequantize  INT4: back to FP16 for `n_tokens` K/V rows
Runtime-only ops, priced only by a cost model that measured them (`measured_ops`; the replay leaves
them out otherwise, so physics sweeps are unchanged):
  skew        InfiniGen prefill: skewing matrices, folded weights and the partial K cache of a layer
  score       H2O: accumulated attention of the prompt (prefill), the per-step score update (decode)
Arguments, for the whole batch of `batch` sequences: `n_tokens` = tokens each sequence pushes through
the op (1 in decode, the prompt in prefill; rows converted for quantize/dequantize); `kv_len` = cached
tokens each sequence's attention/speculation reads, the new ones included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from infinigen_sim.hardware import HardwareConfig
from infinigen_sim.models import ModelSpec
from infinigen_sim.policies import PolicyConfig, PolicyName, kv_memory

OPS = ("embed", "norm", "qkv", "attention", "ffn", "lm_head", "speculate", "topk", "quantize", "dequantize")
RUNTIME_OPS = ("skew", "score")  # priced only from measurements; see the module docstring
GIB = 2**30
INT4_BYTES = 0.5  # one 4-bit code per K/V element


class CostError(ValueError):
    """An op name or argument a cost model cannot price."""


@runtime_checkable
class CostModel(Protocol):
    """Seconds for every op and transfer the replay schedules."""

    def compute_s(self, op: str, model: ModelSpec, batch: int, n_tokens: int, kv_len: int,
                  *, partial_ratio: float = 1.0) -> float:
        """GPU time of `op` (one of OPS) for `batch` sequences; `partial_ratio` is for speculate."""
        ...

    def h2d_s(self, nbytes: float, gathered: bool) -> float:
        """Host-to-GPU copy of `nbytes`; `gathered` = from the gather staging buffer."""
        ...

    def d2h_s(self, nbytes: float) -> float:
        """GPU-to-host copy of `nbytes`."""
        ...

    def gather_s(self, nbytes: float, rows: int) -> float:
        """Host CPU gather of `rows` scattered K/V rows (`nbytes` in all) into a staging buffer."""
        ...

    def describe(self) -> dict[str, Any]:
        """Everything that decides the numbers, for config.yaml."""
        ...


@dataclass(frozen=True)
class OpWork:
    """FLOPs and device-memory bytes one op moves."""

    flops: float
    hbm_bytes: float


def _partial_cols(model: ModelSpec, partial_ratio: float) -> int:
    return math.ceil(partial_ratio * model.head_dim)


def _causal_pairs(n_tokens: int, kv_len: int) -> float:
    """(query, key) pairs when `n_tokens` new tokens attend causally within `kv_len` cached ones."""
    old = max(kv_len - n_tokens, 0)
    return n_tokens * old + n_tokens * (n_tokens + 1) / 2


def _work_table(model: ModelSpec, batch: int, n_tokens: int, kv_len: int, partial_ratio: float,
                dtype_bytes: int) -> dict[str, Callable[[], OpWork]]:
    d, kv, by = model.d_model, model.kv_dim, dtype_bytes
    rows = batch * n_tokens  # token rows flowing through the op
    qkv_params = d * (d + 2 * kv)
    out_ffn_params = model.layer_matmul_params - qkv_params  # W_O + FFN matrices
    cols = _partial_cols(model, partial_ratio) * model.n_heads
    kv_cols = _partial_cols(model, partial_ratio) * model.n_kv_heads
    scores = batch * n_tokens * model.n_heads * kv_len  # one score per head per (query, key)
    elems = rows * 2 * kv  # K and V elements of `n_tokens` rows
    return {
        "embed": lambda: OpWork(0.0, 2.0 * rows * d * by),
        "norm": lambda: OpWork(5.0 * rows * d, 2.0 * rows * d * by),
        "qkv": lambda: OpWork(2.0 * rows * qkv_params, (qkv_params + rows * (2 * d + 2 * kv)) * by),
        "attention": lambda: OpWork(
            4.0 * model.n_heads * model.head_dim * batch * _causal_pairs(n_tokens, kv_len),
            (batch * kv_len * 2 * kv + rows * 2 * d) * by),
        "ffn": lambda: OpWork(2.0 * rows * out_ffn_params, (out_ffn_params + rows * (2 * d + model.d_ffn)) * by),
        "lm_head": lambda: OpWork(float(model.lm_head_flops(rows)), (model.vocab_size * (d + rows)) * by),
        "speculate": lambda: OpWork(
            2.0 * rows * d * cols + 2.0 * batch * n_tokens * cols * kv_len,
            (d * cols + batch * kv_len * kv_cols + scores) * by),
        "topk": lambda: OpWork(float(scores), scores * by + batch * kv_len * 4.0),
        "quantize": lambda: OpWork(4.0 * elems, elems * (by + INT4_BYTES)),
        "dequantize": lambda: OpWork(2.0 * elems, elems * (by + INT4_BYTES)),
        # rough shapes for extrapolating measured rows: Q^T Q and a K projection per token; scores
        "skew": lambda: OpWork(2.0 * rows * (model.n_heads * model.head_dim ** 2 + d * kv),
                               (d * (d + kv) + rows * d) * by),
        "score": lambda: OpWork(
            2.0 * model.n_heads * model.head_dim * batch * _causal_pairs(n_tokens, kv_len) + scores,
            (batch * kv_len * kv + scores) * by),
    }


def op_work(op: str, model: ModelSpec, batch: int, n_tokens: int, kv_len: int,
            partial_ratio: float = 1.0, dtype_bytes: int = 2) -> OpWork:
    """FLOPs and HBM bytes of `op` (see the module docstring for the arguments)."""
    table = _work_table(model, batch, n_tokens, kv_len, partial_ratio, dtype_bytes)
    if op not in table:
        raise CostError(f"unknown op '{op}'; known: {', '.join(OPS + RUNTIME_OPS)}")
    return table[op]()


@dataclass(frozen=True)
class PhysicsCosts:
    """Roofline times from the hardware YAML: peaks x efficiencies, plus fixed per-call costs."""

    hw: HardwareConfig
    dtype_bytes: int = 2

    def compute_s(self, op: str, model: ModelSpec, batch: int, n_tokens: int, kv_len: int,
                  *, partial_ratio: float = 1.0) -> float:
        gpu = self.hw.gpu
        work = op_work(op, model, batch, n_tokens, kv_len, partial_ratio, self.dtype_bytes)
        flop_s = work.flops / (gpu.fp16_tflops * 1e12 * gpu.compute_efficiency)
        byte_s = work.hbm_bytes / (gpu.hbm_gbps * 1e9 * gpu.hbm_efficiency)
        return max(flop_s, byte_s) + gpu.launch_us * 1e-6

    def h2d_s(self, nbytes: float, gathered: bool) -> float:
        link = self.hw.link
        return _copy_s(nbytes, link.latency_us, link.h2d_gbps * link.h2d_efficiency)

    def d2h_s(self, nbytes: float) -> float:
        link = self.hw.link
        return _copy_s(nbytes, link.latency_us, link.d2h_gbps * link.d2h_efficiency)

    def gather_s(self, nbytes: float, rows: int) -> float:
        host = self.hw.host
        if nbytes <= 0:
            return 0.0
        return 2.0 * nbytes / (host.memory_gbps * 1e9 * host.gather_efficiency)  # read rows + write staging

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "physics",
            "hardware": self.hw.name,
            "dtype_bytes": self.dtype_bytes,
            "compute": "max(flops / (fp16_tflops*compute_efficiency), hbm_bytes / (hbm_gbps*hbm_efficiency))"
                       " + launch_us",
            "transfer": "latency_us + bytes / (gbps*efficiency); no copy for 0 bytes",
            "gather": "2 * bytes / (host.memory_gbps*gather_efficiency)",
        }


def _copy_s(nbytes: float, latency_us: float, effective_gbps: float) -> float:
    if nbytes <= 0:
        return 0.0  # nothing to move: no copy is issued
    return latency_us * 1e-6 + nbytes / (effective_gbps * 1e9)


# ---- memory fit ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    """Where a point's bytes live, and whether they fit."""

    gpu_bytes: float  # resident weights + KV-related GPU memory + activation workspace
    host_bytes: float  # KV in host memory + weights streamed from host
    streamed_weight_bytes: float  # per layer, copied host->GPU every step (0 when weights fit)
    fits: bool
    reason: str  # empty when it fits

    @property
    def gpu_gib(self) -> float:
        return self.gpu_bytes / GIB

    @property
    def host_gib(self) -> float:
        return self.host_bytes / GIB


def workspace_bytes(model: ModelSpec, batch: int, prompt_len: int, gen_len: int, dtype_bytes: int = 2) -> float:
    """Activation workspace: the larger of a decode step and one sequence's prefill.

    Decode: hidden states, QKV, FFN and logits for the batch, plus one layer's attention scores.
    Prefill runs one sequence's activations at a time (FlashAttention: no prompt x prompt scores).
    """
    d, f = model.d_model, model.d_ffn
    decode = batch * (4 * d + f + model.vocab_size) + batch * model.n_heads * (prompt_len + gen_len)
    prefill = prompt_len * (4 * d + f)
    return float(max(decode, prefill) * dtype_bytes)


def plan_memory(hw: HardwareConfig, model: ModelSpec, policy: PolicyConfig, batch: int, prompt_len: int,
                gen_len: int, dtype_bytes: int = 2) -> MemoryPlan:
    """GPU: resident weights + KV memory + workspace; layer weights that do not fit are streamed.

    Streamed weights are an equal share of every layer, kept in host memory, with two layers'
    share double-buffered on the GPU. Ideal keeps everything on the GPU or does not fit.
    """
    kv = kv_memory(policy, model, batch, prompt_len, gen_len, dtype_bytes)
    n_layers, layer_bytes = model.n_layers, float(model.layer_weight_bytes(dtype_bytes))
    fixed = kv.gpu_bytes + workspace_bytes(model, batch, prompt_len, gen_len, dtype_bytes) + float(
        model.weight_bytes(dtype_bytes) - n_layers * layer_bytes)  # embeddings, LM head, final norm
    gpu_free = (hw.gpu.memory_gib - hw.gpu.reserved_gib) * GIB
    host_free = (hw.host.memory_gib - hw.host.reserved_gib) * GIB
    all_resident = fixed + n_layers * layer_bytes
    share = 0.0  # share of every layer's weights streamed from host each step
    if all_resident > gpu_free and policy.name is not PolicyName.IDEAL:
        saved_per_share = (n_layers - 2) * layer_bytes  # all but two double-buffered layers leave the GPU
        share = (all_resident - gpu_free) / saved_per_share if saved_per_share > 0 else math.inf
    streamed = min(share, 1.0)
    gpu = all_resident - (n_layers - min(n_layers, 2)) * layer_bytes * streamed
    host = kv.host_bytes + n_layers * layer_bytes * streamed
    reason = ""
    if gpu > gpu_free:
        what = "ideal keeps weights and KV on the GPU" if policy.name is PolicyName.IDEAL else \
            "with all layer weights streamed"
        reason = f"gpu memory: {gpu / GIB:.1f} GiB needed ({what}) > {gpu_free / GIB:.1f} GiB available"
    elif host > host_free:
        reason = f"host memory: {host / GIB:.1f} GiB needed > {host_free / GIB:.1f} GiB available"
    return MemoryPlan(gpu_bytes=gpu, host_bytes=host, streamed_weight_bytes=layer_bytes * streamed,
                      fits=not reason, reason=reason)
