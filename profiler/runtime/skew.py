"""InfiniGen's prefill-time skewing, partial weight index and decode-time speculation ops.

Skewing (paper Sec. 4.3): per KV head, Q = U S V^T over the prompt's queries (the group's query heads
stacked) and A = V, orthogonal, so (QA)(KA)^T = QK^T while QA concentrates its magnitude in a few
columns. The partial weight index keeps the `partial_ratio` columns with the largest
sum |Q~| + |K~| over the prompt. Speculation of layer i scores the cached tokens with those
columns only: partial Q(i) x partial K(i)^T / sqrt(D).

The model's weights are never written, and the KV cache keeps plain K in both families: per layer a
skew object keeps A restricted to the kept columns, `skew_cols` (Hkv, D, d'), beside the model, and
the partial K of a token is k @ skew_cols per KV head. The families differ in the speculative query:
OPT has nothing between the projection and the dot product, so A's kept columns fold into a partial
copy of W_Q (and its bias), (A_cols^T W_Q) per head, and speculation computes only the d' columns
with one small linear (`FoldedSkew`). Llama's RoPE sits between the projection and the dot product,
so A cannot be folded: the speculative query is the full W_Q projection + RoPE, then skewed
(`RotarySkew`; InfiniGen's own Llama code does the same).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from infinigen_sim.spec.models import Family
from infinigen_sim.spec.policies import PolicyConfig
from profiler.runtime.model import Transformer


def skew_matrices(q: Tensor, n_kv_heads: int) -> Tensor:
    """q (B, T, H, D) -> A (Hkv, D, D) in float64: right singular vectors of each KV head's queries,
    columns by descending singular value (eigenvectors of Q^T Q, so no U is ever formed)."""
    B, T, H, D = q.shape
    G = H // n_kv_heads
    q_heads = q.reshape(B * T, n_kv_heads, G, D).transpose(0, 1).reshape(n_kv_heads, B * T * G, D).double()
    gram = q_heads.transpose(1, 2) @ q_heads  # (Hkv, D, D) = V S^2 V^T
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vectors.flip(-1)


def apply_skew(t: Tensor, A: Tensor) -> Tensor:
    """t (B, T, Hkv*G, X) times its KV head's A (Hkv, X, Y) -> (B, T, Hkv*G, Y)."""
    B, T, H, X = t.shape
    Hkv = A.shape[0]
    grouped = t.reshape(B, T, Hkv, H // Hkv, X)  # (B, T, Hkv, G, X)
    return torch.einsum("btjgx,jxy->btjgy", grouped, A.to(t.dtype)).reshape(B, T, H, A.shape[-1])


def partial_columns(q_skewed: Tensor, k_skewed: Tensor, n_cols: int) -> Tensor:
    """Per KV head, the n_cols columns with the largest sum |Q~| + |K~| -> (Hkv, n_cols), sorted."""
    B, T, Hkv, D = k_skewed.shape
    q_mass = q_skewed.abs().double().reshape(B * T, Hkv, -1, D).sum(dim=(0, 2))  # (Hkv, D)
    k_mass = k_skewed.abs().double().reshape(B * T, Hkv, D).sum(dim=0)
    return (q_mass + k_mass).topk(n_cols, dim=-1).indices.sort(dim=-1).values


def select_columns(t: Tensor, cols: Tensor) -> Tensor:
    """t (B, T, Hkv*G, D), cols (Hkv, d') -> (B, T, Hkv*G, d')."""
    B, T, H, D = t.shape
    Hkv, n = cols.shape
    index = cols.repeat_interleave(H // Hkv, dim=0).expand(B, T, H, n)
    return t.gather(-1, index)


def partial_column_count(policy: PolicyConfig, head_dim: int) -> int:
    """Columns kept per head: ceil(partial_ratio * D), as spec.policies.kv_memory counts them."""
    return min(head_dim, max(1, math.ceil(policy.partial_ratio * head_dim)))


class Skew:
    """The skewing of every speculated layer, kept beside the model: A's kept columns per KV head."""

    def __init__(self, model: Transformer, n_cols: int) -> None:
        self.model, self.n_cols = model, n_cols
        self.skew_cols: dict[int, Tensor] = {}  # A restricted to the kept columns, (Hkv, D, d')

    def prepare(self, layer: int, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Prefill: skew layer `layer` from q (B, T, H, D), k (B, T, Hkv, D) -> (K to cache, unchanged,
        partial K (B, T, Hkv, d'))."""
        A = skew_matrices(q, k.shape[2])  # (Hkv, D, D) float64
        cols = partial_columns(apply_skew(q.double(), A), apply_skew(k.double(), A), self.n_cols)
        Hkv, D, _ = A.shape
        A_cols = A.gather(-1, cols[:, None, :].expand(Hkv, D, self.n_cols))  # (Hkv, D, d')
        self.skew_cols[layer] = A_cols.to(q.device, q.dtype)
        self.fold(layer, A_cols)
        return k, self.partial_k(layer, k)

    def fold(self, layer: int, A_cols: Tensor) -> None:
        """What the family keeps of layer `layer`'s skew besides `skew_cols` (A_cols float64)."""

    def partial_k(self, layer: int, k: Tensor) -> Tensor:
        """k (B, T, Hkv, D) -> its kept skewed columns (B, T, Hkv, d')."""
        return apply_skew(k, self.skew_cols[layer])

    def query(self, layer: int, a: Tensor, input_pos: Tensor) -> Tensor:
        """Partial query of layer `layer` from its attention input a (B, 1, d) -> (B, Hkv, G, d')."""
        raise NotImplementedError


class FoldedSkew(Skew):
    """OPT: A's kept columns folded into a partial W_Q (and bias) of H*d' rows, beside the model."""

    def __init__(self, model: Transformer, n_cols: int) -> None:
        super().__init__(model, n_cols)
        self.partial_wq: dict[int, Tensor] = {}  # (H*d', d): per head h of KV head j, A_cols[j]^T W_Q[h]
        self.partial_bq: dict[int, Tensor | None] = {}  # (H*d',)

    def fold(self, layer: int, A_cols: Tensor) -> None:
        proj = self.model.layers[layer].self_attn.q_proj
        Hkv, D, _ = A_cols.shape
        with torch.no_grad():  # reads W_Q, writes only the copy
            w = proj.weight.double().view(Hkv, -1, D, proj.weight.shape[1])  # (Hkv, G, D, d)
            partial = torch.einsum("jde,jgdi->jgei", A_cols, w).reshape(-1, w.shape[-1])  # (H*d', d)
            self.partial_wq[layer] = partial.to(proj.weight.dtype).contiguous()
            bias = None
            if proj.bias is not None:
                b = proj.bias.double().view(Hkv, -1, D)  # (Hkv, G, D)
                bias = torch.einsum("jde,jgd->jge", A_cols, b).reshape(-1).to(proj.bias.dtype)
            self.partial_bq[layer] = bias

    def query(self, layer: int, a: Tensor, input_pos: Tensor) -> Tensor:
        """Only the d' kept columns of the skewed query, in one small linear."""
        B = a.shape[0]
        Hkv = self.skew_cols[layer].shape[0]
        q = F.linear(a, self.partial_wq[layer], self.partial_bq[layer])  # (B, 1, H*d')
        return q.view(B, Hkv, -1, self.n_cols)


class RotarySkew(Skew):
    """Llama: A applied to the post-RoPE query in the speculation path (RoPE forbids folding)."""

    def query(self, layer: int, a: Tensor, input_pos: Tensor) -> Tensor:
        """Full W_Q projection + RoPE at the new token's position, then the kept skewed columns."""
        B = a.shape[0]
        attn = self.model.layers[layer].self_attn
        q = attn.q_proj(a).view(B, 1, attn.n_heads, attn.head_dim)
        q = self.model.embed_positions.rotate(q, input_pos)
        return apply_skew(q, self.skew_cols[layer]).view(B, attn.n_kv_heads, -1, self.n_cols)  # (B, Hkv, G, d')


SKEW = {Family.OPT: FoldedSkew, Family.LLAMA: RotarySkew}


def speculation_scores(q_part: Tensor, partial_k: Tensor, head_dim: int) -> Tensor:
    """q_part (B, Hkv, G, d'), partial_k (B, Hkv, n, d') -> (B, Hkv, n) speculated scores.

    A KV head's row matters if any query head of its group wants it: the max over the group.
    """
    scores = torch.matmul(q_part, partial_k.transpose(-1, -2)) * head_dim**-0.5  # (B, Hkv, G, n)
    return scores.amax(dim=2)


def count_above(scores: Tensor, alpha: float) -> Tensor:
    """Rows scoring above max - alpha per (sequence, KV head), averaged: a 0-d tensor on the device."""
    threshold = scores.amax(dim=-1, keepdim=True) - alpha
    return (scores > threshold).sum(dim=-1).float().mean()
