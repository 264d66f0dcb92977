"""Copy sweep: what one host<->device transfer costs, measured point by point (`transfer_grid` says
which points and what their rows mean), and the summary collect prints.

CUDA: copies run on their own stream, bracketed by CUDA events, while a matmul load runs on the
compute stream for the 'concurrent' points; the host gather of a gathered point is timed by
perf_counter. CPU: the copy (a memcpy between host tensors, as in the runtime's CPU mode) runs on a
worker thread, perf_counter there, with the load on the main thread. An exhausted allocator gives
'oom' rows and the sweep goes on.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from profiler.bench.handoff import HANDOFF_SAMPLES, handoff_samples
from profiler.bench.stats import is_oom, release_memory, time_fn
from profiler.bench.transfer_grid import BATCH_SEQS, GIB, KIB, MIB, TransferPoint, TransferSweep, kv_dtype
from profiler.runtime.cuda_api import CUDA

LOAD_MATMUL_SIDE = {"cuda": 8192, "cpu": 512}  # square matmul of the concurrent compute load
FILL_BYTE = 0x3C  # every buffer byte: 0x3C3C is a finite fp16 and 0x3C3C3C3C a finite fp32


def load_description(device: torch.device) -> str:
    """What runs beside a 'concurrent' copy, for meta.yaml."""
    side, dtype = LOAD_MATMUL_SIDE[device.type], str(kv_dtype(device)).removeprefix("torch.")
    where = "on the compute stream, copies on a copy stream" if device.type == "cuda" else \
        "on the main thread, copies on a worker thread"
    return f"{side}x{side} {dtype} matmuls back to back {where}"


class TransferBench:
    """Buffers, copy stream (or worker thread) and compute load for the copy sweep on one device."""

    def __init__(self, device: torch.device, sweep: TransferSweep, repeats: int, warmup: int,
                 generator: torch.Generator) -> None:
        self.device, self.sweep, self.repeats, self.warmup = device, sweep, repeats, max(1, warmup)
        self.generator = generator
        self.dtype = kv_dtype(device)
        self._host: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # memory -> (pool, staging)
        self._perms: dict[int, torch.Tensor] = {}  # pool rows -> a random permutation of them
        self._dev = torch.empty(sweep.max_bytes, dtype=torch.uint8, device=device).fill_(FILL_BYTE)
        self._dev2 = torch.empty(sweep.max_bytes, dtype=torch.uint8, device=device).fill_(0)
        side = LOAD_MATMUL_SIDE[device.type]
        # drawn on the device (an 8192^2 host rand is seconds of one core); seeded from the sweep's generator
        load_gen = CUDA.generator(device, int(torch.randint(2**31, (1,), generator=generator)))
        self._mm = [torch.rand(side, side, generator=load_gen, device=device, dtype=self.dtype) for _ in range(3)]
        if device.type == "cuda":
            # Copies get their own stream so they can overlap the matmuls on the compute stream.
            self._copy_stream = CUDA.Stream(device)
            self._compute_stream = CUDA.current_stream(device)
            self._load_us = sorted(time_fn(self._load, device, 5, 2))[2]
        else:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy")

    def close(self) -> None:
        if self.device.type != "cuda":
            self._worker.shutdown()

    def _load(self) -> None:
        torch.mm(self._mm[0], self._mm[1], out=self._mm[2])

    def _buffers(self, memory: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool, staging) flat byte buffers of one host memory kind, allocated on first use."""
        if memory not in self._host:
            self._host.clear()  # free the other kind first: the sweep is grouped by memory
            pin = memory == "pinned"
            # Filled so every page is resident before timing (values do not change copy speed).
            pool = torch.empty(self.sweep.pool_bytes, dtype=torch.uint8, pin_memory=pin).fill_(FILL_BYTE)
            staging = torch.empty(self.sweep.max_bytes, dtype=torch.uint8, pin_memory=pin).fill_(0)
            self._host[memory] = (pool, staging)
        return self._host[memory]

    def measure(self, point: TransferPoint) -> list[dict]:
        """Time one point; an exhausted allocator gives 'oom' rows and the sweep goes on."""
        if point.pattern == "handoff":
            samples = handoff_samples(point.policy, self.sweep.handoff_model, point.context,
                                      HANDOFF_SAMPLES * self.repeats, self.generator)
            return [point.row(layout, samples) for layout in point.layouts.values()]
        try:
            gather, copy = self._stages(point)
            if point.direction == "h2h":  # a host memcpy on this thread: perf_counter around it
                samples = {"total": time_fn(copy, torch.device("cpu"), self.repeats, self.warmup)}
            else:
                samples = self._run(gather, copy, point.concurrent)
        except Exception as exc:  # noqa: BLE001 - only allocator exhaustion is recorded, the rest re-raised
            if not is_oom(exc):
                raise
            release_memory(self.device)
            return [point.row(layout, None, "oom") for layout in point.layouts.values()]
        return [point.row(layout, samples[stage]) for stage, layout in point.layouts.items()]

    def _stages(self, point: TransferPoint) -> tuple[Callable[[], object] | None, Callable[[], object]]:
        """(host gather or None, copy) closures for one point."""
        n = point.nbytes
        if point.direction == "d2d":
            return None, lambda: self._dev2[:n].copy_(self._dev[:n], non_blocking=True)
        pool, staging = self._buffers(point.memory)
        if point.direction == "h2h":
            return None, lambda: staging[:n].copy_(pool[:n])
        if point.direction == "d2h":
            return None, lambda: staging[:n].copy_(self._dev[:n], non_blocking=True)
        copy = lambda: self._dev[:n].copy_(staging[:n] if point.row_bytes else pool[:n], non_blocking=True)  # noqa: E731
        if not point.row_bytes:
            return None, copy
        elems = point.row_bytes // self.dtype.itemsize
        table = pool[: pool.numel() // point.row_bytes * point.row_bytes].view(self.dtype).view(-1, elems)
        out = staging[:n].view(self.dtype).view(point.rows, elems)
        indices = self._indices(point, table.shape[0])
        return (lambda: torch.index_select(table, 0, next(indices), out=out)), copy

    def _indices(self, point: TransferPoint, pool_rows: int) -> Iterator[torch.Tensor]:
        """A fresh random draw of distinct rows per call (unsorted, as top-k returns them), cycled."""
        draws = []
        for _ in range(self.warmup + self.repeats):
            if point.pattern == "gathered":
                draws.append(self._window(pool_rows, point.rows))
                continue
            seq_rows = pool_rows // BATCH_SEQS  # the pool as a (B, S, row) cache
            draws.append(torch.cat([b * seq_rows + self._window(seq_rows, point.rows // BATCH_SEQS)
                                    for b in range(BATCH_SEQS)]))
        return itertools.cycle(draws)

    def _window(self, n: int, count: int) -> torch.Tensor:
        """`count` distinct random rows of n: a window at a random offset of a cached permutation
        (a fresh randperm of a 4 GiB pool of 256-byte rows would cost ~0.3 s per draw)."""
        if n not in self._perms:
            self._perms[n] = torch.randperm(n, generator=self.generator)
        start = int(torch.randint(n - count + 1, (1,), generator=self.generator))
        return self._perms[n][start : start + count]

    def _run(self, gather, copy, concurrent: bool) -> dict[str, list[float]]:
        if self.device.type == "cuda":
            return self._run_cuda(gather, copy, concurrent)
        return self._run_cpu(gather, copy, concurrent)

    def _run_cpu(self, gather, copy, concurrent: bool) -> dict[str, list[float]]:
        """Gather and copy on the worker thread (perf_counter there); the load on this thread."""
        started = threading.Event()

        def worker() -> dict[str, list[float]]:
            started.wait()
            samples: dict[str, list[float]] = {"gather": [], "copy": [], "total": []}
            for i in range(self.warmup + self.repeats):
                t0 = time.perf_counter()
                if gather is not None:
                    gather()
                t1 = time.perf_counter()
                copy()
                t2 = time.perf_counter()
                if i >= self.warmup:
                    for stage, us in (("gather", t1 - t0), ("copy", t2 - t1), ("total", t2 - t0)):
                        samples[stage].append(us * 1e6)
            return samples

        future = self._worker.submit(worker)
        started.set()
        while concurrent and not future.done():
            self._load()
        return future.result()

    def _run_cuda(self, gather, copy, concurrent: bool) -> dict[str, list[float]]:
        """Copies on the copy stream bracketed by events; the host gather by perf_counter."""
        stream = self._copy_stream
        t0 = time.perf_counter()
        for _ in range(self.warmup):
            if gather is not None:
                gather()
            with CUDA.stream(stream):
                copy()
            stream.synchronize()  # warm-up wall time sizes the concurrent load
        estimate_us = (time.perf_counter() - t0) * 1e6 / self.warmup
        events = [[CUDA.Event(enable_timing=True) for _ in range(3)] for _ in range(self.repeats)]
        gather_us = []
        for begin, issued, done in events:
            if concurrent:
                self._enqueue_load(estimate_us)
            # The copy stream is idle here, so `begin` stamps now and begin->done spans the host gather.
            begin.record(stream)
            if gather is not None:
                t0 = time.perf_counter()
                gather()
                gather_us.append((time.perf_counter() - t0) * 1e6)
            issued.record(stream)
            with CUDA.stream(stream):
                copy()
            done.record(stream)
            if gather is not None:
                stream.synchronize()  # the next gather overwrites the staging buffer this copy reads
        CUDA.synchronize(self.device)
        return {"gather": gather_us, "copy": [a.elapsed_time(b) * 1e3 for _, a, b in events],
                "total": [a.elapsed_time(b) * 1e3 for a, _, b in events]}

    def _enqueue_load(self, us: float) -> None:
        """Queue matmuls on the compute stream covering ~1.5x `us` of copy time."""
        count = min(2000, math.ceil(1.5 * us / max(self._load_us, 1.0)) + 1)
        with CUDA.stream(self._compute_stream):
            for _ in range(count):
                self._load()


# ---- summary ---------------------------------------------------------------------------------
SUMMARY_GATHER_BYTES = 16 * MIB  # the gather shown: the largest measured at or under this


def _fmt_bytes(nbytes: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if nbytes >= size:
            return f"{nbytes / size:.4g} {unit}"
    return f"{nbytes} B"


def _line(row, what: str, ceiling_gbps: float, ceiling_name: str) -> str:
    share = 100.0 * row.gbps / ceiling_gbps
    return (f"  {what:<66} {_fmt_bytes(int(row.nbytes)):>9}  {row.median_us:>11.1f} us "
            f"[{row.p10_us:.1f}-{row.p90_us:.1f}]  {row.gbps:>7.2f} GB/s  {share:5.1f}% of {ceiling_name}")


def peak_row(frame, direction: str, memory: str):
    """The contiguous copy, alone, with the highest GB/s: the ceiling of that direction and memory."""
    rows = frame[(frame.direction == direction) & (frame.memory == memory) & (frame.layout == "contiguous")
                 & (frame.concurrent.astype(str) == "False") & (frame.status == "ok")]
    return None if rows.empty else next(rows.loc[[rows.gbps.idxmax()]].itertuples())


def summary_lines(frame, memories: list[str], row_bytes: int) -> list[str]:
    """Peaks per direction and memory, compute interference, and the gather at `row_bytes` rows."""
    lines = ["transfers (ceiling: the best contiguous copy of that direction and memory, measured alone)"]
    for memory in memories:
        for direction in ("h2d", "d2h"):
            peak = peak_row(frame, direction, memory)
            if peak is None:
                continue
            lines.append(_line(peak, f"{direction} {memory} contiguous peak", peak.gbps, "ceiling"))
            busy = frame[(frame.direction == direction) & (frame.memory == memory) & (frame.layout == "contiguous")
                         & (frame.concurrent.astype(str) == "True") & (frame.nbytes == peak.nbytes)
                         & (frame.status == "ok")]
            for row in busy.itertuples():
                lines.append(_line(row, f"{direction} {memory} contiguous + concurrent matmul", peak.gbps,
                                   f"{direction} ceiling"))
    d2d = peak_row(frame, "d2d", "device")
    if d2d is not None:
        lines.append(_line(d2d, "d2d device contiguous peak", d2d.gbps, "ceiling"))
    for memory in memories:
        h2h = peak_row(frame, "h2h", memory)
        if h2h is not None:
            lines.append(_line(h2h, f"h2h {memory} host memcpy peak (one thread)", h2h.gbps, "ceiling"))
    handoff = frame[frame.layout.str.startswith("handoff.") & (frame.status == "ok")]
    for row in handoff.itertuples():
        what = f"copy-worker {row.layout}: a layer's fetch + commit, compute-thread cost"
        lines.append(f"  {what:<66} {_fmt_bytes(int(row.nbytes)):>9}  {row.median_us:>11.1f} us "
                     f"[{row.p10_us:.1f}-{row.p90_us:.1f}]")
    memory = memories[0]
    h2d = peak_row(frame, "h2d", memory)
    for pattern in ("gathered", "gathered_batch"):
        rows = frame[(frame.memory == memory) & (frame.row_bytes == row_bytes) & (frame.status == "ok")
                     & (frame.layout.str.startswith(pattern + ".") | (frame.layout == pattern))
                     & (frame.nbytes <= SUMMARY_GATHER_BYTES)]
        if rows.empty or h2d is None:
            continue
        size = rows.nbytes.max()
        stage = {f"{pattern}.gather": 0, f"{pattern}.copy": 1, pattern: 2}
        picked = rows[rows.nbytes == size]
        picked = picked.assign(order=picked.layout.map(stage)).sort_values(["concurrent", "order"])
        for row in picked.itertuples():
            extra = " + concurrent matmul" if str(row.concurrent) == "True" else ""
            what = f"h2d {memory} {row.layout} {int(row.rows)}x{row_bytes} B{extra}"
            lines.append(_line(row, what, h2d.gbps, "h2d ceiling"))
    return lines
