"""Timelines of a replay: every op of a full replay, and its Chrome trace in the shape both worlds share
(`spec.trace`: pid/tid = device/stream or thread, name = the op, args = layer, step, what a copy moves)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from infinigen_sim.sim.machine import Recorder, TimedOp
from infinigen_sim.sim.replay import simulate_full
from infinigen_sim.sim.scenario import Scenario
from infinigen_sim.spec.trace import TraceEvent, trace_json
from infinigen_sim.spec.trace import chrome_trace as shared_trace


def trace_ops(sc: Scenario) -> list[TimedOp]:
    """Every op of a full replay of `sc`, for a timeline."""
    recorder = Recorder(keep_ops=True)
    simulate_full(sc, recorder)
    return recorder.ops


def trace_events(ops: Iterable[TimedOp]) -> list[TraceEvent]:
    """The replay's ops as trace events (zero-length ones left out: they did not happen)."""
    return [TraceEvent(op.resource, op.op.value, op.layer, op.step, op.start_s * 1e6, (op.end_s - op.start_s) * 1e6,
                       {"what": op.what} if op.what else {})
            for op in ops if op.end_s > op.start_s]


def chrome_trace(ops: Iterable[TimedOp], label: str = "") -> dict[str, Any]:
    """Chrome trace JSON (opens in Perfetto) of a replay's ops."""
    return shared_trace(trace_events(ops), label)


def chrome_trace_json(ops: Iterable[TimedOp]) -> str:
    return trace_json(chrome_trace(ops))
