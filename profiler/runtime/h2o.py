"""`h2o`: heavy hitters + recent tokens within a fixed budget, held in host memory (Zhang et al. 2023).

Per (sequence, KV head) the cache keeps at most heavy + recent rows (spec.policies.h2o_budget, fixed
from the prompt length per layer: the first `head_layers` layers may keep shares of their own, as the
InfiniGen artifact's H2O keeps half the prompt as heavy hitters in layers 0-1). Each token's score is
its accumulated attention probability, summed over every query so far and over the query heads sharing
the KV head. At prefill the prompt's scores come from its causal attention and the kept set is the
`recent` last tokens plus the `heavy` best-scoring others. Each decode step fetches the kept rows (a
contiguous prefix, no gather), attends over them plus the new token, adds the probabilities to the
scores and, once over budget, evicts the lowest-scoring row outside the recent window; the new token
takes the evicted row's slot, so the host rows stay a dense prefix. Scores and positions live on the
device, next to the probabilities.

The new row's D2H is issued after QKV as for every policy; its slot is known only after attention,
so its commit into the host cache (on the copy worker) is submitted from `after_attention`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.policies import h2o_budget
from profiler.runtime.kv_cache import OffloadedCache, take_rows
from profiler.runtime.model import prompt_attention_mass


def select_heavy_recent(mass: Tensor, heavy: int, recent: int) -> Tensor:
    """Prompt positions kept per (sequence, KV head): mass (B, Hkv, T) -> (B, Hkv, heavy + recent)."""
    B, Hkv, T = mass.shape
    older = T - recent
    recent_pos = torch.arange(older, T, device=mass.device).expand(B, Hkv, recent)
    heavy_pos = mass[..., :older].topk(heavy, dim=-1).indices  # (B, Hkv, heavy)
    return torch.cat([heavy_pos, recent_pos], dim=-1)


class HeavyHitterCache(OffloadedCache):
    """`h2o` on the offloaded machinery: a dense prefix of at most `budget` host rows per layer."""

    needs_probs = True

    def _host_rows(self, max_rows: int, prompt_len: int) -> int:
        """Each layer's (heavy, recent) budget (the first `head_layers` may keep their own shares, as the
        InfiniGen artifact's H2O does); every layer's host planes hold the largest."""
        self.budgets = [h2o_budget(self.policy, prompt_len, layer) for layer in range(self.n_layers)]
        return min(max_rows, max(heavy + recent for heavy, recent in self.budgets))

    def allocate_device(self, batch: int, max_rows: int, prompt_len: int) -> None:
        super().allocate_device(batch, max_rows, prompt_len)
        lanes = (self.n_layers, batch, self.spec.n_kv_heads, self.host_rows + 1)  # +1: the new token
        self.score = torch.zeros(lanes, device=self.rt.device, dtype=torch.float32)
        self.pos = torch.zeros(lanes, device=self.rt.device, dtype=torch.int64)
        pin = self.copier.cuda
        self.slots = [torch.zeros(batch, self.spec.n_kv_heads, dtype=torch.int64, pin_memory=pin)
                      for _ in range(self.n_layers)]

    def reset(self) -> None:
        super().reset()
        self.written: list[object] = [None] * self.n_layers

    def store_prompt(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> None:
        B, T, Hkv, _ = k.shape
        heavy, recent = self.budgets[layer]
        with self.timer.span(Op.SCORE, layer):
            mass = prompt_attention_mass(q, k)  # (B, Hkv, T)
            if T <= heavy + recent:
                keep = torch.arange(T, device=k.device).expand(B, Hkv, T)
            else:
                keep = select_heavy_recent(mass, heavy, recent)
            m = keep.shape[-1]
            self.score[layer, ..., :m] = mass.gather(-1, keep)
            self.pos[layer, ..., :m] = keep
        self._store_rows(layer, take_rows(k, keep), take_rows(v, keep))  # (m, B, Hkv, D)

    def write_back(self, layer: int, k: Tensor, v: Tensor) -> None:
        if self.commits[layer] is not None:
            self.commits[layer].result()  # the staging row is reused only once its last commit ran
        rows = (k.transpose(0, 1), v.transpose(0, 1))  # (1, B, Hkv, D)
        self.written[layer] = self.copier.d2h(layer, zip(self.staged[layer].t, rows, strict=True))

    def after_attention(self, layer: int, probs: Tensor | None, n: int) -> None:
        assert probs is not None
        new_pos = self.context_len
        score, pos = self.score[layer], self.pos[layer]  # (B, Hkv, budget + 1)
        heavy, window = self.budgets[layer]
        with self.timer.span(Op.SCORE, layer):
            score[..., n], pos[..., n] = 0.0, new_pos
            score[..., : n + 1] += probs.float().sum(dim=2)  # (B, Hkv, G, n+1) -> the KV head's share
            if n + 1 > heavy + window:
                recent = pos[..., : n + 1] > new_pos - window
                slot = score[..., : n + 1].masked_fill(recent, float("inf")).argmin(-1, keepdim=True)
                score.scatter_(-1, slot, score[..., n : n + 1])  # the new token moves into the evicted slot
                pos.scatter_(-1, slot, pos[..., n : n + 1])
            else:
                slot = torch.full_like(pos[..., :1], n)
                self.entries[layer] += 1
        sent = self.copier.d2h(layer, [(self.slots[layer], slot.squeeze(-1))])
        self.commits[layer] = self.copier.submit(self._commit_slots, layer, self.written[layer], sent)

    def _commit_slots(self, layer: int, written: object, sent: object) -> Tensor:
        """Worker: the new row into its slot, once both the row and the slot are in host memory."""
        self.copier.host_wait(written)  # the row's D2H
        self.copier.host_wait(sent)  # the slots' D2H (same stream, issued later)
        return self._commit_job(layer, self.slots[layer], None)
