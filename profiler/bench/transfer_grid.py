"""What the copy sweep measures: its sizes, row sizes and points, the keys of transfers.csv's rows.

Key (direction, memory, layout, concurrent, nbytes, row_bytes):
  direction   h2d | d2h | d2d (d2d: a device-memory copy, the ceiling for the kernel rooflines) | h2h
              (h2h: a host memcpy from the `memory` pool on the calling thread, timed by perf_counter:
              what a pin_memory() relay, a gather into a temporary or the driver's staging of a pageable
              copy costs the host; memcpy_gbps of the host)
  memory      pinned | pageable host buffers (pinned only on CUDA); `device` for d2d
  layout      contiguous          one block of nbytes (rows = row_bytes = 0)
              gathered            the InfiniGen fetch end to end: host index_select of `rows` scattered
                                  rows of row_bytes into a staging buffer, then the copy of the
                                  staging buffer; row_bytes is one token's K or V row of one layer
                                  (kv_dim x dtype: the paper's unit) or of one KV head (head_dim x
                                  dtype: the runtime gathers per (sequence, KV head) from its
                                  token-major (S, B, Hkv, D) cache); GATHER_ROW_BYTES are always
                                  measured too, the gather cost by row size a runtime description needs
              gathered.gather     the host gather alone (timed inside the same loop)
              gathered.copy       the copy of the staging buffer alone
              gathered_batch[.gather|.copy]   the same with the rows spread over BATCH_SEQS sequences
                                  of a (B, S, row) cache (batch-strided indices b * S + s)
              handoff.<policy>    CPU only: what one layer's jobs handed to the runtime's copy worker
                                  under that policy (its fetch of nbytes, the commit of the new row)
                                  cost the compute thread; rows = the cached tokens, row_bytes = 0, no
                                  GB/s; the cache rows are the first collected model's (`bench.handoff`)
  concurrent  True: a square matmul runs meanwhile on the compute stream (CUDA) or the main thread
              (CPU) while the copy runs on the copy stream / worker thread (handoff: always True)
On CPU an 'h2d' is a memcpy from one host tensor into another on a worker thread (the runtime's CPU
mode); 'd2h' the same the other way. Gather indices are a fresh random draw each repeat from a pool
five times the largest gather (InfiniGen's 20% fetch cap), so repeats do not re-read cached rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from infinigen_sim.spec.bundle import TRANSFER_KEY, row_key
from infinigen_sim.spec.models import ModelSpec, get_model
from infinigen_sim.spec.policies import make_policy
from profiler.bench.handoff import HANDOFF_POLICIES, fetch_bytes, handoff_contexts
from profiler.bench.stats import summarize
from profiler.runtime.engine import default_dtype

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
REFERENCE_MODEL = "opt-13b"  # the paper's evaluation model: its fp16 K/V row is "the InfiniGen row"
BATCH_SEQS = 8  # sequences a batch-strided gather spreads its rows over
POOL_CAP_BYTES = 4 * GIB  # largest host KV pool the gathers draw from
GATHER_ROW_BYTES = (256, 1 * KIB, 8 * KIB)  # row sizes every bundle has: per-head fp16 rows up to whole layers


def kv_dtype(device: torch.device) -> torch.dtype:
    """The runtime's KV dtype: fp16 on CUDA, fp32 on CPU."""
    return default_dtype(device)


def infinigen_row_bytes() -> int:
    """One token's K (or V) row of one layer of the reference model in fp16."""
    return get_model(REFERENCE_MODEL).kv_dim * 2


def runtime_row_bytes() -> int:
    """One token's K (or V) row of one KV head of the reference model in fp16: what the runtime's
    per-(sequence, KV head) InfiniGen gather moves per index (kv_cache.Planes.gather)."""
    return get_model(REFERENCE_MODEL).head_dim * 2


@dataclass(frozen=True)
class TransferSweep:
    """What the copy sweep covers."""

    max_bytes: int  # largest copy; sizes are octaves from min_bytes
    memories: tuple[str, ...]  # host buffer kinds: pinned, pageable
    row_bytes: tuple[int, ...]  # gather row sizes
    min_bytes: int = 4 * KIB
    handoff_model: ModelSpec | None = None  # whose cache rows the CPU runtime's handoff points move (None: none)
    pageable_max_bytes: int | None = None  # pageable copies and gathers stop here (None: max_bytes)
    gather_max_bytes: int | None = None  # gathered copies stop here (None: max_bytes)

    @property
    def sizes(self) -> list[int]:
        return [self.min_bytes << k for k in range(int(math.log2(self.max_bytes // self.min_bytes)) + 1)]

    @property
    def pool_bytes(self) -> int:
        share = make_policy("infinigen").max_fetch_ratio
        return min(POOL_CAP_BYTES, max(int(self.max_bytes / share), 64 * MIB))

    def row_counts(self, row_bytes: int) -> list[int]:
        """Octave-spaced row counts whose bytes fit under max_bytes."""
        return [1 << k for k in range(int(math.log2(self.max_bytes // row_bytes)) + 1)]


def make_sweep(device: torch.device, models: list[ModelSpec], quick: bool) -> TransferSweep:
    """4 KiB .. 1 GiB on CUDA, .. 256 MiB on CPU (a CPU runtime's layer moves far less; quick: .. 16 MiB);
    pinned and pageable on CUDA, pageable on CPU."""
    memories = ("pinned", "pageable") if device.type == "cuda" else ("pageable",)
    itemsize = torch.empty(0, dtype=kv_dtype(device)).element_size()
    rows = sorted({infinigen_row_bytes(), runtime_row_bytes(), *GATHER_ROW_BYTES,
                   *(m.kv_dim * itemsize for m in models), *(m.head_dim * itemsize for m in models)})
    largest = 16 * MIB if quick else GIB if device.type == "cuda" else 256 * MIB
    return TransferSweep(max_bytes=largest, memories=memories, row_bytes=tuple(rows),
                         handoff_model=models[0] if device.type == "cpu" and models else None)


@dataclass(frozen=True)
class TransferPoint:
    """One measurement: it writes one row per layout (three for a gather)."""

    direction: str
    memory: str
    pattern: str  # contiguous | gathered | gathered_batch | handoff
    concurrent: bool
    nbytes: int
    row_bytes: int = 0
    policy: str = ""  # handoff: whose jobs
    context: int = 0  # handoff: cached tokens

    @property
    def rows(self) -> int:
        if self.pattern == "handoff":
            return self.context
        return self.nbytes // self.row_bytes if self.row_bytes else 0

    @property
    def layouts(self) -> dict[str, str]:
        """Bundle layout name per timed stage ('total' is the end-to-end time)."""
        if self.pattern == "handoff":
            return {"total": f"handoff.{self.policy}"}
        if self.pattern == "contiguous":
            return {"total": self.pattern}
        return {"total": self.pattern, "gather": f"{self.pattern}.gather", "copy": f"{self.pattern}.copy"}

    def row(self, layout: str, samples: list[float] | None, status: str = "ok") -> dict:
        row = {"direction": self.direction, "memory": self.memory, "layout": layout,
               "concurrent": self.concurrent, "nbytes": self.nbytes, "row_bytes": self.row_bytes,
               "rows": self.rows, "median_us": "", "p10_us": "", "p90_us": "", "gbps": "",
               "repeats": 0, "status": status}
        if samples:
            stats = summarize(samples)
            gbps = "" if self.pattern == "handoff" else round(self.nbytes / stats.median_us / 1e3, 4)
            row.update(stats.as_row(), gbps=gbps)
        return row

    def keys(self) -> list[tuple[str, ...]]:
        return [row_key(self.row(layout, None), TRANSFER_KEY) for layout in self.layouts.values()]

    @property
    def label(self) -> str:
        if self.pattern == "handoff":
            return f"handoff {self.policy} {self.context} tokens"
        rows = f" {self.rows}x{self.row_bytes}B" if self.row_bytes else ""
        return f"{self.direction} {self.memory} {self.pattern}{rows} {self.nbytes >> 10}KiB"


def transfer_points(sweep: TransferSweep) -> list[TransferPoint]:
    """Every point of the sweep, grouped by host memory so each pool is allocated once."""
    points = []
    for memory in sweep.memories:
        cap = sweep.max_bytes if memory != "pageable" else sweep.pageable_max_bytes or sweep.max_bytes
        gather_cap = min(cap, sweep.gather_max_bytes or cap)
        for concurrent in (False, True):
            for direction in ("h2d", "d2h"):
                points += [TransferPoint(direction, memory, "contiguous", concurrent, n) for n in sweep.sizes
                           if n <= cap]
            for row_bytes in sweep.row_bytes:
                counts = [r for r in sweep.row_counts(row_bytes) if r * row_bytes <= gather_cap]
                points += [TransferPoint("h2d", memory, "gathered", concurrent, r * row_bytes, row_bytes)
                           for r in counts]
                points += [TransferPoint("h2d", memory, "gathered_batch", concurrent, r * row_bytes, row_bytes)
                           for r in counts if r >= BATCH_SEQS]
    points += [TransferPoint("d2d", "device", "contiguous", False, n) for n in sweep.sizes]
    points += [TransferPoint("h2h", memory, "contiguous", False, n) for memory in sweep.memories
               for n in sweep.sizes]
    spec = sweep.handoff_model
    if spec is not None:
        points += [TransferPoint("h2d", sweep.memories[0], "handoff", True, fetch_bytes(policy, spec, n), 0, policy, n)
                   for policy in HANDOFF_POLICIES for n in handoff_contexts(sweep.max_bytes, spec)]
    return points
