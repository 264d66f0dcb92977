"""Timelines of a replay: every op of a full replay, and the Chrome-trace JSON (Perfetto) of them.

One complete event per op, `ts`/`dur` in microseconds, pid = device (gpu, host), tid = resource, name =
the op (`spec.ops.Op`), args = layer, step and, for copies, what they move: the shape the runtime's
trace shares.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from infinigen_sim.sim.machine import Recorder, TimedOp
from infinigen_sim.sim.replay import simulate_full
from infinigen_sim.sim.scenario import PREFILL, Scenario


def trace_ops(sc: Scenario) -> list[TimedOp]:
    """Every op of a full replay of `sc`, for a timeline."""
    recorder = Recorder(keep_ops=True)
    simulate_full(sc, recorder)
    return recorder.ops


_TRACKS = {"gpu": (1, 1), "h2d_link": (1, 2), "d2h_link": (1, 3), "host_cpu": (2, 1)}  # (pid, tid)
_DEVICES = {1: "gpu", 2: "host"}


def chrome_trace(ops: Iterable[TimedOp]) -> dict[str, Any]:
    """Chrome trace JSON (opens in Perfetto): one complete event per op, microseconds,
    pid = device (gpu, host), tid = resource; names come from metadata events."""
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}}
        for pid, name in _DEVICES.items()]
    events += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": resource}}
               for resource, (pid, tid) in _TRACKS.items()]
    for op in ops:
        pid, tid = _TRACKS[op.resource]
        start_us, end_us = round(op.start_s * 1e6, 3), round(op.end_s * 1e6, 3)
        args: dict[str, Any] = {"layer": op.layer, "step": "prefill" if op.step == PREFILL else op.step}
        if op.what:
            args["what"] = op.what
        events.append({"name": op.op.value, "cat": op.resource, "ph": "X", "ts": start_us,
                       "dur": round(end_us - start_us, 3), "pid": pid, "tid": tid, "args": args})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def chrome_trace_json(ops: Iterable[TimedOp]) -> str:
    return json.dumps(chrome_trace(ops), separators=(",", ":"))
