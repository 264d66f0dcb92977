"""Each KV policy's choice of cached rows for every evaluated position of a masked pass (masked.py).

- `InfiniGenRows`: the runtime's own skew objects (skew.SKEW: calibrated offline or fitted on the
  prompt, exactly as InfiniGenCache.store_prompt does) speculate layer i from layer i-1's attention
  input; skew.Selection gives the ranking and the count; spec.policies.infinigen_fetch_count turns the
  count into rows; the top rows are read. The per-(layer, position) rows are kept for the oracle.
- `OracleRows`: the same number of rows per (layer, position), ranked by the true attention (the
  group's summed softmax of the real q and k, the query's own row included; or the max logit): the
  bound of any selection rule at that count.
- `HeavyHitterRows`: runtime/h2o.py's HeavyHitterCache replayed position by position (prompt mass,
  heavy + recent kept, the lowest-scoring non-recent row evicted for the new one, in slot order).
- `QuantizedRows`: every cached row K and V through runtime/quant.py's quantise + dequantise.
Layers below `first_sparse_layer` read every row as stored. The runtime quantises and evicts in every
layer (first_sparse_layer 0); the paper's artifact keeps layers 0 and 1 full for H2O and INT4 too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from infinigen_sim.spec.policies import PolicyConfig, h2o_budget, infinigen_fetch_count
from profiler.runtime.h2o import select_heavy_recent
from profiler.runtime.model import Transformer
from profiler.runtime.quant import dequantize, quantize
from profiler.runtime.skew import SKEW, Selection, SkewCalibration, partial_column_count, speculated_logits
from profiler.studies.masked import LayerChoice, LayerInputs, Prefix, Window, allowed_rows, query_chunks


def causal_valid(window: Window, e0: int, e1: int, n: int, device: torch.device) -> Tensor:
    """(c, n) bool: row j is cached at position P + e's step when j < P + e (e in [e0, e1))."""
    pos = window.prompt_len + torch.arange(e0, e1, device=device)
    return torch.arange(n, device=device)[None, :] < pos[:, None]


def top_rows(scores: Tensor, rows: Tensor) -> Tensor:
    """scores (Hkv, c, n), rows not cached -inf; rows (c,) -> (Hkv, c, n) bool: each position's top rows."""
    k_max = int(rows.max())
    index = scores.topk(k_max, dim=-1).indices  # (Hkv, c, k_max) by descending score
    keep = torch.arange(k_max, device=scores.device)[None, None, :] < rows.to(scores.device)[None, :, None]
    return allowed_rows(index, keep.expand_as(index), scores.shape[-1])


def grouped(t: Tensor, n_kv_heads: int) -> Tensor:
    """Queries (1, E, H, X) -> (1, Hkv, G, E, X)."""
    _, E, H, X = t.shape
    return t.view(1, E, n_kv_heads, H // n_kv_heads, X).permute(0, 2, 3, 1, 4)


def by_head(t: Tensor) -> Tensor:
    """Rows (1, T, Hkv, X) -> (1, Hkv, 1, T, X)."""
    return t.permute(0, 2, 1, 3).unsqueeze(2)


class InfiniGenRows:
    """InfiniGen's speculated rows: the runtime's skew, Selection and fetch-count rule."""

    def __init__(self, model: Transformer, policy: PolicyConfig, selection: Selection,
                 calibration: SkewCalibration | None, prefix: Prefix) -> None:
        if policy.pool_ratio is not None:
            raise ValueError("the masked harness models an unbounded host cache (pool_ratio None)")
        self.policy, self.selection, self.head_dim = policy, selection, model.spec.head_dim
        self.first_sparse_layer = policy.full_fetch_layers
        self.skew = SKEW[model.spec.family](model, partial_column_count(policy, self.head_dim), calibration)
        for layer in range(policy.full_fetch_layers, model.spec.n_layers):  # the prefill's skew, once
            self.skew.prepare(layer, prefix.q[layer], prefix.k[layer])
        self.rows: dict[int, Tensor] = {}  # layer -> (E,) rows read, for the oracle at the same count

    def select(self, inputs: LayerInputs) -> LayerChoice:
        layer, pos, window = inputs.layer, inputs.window.positions, inputs.window
        if layer < self.first_sparse_layer:
            return LayerChoice(pos.clone())
        Hkv, T = inputs.k.shape[2], inputs.k.shape[1]
        q_part = grouped(self.skew.query_tokens(layer, inputs.a_prev, pos), Hkv)  # (1, Hkv, G, E, d')
        k_part = by_head(self.skew.partial_k(layer, inputs.k))  # (1, Hkv, 1, T, d')
        allowed = torch.zeros(Hkv, len(pos), T, dtype=torch.bool, device=inputs.k.device)
        rows = torch.empty(len(pos), dtype=torch.int64)
        for e0, e1, n in query_chunks(window):
            logits = speculated_logits(q_part[:, :, :, e0:e1], k_part[:, :, :, :n], self.head_dim)  # (.., c, n)
            valid = causal_valid(window, e0, e1, n, logits.device)
            logits.masked_fill_(~valid, float("-inf"))  # rows not cached yet at each position's step
            counts = self.selection.count(logits, self.policy.alpha, pos[e0:e1]).tolist()  # before the cap
            rows[e0:e1] = torch.tensor([infinigen_fetch_count(self.policy, layer, t, c)
                                        for t, c in zip(pos[e0:e1].tolist(), counts, strict=True)])
            allowed[:, e0:e1, :n] = top_rows(self.selection.scores(logits, valid)[0], rows[e0:e1])
        self.rows[layer] = rows
        return LayerChoice(rows, allowed)


class OracleRows:
    """True-score top rows at given per-(layer, position) counts."""

    def __init__(self, first_sparse_layer: int, rows: dict[int, Tensor], rank: str) -> None:
        self.first_sparse_layer, self.row_counts, self.rank = first_sparse_layer, rows, rank

    def select(self, inputs: LayerInputs) -> LayerChoice:
        layer, pos, window = inputs.layer, inputs.window.positions, inputs.window
        if layer < self.first_sparse_layer:
            return LayerChoice(pos.clone())
        Hkv, T, D = inputs.k.shape[2], inputs.k.shape[1], inputs.k.shape[3]
        q, k = grouped(inputs.q, Hkv), by_head(inputs.k)  # (1, Hkv, G, E, D), (1, Hkv, 1, T, D)
        own = (q * by_head(inputs.k[:, window.prompt_len :])).sum(-1) * D**-0.5  # (1, Hkv, G, E)
        rows = self.row_counts[layer]
        allowed = torch.zeros(Hkv, len(pos), T, dtype=torch.bool, device=inputs.k.device)
        for e0, e1, n in query_chunks(window):
            logits = speculated_logits(q[:, :, :, e0:e1], k[:, :, :, :n], D)  # (1, Hkv, G, c, n)
            valid = causal_valid(window, e0, e1, n, logits.device)
            logits.masked_fill_(~valid, float("-inf"))
            if self.rank == "max":
                scores = logits.amax(dim=2)[0]
            else:  # the attention each row really gets: softmax over the cached rows and the query's own
                probs = torch.softmax(torch.cat([logits, own[..., e0:e1, None]], dim=-1), dim=-1)[..., :-1]
                scores = probs.sum(dim=2)[0].masked_fill(~valid, float("-inf"))
            allowed[:, e0:e1, :n] = top_rows(scores, rows[e0:e1])
        return LayerChoice(rows, allowed)


class QuantizedRows:
    """INT4: cached K and V quantised group-wise per token and dequantised, as QuantizedCache stores them."""

    def __init__(self, policy: PolicyConfig, first_sparse_layer: int = 0) -> None:
        self.policy, self.first_sparse_layer = policy, first_sparse_layer

    def _fake_quant(self, t: Tensor) -> Tensor:
        _, T, Hkv, D = t.shape
        rows = t[0].reshape(T, 1, Hkv * D)  # (m, B, kv_dim), the runtime's _encode layout
        bits, group = self.policy.quant_bits, self.policy.quant_group
        codes, scale, zero = quantize(rows, bits, group)
        return dequantize(codes, scale, zero, Hkv * D, bits, group, dtype=t.dtype).view(1, T, Hkv, D)

    def select(self, inputs: LayerInputs) -> LayerChoice:
        pos = inputs.window.positions.clone()
        if inputs.layer < self.first_sparse_layer:
            return LayerChoice(pos)
        return LayerChoice(pos, k=self._fake_quant(inputs.k), v=self._fake_quant(inputs.v))


class HeavyHitterRows:
    """H2O: HeavyHitterCache's kept set, replayed step by step in its slot order."""

    def __init__(self, policy: PolicyConfig, prompt_len: int, first_sparse_layer: int = 0) -> None:
        self.heavy, self.recent = h2o_budget(policy, prompt_len)
        self.budget = self.heavy + self.recent
        self.first_sparse_layer = first_sparse_layer

    def _prompt_rows(self, prefix: Prefix, layer: int) -> tuple[Tensor, Tensor]:
        """The prompt's kept rows and their scores, (Hkv, budget + 1) slots (store_prompt)."""
        mass = prefix.attention_mass(layer)  # (1, Hkv, P)
        k = prefix.k[layer]
        P, Hkv, device = k.shape[1], k.shape[2], k.device
        keep = torch.arange(P, device=device).expand(1, Hkv, P) if P <= self.budget else select_heavy_recent(
            mass, self.heavy, self.recent)
        m = keep.shape[-1]
        score = torch.zeros(Hkv, self.budget + 1, device=device)
        pos = torch.zeros(Hkv, self.budget + 1, dtype=torch.int64, device=device)
        score[:, :m], pos[:, :m] = mass.gather(-1, keep)[0], keep[0]
        return score, pos

    def select(self, inputs: LayerInputs) -> LayerChoice:
        layer, positions = inputs.layer, inputs.window.positions
        if layer < self.first_sparse_layer:
            return LayerChoice(positions.clone())
        P, E = inputs.window.prompt_len, len(positions)
        score, pos = self._prompt_rows(inputs.prefix, layer)
        n = min(P, self.budget)
        Hkv, D = inputs.k.shape[2], inputs.k.shape[3]
        q, k = grouped(inputs.q, Hkv), by_head(inputs.k)
        index = torch.zeros(Hkv, E, self.budget, dtype=torch.int64, device=inputs.k.device)
        rows = torch.empty(E, dtype=torch.int64)
        chunks = {e0: (e1, n) for e0, e1, n in query_chunks(inputs.window)}
        for e, t in enumerate(positions.tolist()):
            if e in chunks:  # a chunk's logits over every row it can see, at once; each step reads its held rows
                e1, n_rows = chunks[e]
                logits = speculated_logits(q[:, :, :, e:e1], k[:, :, :, :n_rows], D)[0]  # (Hkv, G, c, n)
                G, base = logits.shape[1], e
            index[:, e, :n] = pos[:, :n]  # (Hkv, n) token positions, in slot order
            rows[e] = n
            pos[:, n] = t  # the new token's row sits after the held ones (slot n), score 0
            held = pos[:, None, : n + 1].expand(Hkv, G, n + 1)
            probs = torch.softmax(logits[:, :, e - base].gather(-1, held).float(), dim=-1)  # (Hkv, G, n+1)
            score[:, n] = 0.0
            score[:, : n + 1] += probs.sum(dim=1)
            if n + 1 > self.budget:  # evict the lowest-scoring row outside the recent window
                recent = pos[:, : n + 1] > t - self.recent
                slot = score[:, : n + 1].masked_fill(recent, float("inf")).argmin(-1, keepdim=True)  # (Hkv, 1)
                score.scatter_(-1, slot, score[:, n : n + 1])
                pos.scatter_(-1, slot, pos[:, n : n + 1])
            else:
                n += 1
        keep = torch.arange(self.budget, device=index.device)[None, None, :] < rows.to(index.device)[None, :, None]
        return LayerChoice(rows, allowed_rows(index, keep.expand_as(index), inputs.k.shape[1]))
