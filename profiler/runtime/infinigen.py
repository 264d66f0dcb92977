"""`infinigen`: speculate, gather and prefetch only the important K/V rows (Lee et al., OSDI 2024).

Prefill skews every speculated layer (skew.py: kept beside the model, whose weights it never writes;
the host cache keeps plain K; A and the partial columns fitted on the prompt, or taken from an offline
`SkewCalibration` given to `configure`) and keeps its partial K cache on the device. At the
start of decode layer i-1 the engine hands this cache layer i-1's attention input; `plan_fetch`
speculates layer i with it (partial Q x partial K^T, then skew.Selection: the count of rows above
max - alpha and the ranking of a KV head's rows, by default the group's summed speculated softmax),
sends the indices and the count to the host (small D2H), and the copy worker turns the count into
a row count through spec.policies.infinigen_fetch_count, gathers exactly those rows into a staging
buffer (pinned on CUDA) and copies them to the device on the copy stream; layer i's attention waits
on that event. Layers < full_fetch_layers fetch everything, unspeculated.

The top-k runs on the device with k = the cap (infinigen_cap) and the worker keeps the first
`count` of those sorted indices, the same rows as top-`count`, so the compute thread never blocks
to read the count. With `pool_ratio` the host holds a bounded pool of rows per (sequence, KV head)
with counter-based eviction (HostPool); the partial K cache follows the pool slot for slot.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.policies import infinigen_cap, infinigen_fetch_count
from profiler.runtime.kv_cache import OffloadedCache, Planes, Runtime, take_rows
from profiler.runtime.model import prompt_attention_mass
from profiler.runtime.skew import (
    DEFAULT_SELECTION,
    SKEW,
    Selection,
    SkewCalibration,
    partial_column_count,
    speculated_logits,
)
from profiler.runtime.transfer import Event, FetchResult


class HostPool:
    """A bounded host KV pool: per (sequence, KV head) slots, each with a use counter.

    A counter is incremented each time its row is fetched; when the pool is full the new token
    replaces the row with the smallest count (ties: the oldest token); when a counter reaches
    SATURATION all counters of its (sequence, KV head) are halved.
    """

    SATURATION = 255

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, capacity: int) -> None:
        self.capacity = capacity
        shape = (n_layers, batch, n_kv_heads, capacity)
        self.count = torch.zeros(shape, dtype=torch.int32)
        self.pos = torch.full(shape, -1, dtype=torch.int64)  # token position held by each slot

    def fill(self, layer: int, positions: Tensor) -> None:
        """The prompt's rows: positions (B, Hkv, m) in slots [:m]."""
        self.count[layer] = 0
        self.pos[layer] = -1
        self.pos[layer, ..., : positions.shape[-1]] = positions

    def touch(self, layer: int, slots: Tensor | int) -> None:
        """Count a fetch of slots (B, Hkv, n), or of the first `slots` slots of every lane."""
        count = self.count[layer]
        if isinstance(slots, int):
            count[..., :slots] += 1
        else:
            slots = slots.long()  # the speculated indices arrive as int32; scatter takes int64
            count.scatter_add_(-1, slots, torch.ones_like(slots, dtype=count.dtype))
        saturated = (count >= self.SATURATION).any(dim=-1)  # (B, Hkv)
        count[saturated] //= 2

    def place(self, layer: int, entries: int, new_pos: int) -> Tensor:
        """The slot (B, Hkv) of a new token: the next free one, else evict the least-used."""
        count, pos = self.count[layer], self.pos[layer]
        if entries < self.capacity:
            slots = torch.full(count.shape[:-1], entries, dtype=torch.int64)
        else:
            key = count.to(torch.int64) * 2**32 + pos  # least used first, then oldest
            slots = key.argmin(dim=-1)
        count.scatter_(-1, slots.unsqueeze(-1), 0)
        pos.scatter_(-1, slots.unsqueeze(-1), new_pos)
        return slots


class PoolSlot(NamedTuple):
    """A new token's row before the pool has chosen its slot (on the worker, beside the counters)."""

    entries: int
    new_pos: int


@dataclass
class SpeculationPlan:
    """Layer i's speculated rows on their way to the host."""

    index: Tensor  # (B, Hkv, cap) int32 row indices by descending score, host (pinned on CUDA)
    selected: Tensor  # (1,) mean count of rows above max - alpha, host
    entries: int  # rows the speculation scored
    ready: Event  # the D2H of index and selected


class InfiniGenCache(OffloadedCache):
    """`infinigen` on the offloaded machinery: speculated gathers for layers >= full_fetch_layers."""

    def __init__(self, rt: Runtime) -> None:
        self.selection: Selection = DEFAULT_SELECTION  # set before the base class records its own attributes,
        self.calibration: SkewCalibration | None = None  # so `release` keeps them across allocations
        super().__init__(rt)

    def configure(self, selection: Selection | None = None, calibration: SkewCalibration | None = None) -> None:
        """The selection rule and an offline skew calibration (None: fit on each prompt); before a generation."""
        self.selection = selection or DEFAULT_SELECTION
        self.calibration = calibration
        if hasattr(self, "skew"):  # already allocated: the next prefill uses the new calibration
            self.skew.calibration = calibration

    def _host_rows(self, max_rows: int, prompt_len: int) -> int:
        ratio = self.policy.pool_ratio
        return max_rows if ratio is None else max(1, math.ceil(ratio * max_rows))

    def allocate_device(self, batch: int, max_rows: int, prompt_len: int) -> None:
        super().allocate_device(batch, max_rows, prompt_len)
        spec, rt, pin = self.spec, self.rt, self.copier.cuda
        self.speculated = range(self.policy.full_fetch_layers, self.n_layers)
        self.n_cols = partial_column_count(self.policy, spec.head_dim)
        self.skew = SKEW[spec.family](rt.model, self.n_cols, self.calibration)
        shape = (batch, spec.n_kv_heads, self.host_rows, self.n_cols)
        self.partial_k_cache = {i: torch.zeros(shape, device=rt.device, dtype=rt.dtype) for i in self.speculated}
        cap = infinigen_cap(self.policy, self.host_rows)  # no speculated layer fetches more rows than this
        # int32: half the bytes of top-k's int64 on the link (spec: one 4-byte index per selected row)
        self.index_host = {i: torch.zeros(batch * spec.n_kv_heads * cap, dtype=torch.int32, pin_memory=pin)
                           for i in self.speculated}
        self.selected_host = {i: torch.zeros(1, pin_memory=pin) for i in self.speculated}
        self.pool = None

    def allocate_host(self, batch: int) -> None:
        super().allocate_host(batch)
        cap = infinigen_cap(self.policy, self.host_rows)
        # gathered rows wait here for their H2D; two, like the device buffers they are copied into
        self.staging = [Planes.allocate(cap, self._row_specs(batch), "cpu", self.copier.cuda) for _ in range(2)]
        if self.policy.pool_ratio is not None:
            self.pool = HostPool(self.n_layers, batch, self.spec.n_kv_heads, self.host_rows)

    def reset(self) -> None:
        super().reset()
        self.staging_free: list[Event] = [None, None]
        self.pending: dict[int, tuple[Future, Tensor]] = {}
        # the H2D of an unspeculated layer reads its pinned host rows themselves, not a staging copy
        self.host_read: list[Event] = [None] * self.n_layers

    def store_prompt(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> None:
        B, T, Hkv, _ = k.shape
        keep = torch.arange(T, device=k.device).expand(B, Hkv, T)
        if T > self.host_rows:  # a bounded pool smaller than the prompt keeps its most attended rows
            with self.timer.span(Op.SCORE, layer):
                keep = prompt_attention_mass(q, k).topk(self.host_rows, dim=-1).indices.sort(-1).values
        if layer in self.speculated:
            with self.timer.span(Op.SKEW, layer):
                k, partial_k = self.skew.prepare(layer, q, k)  # (B, T, Hkv, D), (B, T, Hkv, d')
                m = keep.shape[-1]
                self.partial_k_cache[layer][:, :, :m] = take_rows(partial_k, keep).permute(1, 2, 0, 3)
        if self.pool is not None:
            self.pool.fill(layer, keep.cpu())
        if keep.shape[-1] == T:
            self._store_rows(layer, k.transpose(0, 1), v.transpose(0, 1))  # (T, B, Hkv, D)
        else:
            self._store_rows(layer, take_rows(k, keep), take_rows(v, keep))

    def plan_fetch(self, layer: int, a: Tensor, input_pos: Tensor) -> SpeculationPlan | None:
        """Speculate layer `layer` from the previous layer's attention input a (B, 1, d)."""
        if layer not in self.speculated:
            return None
        self._apply_pending(layer)
        n = self.entries[layer]
        with self.timer.span(Op.SPECULATE, layer):
            q_part = self.skew.query(layer, a, input_pos)  # (B, Hkv, G, d')
            logits = speculated_logits(q_part, self.partial_k_cache[layer][:, :, :n], self.spec.head_dim)
            scores = self.selection.scores(logits)  # (B, Hkv, n)
            selected = self.selection.count(logits, self.policy.alpha)  # 0-d, before the cap
        cap = infinigen_cap(self.policy, n)
        with self.timer.span(Op.TOPK, layer):
            index = scores.topk(cap, dim=-1).indices.int()  # (B, Hkv, cap), sorted by score; int32 to the host
        index_host = self.index_host[layer][: index.numel()].view(index.shape)
        pairs = [(index_host, index), (self.selected_host[layer], selected.view(1))]
        return SpeculationPlan(index_host, self.selected_host[layer], n, self.copier.d2h(layer, pairs))

    def _fetch_job(self, layer: int, n: int, plan: object, buf_free: Event, ready: Event) -> FetchResult:
        if plan is None:
            fetched = super()._fetch_job(layer, n, plan, buf_free, ready)
            if self.pool is not None:
                self.pool.touch(layer, n)
                self.host_read[layer] = fetched.event
            return fetched
        assert isinstance(plan, SpeculationPlan)
        self.copier.host_wait(ready)  # the prompt's rows must be in host memory
        self.copier.host_wait(plan.ready)  # so must the speculated indices
        rows = infinigen_fetch_count(self.policy, layer, plan.entries, float(plan.selected))
        index = plan.index[..., :rows]  # top-`rows` = the first `rows` of the sorted top-cap
        parity = layer % 2
        self.copier.host_wait(self.staging_free[parity])  # its last H2D must have read the staging buffer
        with self.timer.span(Op.GATHER, layer, host=True):
            self.host[layer].gather(index, self.staging[parity])
        if self.pool is not None:
            self.pool.touch(layer, index)
        dev = self.fetch_bufs[parity]
        pairs = zip(dev.head(rows), self.staging[parity].head(rows), strict=True)
        event = self.staging_free[parity] = self.copier.h2d(layer, pairs, after=buf_free)
        return FetchResult(dev.t, rows, event)

    def _slot(self, layer: int) -> int | PoolSlot:
        if self.pool is None:
            return super()._slot(layer)
        entries = self.entries[layer]
        self.entries[layer] = min(entries + 1, self.pool.capacity)
        return PoolSlot(entries, self.context_len)

    def _commit_job(self, layer: int, slot: int | Tensor | PoolSlot, written: Event) -> int | Tensor:
        if isinstance(slot, PoolSlot):  # eviction is decided here, where the counters live
            if slot.entries >= self.pool.capacity:
                # a full pool overwrites a slot inside the prefix this layer's H2D may still be reading
                self.copier.host_wait(self.host_read[layer])
            slot = self.pool.place(layer, slot.entries, slot.new_pos)
        return super()._commit_job(layer, slot, written)

    def write_back(self, layer: int, k: Tensor, v: Tensor) -> None:
        super().write_back(layer, k, v)
        if layer not in self.speculated:
            return
        with self.timer.span(Op.SPECULATE, layer):
            partial_k = self.skew.partial_k(layer, k).transpose(1, 2)  # (B, 1, Hkv, d') -> (B, Hkv, 1, d')
            if self.pool is None:  # the partial K cache grows with every token, in step with the host rows
                self.partial_k_cache[layer][:, :, self.entries[layer] - 1] = partial_k[:, :, 0]
        if self.pool is not None:
            self.pending[layer] = (self.commits[layer], partial_k)

    def end_step(self) -> list[int]:
        fetched = super().end_step()
        for layer in list(self.pending):  # the commits have run (drained): settle the partial K cache now
            self._apply_pending(layer)
        return fetched

    def _apply_pending(self, layer: int) -> None:
        """Put the last new token's partial K where the pool put its row."""
        if layer not in self.pending:
            return
        commit, partial_k = self.pending.pop(layer)
        slots = commit.result().to(self.rt.device)  # (B, Hkv)
        index = slots[..., None, None].expand(*slots.shape, 1, self.n_cols)
        self.partial_k_cache[layer].scatter_(2, index, partial_k)
