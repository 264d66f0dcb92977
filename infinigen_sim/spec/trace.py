"""The one Chrome-trace shape both worlds write, so a runtime's measured timeline and the simulator's
predicted one open side by side in Perfetto (ui.perfetto.dev) or chrome://tracing.

Complete events ("ph": "X") with `ts` and `dur` in microseconds; pid = device (gpu, host), tid = the
stream or thread (`TRACKS`): the compute stream, the H2D and D2H copy streams, the host thread that
dispatches the model's ops, the copy worker. name = the op (`spec.ops.Op` value); args = layer, step
(or "prefill") and, for copies, what they move. Metadata events name every process and thread.
`side_by_side` puts two timelines in one file under distinct processes ("measured: gpu", ...).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# track -> (pid, tid): the simulator's resources and the runtime's streams and threads alike
TRACKS: dict[str, tuple[int, int]] = {"gpu": (1, 1), "h2d_link": (1, 2), "d2h_link": (1, 3),
                                      "dispatch": (2, 1), "host_cpu": (2, 2)}
PROCESSES = {1: "gpu", 2: "host"}
THREADS = {"gpu": "compute stream", "h2d_link": "H2D stream", "d2h_link": "D2H stream",
           "dispatch": "dispatching thread", "host_cpu": "copy worker"}
PREFILL_STEP = -1


@dataclass(frozen=True)
class TraceEvent:
    """One timed operation on one track."""

    track: str  # a key of TRACKS
    name: str  # the op
    layer: int
    step: int  # PREFILL_STEP or the decode step
    start_us: float
    dur_us: float
    args: dict[str, Any] = field(default_factory=dict)  # e.g. {"what": "kv"} for a copy


def chrome_trace(events: Iterable[TraceEvent], label: str = "", pid_offset: int = 0,
                 metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trace JSON of `events`; `label` prefixes the process names, `pid_offset` moves their pids."""
    prefix = f"{label}: " if label else ""
    out: list[dict[str, Any]] = [{"ph": "M", "name": "process_name", "pid": pid + pid_offset, "tid": 0,
                                  "args": {"name": prefix + name}} for pid, name in PROCESSES.items()]
    out += [{"ph": "M", "name": "thread_name", "pid": pid + pid_offset, "tid": tid, "args": {"name": THREADS[track]}}
            for track, (pid, tid) in TRACKS.items()]
    for event in events:
        pid, tid = TRACKS[event.track]
        args = {"layer": event.layer, "step": "prefill" if event.step == PREFILL_STEP else event.step, **event.args}
        start, end = round(event.start_us, 3), round(event.start_us + event.dur_us, 3)  # ends land on the grid too
        out.append({"name": event.name, "cat": event.track, "ph": "X", "ts": start, "dur": round(end - start, 3),
                    "pid": pid + pid_offset, "tid": tid, "args": args})
    trace: dict[str, Any] = {"traceEvents": out, "displayTimeUnit": "ms"}
    if metadata:
        trace["otherData"] = metadata
    return trace


def side_by_side(timelines: Sequence[tuple[str, Iterable[TraceEvent]]],
                 metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Several labelled timelines in one trace, each under its own processes (pids 10 apart)."""
    events: list[dict[str, Any]] = []
    for i, (label, timeline) in enumerate(timelines):
        events += chrome_trace(timeline, label, 10 * i)["traceEvents"]
    trace: dict[str, Any] = {"traceEvents": events, "displayTimeUnit": "ms"}
    if metadata:
        trace["otherData"] = metadata
    return trace


def trace_json(trace: dict[str, Any]) -> str:
    return json.dumps(trace, separators=(",", ":"))


def read_trace(text: str, where: str) -> tuple[list[TraceEvent], dict[str, Any]]:
    """The complete events and otherData of a trace written by chrome_trace; ValueError naming `where`."""
    try:
        trace = json.loads(text)
        events = [TraceEvent(str(e["cat"]), str(e["name"]), int(e["args"]["layer"]),
                             PREFILL_STEP if e["args"]["step"] == "prefill" else int(e["args"]["step"]),
                             float(e["ts"]), float(e["dur"]),
                             {k: v for k, v in e["args"].items() if k not in ("layer", "step")})
                  for e in trace["traceEvents"] if e.get("ph") == "X"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{where}: not a trace this project wrote ({type(exc).__name__}: {exc})") from None
    if any(e.track not in TRACKS for e in events):
        raise ValueError(f"{where}: a track other than {', '.join(TRACKS)}")
    return events, dict(trace.get("otherData") or {})
