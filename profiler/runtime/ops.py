"""Per-op callables for micro-benchmarks: each phase of a decode step, alone, on ready inputs.

`decode_ops(model, policy, batch, kv_len)` returns {phase name: zero-argument callable} running the
same functions the engine runs (model.py, skew.py, quant.py, kv_cache.Planes) on seeded random
inputs shaped like one decode step of layer 0 with `kv_len` cached tokens, so a profiler can time
qkv, attention(kv_len), ffn, speculate, topk, gather, h2d, d2h, quantize, dequantize, norm in
isolation (with CUDA events around a call, after warm-up); each runs under inference mode.
Speculation uses partial weights of the right shapes (a plain column subset, no fold): the cost
is the same, the selected rows are not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from infinigen_sim.policies import PolicyConfig, infinigen_cap
from profiler.runtime.kv_cache import Planes
from profiler.runtime.model import Transformer, decode_attention
from profiler.runtime.quant import dequantize, quantize
from profiler.runtime.skew import SKEW, FoldedSkew, RotarySkew, count_above, partial_column_count, speculation_scores


def _skew_for_benchmark(model: Transformer, n_cols: int, gen: torch.Generator) -> FoldedSkew | RotarySkew:
    """The family's speculation object for layer 0 with random partial columns."""
    spec, attn = model.spec, model.layers[0].self_attn
    p = next(model.parameters())
    skew = SKEW[spec.family](model, n_cols)
    cols = torch.stack([torch.randperm(spec.head_dim, generator=gen)[:n_cols].sort().values
                        for _ in range(spec.n_kv_heads)]).to(p.device)
    if isinstance(skew, FoldedSkew):
        w = attn.q_proj.weight.view(spec.n_kv_heads, -1, spec.head_dim, spec.d_model)
        index = cols[:, None, :, None].expand(spec.n_kv_heads, w.shape[1], n_cols, spec.d_model)
        skew.cols[0], skew.partial_wq[0] = cols, w.gather(2, index).reshape(-1, spec.d_model).contiguous()
        skew.partial_bq[0] = None if attn.q_proj.bias is None else attn.q_proj.bias[: skew.partial_wq[0].shape[0]]
    else:
        A = torch.linalg.qr(torch.randn(spec.n_kv_heads, spec.head_dim, spec.head_dim, generator=gen))[0]
        skew.skew_cols[0] = A[..., :n_cols].to(p.device, p.dtype)
    return skew


def decode_ops(model: Transformer, policy: PolicyConfig, batch: int, kv_len: int,
               seed: int = 0) -> dict[str, Callable[[], object]]:
    """Zero-argument callables, one per phase, for layer 0 of one decode step over kv_len rows."""
    spec = model.spec
    p = next(model.parameters())
    dev, dt = p.device, p.dtype
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen).to(dev, dt)

    B, H, Hkv, D = batch, spec.n_heads, spec.n_kv_heads, spec.head_dim
    block, pos = model.layers[0], torch.tensor([kv_len], device=dev)
    tokens = torch.randint(0, spec.vocab_size, (B, 1), generator=gen).to(dev)
    x, q = rand(B, 1, spec.d_model), rand(B, H, D)
    k_rows, v_rows = rand(kv_len + 1, B, Hkv, D), rand(kv_len + 1, B, Hkv, D)
    n_cols = partial_column_count(policy, D)
    skew = _skew_for_benchmark(model, n_cols, gen)
    partial_k = rand(B, Hkv, kv_len, n_cols)
    scores = rand(B, Hkv, kv_len)
    cap = infinigen_cap(policy, kv_len)
    pin = dev.type == "cuda"
    host = Planes([k_rows.cpu().pin_memory() if pin else k_rows.cpu().clone() for _ in range(2)])
    staging = Planes.allocate(kv_len + 1, [((B, Hkv, D), dt)] * 2, "cpu", pin)
    index = torch.stack([torch.randperm(kv_len, generator=gen)[:cap] for _ in range(B * Hkv)]).view(B, Hkv, cap)
    new_row = rand(1, B, spec.kv_dim)
    codes = quantize(k_rows[:kv_len].reshape(kv_len, B, -1), policy.quant_bits, policy.quant_group)
    dequant_out = torch.empty(kv_len, B, spec.kv_dim, device=dev, dtype=dt)
    row_host = torch.empty(1, B, Hkv, D, dtype=dt, pin_memory=pin)
    fetched = torch.empty_like(k_rows)
    ops = {
        "embed": lambda: model.embed(tokens, pos),
        "norm": lambda: block.input_layernorm(x),
        "qkv": lambda: model.qkv(0, x, pos),
        "attention": lambda: decode_attention(q, k_rows, v_rows),
        "o_proj": lambda: block.self_attn.o_proj(x),
        "ffn": lambda: block.mlp(x),
        "lm_head": lambda: model.lm_head_logits(x),
        "speculate": lambda: count_above(speculation_scores(skew.query(0, x, pos), partial_k, D), policy.alpha),
        "topk": lambda: scores.topk(cap, dim=-1),
        "gather": lambda: host.gather(index, staging),
        "h2d": lambda: fetched[:kv_len].copy_(staging.t[0][:kv_len], non_blocking=pin),
        "d2h": lambda: row_host.copy_(k_rows[:1], non_blocking=pin),
        "quantize": lambda: quantize(new_row, policy.quant_bits, policy.quant_group),
        "dequantize": lambda: dequantize(*codes, spec.kv_dim, policy.quant_bits, policy.quant_group, out=dequant_out),
    }
    return {name: torch.inference_mode()(fn) for name, fn in ops.items()}
