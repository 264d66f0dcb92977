"""Phase timing and the per-step records the profiler reads.

On CUDA a phase is timed by a pair of CUDA events recorded on the stream that runs it (compute,
H2D copy or D2H write-back stream); the events are read after the step, when the engine has
synchronised once, so no phase synchronises on its own. Host work (the copy worker's gathers and
commits, the compute thread's waits) is timed with `time.perf_counter` on the thread that does it,
on CUDA as on CPU. On CPU every phase is perf_counter. Spans are summed per (phase, layer).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from enum import Enum

import torch


class Phase(str, Enum):
    """The timed phases of prefill and decode (names the profile bundle uses)."""

    EMBED = "embed"  # token (+ learned position) embedding
    NORM = "norm"  # input / post-attention / final norm
    QKV = "qkv"  # Q, K, V projections (+ RoPE)
    ATTENTION = "attention"  # softmax(QK^T)V over the rows at hand, incl. writing the new row
    O_PROJ = "o_proj"  # attention output projection
    FFN = "ffn"  # the MLP
    SKEW = "skew"  # InfiniGen prefill: SVD, fold, partial weight index, partial K cache
    SCORE = "score"  # H2O / bounded pool: accumulated attention of the prompt, eviction bookkeeping
    SPECULATE = "speculate"  # InfiniGen: partial Q x partial K^T, count above max - alpha
    TOPK = "topk"  # InfiniGen: top-k rows per KV head
    GATHER = "gather"  # host: chosen rows into the staging buffer
    H2D = "h2d"  # host -> device copy of fetched rows
    D2H = "d2h"  # device -> host copy (new K/V row, prompt KV, speculated indices)
    COMMIT = "commit"  # host: filing the written-back row into the host cache
    QUANTIZE = "quantize"  # INT4: K/V to codes + scale/zero
    DEQUANTIZE = "dequantize"  # INT4: fetched codes back to K/V
    WAIT = "wait"  # compute thread blocked on a fetch's host work (the copy stream's lag)
    LM_HEAD = "lm_head"  # logits


MODEL_LAYER = -1  # layer index of spans outside the decoder layers (embed, final norm, lm_head)


@dataclass
class StepRecord:
    """One prefill (step -1) or decode step: wall time, seconds per layer and phase, rows fetched."""

    step: int
    context_len: int  # tokens cached before the step (the prompt length for prefill)
    wall_s: float
    layer_phase_s: list[dict[str, float]]  # [layer][phase] seconds, summed over the step's spans
    model_phase_s: dict[str, float]  # phases outside the layers
    fetched: list[int]  # K/V rows per sequence copied host->device, per layer

    def phase_total_s(self, phase: Phase | str) -> float:
        key = Phase(phase).value
        return self.model_phase_s.get(key, 0.0) + sum(p.get(key, 0.0) for p in self.layer_phase_s)

    def to_dict(self) -> dict:
        return asdict(self)


class PhaseTimer:
    """Collects phase spans from the compute thread and the copy worker during one step."""

    def __init__(self, cuda: bool, trace: bool = False) -> None:
        self.cuda = cuda
        self.trace = trace  # label spans for torch.profiler (a Chrome trace)
        self._lock = threading.Lock()  # the copy worker appends beside the compute thread
        self._events: list[tuple[str, int, torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds: list[tuple[str, int, float]] = []

    @contextmanager
    def span(self, phase: Phase, layer: int, host: bool = False) -> Iterator[None]:
        """Time the enclosed work; `host=True` for CPU work (perf_counter even on CUDA)."""
        label = torch.profiler.record_function(f"{phase.value}[{layer}]") if self.trace else nullcontext()
        with label:
            if self.cuda and not host:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()  # on the current stream: the one the enclosed kernels run on
                yield
                end.record()
                with self._lock:
                    self._events.append((phase.value, layer, start, end))
            else:
                t0 = time.perf_counter()
                yield
                seconds = time.perf_counter() - t0
                with self._lock:
                    self._seconds.append((phase.value, layer, seconds))

    def collect(self, n_layers: int) -> tuple[list[dict[str, float]], dict[str, float]]:
        """Per-layer and model-level seconds since the last collect; call after synchronising."""
        with self._lock:
            events, seconds = self._events, self._seconds
            self._events, self._seconds = [], []
        totals: dict[tuple[str, int], float] = defaultdict(float)
        for phase, layer, start, end in events:
            totals[phase, layer] += start.elapsed_time(end) / 1e3  # ms -> s
        for phase, layer, s in seconds:
            totals[phase, layer] += s
        per_layer: list[dict[str, float]] = [{} for _ in range(n_layers)]
        model: dict[str, float] = {}
        for (phase, layer), s in totals.items():
            (model if layer == MODEL_LAYER else per_layer[layer])[phase] = s
        return per_layer, model
