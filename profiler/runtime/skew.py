"""InfiniGen's skewing, partial weight index and speculation ops, and the one row-selection rule.

Skewing (paper Sec. 4.3): per KV head, Q = U S V^T over queries (the group's query heads stacked) and
A = V, orthogonal, so (QA)(KA)^T = QK^T while QA concentrates its magnitude in a few columns. The
partial weight index keeps the `partial_ratio` columns with the largest sum |Q~| + |K~|. Speculation
of layer i scores the cached tokens with those columns only: partial Q(i) x partial K(i)^T / sqrt(D).
A and the column masses come either from the prompt at every prefill (`Skew.prepare` without a
calibration) or once, offline, from a calibration text (`SkewCalibration`, fitted by
profiler.studies.calibrate and stored by profiler.weights.skew_file), as the paper's artifact does.

The model's weights are never written, and the KV cache keeps plain K in both families: per layer a
skew object keeps A restricted to the kept columns, `skew_cols` (Hkv, D, d'), beside the model, and
the partial K of a token is k @ skew_cols per KV head. The families differ in the speculative query:
OPT has nothing between the projection and the dot product, so A's kept columns fold into a partial
copy of W_Q (and its bias), (A_cols^T W_Q) per head, and speculation computes only the d' columns
with one small linear (`FoldedSkew`). Llama's RoPE sits between the projection and the dot product,
so A cannot be folded: the speculative query is the full W_Q projection + RoPE, then skewed
(`RotarySkew`; InfiniGen's own Llama code does the same).

`Selection` is the rule that turns speculated logits (B, Hkv, G, [queries,] n) into rows; the runtime
(one query per step), the masked accuracy harness (every query at once, with a causal `valid` mask)
and the fetch statistics call the same two methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from infinigen_sim.spec.models import Family
from infinigen_sim.spec.policies import PolicyConfig
from profiler.runtime.model import Transformer

RANKS = ("sum", "max")


@dataclass(frozen=True)
class Selection:
    """How a KV head's cached rows are ranked and how many are selected.

    rank 'sum' (default): rows ranked by the group's summed speculated softmax, sum_g softmax_n(s_g);
    the count is, per query head, the rows scoring above that head's max - alpha, averaged over every
    query head (and sequence): the paper's per-head rule, one count for all heads. rank 'max': the
    earlier rule, rows ranked by the max logit over the group, counted above max - alpha of those
    maxima, averaged over KV heads. min_fetch_ratio floors the count at that share of the rows.
    """

    rank: str = field(default="sum", metadata={"help": "GQA ranking of a KV head's rows", "choices": RANKS})
    min_fetch_ratio: float = field(default=0.0, metadata={"help": "count floor", "unit": "share of the context"})

    def __post_init__(self) -> None:
        if self.rank not in RANKS:
            raise ValueError(f"rank: expected one of {', '.join(RANKS)}, got {self.rank!r}")
        if not 0 <= self.min_fetch_ratio <= 1:
            raise ValueError(f"min_fetch_ratio: expected a share in [0, 1], got {self.min_fetch_ratio!r}")

    def scores(self, logits: Tensor, valid: Tensor | None = None) -> Tensor:
        """logits (B, Hkv, G, *Q, n), rows not cached at -inf -> ranking scores (B, Hkv, *Q, n); `valid`
        (*Q, n), the cached rows, masks the others first (out of the softmax's sum too), and they score -inf
        (a summed softmax would give them 0)."""
        if valid is not None:
            logits = logits.masked_fill(~valid, -math.inf)
        if self.rank == "max":
            return logits.amax(dim=2)
        scores = torch.softmax(logits.float(), dim=-1).sum(dim=2).to(logits.dtype)
        return scores if valid is None else scores.masked_fill(~valid, -math.inf)

    def count(self, logits: Tensor, alpha: float, rows: Tensor | None = None) -> Tensor:
        """logits (B, Hkv, G, *Q, n), rows not cached at -inf -> rows selected (*Q), a mean over heads (0-d for
        one query); `rows` (*Q) the cached rows of each query, the floor's base (default: n)."""
        heads = (0, 1) if self.rank == "max" else (0, 1, 2)
        if self.rank == "max":
            logits = logits.amax(dim=2)  # (B, Hkv, *Q, n)
        threshold = logits.amax(dim=-1, keepdim=True) - alpha
        selected = (logits > threshold).sum(dim=-1).float().mean(dim=heads)
        if self.min_fetch_ratio > 0:  # the floor, a share of the rows each query could select
            if rows is None:
                return selected.clamp(min=self.min_fetch_ratio * logits.shape[-1])
            return torch.maximum(selected, self.min_fetch_ratio * rows.to(selected))
        return selected


DEFAULT_SELECTION = Selection()


def speculated_logits(q_part: Tensor, partial_k: Tensor, head_dim: int) -> Tensor:
    """q_part (B, Hkv, G, [Q,] d'), partial_k (B, Hkv, [1,] n, d') -> logits (B, Hkv, G, [Q,] n) in
    1/sqrt(D) units (the real attention's scale, so alpha means the same with every column count)."""
    if q_part.dim() == 4:
        return torch.matmul(q_part, partial_k.transpose(-1, -2)) * head_dim**-0.5  # (B, Hkv, G, n)
    B, Hkv, G, Q, d = q_part.shape
    flat = q_part.reshape(B, Hkv, G * Q, d)  # (B, Hkv, G*Q, d'): one matmul per KV head
    return (torch.matmul(flat, partial_k.reshape(B, Hkv, -1, d).transpose(-1, -2)) * head_dim**-0.5).view(
        B, Hkv, G, Q, -1)


def speculation_scores(q_part: Tensor, partial_k: Tensor, head_dim: int,
                       selection: Selection = DEFAULT_SELECTION) -> Tensor:
    """q_part (B, Hkv, G, d'), partial_k (B, Hkv, n, d') -> (B, Hkv, n) ranking scores."""
    return selection.scores(speculated_logits(q_part, partial_k, head_dim))


def count_above(logits: Tensor, alpha: float, selection: Selection = DEFAULT_SELECTION) -> Tensor:
    """Rows selected from logits (B, Hkv, G, n): a 0-d tensor on the device (Selection.count)."""
    return selection.count(logits, alpha)


# ---- fitting --------------------------------------------------------------------------------------
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


def column_mass(q_skewed: Tensor, k_skewed: Tensor) -> Tensor:
    """Per KV head and column, sum |Q~| (the group's heads pooled) + sum |K~| over tokens -> (Hkv, D) float64."""
    B, T, Hkv, D = k_skewed.shape
    q_mass = q_skewed.abs().double().reshape(B * T, Hkv, -1, D).sum(dim=(0, 2))  # (Hkv, D)
    return q_mass + k_skewed.abs().double().reshape(B * T, Hkv, D).sum(dim=0)


def top_columns(mass: Tensor, n_cols: int) -> Tensor:
    """The n_cols columns of largest mass (Hkv, D) per KV head -> (Hkv, n_cols), sorted."""
    return mass.topk(n_cols, dim=-1).indices.sort(dim=-1).values


def partial_columns(q_skewed: Tensor, k_skewed: Tensor, n_cols: int) -> Tensor:
    """Per KV head, the n_cols columns with the largest sum |Q~| + |K~| -> (Hkv, n_cols), sorted."""
    return top_columns(column_mass(q_skewed, k_skewed), n_cols)


def select_columns(t: Tensor, cols: Tensor) -> Tensor:
    """t (B, T, Hkv*G, D), cols (Hkv, d') -> (B, T, Hkv*G, d')."""
    B, T, H, D = t.shape
    Hkv, n = cols.shape
    index = cols.repeat_interleave(H // Hkv, dim=0).expand(B, T, H, n)
    return t.gather(-1, index)


def partial_column_count(policy: PolicyConfig, head_dim: int) -> int:
    """Columns kept per head: ceil(partial_ratio * D), as spec.policies.kv_memory counts them."""
    return min(head_dim, max(1, math.ceil(policy.partial_ratio * head_dim)))


@dataclass(frozen=True)
class SkewCalibration:
    """Skew fitted once, offline: per speculated layer A (Hkv, D, D) and the column masses (Hkv, D).

    Unskewed (the ablation): A is the identity and the masses are those of the plain Q and K.
    `meta` says where it came from (model, text, tokens, skewed, post_rope); profiler.weights.skew_file
    stores it.
    """

    skew: dict[int, Tensor]  # layer -> A (Hkv, D, D) float64
    mass: dict[int, Tensor]  # layer -> (Hkv, D) float64
    meta: dict[str, str] = field(default_factory=dict)

    def layer(self, layer: int, n_cols: int) -> tuple[Tensor, Tensor]:
        """(A, kept columns (Hkv, n_cols)) of one layer; KeyError names a layer it does not cover."""
        if layer not in self.skew:
            raise KeyError(f"the skew calibration has no layer {layer} (it covers {min(self.skew)}-{max(self.skew)})")
        return self.skew[layer].double(), top_columns(self.mass[layer], n_cols)


class Skew:
    """The skewing of every speculated layer, kept beside the model: A's kept columns per KV head."""

    def __init__(self, model: Transformer, n_cols: int, calibration: SkewCalibration | None = None) -> None:
        self.model, self.n_cols, self.calibration = model, n_cols, calibration
        self.skew_cols: dict[int, Tensor] = {}  # A restricted to the kept columns, (Hkv, D, d')

    def prepare(self, layer: int, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Prefill: skew layer `layer` (from q (B, T, H, D), k (B, T, Hkv, D) unless calibrated offline)
        -> (K to cache, unchanged, partial K (B, T, Hkv, d'))."""
        if self.calibration is not None:
            A, cols = self.calibration.layer(layer, self.n_cols)
        else:
            A = skew_matrices(q, k.shape[2])  # (Hkv, D, D) float64
            cols = partial_columns(apply_skew(q.double(), A), apply_skew(k.double(), A), self.n_cols)
        Hkv, D, _ = A.shape
        A_cols = A.gather(-1, cols[:, None, :].to(A.device).expand(Hkv, D, self.n_cols))  # (Hkv, D, d')
        self.skew_cols[layer] = A_cols.to(q.device, q.dtype)
        self.fold(layer, A_cols.to(q.device))
        return k, self.partial_k(layer, k)

    def fold(self, layer: int, A_cols: Tensor) -> None:
        """What the family keeps of layer `layer`'s skew besides `skew_cols` (A_cols float64)."""

    def partial_k(self, layer: int, k: Tensor) -> Tensor:
        """k (B, T, Hkv, D) -> its kept skewed columns (B, T, Hkv, d')."""
        return apply_skew(k, self.skew_cols[layer])

    def query_tokens(self, layer: int, a: Tensor, input_pos: Tensor) -> Tensor:
        """Partial queries of layer `layer` from its attention input a (B, T, d) -> (B, T, H, d')."""
        raise NotImplementedError

    def query(self, layer: int, a: Tensor, input_pos: Tensor) -> Tensor:
        """The new token's partial query, a (B, 1, d) -> (B, Hkv, G, d')."""
        B = a.shape[0]
        return self.query_tokens(layer, a, input_pos).view(B, self.skew_cols[layer].shape[0], -1, self.n_cols)


class FoldedSkew(Skew):
    """OPT: A's kept columns folded into a partial W_Q (and bias) of H*d' rows, beside the model."""

    def __init__(self, model: Transformer, n_cols: int, calibration: SkewCalibration | None = None) -> None:
        super().__init__(model, n_cols, calibration)
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

    def query_tokens(self, layer: int, a: Tensor, input_pos: Tensor) -> Tensor:
        """Only the d' kept columns of the skewed query, in one small linear."""
        B, T, _ = a.shape
        q = F.linear(a, self.partial_wq[layer], self.partial_bq[layer])  # (B, T, H*d')
        return q.view(B, T, -1, self.n_cols)


class RotarySkew(Skew):
    """Llama: A applied to the post-RoPE query in the speculation path (RoPE forbids folding)."""

    def query_tokens(self, layer: int, a: Tensor, input_pos: Tensor) -> Tensor:
        """Full W_Q projection + RoPE at the tokens' positions, then the kept skewed columns."""
        B, T, _ = a.shape
        attn = self.model.layers[layer].self_attn
        q = attn.q_proj(a).view(B, T, attn.n_heads, attn.head_dim)
        q = self.model.embed_positions.rotate(q, input_pos)
        return apply_skew(q, self.skew_cols[layer])  # (B, T, H, d')


SKEW = {Family.OPT: FoldedSkew, Family.LLAMA: RotarySkew}
