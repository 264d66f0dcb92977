"""One decode step of a measured run beside the simulator's prediction of it, in one Chrome trace.

`profiler.run --trace RUN.json` writes the runtime's timeline in the shared shape (`spec.trace`) with the
run's point in `otherData` (model, policy, alpha, overlap, lengths, device, the rows each layer fetched
at each step). `side_by_side_trace` rebuilds that point, replays it in full from a bundle's calibration
(as `validate` does for steps.csv runs; InfiniGen's fetched rows from the trace), and writes the chosen
step of both timelines, each shifted to start at 0, under processes "measured: ..." and "predicted: ...",
so a miss can be seen op by op in Perfetto.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from infinigen_sim.analysis.validate import Run, scenario
from infinigen_sim.cost.calibrate import Calibration
from infinigen_sim.sim.trace import trace_events, trace_ops
from infinigen_sim.spec.cli import InputError
from infinigen_sim.spec.fetch import FetchModel
from infinigen_sim.spec.hardware import HardwareConfig
from infinigen_sim.spec.policies import PolicyError, make_policy
from infinigen_sim.spec.runtime import RuntimeSpec
from infinigen_sim.spec.trace import TraceEvent, read_trace, side_by_side

NEEDED = ("model", "policy", "alpha", "overlap", "batch_size", "prompt_len", "gen_len", "device",
          "fetched_per_step")


def load_run_trace(path: str | Path) -> tuple[list[TraceEvent], dict[str, Any]]:
    """A `profiler.run --trace` file: its events and its run's point; InputError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--trace {path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        events, meta = read_trace(text, str(path))
    except ValueError as exc:
        raise InputError(f"--trace {exc}") from None
    missing = [key for key in NEEDED if key not in meta]
    if missing:
        raise InputError(f"--trace {path}: otherData lacks {', '.join(missing)} (write it with profiler.run --trace)")
    return events, meta


def run_of(meta: dict[str, Any], where: str) -> tuple[Run, FetchModel | None]:
    """The traced run's point, and (InfiniGen) the mean rows each layer fetched over its decode steps."""
    try:
        policy = make_policy(str(meta["policy"]), alpha=float(meta["alpha"]), overlap=bool(meta["overlap"]))
        run = Run(f"trace {Path(where).name}", str(meta["model"]), policy, int(meta["batch_size"]),
                  int(meta["prompt_len"]), int(meta["gen_len"]), pd.DataFrame())
        per_step = np.asarray(meta["fetched_per_step"], dtype=float)
    except (PolicyError, TypeError, ValueError) as exc:
        raise InputError(f"--trace {where}: otherData: {exc}") from None
    if policy.name.value != "infinigen" or per_step.size == 0:
        return run, None
    return run, FetchModel.measured_rows(list(enumerate(per_step.mean(axis=0))), f"measured in {where}")


def _step_events(events: list[TraceEvent], step: int) -> list[TraceEvent]:
    """`step`'s events, shifted so the step starts at 0."""
    picked = [e for e in events if e.step == step]
    start = min((e.start_us for e in picked), default=0.0)
    return [TraceEvent(e.track, e.name, e.layer, e.step, e.start_us - start, e.dur_us, e.args) for e in picked]


def side_by_side_trace(cal: Calibration, hw: HardwareConfig, trace_path: str | Path, runtime: RuntimeSpec | None,
                       step: int | None = None) -> dict[str, Any]:
    """Trace JSON with the traced run's decode step `step` (default: the middle one) measured and predicted."""
    events, meta = load_run_trace(trace_path)
    bundle_device = "cpu" if cal.cpu else "cuda"
    if str(meta["device"]) != bundle_device:
        raise InputError(f"--trace {trace_path}: a {meta['device']} run, but the bundle measured {bundle_device}: "
                         f"predict it from a bundle of the same device")
    run, fetch = run_of(meta, str(trace_path))
    steps = run.gen_len - 1
    if steps < 1:
        raise InputError(f"--trace {trace_path}: the run has no decode step (gen_len {run.gen_len})")
    step = (steps - 1) // 2 if step is None else step
    if not 0 <= step < steps:
        raise InputError(f"--trace-step: expected 0-{steps - 1} (the run's decode steps), got {step}")
    sc = scenario(cal, hw, run, runtime, fetch)
    predicted = trace_events(trace_ops(sc))
    measured_step, predicted_step = _step_events(events, step), _step_events(predicted, step)
    wall = lambda evs: max((e.start_us + e.dur_us for e in evs), default=0.0)  # noqa: E731
    info = {"run": meta, "step": step, "bundle": str(cal.path), "runtime": sc.runtime.name,
            "measured_step_us": round(wall(measured_step), 3), "predicted_step_us": round(wall(predicted_step), 3)}
    return side_by_side([("measured", measured_step), ("predicted", predicted_step)], info)
