"""Op timing and the per-step records the profiler reads.

Spans are named by `infinigen_sim.spec.ops.Op`, the op vocabulary of both worlds, so a step's
record, a steps.csv row and a kernels.csv row name an op alike (the engine times the output
projection and the MLP as two `Op.FFN` spans, which sum to one `ffn` entry of the record).
On CUDA a span is timed by a pair of CUDA events recorded on the stream that runs it (compute,
H2D copy or D2H write-back stream); the events are read after the step, when the engine has
synchronised once, so no span synchronises on its own. Host work (the copy worker's gathers and
commits, the compute thread's waits) is timed with `time.perf_counter` on the thread that does it,
on CUDA as on CPU. On CPU every span is perf_counter. Spans are summed per (op, layer). With `trace`
the timer also keeps every span's start and end as `spec.trace.TraceEvent`s on the simulator's tracks
(compute stream, H2D / D2H streams, the dispatching thread, the copy worker), so `profiler.run --trace`
writes the shape `sweep --trace` writes.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.trace import PREFILL_STEP, TraceEvent
from profiler.runtime.cuda_api import CUDA

MODEL_LAYER = -1  # layer index of spans outside the decoder layers (embed, final norm, lm_head)


@dataclass
class StepRecord:
    """One prefill (step -1) or decode step: wall time, seconds per layer and op, rows fetched."""

    step: int
    context_len: int  # tokens cached before the step (the prompt length for prefill)
    wall_s: float
    layer_op_s: list[dict[str, float]]  # [layer][op value] seconds, summed over the step's spans
    model_op_s: dict[str, float]  # ops outside the layers
    fetched: list[int]  # K/V rows per sequence copied host->device, per layer

    def op_total_s(self, op: Op | str) -> float:
        """Seconds of `op` over the whole step, every layer and outside them."""
        key = Op(op).value
        return self.model_op_s.get(key, 0.0) + sum(p.get(key, 0.0) for p in self.layer_op_s)


class PhaseTimer:
    """Collects op spans from the compute thread and the copy worker during one step; with `trace`, also
    each span's start and end, for a timeline in the simulator's trace shape (`spec.trace`)."""

    def __init__(self, cuda: bool, trace: bool = False) -> None:
        self.cuda = cuda
        self.trace = trace  # keep every span's start and end (`timeline`)
        self._lock = threading.Lock()  # the copy worker appends beside the compute thread
        self._events: list[tuple[str, int, object, object]] = []  # (op, layer, start, end) CUDA events
        self._seconds: list[tuple[str, int, float]] = []
        self._spans: list[tuple[str, str, int, object, object]] = []  # (track, op, layer, start, end)
        self._main = threading.get_ident()  # the thread that dispatches the model
        self._step, self._t0_s, self._base, self._compute = PREFILL_STEP, 0.0, None, None
        self._first_s: float | None = None
        self.timeline: list[TraceEvent] = []

    def begin_step(self, step: int) -> None:
        """Mark a step's start (host clock, and on CUDA an event on the compute stream) for the timeline."""
        if not self.trace:
            return
        self._step, self._t0_s = step, time.perf_counter()
        self._first_s = self._t0_s if self._first_s is None else self._first_s
        if self.cuda:
            self._compute = CUDA.current_stream()
            self._base = CUDA.Event(enable_timing=True)
            self._base.record(self._compute)

    def _track(self, op: Op, device_span: bool) -> str:
        """The timeline track of a span: its stream on CUDA, its thread on the host."""
        if device_span:
            if CUDA.current_stream() == self._compute:
                return "gpu"
            return {Op.H2D: "h2d_link", Op.D2H: "d2h_link"}.get(op, "gpu")
        if threading.get_ident() != self._main:
            return "host_cpu"  # the copy worker
        return "dispatch" if self.cuda else "gpu"  # on CPU the dispatching thread is the compute thread

    @contextmanager
    def span(self, op: Op, layer: int, host: bool = False) -> Iterator[None]:
        """Time the enclosed work; `host=True` for CPU work (perf_counter even on CUDA)."""
        if self.cuda and not host:
            start, end = CUDA.Event(enable_timing=True), CUDA.Event(enable_timing=True)
            start.record()  # on the current stream: the one the enclosed kernels run on
            yield
            end.record()
            with self._lock:
                self._events.append((op.value, layer, start, end))
                if self.trace:
                    self._spans.append((self._track(op, True), op.value, layer, start, end))
        else:
            t0 = time.perf_counter()
            yield
            t1 = time.perf_counter()
            with self._lock:
                self._seconds.append((op.value, layer, t1 - t0))
                if self.trace:
                    self._spans.append((self._track(op, False), op.value, layer, t0, t1))

    def _timeline_events(self) -> list[TraceEvent]:
        """This step's spans, in microseconds since the first traced step began (CUDA events placed by
        their elapsed time from the step's base event; host spans by perf_counter)."""
        offset_us = (self._t0_s - (self._first_s or self._t0_s)) * 1e6
        out = []
        for track, op, layer, start, end in self._spans:
            if isinstance(start, float):
                t0_us, t1_us = (start - self._t0_s) * 1e6, (end - self._t0_s) * 1e6
            else:
                t0_us, t1_us = self._base.elapsed_time(start) * 1e3, self._base.elapsed_time(end) * 1e3
            out.append(TraceEvent(track, op, layer, self._step, offset_us + t0_us, max(t1_us - t0_us, 0.0)))
        self._spans = []
        return out

    def discard(self) -> None:
        """Drop the spans recorded so far, once the device finished them (CUDA events are read, and may be
        dropped, only once complete): after set-up work that is not timed."""
        if self.cuda:
            CUDA.synchronize()
        with self._lock:
            self._events, self._seconds = [], []

    def collect(self, n_layers: int) -> tuple[list[dict[str, float]], dict[str, float]]:
        """Per-layer and model-level seconds since the last collect; call after synchronising."""
        with self._lock:
            events, seconds = self._events, self._seconds
            self._events, self._seconds = [], []
            if self.trace:
                self.timeline += self._timeline_events()
        totals: dict[tuple[str, int], float] = defaultdict(float)
        for op, layer, start, end in events:
            totals[op, layer] += start.elapsed_time(end) / 1e3  # ms -> s
        for op, layer, s in seconds:
            totals[op, layer] += s
        per_layer: list[dict[str, float]] = [{} for _ in range(n_layers)]
        model: dict[str, float] = {}
        for (op, layer), s in totals.items():
            (model if layer == MODEL_LAYER else per_layer[layer])[op] = s
        return per_layer, model
