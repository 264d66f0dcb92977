"""KV caches: where each policy keeps K/V rows and how a layer's rows reach attention.

Rows are token-major (S, B, Hkv, D) as in FlexGen: a prefix of tokens is one contiguous block (one
copy), and rows chosen per (sequence, KV head) are an embedding lookup over (S*B*Hkv, D). Buffers
are allocated by `allocate`, apart from model construction (gpt-fast's setup_caches): `allocate_device`
(what device ops use) then `allocate_host` (the pinned host K/V and staging rows), so a bench can keep
a policy's device state alone.

Per decode step the engine calls begin_step, then for each layer before_layer (right after the
layer's input norm), write_back (after QKV) and attend, then end_step: the schedule in
infinigen_sim.spec.policies. Offloaded caches fetch a layer's rows on the copy worker: with overlap on,
layer i+1's fetch is issued at the start of layer i; with it off, at the start of layer i itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import Tensor

from infinigen_sim.spec.models import ModelSpec
from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.policies import PolicyConfig
from profiler.runtime.model import Transformer, decode_attention
from profiler.runtime.timing import PhaseTimer
from profiler.runtime.transfer import Copier, Event, FetchResult

RowSpec = tuple[tuple[int, ...], torch.dtype]  # the shape of one token's row in a plane, and its dtype


class Planes:
    """Token-major tensors (rows, *row_shape) that move together: K and V, or codes/scales/zeros."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.t = tuple(tensors)

    @classmethod
    def allocate(cls, rows: int, specs: Sequence[RowSpec], device: torch.device | str, pin: bool = False) -> Planes:
        return cls(torch.zeros((rows, *shape), dtype=dt, device=device, pin_memory=pin) for shape, dt in specs)

    def head(self, n: int) -> tuple[Tensor, ...]:
        return tuple(t[:n] for t in self.t)

    def write(self, slot: int | Tensor, rows: Sequence[Tensor]) -> None:
        """Rows (1, ...) into row `slot`, or into per-(sequence, KV head) slots (B, Hkv)."""
        for dst, src in zip(self.t, rows, strict=True):
            if isinstance(slot, int):
                dst[slot : slot + 1].copy_(src)
                continue
            flat = _flat_rows(slot.unsqueeze(0))  # (1, B*Hkv)
            dst.view(-1, dst.shape[-1]).index_copy_(0, flat.reshape(-1), src.reshape(-1, dst.shape[-1]))

    def gather(self, index: Tensor, out: Planes) -> None:
        """Rows chosen per (sequence, KV head), index (B, Hkv, n), into out's first n rows."""
        flat = _flat_rows(index.permute(2, 0, 1))  # (n, B*Hkv)
        n = index.shape[-1]
        for src, dst in zip(self.t, out.t, strict=True):
            width = src.shape[-1]
            torch.index_select(src.view(-1, width), 0, flat.reshape(-1), out=dst[:n].view(-1, width))


def _flat_rows(slots: Tensor) -> Tensor:
    """Slots (n, B, Hkv) -> row numbers of a (S*B*Hkv, D) view of a (S, B, Hkv, D) buffer."""
    n, B, Hkv = slots.shape
    lane = torch.arange(B * Hkv, device=slots.device)  # (B*Hkv,), a (sequence, KV head) pair
    return slots.reshape(n, B * Hkv) * (B * Hkv) + lane


def take_rows(k: Tensor, keep: Tensor) -> Tensor:
    """Prompt rows k (B, T, Hkv, X) kept per (sequence, KV head), keep (B, Hkv, m) -> (m, B, Hkv, X)."""
    per_head = k.transpose(1, 2)  # (B, Hkv, T, X)
    index = keep.unsqueeze(-1).expand(*keep.shape, k.shape[-1])
    return per_head.gather(2, index).permute(2, 0, 1, 3).contiguous()  # (m, B, Hkv, X)


@dataclass
class Runtime:
    """What a cache needs from its engine."""

    spec: ModelSpec
    policy: PolicyConfig
    model: Transformer
    device: torch.device
    dtype: torch.dtype
    copier: Copier
    timer: PhaseTimer


class KVCache:
    """The hooks the engine calls; subclasses decide where rows live and which ones attention reads."""

    needs_probs = False  # attention returns its probabilities to `after_attention`

    def __init__(self, rt: Runtime) -> None:
        self.rt, self.spec, self.policy = rt, rt.spec, rt.policy
        self.timer, self.copier = rt.timer, rt.copier
        self.n_layers = rt.spec.n_layers
        self.context_len = 0
        self.fetched = [0] * self.n_layers
        self._own_attrs = set(vars(self)) | {"_own_attrs"}

    def release(self) -> None:
        """Drop the buffers and state `allocate`/`reset` made, so their memory can be reused."""
        for name in set(vars(self)) - self._own_attrs:
            delattr(self, name)

    def allocate(self, batch: int, max_rows: int, prompt_len: int) -> None:
        """Buffers for generations of this shape; each generation then starts with `reset`."""
        raise NotImplementedError

    def reset(self) -> None:
        """Per-generation state (buffers are reused: every generation overwrites what it reads)."""
        self.context_len = 0
        self.fetched = [0] * self.n_layers

    def store_prompt(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> None:
        """Prefill: keep the prompt's K/V (q, k (B, T, H|Hkv, D), post-RoPE)."""
        raise NotImplementedError

    def begin_step(self, context_len: int) -> None:
        self.context_len = context_len
        self.fetched = [0] * self.n_layers

    def before_layer(self, layer: int, a: Tensor, input_pos: Tensor) -> None:
        """Called with layer `layer`'s attention input a (B, 1, d), before its QKV."""

    def write_back(self, layer: int, k: Tensor, v: Tensor) -> None:
        """The new token's k/v (B, 1, Hkv, D)."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of the new token q (B, 1, H, D) -> (B, 1, H*D)."""
        raise NotImplementedError

    def end_step(self) -> list[int]:
        self.copier.drain()  # the step's host work belongs to its record
        return list(self.fetched)

    def _row_specs(self, batch: int) -> list[RowSpec]:
        row = (batch, self.spec.n_kv_heads, self.spec.head_dim)
        return [(row, self.rt.dtype), (row, self.rt.dtype)]


class DeviceCache(KVCache):
    """`ideal`: every layer's K/V on the device, no transfers (gpt-fast's KVCache, token-major)."""

    def allocate(self, batch: int, max_rows: int, prompt_len: int) -> None:
        specs = self._row_specs(batch)
        self.kv = [Planes.allocate(max_rows, specs, self.rt.device) for _ in range(self.n_layers)]

    def store_prompt(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> None:
        T = k.shape[1]
        self.kv[layer].t[0][:T] = k.transpose(0, 1)  # (B, T, Hkv, D) -> (T, B, Hkv, D)
        self.kv[layer].t[1][:T] = v.transpose(0, 1)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n = self.context_len
        k_rows, v_rows = self.kv[layer].t
        with self.timer.span(Op.ATTENTION, layer):
            k_rows[n], v_rows[n] = k[:, 0], v[:, 0]
            out, _ = decode_attention(q[:, 0], k_rows[: n + 1], v_rows[: n + 1])
        return out.unsqueeze(1)


class OffloadedCache(KVCache):
    """`flexgen`: every layer's K/V in host memory (pinned on CUDA), a layer's rows fetched each step.

    Subclasses change what a row is (`_row_specs`, `_encode`, `_decode`), how many rows and which
    (`_fetch_job`, `plan_fetch`), and where a written-back row goes (`_slot`).
    """

    def allocate(self, batch: int, max_rows: int, prompt_len: int) -> None:
        self.allocate_device(batch, max_rows, prompt_len)
        self.allocate_host(batch)

    def allocate_device(self, batch: int, max_rows: int, prompt_len: int) -> None:
        """What the device ops use: the fetch buffers (subclasses add their own device state)."""
        self.batch, self.host_rows = batch, self._host_rows(max_rows, prompt_len)
        # two device buffers: layer i+1's rows arrive while layer i attends over the other
        self.fetch_bufs = [Planes.allocate(self.host_rows + 1, self._row_specs(batch), self.rt.device)
                           for _ in range(2)]
        self.buf_free: list[Event] = [None, None]

    def allocate_host(self, batch: int) -> None:
        """The host K/V rows of every layer and each layer's staging row for the new token's D2H
        (pinned on CUDA: the copy engines read and write them while the host goes on)."""
        pin, specs = self.copier.cuda, self._row_specs(batch)
        self.host = [Planes.allocate(self.host_rows, specs, "cpu", pin) for _ in range(self.n_layers)]
        self.staged = [Planes.allocate(1, specs, "cpu", pin) for _ in range(self.n_layers)]

    def reset(self) -> None:
        super().reset()
        self.buf_free = [None, None]
        self.entries = [0] * self.n_layers  # rows held in the host cache per layer
        self.host_ready: list[Event] = [None] * self.n_layers  # the prompt's D2H
        self.commits: list[Future | None] = [None] * self.n_layers
        self.fetches: dict[int, Future] = {}
        self.plans: dict[int, object] = {}

    def _host_rows(self, max_rows: int, prompt_len: int) -> int:
        return max_rows

    def store_prompt(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> None:
        self._store_rows(layer, k.transpose(0, 1), v.transpose(0, 1))  # (B, T, Hkv, D) -> (T, B, Hkv, D)

    def _store_rows(self, layer: int, k_rows: Tensor, v_rows: Tensor) -> None:
        """Token-major prompt rows (m, B, Hkv, D) into host rows [:m]."""
        m = k_rows.shape[0]
        encoded = self._encode(layer, k_rows.contiguous(), v_rows.contiguous())
        self.host_ready[layer] = self.copier.d2h(layer, zip(self.host[layer].head(m), encoded, strict=True))
        self.entries[layer] = m

    def _encode(self, layer: int, k_rows: Tensor, v_rows: Tensor) -> tuple[Tensor, ...]:
        return k_rows, v_rows

    def _decode(self, layer: int, fetched: FetchResult) -> tuple[Tensor, Tensor]:
        """Fetched planes -> K and V rows (>= rows + 1, B, Hkv, D), row `rows` free for the new token."""
        return fetched.planes[0], fetched.planes[1]

    def begin_step(self, context_len: int) -> None:
        super().begin_step(context_len)
        if self.copier.worker is not None:
            self.issue_fetch(0, None)  # layer 0 has no previous layer to hide behind: issue it first

    def before_layer(self, layer: int, a: Tensor, input_pos: Tensor) -> None:
        nxt = layer + 1
        if self.copier.worker is not None:
            if nxt < self.n_layers:
                self.issue_fetch(nxt, self.plan_fetch(nxt, a, input_pos))
            return
        if nxt < self.n_layers:
            self.plans[nxt] = self.plan_fetch(nxt, a, input_pos)
        self.issue_fetch(layer, self.plans.pop(layer, None))

    def plan_fetch(self, layer: int, a: Tensor, input_pos: Tensor) -> object:
        """Work on the device that decides `layer`'s fetch, during the previous layer (InfiniGen)."""
        return None

    def issue_fetch(self, layer: int, plan: object) -> None:
        job = (layer, self.entries[layer], plan, self.buf_free[layer % 2], self.host_ready[layer])
        self.fetches[layer] = self.copier.submit(self._fetch_job, *job)

    def _fetch_job(self, layer: int, n: int, plan: object, buf_free: Event, ready: Event) -> FetchResult:
        """Worker: the whole prefix of the layer's host rows to the device."""
        self.copier.host_wait(ready)  # the prompt's rows must be in host memory
        dev = self.fetch_bufs[layer % 2]
        event = self.copier.h2d(layer, zip(dev.head(n), self.host[layer].head(n), strict=True), after=buf_free)
        return FetchResult(dev.t, n, event)

    def write_back(self, layer: int, k: Tensor, v: Tensor) -> None:
        self._send_row(layer, k, v)

    def _send_row(self, layer: int, k: Tensor, v: Tensor) -> None:
        """The new row (B, 1, Hkv, D) to the host: its D2H, then its commit into the row `_slot` names."""
        if self.commits[layer] is not None:
            self.commits[layer].result()  # the staging row is reused only once its last commit ran
        encoded = self._encode(layer, k.transpose(0, 1), v.transpose(0, 1))  # (1, B, Hkv, D)
        written = self.copier.d2h(layer, zip(self.staged[layer].t, encoded, strict=True))
        slot = self._slot(layer)
        self.commits[layer] = self.copier.submit(self._commit_job, layer, slot, written)

    def _slot(self, layer: int) -> int | Tensor:
        """Host row of the new token: the next free one (the cache grows with every token)."""
        slot = self.entries[layer]
        self.entries[layer] += 1
        return slot

    def _commit_job(self, layer: int, slot: int | Tensor, written: Event) -> int | Tensor:
        """Worker: file the written-back row into the host cache."""
        self.copier.host_wait(written)  # the row must have landed in the staging buffer
        with self.timer.span(Op.COMMIT, layer, host=True):
            self.host[layer].write(slot, self.staged[layer].t)
        return slot

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        fetched = self.copier.device_wait(layer, self.fetches.pop(layer))
        n = self.fetched[layer] = fetched.rows
        k_rows, v_rows = self._decode(layer, fetched)
        with self.timer.span(Op.ATTENTION, layer):
            k_rows[n], v_rows[n] = k[:, 0], v[:, 0]  # the new token's row beside the fetched ones
            out, probs = decode_attention(q[:, 0], k_rows[: n + 1], v_rows[: n + 1], self.needs_probs)
        self.buf_free[layer % 2] = self.copier.compute_mark()
        self.after_attention(layer, probs, n)
        return out.unsqueeze(1)

    def after_attention(self, layer: int, probs: Tensor | None, n: int) -> None:
        """Bookkeeping that needs this step's attention (H2O's scores)."""
