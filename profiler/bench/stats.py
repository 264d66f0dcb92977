"""Timing primitives shared by every bench: summaries, the OOM test, timed calls, a paused collector.

GPU work is timed with CUDA events recorded on the stream that runs it, read after the run; CPU work
with `time.perf_counter`. Every measurement is warmed up first and summarised as median / p10 / p90.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from profiler.runtime.cuda_api import CUDA

OOM_MESSAGES = ("out of memory", "can't allocate memory")


@dataclass(frozen=True)
class Stats:
    """Median and spread of one measurement, in microseconds."""

    median_us: float
    p10_us: float
    p90_us: float
    repeats: int

    def as_row(self) -> dict[str, float | int]:
        return {"median_us": self.median_us, "p10_us": self.p10_us, "p90_us": self.p90_us, "repeats": self.repeats}


def summarize(samples_us: Sequence[float]) -> Stats:
    """Median, p10 and p90 of per-call microseconds."""
    p10, median, p90 = np.percentile(np.asarray(samples_us, dtype=float), [10, 50, 90])
    return Stats(round(float(median), 3), round(float(p10), 3), round(float(p90), 3), len(samples_us))


def is_oom(exc: BaseException) -> bool:
    """True for the ways PyTorch and Python report an exhausted allocator."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MESSAGES)


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int,
            stream: object | None = None) -> list[float]:
    """Microseconds of each of `repeats` calls of `fn`, after `warmup` untimed calls."""
    if device.type != "cuda":
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e6)
        return samples
    stream = stream or CUDA.current_stream(device)
    pairs = [(CUDA.Event(enable_timing=True), CUDA.Event(enable_timing=True)) for _ in range(repeats)]
    with CUDA.stream(stream):
        for _ in range(warmup):
            fn()
        # Events bracket each call on the stream that runs it; one sync after the loop keeps the
        # host out of the timed region (no per-call synchronisation).
        for start, end in pairs:
            start.record(stream)
            fn()
            end.record(stream)
    stream.synchronize()
    return [start.elapsed_time(end) * 1e3 for start, end in pairs]


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on `device` (a no-op on CPU)."""
    if device.type == "cuda":
        CUDA.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Hand the caching allocators' free blocks back: device memory, and pinned host memory (which torch
    keeps, each block rounded up to a power of two, until asked)."""
    if device.type == "cuda":
        CUDA.empty_cache()
        CUDA.empty_host_cache()


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off (after a full collection) while timing, as `timeit` does:
    a full collection of a process holding a model stalls whichever call it lands in for ~10 ms, at
    the same point of every repeat of a periodic workload (so medians cannot remove it)."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
