"""Sweep points: the grid, one `Point` per configuration, and `simulate_point`, its result row.

A point is a frozen, picklable `Point` keyed by its parameters (`Point.key`), so any executor (this
process, a process pool, Ray) can run it and a resumed sweep can tell which rows it already has. A
point whose memory does not fit is reported with fits=False and a reason, and is not simulated.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infinigen_sim.calibrate import calibration_columns, point_costs, point_fetch_model
from infinigen_sim.costs import MemoryPlan, plan_memory
from infinigen_sim.hardware import HardwareConfig, load_hardware
from infinigen_sim.models import get_model
from infinigen_sim.pipeline import RESOURCES, Scenario, simulate
from infinigen_sim.policies import ALL_POLICIES, DEFAULT_FETCH_MODEL, PolicyConfig, PolicyError, make_policy

POLICY_PREFIX = "policy."
RESULT_COLUMNS = ["prefill_s", "decode_s", "total_s", "tokens_per_s", "speedup_vs_flexgen", "decode_step_ms",
                  *(f"{resource}_busy_pct" for resource in RESOURCES)]  # NaN when the point does not fit


@dataclass(frozen=True)
class SweepGrid:
    """The axes of a sweep; the defaults are the grid run when no option is given."""

    models: tuple[str, ...] = field(default=("opt-6.7b", "opt-13b", "llama-2-7b", "llama-3-8b"),
                                    metadata={"help": "model names from infinigen_sim.models"})
    policies: tuple[str, ...] = field(default=ALL_POLICIES, metadata={"help": "KV policies"})
    batch_sizes: tuple[int, ...] = field(default=(1, 4, 16, 64),
                                         metadata={"help": "sequences decoded together"})
    prompt_lens: tuple[int, ...] = field(default=(512, 2048, 8192, 32768),
                                         metadata={"help": "prompt length, tokens"})
    gen_lens: tuple[int, ...] = field(default=(128,), metadata={"help": "tokens generated per sequence"})


@dataclass(frozen=True)
class Point:
    """One configuration to simulate; `key` identifies it by its parameters."""

    hw: HardwareConfig  # with --set overrides applied
    model: str
    policy: PolicyConfig  # with policy.* overrides applied
    batch_size: int
    prompt_len: int  # tokens
    gen_len: int  # tokens
    settings: tuple[tuple[str, Any], ...] = ()  # the --set values, (dotted key, value)
    mode: str = "fast"
    profile: str | None = None  # profile bundle folder: costs from its measurements (a path keeps Point picklable)

    @property
    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hw": self.hw.name}
        out.update(self.settings)
        out.update(model=self.model, policy=self.policy.name.value, batch_size=self.batch_size,
                   prompt_len=self.prompt_len, gen_len=self.gen_len)
        return out

    @property
    def key(self) -> str:
        return "|".join(f"{name}={value}" for name, value in self.params.items())


def expand_points(hw_configs: Sequence[str | Path], grid: SweepGrid,
                  settings: dict[str, tuple[Any, ...]] | None = None, mode: str = "fast",
                  profile: str | None = None) -> list[Point]:
    """Every point of the grid; each --set key with several values is one more axis."""
    settings = settings or {}
    for name in grid.models:
        get_model(name)
    hw_keys = [k for k in settings if not k.startswith(POLICY_PREFIX)]
    policy_keys = [k for k in settings if k.startswith(POLICY_PREFIX)]
    points = []
    for path in hw_configs:
        for hw_values in itertools.product(*(settings[k] for k in hw_keys)):
            hw = load_hardware(path, dict(zip(hw_keys, hw_values, strict=True)))
            for policy_values in itertools.product(*(settings[k] for k in policy_keys)):
                chosen = tuple(zip(hw_keys + policy_keys, hw_values + policy_values, strict=True))
                params = {k[len(POLICY_PREFIX):]: v for k, v in zip(policy_keys, policy_values, strict=True)}
                policies = [_policy(name, params) for name in grid.policies]
                points += [Point(hw, model, policy, batch, prompt, gen, chosen, mode, profile)
                           for model in grid.models for prompt in grid.prompt_lens
                           for batch in grid.batch_sizes for gen in grid.gen_lens for policy in policies]
    return points


def _policy(name: str, params: dict[str, Any]) -> PolicyConfig:
    try:
        return make_policy(name, **params)
    except PolicyError as exc:
        keys = ", ".join(f"--set {POLICY_PREFIX}{k}" for k in params) or "--policies"
        raise PolicyError(f"{keys}: {exc}") from None


def scenario_for(point: Point) -> tuple[Scenario | None, MemoryPlan]:
    """The replay input of `point` and its memory plan (no scenario when it does not fit)."""
    model = get_model(point.model)
    plan = plan_memory(point.hw, model, point.policy, point.batch_size, point.prompt_len, point.gen_len)
    if not plan.fits:
        return None, plan
    costs = point_costs(point.profile, point.hw, point.policy, model)
    fetch_model = point_fetch_model(point.profile, model, DEFAULT_FETCH_MODEL)
    return Scenario(costs, model, point.policy, point.batch_size, point.prompt_len,
                    point.gen_len, fetch_model, plan.streamed_weight_bytes), plan


MEMORY_COLUMNS = ["mode", "fits", "reason", "gpu_mem_gib", "host_mem_gib", "weights_streamed_pct"]
CALIBRATION_COLUMNS = ["calibration", "extrapolated"]  # with --profile only
RESULT_COLUMNS = ["prefill_s", "decode_s", "total_s", "tokens_per_s", "speedup_vs_flexgen", "decode_step_ms",
                  *(f"{resource}_busy_pct" for resource in RESOURCES)]  # NaN when the point does not fit


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


