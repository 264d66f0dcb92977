"""Where KV traffic runs beside compute: the copy streams and the host worker.

CUDA: H2D copies run on a copy stream and D2H write-backs on a write-back stream, both apart from
the compute (current) stream; host-side work (row gathers, filing written-back rows) runs on one
worker thread so the compute thread keeps queueing kernels. CPU: the same worker thread stands in
for the copy stream and its future for the event; a "device" buffer is a separate tensor and a copy
is a real memcpy. With overlap off the worker is replaced by inline execution, so a layer's copy
and its compute serialise.

Ordering rule: the worker runs jobs strictly in submission order (one thread, FIFO), so a
write-back committed during step t is in the host cache before any fetch submitted later reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from infinigen_sim.spec.ops import Op
from profiler.runtime.cuda_api import CUDA
from profiler.runtime.timing import PhaseTimer

Event = Any  # torch.cuda.Event on CUDA, None on CPU (the future is the event)


@dataclass
class FetchResult:
    """A layer's rows on the device: planes whose first `rows` rows are valid once `event` fires."""

    planes: tuple[Tensor, ...]
    rows: int
    event: Event = None


def _run_inference(fn: Callable, *args: Any) -> Any:
    with torch.inference_mode():  # inference mode is per thread; the cache tensors are inference tensors
        return fn(*args)


class Copier:
    """Copy streams and the host worker of one engine."""

    def __init__(self, device: torch.device, overlap: bool, timer: PhaseTimer) -> None:
        self.cuda = device.type == "cuda"
        self.timer = timer
        # H2D on its own stream so that layer i+1's fetch overlaps layer i's compute
        self.h2d_stream = CUDA.Stream(device) if self.cuda else None
        # D2H on another: PCIe is full duplex, and write-backs must not queue behind prefetches
        self.d2h_stream = CUDA.Stream(device) if self.cuda else None
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="kv-copy") if overlap else None

    def submit(self, fn: Callable, *args: Any) -> Future:
        """Run host work on the worker (FIFO), or now when overlap is off."""
        if self.worker is not None:
            return self.worker.submit(_run_inference, fn, *args)
        done: Future = Future()
        done.set_result(fn(*args))
        return done

    def h2d(self, layer: int, pairs: Iterable[tuple[Tensor, Tensor]], after: Event = None) -> Event:
        """Copy (device dst, host src) pairs; returns the event attention waits on."""
        if not self.cuda:
            with self.timer.span(Op.H2D, layer):
                for dst, src in pairs:
                    dst.copy_(src)
            return None
        with CUDA.stream(self.h2d_stream):
            if after is not None:
                self.h2d_stream.wait_event(after)  # the buffer is free only once attention stopped reading it
            with self.timer.span(Op.H2D, layer):
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
            # attention of `layer` waits on this on the device; the host may wait on it too (before it
            # overwrites the pinned source): blocking, so a waiting host thread sleeps instead of spinning
            done = CUDA.Event(blocking=True)
            done.record()
        return done

    def d2h(self, layer: int, pairs: Iterable[tuple[Tensor, Tensor]]) -> Event:
        """Copy (host dst, device src) pairs; returns the event host readers synchronise on."""
        if not self.cuda:
            with self.timer.span(Op.D2H, layer):
                for dst, src in pairs:
                    dst.copy_(src)
            return None
        self.d2h_stream.wait_stream(CUDA.current_stream())  # the rows are produced on the compute stream
        with CUDA.stream(self.d2h_stream):
            with self.timer.span(Op.D2H, layer):
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
                    src.record_stream(self.d2h_stream)  # keep src alive until this stream has copied it
            # the host reads the rows only after this fires; blocking: the waiting worker thread sleeps
            # (a spinning wait would take the core the compute thread needs to queue kernels)
            done = CUDA.Event(blocking=True)
            done.record()
        return done

    def host_wait(self, event: Event) -> None:
        """Block this (host) thread until a D2H copy has landed in host memory."""
        if event is not None:
            event.synchronize()  # the host is about to read the rows with the CPU

    def compute_mark(self) -> Event:
        """An event at the current point of the compute stream (None on CPU: work is already done)."""
        if not self.cuda:
            return None
        mark = CUDA.Event()
        mark.record()  # later copies into buffers read so far wait on this (on the device, never the host)
        return mark

    def device_wait(self, layer: int, fetch: Future) -> FetchResult:
        """Make compute wait for a fetch: its host work on this thread, its copy on the stream."""
        with self.timer.span(Op.WAIT, layer, host=True):
            result: FetchResult = fetch.result()
        if result.event is not None:
            CUDA.current_stream().wait_event(result.event)  # attention must not read rows still in flight
        return result

    def drain(self) -> None:
        """Wait for every job submitted so far (FIFO: a no-op job finishing means all did)."""
        if self.worker is not None:
            self.worker.submit(lambda: None).result()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.shutdown(wait=True)
            self.worker = None
