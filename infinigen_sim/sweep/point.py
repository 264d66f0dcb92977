"""One sweep point simulated: its memory plan, its replay and its result row.

A point whose memory does not fit is reported with fits=False and a reason, and is not simulated.
"""

from __future__ import annotations

import math
from typing import Any

from infinigen_sim.cost.calibrate import calibration_columns, point_costs, point_fetch_model
from infinigen_sim.cost.memory import MemoryPlan, plan_memory
from infinigen_sim.sim import simulate
from infinigen_sim.sim.scenario import RESOURCES, Scenario
from infinigen_sim.spec.fetch import DEFAULT_FETCH_MODEL
from infinigen_sim.spec.models import get_model
from infinigen_sim.sweep.grid import Point

MEMORY_COLUMNS = ["mode", "fits", "reason", "gpu_mem_gib", "host_mem_gib", "weights_streamed_pct"]
CALIBRATION_COLUMNS = ["calibration", "extrapolated"]  # with --profile only
RESULT_COLUMNS = ["prefill_s", "decode_s", "total_s", "tokens_per_s", "speedup_vs_flexgen", "decode_step_ms",
                  *(f"{resource}_busy_pct" for resource in RESOURCES)]  # NaN when the point does not fit


def scenario_for(point: Point) -> tuple[Scenario | None, MemoryPlan]:
    """The replay input of `point` and its memory plan (no scenario when it does not fit)."""
    model = get_model(point.model)
    runtime = point.runtime.for_policy(point.policy.name)
    policy = runtime.policies.apply(point.policy)  # the runtime's own per-layer budgets
    plan = plan_memory(point.hw, model, policy, point.batch_size, point.prompt_len, point.gen_len)
    if not plan.fits:
        return None, plan
    costs = point_costs(point.profile, point.hw, policy, model, point.runtime)
    fetch_model = point.fetch_model or point_fetch_model(point.profile, model, DEFAULT_FETCH_MODEL)
    return Scenario(costs, model, policy, point.batch_size, point.prompt_len, point.gen_len, fetch_model,
                    plan.streamed_weight_bytes, runtime=runtime), plan


def simulate_point(point: Point) -> dict[str, Any]:
    """One result row: the point's parameters, memory, and (when it fits) times and bottleneck."""
    sc, plan = scenario_for(point)
    layer_bytes = get_model(point.model).layer_weight_bytes()
    row: dict[str, Any] = {**point.params, "mode": point.mode, "fits": plan.fits, "reason": plan.reason,
                           "gpu_mem_gib": round(plan.gpu_gib, 3), "host_mem_gib": round(plan.host_gib, 3),
                           "weights_streamed_pct": round(100 * plan.streamed_weight_bytes / layer_bytes, 2)}
    row.update(dict.fromkeys(RESULT_COLUMNS, math.nan), bottleneck="")
    if point.profile is not None:
        row.update(calibration="", extrapolated=False)
    if sc is None:
        return {**row, "key": point.key}
    res = simulate(sc, point.mode)
    if point.profile is not None:
        row.update(calibration_columns(sc.costs))  # read after the replay: which lookups left the grid
    row.update(prefill_s=res.prefill_s, decode_s=res.decode_s, total_s=res.total_s,
               tokens_per_s=point.batch_size * point.gen_len / res.total_s,
               decode_step_ms=1e3 * res.step_s, bottleneck=res.bottleneck)
    for resource in RESOURCES:
        row[f"{resource}_busy_pct"] = 100 * res.busy_s[resource] / res.step_s if res.step_s else math.nan
    return {**row, "key": point.key}


def row_columns(point: Point) -> list[str]:
    """The columns of `simulate_point(point)`'s row, in order, known without simulating."""
    extra = CALIBRATION_COLUMNS if point.profile is not None else []
    return [*point.params, *MEMORY_COLUMNS, *RESULT_COLUMNS, "bottleneck", *extra, "key"]


