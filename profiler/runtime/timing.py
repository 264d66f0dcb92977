"""Op timing and the per-step records the profiler reads.

Spans are named by `infinigen_sim.spec.ops.Op`, the op vocabulary of both worlds, so a step's
record, a steps.csv row and a kernels.csv row name an op alike (the engine times the output
projection and the MLP as two `Op.FFN` spans, which sum to one `ffn` entry of the record).
On CUDA a span is timed by a pair of CUDA events recorded on the stream that runs it (compute,
H2D copy or D2H write-back stream); the events are read after the step, when the engine has
synchronised once, so no span synchronises on its own. Host work (the copy worker's gathers and
commits, the compute thread's waits) is timed with `time.perf_counter` on the thread that does it,
on CUDA as on CPU. On CPU every span is perf_counter. Spans are summed per (op, layer).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from infinigen_sim.spec.ops import Op
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
    """Collects op spans from the compute thread and the copy worker during one step."""

    def __init__(self, cuda: bool, trace: bool = False) -> None:
        self.cuda = cuda
        self.trace = trace  # label spans for torch.profiler (a Chrome trace)
        self._lock = threading.Lock()  # the copy worker appends beside the compute thread
        self._events: list[tuple[str, int, object, object]] = []  # (op, layer, start, end) CUDA events
        self._seconds: list[tuple[str, int, float]] = []

    @contextmanager
    def span(self, op: Op, layer: int, host: bool = False) -> Iterator[None]:
        """Time the enclosed work; `host=True` for CPU work (perf_counter even on CUDA)."""
        label = torch.profiler.record_function(f"{op.value}[{layer}]") if self.trace else nullcontext()
        with label:
            if self.cuda and not host:
                start, end = CUDA.Event(enable_timing=True), CUDA.Event(enable_timing=True)
                start.record()  # on the current stream: the one the enclosed kernels run on
                yield
                end.record()
                with self._lock:
                    self._events.append((op.value, layer, start, end))
            else:
                t0 = time.perf_counter()
                yield
                seconds = time.perf_counter() - t0
                with self._lock:
                    self._seconds.append((op.value, layer, seconds))

    def collect(self, n_layers: int) -> tuple[list[dict[str, float]], dict[str, float]]:
        """Per-layer and model-level seconds since the last collect; call after synchronising."""
        with self._lock:
            events, seconds = self._events, self._seconds
            self._events, self._seconds = [], []
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
