"""InfiniGen's prefill-time skewing, partial weight index and decode-time speculation ops.

Skewing (paper Sec. 4.3): per KV head, Q = U S V^T over the prompt's queries (the group's query heads
stacked) and A = V, orthogonal, so (QA)(KA)^T = QK^T while QA concentrates its magnitude in a few
columns. The partial weight index keeps the `partial_ratio` columns with the largest
sum |Q~| + |K~| over the prompt. Speculation of layer i scores the cached tokens with those
columns only: partial Q(i) x partial K(i)^T / sqrt(D).

OPT folds A into W_Q and W_K (and their biases), so the cached K is already skewed and partial W_Q is
a row slice of W_Q (`FoldedSkew`). Llama's RoPE sits between the projection and the dot product, so
A cannot be folded: it is applied to post-RoPE q/k inside speculation only, the cache keeps plain
K, and the speculative query needs the full W_Q projection (`RotarySkew`; InfiniGen's own Llama
code does the same).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from infinigen_sim.models import Family
from infinigen_sim.policies import PolicyConfig
from profiler.runtime.model import SelfAttention, Transformer


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
    """Columns kept per head: ceil(partial_ratio * D), as policies.kv_memory counts them."""
    return min(head_dim, max(1, math.ceil(policy.partial_ratio * head_dim)))


def fold_skew(attn: SelfAttention, A: Tensor) -> None:
    """W_Q and W_K rows of each head (and biases) <- A^T W, in float64, in place."""
    Hkv, D, _ = A.shape
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj):
            w = proj.weight.double().view(Hkv, -1, D, proj.weight.shape[1])  # (Hkv, G, D, d)
            proj.weight.copy_(torch.einsum("jde,jgdi->jgei", A, w).reshape(proj.weight.shape))
            if proj.bias is not None:
                b = proj.bias.double().view(Hkv, -1, D)  # (Hkv, G, D)
                proj.bias.copy_(torch.einsum("jde,jgd->jge", A, b).reshape(proj.bias.shape))


class FoldedSkew:
    """OPT: A folded into the weights; partial W_Q (and bias) are row slices of the folded W_Q."""

    def __init__(self, model: Transformer, n_cols: int) -> None:
        self.model, self.n_cols = model, n_cols
        self.cols: dict[int, Tensor] = {}
        self.partial_wq: dict[int, Tensor] = {}  # (H*d', d)
        self.partial_bq: dict[int, Tensor | None] = {}

    def prepare(self, layer: int, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Prefill: skew layer `layer` -> (K to cache (B, T, Hkv, D), partial K (B, T, Hkv, d'))."""
        attn = self.model.layers[layer].self_attn
        A = skew_matrices(q, attn.n_kv_heads)
        fold_skew(attn, A)
        q_s, k_s = apply_skew(q.double(), A), apply_skew(k.double(), A)
        cols = self.cols[layer] = partial_columns(q_s, k_s, self.n_cols).to(q.device)
        Hkv, n = cols.shape
        w = attn.q_proj.weight.view(Hkv, -1, attn.head_dim, attn.q_proj.weight.shape[1])  # (Hkv, G, D, d)
        self.partial_wq[layer] = w.gather(2, cols[:, None, :, None].expand(Hkv, w.shape[1], n, w.shape[3]))
        self.partial_wq[layer] = self.partial_wq[layer].reshape(-1, w.shape[3]).contiguous()
        bias = attn.q_proj.bias
        self.partial_bq[layer] = None if bias is None else bias.view(Hkv, -1, attn.head_dim).gather(
            2, cols[:, None, :].expand(Hkv, w.shape[1], n)).reshape(-1).contiguous()
        k_s = k_s.to(k.dtype)
        return k_s, select_columns(k_s, cols)

    def partial_k(self, layer: int, k: Tensor) -> Tensor:
        """The new token's partial K: k (B, 1, Hkv, D) is already skewed by the folded W_K."""
        return select_columns(k, self.cols[layer])

    def query(self, layer: int, a: Tensor, input_pos: Tensor) -> Tensor:
        """Partial query of layer `layer` from a (B, 1, d) -> (B, Hkv, G, d')."""
        B = a.shape[0]
        Hkv = self.cols[layer].shape[0]
        q = torch.nn.functional.linear(a, self.partial_wq[layer], self.partial_bq[layer])  # (B, 1, H*d')
        return q.view(B, Hkv, -1, self.n_cols)


class RotarySkew:
    """Llama: A applied to post-RoPE q/k in the speculation path; the cache keeps plain K."""

    def __init__(self, model: Transformer, n_cols: int) -> None:
        self.model, self.n_cols = model, n_cols
        self.skew_cols: dict[int, Tensor] = {}  # A restricted to the kept columns, (Hkv, D, d')

    def prepare(self, layer: int, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        A = skew_matrices(q, k.shape[2])
        cols = partial_columns(apply_skew(q.double(), A), apply_skew(k.double(), A), self.n_cols)
        Hkv, D, _ = A.shape
        self.skew_cols[layer] = A.gather(-1, cols[:, None, :].expand(Hkv, D, self.n_cols)).to(q.device, q.dtype)
        return k, self.partial_k(layer, k)

    def partial_k(self, layer: int, k: Tensor) -> Tensor:
        return apply_skew(k, self.skew_cols[layer])  # (B, T, Hkv, d')

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
