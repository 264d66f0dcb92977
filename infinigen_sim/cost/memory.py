"""Where a point's bytes live and whether they fit: GPU (weights, KV-related buffers, workspace) and host.

Weights that do not fit on the GPU are streamed from host memory every step: an equal share of every
layer, with two layers' share double-buffered on the GPU (the simulator's model; a runtime may place
whole layers instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from infinigen_sim.spec.hardware import HardwareConfig
from infinigen_sim.spec.models import ModelSpec
from infinigen_sim.spec.policies import PolicyConfig, PolicyName, kv_memory

GIB = 2**30


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
