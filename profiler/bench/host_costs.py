"""What the thread that dispatches the model pays per eager op and per host<->device sync (host.csv).

A runtime description (`infinigen_sim/runtimes/`) prices a decode layer's host time as ops x dispatch
+ syncs x sync; these rows are the two unit costs on the host the bundle was collected on.

  dispatch  host seconds per eager op: a burst of OPS_PER_BURST small ops (the mix a decode layer
            dispatches: elementwise, a tiny matmul, softmax, an index_select, a cat, a view-then-copy) on
            tensors of one token's width, timed by perf_counter around the burst and divided by its op
            count. On CUDA the burst is only enqueued (the device runs each kernel faster than the host
            dispatches the next, so the host is the bottleneck and the wall is dispatch); the queue is
            drained after the clock stops. On CPU each op also runs, on tensors so small that running
            is negligible beside the framework's per-op cost.
  sync      host seconds of one blocking round trip: `.item()` of the 1-element result of a tiny kernel
            just queued on an otherwise idle device (what `.item()`, a small pageable D2H or
            `torch.cuda.synchronize()` after queued work cost the host beyond the work itself). On CPU:
            `.item()` of a CPU tensor, the same call without a device.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from infinigen_sim.spec.bundle import HOST_COLUMNS
from profiler.bench.stats import gc_paused, summarize, synchronize

WIDTH = 64  # elements per operand: small enough that no op's own work shows beside its dispatch
ROWS = 32  # cached rows the index_select and cat touch


def _burst(device: torch.device) -> tuple[Callable[[], object], int]:
    """A closure that dispatches a decode layer's kind of small ops, and how many it dispatches."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.randn(1, WIDTH, device=device, dtype=dtype)
    w = torch.randn(WIDTH, WIDTH, device=device, dtype=dtype)
    cache = torch.randn(ROWS, WIDTH, device=device, dtype=dtype)
    idx = torch.arange(0, ROWS, 4, device=device)

    def burst() -> object:
        y = x * 0.5                                   # 1 elementwise
        y = y + x                                     # 2 elementwise
        y = torch.matmul(y, w)                        # 3 matmul
        y = torch.softmax(y, dim=-1)                  # 4 softmax
        rows = torch.index_select(cache, 0, idx)      # 5 index_select
        both = torch.cat((rows, y), dim=0)            # 6 cat
        flat = both.view(-1, WIDTH).contiguous()      # 7 (view is free; contiguous of a contiguous: no op)
        return torch.sum(flat, dim=0)                 # 7 reduction

    return burst, 7


def dispatch_us(device: torch.device, repeats: int, warmup: int, bursts: int = 20) -> list[float]:
    """Per-op host microseconds, one sample per timed run of `bursts` bursts."""
    burst, ops = _burst(device)
    for _ in range(warmup):
        burst()
    synchronize(device)
    samples = []
    with gc_paused():
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(bursts):
                burst()
            samples.append((time.perf_counter() - start) * 1e6 / (bursts * ops))
            synchronize(device)  # outside the clock: the next run starts on an empty queue
    return samples


def sync_us(device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Host microseconds of `.item()` on the result of a just-queued tiny kernel (an idle device
    otherwise): the wait for that kernel, the 4-byte read-back and the round trip; the kernel's launch is
    outside the clock."""
    x = torch.ones(1, device=device)
    for _ in range(warmup):
        (x + 1).item()
    samples = []
    with gc_paused():
        for _ in range(repeats):
            synchronize(device)
            y = x + 1
            start = time.perf_counter()
            y.item()
            samples.append((time.perf_counter() - start) * 1e6)
    return samples


def host_rows(device: torch.device, repeats: int, warmup: int) -> list[dict]:
    """host.csv rows (dispatch, sync) for `device`, as HOST_COLUMNS."""
    rows = []
    for op, measure in (("dispatch", dispatch_us), ("sync", sync_us)):
        stats = summarize(measure(device, max(repeats, 5), warmup))
        rows.append({"op": op, "device": device.type, **stats.as_row(), "status": "ok"})
    assert all(list(row) == HOST_COLUMNS for row in rows)
    return rows
