"""Skewing measured on a real model: how it concentrates the query and what that buys speculation.

One full-KV forward pass over a text (PG-19 by default) records, per layer, the attention input and
the post-RoPE q and k. The first `prompt_len` tokens play the prompt: they build each layer's skewing
matrix A (skew.skew_matrices) and partial columns (skew.partial_columns), as InfiniGen's prefill does.
The later positions play decode steps and are what is measured (layers >= full_fetch_layers):

- energy share: the share of sum |Q|^2 that the top `partial_ratio` of a head's columns hold, before
  skewing (q as computed) and after (q A); the columns are the best ones for the measured queries.
  Measured on the prompt's own queries (what A was fitted to) and on the later ones: Llama's K/V are
  skewed after RoPE (skew.RotarySkew), so a basis fitted at prompt positions may not fit later ones.
- speculation recall: at each decode position t, layer i's rows are scored as InfiniGen does, with
  layer i's W_Q applied to layer i-1's attention input, the partial columns only, ranked per KV head
  by the runtime's rule (skew.Selection: the group's summed speculated softmax); the top
  k = ceil(k_ratio * t) cached rows are kept. Recall is the true
  attention mass (layer i's full attention, mean over the group's heads, over the cached rows) those
  rows hold, over the mass of the true top k. Compared: skewed partial columns (InfiniGen), the same
  number of unskewed columns picked by the same |Q| + |K| rule, and all columns (no partial weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from infinigen_sim.spec.policies import make_policy
from profiler.runtime.model import Transformer, prefill_attention
from profiler.runtime.skew import (
    DEFAULT_SELECTION,
    Selection,
    apply_skew,
    partial_column_count,
    partial_columns,
    select_columns,
    skew_matrices,
    speculated_logits,
)

K_RATIOS = (0.05, 0.1, 0.2)  # rows kept, share of the cached context (0.2 = InfiniGen's cap)
VARIANTS = ("skewed", "unskewed", "all columns")


@dataclass
class SkewStats:
    """Per speculated layer: energy shares before/after skewing, and recall per (variant, k_ratio)."""

    n_cols: int
    head_dim: int
    layers: list[int]
    energy_before: list[float]  # later positions
    energy_after: list[float]
    prompt_energy_before: list[float]  # the prompt's queries, which A was fitted to
    prompt_energy_after: list[float]
    recall: dict[tuple[str, float], list[float]]

    def mean(self, values: list[float]) -> float:
        return sum(values) / len(values)


def layer_inputs(model: Transformer, ids: Tensor):
    """Yield (layer, previous layer's attention input (1, T, d), q (1, T, H, D), k (1, T, Hkv, D))."""
    pos = torch.arange(ids.shape[1])
    x = model.embed(ids, pos)
    prev = None
    for layer, block in enumerate(model.layers):
        a = block.input_layernorm(x)
        q, k, v = model.qkv(layer, a, pos)  # post-RoPE
        yield layer, prev, q, k
        x = x + block.self_attn.o_proj(prefill_attention(q, k, v))
        x = x + block.ffn(x)
        prev = a


def top_share(q: Tensor, n_cols: int) -> Tensor:
    """q (1, T, H, D) -> (H,) share of each head's column energy in its n_cols strongest columns."""
    energy = q.double().pow(2).sum(dim=(0, 1))  # (H, D)
    return energy.topk(n_cols, dim=-1).values.sum(-1) / energy.sum(-1)


def true_mass(q: Tensor, k: Tensor, start: int) -> Tensor:
    """Full causal attention of queries [start, T), mean over a KV head's query heads, on the cached rows.

    q (1, T, H, D), k (1, T, Hkv, D) -> (Hkv, T - start, T); rows j >= t (the query's own, the future) hold 0.
    """
    _, T, H, D = q.shape
    Hkv = k.shape[2]
    qg = q[0, start:].reshape(T - start, Hkv, H // Hkv, D).permute(1, 2, 0, 3)  # (Hkv, G, Tq, D)
    scores = torch.matmul(qg, k[0].permute(1, 2, 0).unsqueeze(1)).float() * D**-0.5  # (Hkv, G, Tq, T)
    t, j = torch.arange(start, T)[:, None], torch.arange(T)[None, :]
    probs = torch.softmax(scores.masked_fill(j > t, float("-inf")), dim=-1)
    return probs.masked_fill(j >= t, 0.0).mean(dim=1)


def speculated_scores(q_part: Tensor, k_part: Tensor, start: int, head_dim: int,
                      selection: Selection = DEFAULT_SELECTION) -> Tensor:
    """Partial scores of queries [start, T) over rows j < t, ranked by the runtime's rule: (Hkv, Tq, T)."""
    _, T, H, d = q_part.shape
    Hkv = k_part.shape[2]
    qg = q_part[0, start:].reshape(T - start, Hkv, H // Hkv, d).permute(1, 2, 0, 3)[None]  # (1, Hkv, G, Tq, d')
    logits = speculated_logits(qg, k_part.permute(0, 2, 1, 3)[:, :, None], head_dim)  # (1, Hkv, G, Tq, T)
    valid = torch.arange(start, T)[:, None] > torch.arange(T)[None, :]
    return selection.scores(logits, valid)[0]


def recall_at(scores: Tensor, mass: Tensor, start: int, k_ratio: float) -> float:
    """Mean over (KV head, query) of mass in the top-k scored rows / mass in the true top-k rows."""
    Tq = scores.shape[1]
    k = torch.tensor([max(1, math.ceil(k_ratio * t)) for t in range(start, start + Tq)])  # (Tq,)
    picked = mass.gather(-1, scores.argsort(dim=-1, descending=True)).cumsum(-1)  # (Hkv, Tq, T)
    best = mass.sort(dim=-1, descending=True).values.cumsum(-1)
    index = (k - 1).expand(scores.shape[0], Tq).unsqueeze(-1)
    return float((picked.gather(-1, index) / best.gather(-1, index).clamp_min(1e-12)).mean())


@torch.inference_mode()
def measure(model: Transformer, ids: Tensor, prompt_len: int, partial_ratio: float | None = None,
            k_ratios: tuple[float, ...] = K_RATIOS) -> SkewStats:
    """Skewing statistics of `model` over ids (1, T); the first prompt_len tokens are the prompt."""
    policy = make_policy("infinigen", **({} if partial_ratio is None else {"partial_ratio": partial_ratio}))
    spec = model.spec
    n_cols = partial_column_count(policy, spec.head_dim)
    stats = SkewStats(n_cols, spec.head_dim, [], [], [], [], [], {(v, r): [] for v in VARIANTS for r in k_ratios})
    P = prompt_len
    for layer, prev, q, k in layer_inputs(model, ids):
        if layer < policy.full_fetch_layers:
            continue
        attn = model.layers[layer].self_attn
        A = skew_matrices(q[:, :P], spec.n_kv_heads)  # (Hkv, D, D) float64, from the prompt only
        q_s = apply_skew(q.double(), A)
        stats.layers.append(layer)
        stats.energy_before.append(float(top_share(q[:, P:], n_cols).mean()))
        stats.energy_after.append(float(top_share(q_s[:, P:], n_cols).mean()))
        stats.prompt_energy_before.append(float(top_share(q[:, :P], n_cols).mean()))
        stats.prompt_energy_after.append(float(top_share(q_s[:, :P], n_cols).mean()))
        # InfiniGen's speculative query: layer i's W_Q on layer i-1's attention input, at each position
        pos = torch.arange(ids.shape[1])
        q_spec = model.embed_positions.rotate(attn.q_proj(prev).view(1, -1, spec.n_heads, spec.head_dim), pos)
        cols_s = partial_columns(q_s[:, :P], apply_skew(k[:, :P].double(), A), n_cols)  # (Hkv, d')
        A_part = A.gather(-1, cols_s[:, None, :].expand(spec.n_kv_heads, spec.head_dim, n_cols)).to(q.dtype)
        cols_u = partial_columns(q[:, :P], k[:, :P], n_cols)
        parts = {
            "skewed": (apply_skew(q_spec, A_part), apply_skew(k, A_part)),
            "unskewed": (select_columns(q_spec, cols_u), select_columns(k, cols_u)),
            "all columns": (q_spec, k),
        }
        mass = true_mass(q, k, P)
        for variant, (q_part, k_part) in parts.items():
            scores = speculated_scores(q_part, k_part, P, spec.head_dim)
            for r in k_ratios:
                stats.recall[variant, r].append(recall_at(scores, mass, P, r))
    return stats


def format_stats(stats: SkewStats, tokens: int, prompt_len: int) -> str:
    share = stats.n_cols / stats.head_dim
    lines = [f"skewing on {tokens} tokens (prompt {prompt_len}, measured on the {tokens - prompt_len} later "
             f"positions), layers {stats.layers[0]}-{stats.layers[-1]}, mean over layers and heads",
             f"  energy share of |Q|^2 in the top {stats.n_cols}/{stats.head_dim} columns ({share:.0%}), "
             "before -> after skewing:",
             f"    prompt queries (A fitted to them) {stats.mean(stats.prompt_energy_before):.3f} -> "
             f"{stats.mean(stats.prompt_energy_after):.3f}; later queries {stats.mean(stats.energy_before):.3f} -> "
             f"{stats.mean(stats.energy_after):.3f}",
             "  speculation recall (true attention mass in the speculated top-k rows / in the true top-k):"]
    ratios = sorted({r for _, r in stats.recall})
    lines.append("    " + f"{'variant':<22}" + "".join(f"{f'k={r:g}n':>9}" for r in ratios))
    for variant in VARIANTS:
        cells = "".join(f"{stats.mean(stats.recall[variant, r]):>9.3f}" for r in ratios)
        label = f"{variant} ({stats.n_cols if variant != 'all columns' else stats.head_dim} cols)"
        lines.append(f"    {label:<22}{cells}")
    return "\n".join(lines)
