"""The simulated box: one SimPy environment, its four resources, and what the replay records.

Simultaneous events: SimPy runs events due at the same time in the order they were scheduled and
each resource grants requests in request order, so ties resolve in program order: a layer requests
its weight load before its K/V fetch, and the compute stream runs kernels as issued. All times are
seconds; state lives in a `Machine` (the environment and its resources), so a replay is deterministic.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, NamedTuple

import simpy

from infinigen_sim.sim.pricing import LayerTimes, layer_times
from infinigen_sim.sim.scenario import RESOURCES, Scenario
from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.policies import LayerWork


class Work(NamedTuple):
    """One op to run on a resource: what it is, for which layer, how long; `what` tells copies apart."""

    op: Op
    layer: int  # -1: before the first layer (embed); n_layers: after the last (LM head)
    seconds: float
    what: str = ""  # copies: kv | weights | indices | row | prompt


@dataclass(frozen=True)
class TimedOp:
    """One timed operation on one resource, as the trace shows it."""

    resource: str
    op: Op
    layer: int  # -1: before the first layer (embed); n_layers: after the last (LM head)
    step: int  # PREFILL or the decode step
    start_s: float
    end_s: float
    what: str = ""

    @property
    def label(self) -> str:
        """`op` or `op:what` (h2d:kv, h2d:weights, d2h:row, ...)."""
        return f"{self.op.value}:{self.what}" if self.what else self.op.value


class Recorder:
    """Busy seconds per (step, layer, resource); every `TimedOp` too when `keep_ops`."""

    def __init__(self, keep_ops: bool = False) -> None:
        self.keep_ops = keep_ops
        self.ops: list[TimedOp] = []
        self.busy: dict[tuple[int, int, str], float] = defaultdict(float)

    def add(self, resource: str, work: Work, step: int, start_s: float, end_s: float) -> None:
        self.busy[step, work.layer, resource] += end_s - start_s
        if self.keep_ops:
            self.ops.append(TimedOp(resource, work.op, work.layer, step, start_s, end_s, work.what))

    def busy_s(self, step: int) -> dict[str, float]:
        out = dict.fromkeys(RESOURCES, 0.0)
        for (op_step, _, resource), seconds in self.busy.items():
            if op_step == step:
                out[resource] += seconds
        return out

    def log(self) -> list[tuple[str, float]]:
        """[(event, time)]: "<resource> <label>[layer] start|end", in time order (ties: as recorded)."""
        events = []
        for op in self.ops:
            label = f"{op.resource} {op.label}[{op.layer}]"
            events += [(f"{label} start", op.start_s), (f"{label} end", op.end_s)]
        return sorted(events, key=lambda event: event[1])


WorkList = list[Work]  # run back to back on one resource


class Machine:
    """The simulated box: one environment, its four resources and a recorder."""

    def __init__(self, sc: Scenario, recorder: Recorder | None = None) -> None:
        self.sc = sc
        self.env = simpy.Environment()
        self.resources = {name: simpy.Resource(self.env, capacity=1) for name in RESOURCES}
        self.h2d, self.gather = sc.placement.h2d, sc.placement.gather
        if sc.placement.dispatch and sc.runtime.gather.thread == "main":
            self.gather = "dispatch"  # the runtime gathers on the thread that dispatches the ops
        self.recorder = recorder if recorder is not None else Recorder()
        self.layer_start_s: list[float] = []  # when each layer began, in replay order
        self._times: dict[tuple[LayerWork, int], LayerTimes] = {}
        self._span_s: dict[Op, float] = {}

    def times(self, work: LayerWork, context_len: int) -> LayerTimes:
        key = (work, context_len)
        if key not in self._times:
            self._times[key] = layer_times(self.sc, work, context_len)
        return self._times[key]

    def span_s(self, op: Op) -> float:
        """The runtime's bookkeeping after `op` on the compute thread (0 unless the cost model prices it)."""
        if op not in self._span_s:
            self._span_s[op] = float(self.sc.costs.span_s(op))
        return self._span_s[op]

    def hold(self, resource: str, ops: WorkList, step: int) -> Generator[simpy.Event, Any, None]:
        """Run `ops` back to back on `resource` once it is free (one request for the batch of ops)."""
        if resource == "gpu" and self.sc.placement.spans:
            spans = [(w, Work(Op.SPAN, w.layer, self.span_s(w.op))) for w in ops]
            ops = [entry for w, span in spans for entry in ((w, span) if span.seconds > 0 else (w,))]
        with self.resources[resource].request() as req:
            yield req
            start = self.env.now
            yield self.env.timeout(sum(w.seconds for w in ops))
        for w in ops:
            self.recorder.add(resource, w, step, start, start + w.seconds)
            start += w.seconds


class StepState:
    """One decode step's inputs and the events its processes signal."""

    def __init__(self, step: int, layers: list[LayerWork], context_len: int,
                 prev_writes: list[simpy.Event | None] | None) -> None:
        self.step = step
        self.layers = layers
        self.context_len = context_len
        self.prev_writes = prev_writes  # last step's write-backs, which this step's fetches read
        self.kv_ready: list[simpy.Event | None] = [None] * len(layers)
        self.weights_ready: list[simpy.Event | None] = [None] * len(layers)
        self.written: list[simpy.Event | None] = [None] * len(layers)
        self.gathered: list[simpy.Event | None] = [None] * len(layers)  # a main-thread gather finished
        self.dispatched: list[simpy.Event] = []  # the host dispatched the layer (set when the host costs time)
        self.layer_done: list[simpy.Event] = []  # the layer's GPU work finished (likewise)
        self.end_s = 0.0
