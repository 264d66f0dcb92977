"""The op sweep's passes: the runtime's own calls for every layer of a model, in the engine's order.

A pass is a list of `Entry`s run back to back, as one decode step (or one prefill) would run them:
embed, then per layer its ops, then the final norm and the LM head. Each layer's weights and K/V
rows are its own, so between two calls of an op on one layer every other layer's weights and rows
pass through the caches, as they do in a step (`profiler.bench.kernels` picks how many layers).
Each pass times exactly the ops `infinigen_sim.spec.ops.ops_in_pass` names for it.

An entry is timed one of two ways:
  around the call   model modules (`norm`, `qkv`, `ffn`, `embed`, `lm_head`, prefill attention), each
                    as the engine's span encloses it (residual adds included); `ffn` is the output
                    projection and the MLP in one call (x + o_proj(o), then x + mlp(x)): the engine's
                    two `ffn` spans, the op the cost model prices as W_O + MLP;
  by its own span   the policy ops, run through the runtime's KV caches (kv_cache.py, quant.py, h2o.py,
                    infinigen.py) with their device state only (`DeviceOnly`: no host K/V is allocated and
                    no row filed, so no timed entry waits for a copy) on an inline copier: the seconds
                    their `PhaseTimer` spans record,
                    exactly what steps.csv sums: `attention` (DeviceCache.attend: the new row written,
                    then attention over kv + 1 rows), `speculate` and `topk` (InfiniGen's plan_fetch of
                    the layer and its write-back of the new partial K row), `dequantize` / `quantize`
                    (K and V), `score` (H2O's per-step score update, eviction included; at prefill the
                    prompt's attention mass and the heavy-hitter choice) and `skew` (InfiniGen prefill).
`span` is one empty PhaseTimer span timed from outside: the bookkeeping the engine adds to every op.
A task builds one pass at a time (`PassBuilder`), so one policy's state is alive at once, and each pass's
set-up is synchronised before its spans are dropped (`settle`): CUDA events are read only once complete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.policies import make_policy
from profiler.runtime.cuda_api import CUDA
from profiler.runtime.h2o import HeavyHitterCache
from profiler.runtime.infinigen import InfiniGenCache
from profiler.runtime.kv_cache import DeviceCache, KVCache, Runtime
from profiler.runtime.model import Block, Transformer, prefill_attention
from profiler.runtime.quant import QuantizedCache
from profiler.runtime.timing import MODEL_LAYER, PhaseTimer
from profiler.runtime.transfer import Copier, FetchResult

NEW_POS_PAD = 8  # host rows beyond the cached ones: room for the new token's row


@dataclass(frozen=True)
class Entry:
    """One call of a pass: timed around the call, or (`spans`) by the runtime spans it records; an
    entry without an op is context (run, not timed)."""

    op: Op | None
    layer: int
    call: Callable[[], object]
    spans: tuple[Op, ...] = ()  # this call's runtime spans of these ops in `layer` time them

    @property
    def ops(self) -> tuple[Op, ...]:
        """The ops this entry's samples time."""
        return self.spans or ((self.op,) if self.op is not None else ())


@dataclass
class Pass:
    """The entries of one pass and the timer their spans report to."""

    entries: list[Entry]
    timer: PhaseTimer
    n_layers: int
    keep: list[object] = field(default_factory=list)  # caches and inputs the entries close over


class Inputs:
    """Seeded random tensors drawn on the model's device in its dtype (a device generator: no host randn
    and copy); on CPU the same values as an fp32 CPU generator gives."""

    def __init__(self, model: Transformer, seed: int) -> None:
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.gen = CUDA.generator(self.device, seed)

    def rand(self, *shape: int) -> Tensor:
        return torch.randn(shape, generator=self.gen, device=self.device, dtype=self.dtype)

    def tokens(self, vocab: int, *shape: int) -> Tensor:
        return torch.randint(0, vocab, shape, generator=self.gen, device=self.device)


class DeviceOnly:
    """A policy's cache with its device state only (put first among the bases): no host K/V and no row
    filed into one, so a pass allocates no pinned memory it does not time and never waits for a copy
    inside a timed entry (the host side is the copy sweep's to measure)."""

    def allocate(self, batch: int, max_rows: int, prompt_len: int) -> None:
        self.allocate_device(batch, max_rows, prompt_len)

    def _store_rows(self, layer: int, k_rows: Tensor, v_rows: Tensor) -> None:
        self.entries[layer] = k_rows.shape[0]  # the prompt's rows stay on the device

    def _send_row(self, layer: int, k: Tensor, v: Tensor) -> None:
        self._slot(layer)  # the new row takes its slot; no D2H, no commit

    def _commit_slots(self, layer: int, written: object, sent: object) -> None:
        return None  # H2O's row is not filed anywhere (and nothing waits for its slots)


class DeviceQuantized(DeviceOnly, QuantizedCache):
    """INT4's dequantisation buffers, no host codes."""


class DeviceHeavyHitter(DeviceOnly, HeavyHitterCache):
    """H2O's scores and positions, no host rows."""


class DeviceInfiniGen(DeviceOnly, InfiniGenCache):
    """InfiniGen's skew, partial K cache and index buffers, no host rows or staging."""


def _cache(kind: type[KVCache], model: Transformer, timer: PhaseTimer, n_layers: int, policy: str,
           **params: object) -> KVCache:
    """A runtime KV cache over the first `n_layers` layers of `model`, copies run inline (no worker)."""
    p = next(model.parameters())
    spec = replace(model.spec, n_layers=n_layers)
    copier = Copier(p.device, overlap=False, timer=timer)
    return kind(Runtime(spec, make_policy(policy, **params), model, p.device, p.dtype, copier, timer))


def settle(p: Pass) -> Pass:
    """The pass's set-up finished: wait for its device work (its D2H copies, its kernels) before its
    spans are read and dropped; CUDA events can be read only once complete."""
    p.timer.discard()
    return p


@dataclass(frozen=True)
class PassBuilder:
    """A pass not built yet, and the ops it times: a task builds, runs and drops one pass at a time."""

    ops: tuple[Op, ...]
    build: Callable[[], Pass]


def span_entry(timer: PhaseTimer) -> Entry:
    """One empty runtime span, timed from outside."""
    def empty() -> None:
        with timer.span(Op.NORM, MODEL_LAYER):
            pass
    return Entry(Op.SPAN, MODEL_LAYER, empty)


def ffn(block: Block, x: Tensor, o: Tensor) -> Tensor:
    """What the engine's two `ffn` spans run after attention: x + o_proj(o), then x + mlp(x) (the
    post-attention norm between them is its own `norm` entry)."""
    x = x + block.self_attn.o_proj(o)
    return x + block.mlp(x)


def weight_context(model: Transformer, layer: int, x: Tensor, input_pos: Tensor) -> list[Entry]:
    """Untimed: the layer's QKV, output projection and MLP on x (B, 1, d), so its weights pass through."""
    block = model.layers[layer]
    return [Entry(None, layer, lambda: model.qkv(layer, x, input_pos)),
            Entry(None, layer, lambda: ffn(block, x, x))]


def in_context(model: Transformer, x: Tensor, input_pos: Tensor, timed: list[Entry]) -> list[Entry]:
    """Each layer's timed policy op between that layer's untimed QKV, output projection and MLP, as a
    step runs it: a policy op timed back to back with itself alone (every layer's rows hot, the same
    few kernels and Python paths over and over) ran 1.7x faster on the 2-core CPU box than inside a
    decode step (tiny-opt attention at 129 rows: 200 us alone, 345 us with the layer's ops between;
    2026-12-02)."""
    return [e for entry in timed for e in (*weight_context(model, entry.layer, x, input_pos), entry)]


def decode_pass(model: Transformer, batch: int, pos: int, seed: int) -> Pass:
    """The token ops of one decode step over every layer of `model`: (batch, 1) tokens at `pos`."""
    spec, inp, timer = model.spec, Inputs(model, seed), PhaseTimer(next(model.parameters()).is_cuda)
    n_layers = len(model.layers)
    tokens, input_pos = inp.tokens(spec.vocab_size, batch, 1), torch.tensor([pos], device=inp.device)
    x, o = inp.rand(batch, 1, spec.d_model), inp.rand(batch, 1, spec.n_heads * spec.head_dim)
    k, v = inp.rand(batch, 1, spec.n_kv_heads, spec.head_dim), inp.rand(batch, 1, spec.n_kv_heads, spec.head_dim)
    int4 = _cache(QuantizedCache, model, timer, n_layers, "int4")
    span = span_entry(PhaseTimer(timer.cuda))
    entries = [Entry(Op.EMBED, MODEL_LAYER, lambda: model.embed(tokens, input_pos))]
    for i, block in enumerate(model.layers):
        entries += [
            Entry(Op.NORM, i, lambda b=block: b.input_layernorm(x)),
            Entry(Op.QKV, i, lambda i=i: model.qkv(i, x, input_pos)),
            Entry(Op.QUANTIZE, i, lambda i=i: int4._encode(i, k.transpose(0, 1), v.transpose(0, 1)),
                  (Op.QUANTIZE,)),  # INT4's new row, (1, B, Hkv, D) as write_back hands it
            Entry(Op.NORM, i, lambda b=block: b.post_attention_layernorm(x)),
            Entry(Op.FFN, i, lambda b=block: ffn(b, x, o)),
            span,  # between two layers, as the engine opens its next span
        ]
    entries += [Entry(Op.NORM, MODEL_LAYER, lambda: model.norm(x)),
                Entry(Op.LM_HEAD, MODEL_LAYER, lambda: model.lm_head_logits(x).float())]
    return settle(Pass(entries, timer, n_layers, [int4]))


def cache_pass(model: Transformer, n_layers: int, batch: int, kv_len: int, seed: int) -> list[PassBuilder]:
    """The policy ops of one decode step over `kv_len` cached rows, on the first `n_layers` layers: one
    pass per policy's ops (InfiniGen's speculation, INT4's dequantisation, attention, H2O's scores), each
    building only that policy's device state, mid-decode at `kv_len` cached rows."""
    spec, device = model.spec, next(model.parameters()).device
    B, T, H, Hkv, D = batch, kv_len, spec.n_heads, spec.n_kv_heads, spec.head_dim
    rows, layers = T + NEW_POS_PAD, range(n_layers)

    def timer_inputs() -> tuple[PhaseTimer, Inputs, Tensor]:
        inp = Inputs(model, seed)
        return PhaseTimer(device.type == "cuda"), inp, torch.tensor([T], device=device)

    def speculation() -> Pass:
        timer, inp, input_pos = timer_inputs()
        a, x = inp.rand(B, 1, spec.d_model), inp.rand(B, 1, spec.d_model)
        k, v = inp.rand(B, 1, Hkv, D), inp.rand(B, 1, Hkv, D)
        infinigen = _cache(DeviceInfiniGen, model, timer, n_layers, "infinigen", full_fetch_layers=0)
        infinigen.allocate(B, rows, T)
        infinigen.reset()
        for i in layers:  # the prompt: skewed (beside the model) and its partial K cached
            infinigen.store_prompt(i, inp.rand(B, T, H, D), inp.rand(B, T, Hkv, D), inp.rand(B, T, Hkv, D))
        infinigen.begin_step(T)

        def speculate(i: int) -> None:
            infinigen.plan_fetch(i, a, input_pos)
            infinigen.write_back(i, k, v)
            infinigen.entries[i] = T  # the next pass speculates over the same rows

        # speculation reads the next layer's (partial) W_Q and partial K cache, last read a step ago
        entries = in_context(model, x, input_pos, [Entry(Op.SPECULATE, i, lambda i=i: speculate(i),
                                                         (Op.SPECULATE, Op.TOPK)) for i in layers])
        return settle(Pass(entries, timer, n_layers, [infinigen]))

    def dequantisation() -> Pass:
        timer, inp, input_pos = timer_inputs()
        x = inp.rand(B, 1, spec.d_model)
        int4 = _cache(DeviceQuantized, model, timer, n_layers, "int4")
        int4.allocate(B, rows, T)
        int4.reset()
        entries = in_context(model, x, input_pos, [
            Entry(Op.DEQUANTIZE, i, lambda i=i: int4._decode(i, FetchResult(int4.fetch_bufs[i % 2].t, T)),
                  (Op.DEQUANTIZE,)) for i in layers])
        return settle(Pass(entries, timer, n_layers, [int4]))

    def attention() -> Pass:
        timer, inp, input_pos = timer_inputs()
        x = inp.rand(B, 1, spec.d_model)
        q, k, v = inp.rand(B, 1, H, D), inp.rand(B, 1, Hkv, D), inp.rand(B, 1, Hkv, D)
        ideal = _cache(DeviceCache, model, timer, n_layers, "ideal")
        ideal.allocate(B, rows, T)
        ideal.begin_step(T)
        entries = in_context(model, x, input_pos, [Entry(Op.ATTENTION, i, lambda i=i: ideal.attend(i, q, k, v),
                                                         (Op.ATTENTION,)) for i in layers])
        return settle(Pass(entries, timer, n_layers, [ideal]))

    def scores() -> Pass:
        timer, inp, input_pos = timer_inputs()
        x = inp.rand(B, 1, spec.d_model)
        probs = torch.softmax(inp.rand(B, Hkv, H // Hkv, T + 1).float(), dim=-1).to(inp.dtype)
        # H2O keeps exactly `kv_len` rows (about half heavy, half recent) and is over budget at every step
        heavy = max(1, round(T / 2))
        h2o = _cache(DeviceHeavyHitter, model, timer, n_layers, "h2o", heavy_ratio=heavy / T,
                     recent_ratio=max(T - heavy, 1) / T)
        h2o.allocate(B, T + 1, T)
        h2o.reset()
        h2o.begin_step(T)
        entries = in_context(model, x, input_pos, [Entry(Op.SCORE, i, lambda i=i: h2o.after_attention(i, probs, T),
                                                         (Op.SCORE,)) for i in layers])
        return settle(Pass(entries, timer, n_layers, [h2o]))

    # one pass per policy: no runtime runs another policy's ops between its own
    return [PassBuilder((Op.SPECULATE, Op.TOPK), speculation), PassBuilder((Op.DEQUANTIZE,), dequantisation),
            PassBuilder((Op.ATTENTION,), attention), PassBuilder((Op.SCORE,), scores)]


def prefill_pass(model: Transformer, batch: int, n: int, seed: int) -> Pass:
    """The prefill ops of layer 0 over `n` prompt tokens, as the engine's prefill_layer runs them."""
    spec, inp, timer = model.spec, Inputs(model, seed), PhaseTimer(next(model.parameters()).is_cuda)
    B, H, Hkv, D = batch, spec.n_heads, spec.n_kv_heads, spec.head_dim
    tokens, input_pos = inp.tokens(spec.vocab_size, B, n), torch.arange(n, device=inp.device)
    x = inp.rand(B, n, spec.d_model)
    q, k, v = inp.rand(B, n, H, D), inp.rand(B, n, Hkv, D), inp.rand(B, n, Hkv, D)
    k_rows, v_rows = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()  # token-major (T, B, Hkv, D)
    o = inp.rand(B, n, H * D)
    int4 = _cache(QuantizedCache, model, timer, 1, "int4")  # only its _encode runs: nothing allocated
    h2o = _cache(DeviceHeavyHitter, model, timer, 1, "h2o")
    infinigen = _cache(DeviceInfiniGen, model, timer, 1, "infinigen", full_fetch_layers=0)
    for cache in (h2o, infinigen):
        cache.allocate(B, n + NEW_POS_PAD, n)
        cache.reset()
    block = model.layers[0]
    entries = [
        Entry(Op.EMBED, MODEL_LAYER, lambda: model.embed(tokens, input_pos)),
        Entry(Op.NORM, 0, lambda: block.input_layernorm(x)),
        Entry(Op.QKV, 0, lambda: model.qkv(0, x, input_pos)),
        Entry(Op.SKEW, 0, lambda: infinigen.store_prompt(0, q, k, v), (Op.SKEW,)),
        Entry(Op.SCORE, 0, lambda: h2o.store_prompt(0, q, k, v), (Op.SCORE,)),
        Entry(Op.QUANTIZE, 0, lambda: int4._encode(0, k_rows, v_rows), (Op.QUANTIZE,)),
        Entry(Op.ATTENTION, 0, lambda: prefill_attention(q, k, v)),
        Entry(Op.NORM, 0, lambda: block.post_attention_layernorm(x)),
        Entry(Op.FFN, 0, lambda: ffn(block, x, o)),
    ]
    return settle(Pass(entries, timer, 1, [int4, h2o, infinigen]))
