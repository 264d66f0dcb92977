"""The masked full-sequence forward: every evaluated position at once, each attending only to the rows its
policy would have on the GPU at that decode step.

A window of a text is a prompt of P tokens and E evaluated positions t = P .. P+E-1; position t predicts
token t+1 and, at its decode step, has t cached rows (0 .. t-1) plus its own. The prompt goes through
every layer once at full causal attention (`run_prefix`, the prefill every policy shares). Then, per
policy, one pass over the E positions layer by layer (`eval_pass`): the layer's q, k, v of all E
positions, the policy's choice of cached rows for every position (a `Selector`: InfiniGen's speculated
set from the previous layer's attention input, H2O's heavy + recent set, INT4's dequantised rows, the
oracle's true top set; selectors.py), and `masked_attention` over the prompt's and the window's rows.
This is exactly the decode path: a position's hidden state at layer i depends only on rows <= t of layer
i-1, which the pass computed with the same masks (tests/test_accuracy.py checks the logits against
Engine's step-by-step decode within fp32 tolerance), but it runs as a few large matmuls per layer.

Every pass that leaves its first layers at full attention starts from the full-KV pass's hidden states
at its first sparse layer (`Trace`), which are the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from profiler.runtime.model import Transformer, prefill_attention, prompt_attention_mass

QUERY_CHUNK = 128  # positions scored together: their scores stay in cache, their rows stop at P + e1


@dataclass(frozen=True)
class Window:
    """ids (1, P + E + 1): a prompt of P tokens, E evaluated positions and the last one's target."""

    ids: Tensor
    prompt_len: int

    @property
    def eval_tokens(self) -> int:
        return self.ids.shape[1] - self.prompt_len - 1

    @property
    def positions(self) -> Tensor:
        """(E,) the evaluated positions P .. P+E-1, which are also their cached-row counts."""
        return torch.arange(self.prompt_len, self.prompt_len + self.eval_tokens)

    @property
    def targets(self) -> Tensor:
        return self.ids[0, self.prompt_len + 1 :]


@dataclass
class Prefix:
    """The prompt's q, k, v of every layer at full attention: (1, P, H|Hkv, D), post-RoPE."""

    q: list[Tensor] = field(default_factory=list)
    k: list[Tensor] = field(default_factory=list)
    v: list[Tensor] = field(default_factory=list)
    mass: dict[int, Tensor] = field(default_factory=dict)  # H2O's prompt scores per layer, computed once

    def attention_mass(self, layer: int) -> Tensor:
        """The prompt rows' accumulated causal attention per KV head (1, Hkv, P) (model.prompt_attention_mass)."""
        if layer not in self.mass:
            self.mass[layer] = prompt_attention_mass(self.q[layer], self.k[layer])
        return self.mass[layer]


@dataclass(frozen=True)
class LayerInputs:
    """What a selector sees of one layer: every evaluated position's q, the cached rows, the inputs."""

    layer: int
    q: Tensor  # (1, E, H, D) the evaluated positions' queries
    k: Tensor  # (1, T, Hkv, D) rows 0 .. T-1 = the prompt's, then the evaluated positions'
    v: Tensor
    a: Tensor  # (1, E, d) this layer's attention input at the evaluated positions
    a_prev: Tensor | None  # (1, E, d) the previous layer's (None at layer 0)
    window: Window
    prefix: Prefix


@dataclass(frozen=True)
class LayerChoice:
    """A selector's answer for one layer."""

    rows: Tensor  # (E,) cached rows each position reads (its fetched count)
    allowed: Tensor | None = None  # (Hkv, E, T) bool, the cached rows read (None: every row j < t)
    k: Tensor | None = None  # (1, T, Hkv, D) the cached rows as attention reads them (INT4: dequantised)
    v: Tensor | None = None


class Selector(Protocol):
    """A policy's choice of rows, layer by layer; layers below first_sparse_layer are full attention."""

    first_sparse_layer: int

    def select(self, inputs: LayerInputs) -> LayerChoice: ...


class FullAttention:
    """`ideal` (and every layer a policy leaves full): all cached rows, as stored."""

    first_sparse_layer = 10**9

    def select(self, inputs: LayerInputs) -> LayerChoice:
        return LayerChoice(inputs.window.positions.clone())


@dataclass
class Trace:
    """The full-KV pass's residual input x and attention input a of every layer (1, E, d)."""

    x: list[Tensor] = field(default_factory=list)
    a: list[Tensor] = field(default_factory=list)


@dataclass
class PassResult:
    """One policy's pass: logits (E, vocab) and rows read (L, E)."""

    logits: Tensor
    rows: Tensor
    trace: Trace | None = None


@torch.inference_mode()
def run_prefix(model: Transformer, window: Window) -> Prefix:
    """The prompt through every layer at full causal attention, its q, k, v kept per layer."""
    ids = window.ids[:, : window.prompt_len]
    pos = torch.arange(ids.shape[1])
    x = model.embed(ids, pos)
    prefix = Prefix()
    for layer, block in enumerate(model.layers):
        q, k, v = model.qkv(layer, block.input_layernorm(x), pos)
        prefix.q.append(q)
        prefix.k.append(k)
        prefix.v.append(v)
        x = x + block.self_attn.o_proj(prefill_attention(q, k, v))
        x = x + block.ffn(x)
    return prefix


def query_chunks(window: Window, chunk: int | None = None):
    """(e0, e1, n): chunks of evaluated positions (QUERY_CHUNK by default) and the rows n = P + e1 any of
    them can read (own included)."""
    E, P, chunk = window.eval_tokens, window.prompt_len, chunk or QUERY_CHUNK
    for e0 in range(0, E, chunk):
        e1 = min(E, e0 + chunk)
        yield e0, e1, P + e1


def allowed_rows(index: Tensor, keep: Tensor, n_rows: int) -> Tensor:
    """(index, keep) (Hkv, E, m) -> (Hkv, E, n_rows) bool; slots not kept write a spare column, dropped."""
    Hkv, E, _ = index.shape
    spare = index.masked_fill(~keep, n_rows)
    allowed = torch.zeros(Hkv, E, n_rows + 1, dtype=torch.bool, device=index.device)
    return allowed.scatter_(-1, spare, True)[..., :n_rows]


def masked_attention(q: Tensor, k: Tensor, v: Tensor, k_self: Tensor, v_self: Tensor, window: Window,
                     allowed: Tensor | None = None, stored: bool = True) -> Tensor:
    """Each evaluated position over its allowed cached rows plus its own row -> (1, E, H*D).

    q (1, E, H, D); k, v (1, T, Hkv, D) the cached rows as attention reads them; k_self, v_self
    (1, E, Hkv, D) each position's own new row; allowed (Hkv, E, T) or None (every row). Position e
    (= P + e) reads rows j < P + e only. `stored`: k and v hold the rows as computed, so a position's own
    row is row P + e of them; otherwise (INT4: the cached rows are dequantised, the new row is not, as in
    the runtime) the chunk's own rows are appended as more keys, each visible to its own position only.
    One fused scaled_dot_product_attention per chunk of positions, over the rows the chunk can see.
    """
    _, E, H, D = q.shape
    Hkv = k.shape[2]
    P = window.prompt_len
    # KV heads as the batch, the group's query heads as its heads: one mask per KV head serves its group
    qh = q[0].view(E, Hkv, H // Hkv, D).permute(1, 2, 0, 3)  # (Hkv, G, E, D)
    kh, vh = k[0].transpose(0, 1)[:, None], v[0].transpose(0, 1)[:, None]  # (Hkv, 1, T, D)
    ks, vs = k_self[0].transpose(0, 1)[:, None], v_self[0].transpose(0, 1)[:, None]  # (Hkv, 1, E, D)
    out = torch.empty_like(qh)
    for e0, e1, n in query_chunks(window):
        keys = torch.arange(n, device=q.device)[None, :]
        pos = P + torch.arange(e0, e1, device=q.device)[:, None]  # (c, 1)
        cached = keys < pos  # (c, n)
        if allowed is not None:
            cached = cached & allowed[:, e0:e1, :n]  # (Hkv, c, n)
        if stored:  # the own row is row P + e of the cached rows
            mask, k_c, v_c = cached | (keys == pos), kh[:, :, :n], vh[:, :, :n]
        else:  # the own rows follow the cached ones
            own = torch.eye(e1 - e0, dtype=torch.bool, device=q.device)
            mask = torch.cat([cached, own.expand(*cached.shape[:-1], -1)], dim=-1)
            k_c = torch.cat([kh[:, :, :n], ks[:, :, e0:e1]], dim=2)
            v_c = torch.cat([vh[:, :, :n], vs[:, :, e0:e1]], dim=2)
        out[:, :, e0:e1] = F.scaled_dot_product_attention(qh[:, :, e0:e1], k_c, v_c, attn_mask=mask.unsqueeze(-3),
                                                          enable_gqa=True)
    return out.permute(2, 0, 1, 3).reshape(1, E, H * D)


@torch.inference_mode()
def eval_pass(model: Transformer, window: Window, prefix: Prefix, selector: Selector,
              start: Trace | None = None, keep_trace: bool = False) -> PassResult:
    """One policy over the window's evaluated positions -> logits (E, vocab) and rows read (L, E).

    With `start` (the full-KV pass's trace) the pass begins at the selector's first sparse layer.
    """
    pos = window.positions
    E, L = window.eval_tokens, model.spec.n_layers
    rows = pos.expand(L, E).clone()  # full layers read every cached row
    first = min(selector.first_sparse_layer, L) if start is not None else 0
    if first > 0:
        x, a_prev = start.x[first], start.a[first - 1]
    else:
        x, a_prev = model.embed(window.ids[:, window.prompt_len : window.prompt_len + E], pos), None
    trace = Trace() if keep_trace else None
    for layer in range(first, L):
        block = model.layers[layer]
        a = block.input_layernorm(x)
        if trace is not None:
            trace.x.append(x)
            trace.a.append(a)
        q, k, v = model.qkv(layer, a, pos)  # (1, E, H|Hkv, D)
        k_all = torch.cat([prefix.k[layer], k], dim=1)  # (1, T, Hkv, D)
        v_all = torch.cat([prefix.v[layer], v], dim=1)
        choice = selector.select(LayerInputs(layer, q, k_all, v_all, a, a_prev, window, prefix))
        rows[layer] = choice.rows.cpu()
        k_read = k_all if choice.k is None else choice.k
        v_read = v_all if choice.v is None else choice.v
        o = masked_attention(q, k_read, v_read, k, v, window, choice.allowed, stored=choice.k is None)
        x = x + block.self_attn.o_proj(o)
        x = x + block.ffn(x)
        a_prev = a
    logits = model.lm_head_logits(model.norm(x[0])).float()  # (E, vocab)
    return PassResult(logits, rows, trace)
