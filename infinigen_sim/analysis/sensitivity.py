"""What-if analyses around one point: re-simulate it with one thing changed.

    elasticities(hw_path, {"model": "llama-3-8b", "policy": "infinigen", "batch_size": 16,
                           "prompt_len": 32768, "gen_len": 128})
    -> {"link.h2d_gbps": 0.93, "link.d2h_gbps": 0.0, "gpu.hbm_gbps": 0.02, ...}

- `elasticities`: arc elasticity of tokens/s to each hardware peak, (T(p * (1 + step)) / T(p) - 1) / step;
  0.93 at step 0.1 reads "+10% link.h2d_gbps gives +9.3% throughput".
- `bandwidth_sweep`: every policy at one shape with the host link (both directions) set to each of a
  list of GB/s, and each policy's speedup over FlexGen at the same bandwidth (the design-space view:
  where InfiniGen stops paying).
- `memory_fit`: the largest batch that fits GPU and host memory, per policy and context length.
- `step_ops`: every op of one steady decode step, for a timeline.

A point here is `Point.params`-shaped: model, policy, batch_size, prompt_len, gen_len, optional mode,
dotted hardware overrides (`link.h2d_gbps`) and policy parameters (`policy.alpha`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from infinigen_sim.cost.memory import plan_memory
from infinigen_sim.sim.machine import TimedOp
from infinigen_sim.sim.trace import trace_ops
from infinigen_sim.spec.hardware import HardwareConfig, from_raw, load_hardware, set_dotted
from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.policies import PolicyName, make_policy
from infinigen_sim.spec.runtime import DEFAULT_RUNTIME, RuntimeConfigError, RuntimeSpec, load_runtime
from infinigen_sim.sweep.grid import DEFAULT_SPEC, POLICY_PREFIX, Point
from infinigen_sim.sweep.point import scenario_for, simulate_point

PARAMETERS = ("link.h2d_gbps", "link.d2h_gbps", "gpu.hbm_gbps", "gpu.fp16_tflops", "host.memory_gbps")
LINK_GBPS = (8, 16, 32, 64, 128, 256, 512)  # host-link sweep, GB/s per direction
PAYS_SPEEDUP = 1.10  # InfiniGen "pays" while it beats FlexGen by at least this factor
MAX_BATCH = 1 << 16  # memory-fit search ceiling
SHAPE_KEYS = ("model", "policy", "batch_size", "prompt_len", "gen_len")


class PointError(ValueError):
    """Point parameters that cannot be simulated; the message names the key."""


def hardware_with(hw: HardwareConfig, overrides: Mapping[str, Any]) -> HardwareConfig:
    """`hw` with dotted keys (`link.h2d_gbps`) replaced, validated as the loader validates files."""
    raw = hw.to_dict()
    for key, value in overrides.items():
        raw = set_dotted(raw, key, value, hw.source_file or hw.name)
    return from_raw(raw, hw.source_file or hw.name, default_name=hw.name)


def point_from_params(hw: HardwareConfig, params: Mapping[str, Any], runtime: RuntimeSpec | None = None) -> Point:
    """A `Point` on `hw` from `Point.params`-shaped values (an `hw` key, if any, is ignored) under `runtime`
    (default: the params' `runtime` name, else this project's)."""
    missing = [k for k in SHAPE_KEYS if k not in params]
    if missing:
        raise PointError(f"point: missing key(s) {', '.join(missing)} (need {', '.join(SHAPE_KEYS)})")
    unknown = [k for k in params if k not in (*SHAPE_KEYS, "hw", "mode", "runtime") and "." not in k]
    if unknown:
        raise PointError(f"point: unknown key(s) {', '.join(unknown)} (expected {', '.join(SHAPE_KEYS)}, "
                         "mode, or dotted hardware/policy keys)")
    dotted = {k: v for k, v in params.items() if "." in k}
    hw_settings = {k: v for k, v in dotted.items() if not k.startswith(POLICY_PREFIX)}
    policy_params = {k[len(POLICY_PREFIX):]: v for k, v in dotted.items() if k.startswith(POLICY_PREFIX)}
    get_model(str(params["model"]))
    if runtime is None:
        try:
            runtime = load_runtime(str(params.get("runtime", DEFAULT_RUNTIME)))
        except RuntimeConfigError as exc:
            raise PointError(f"point: key 'runtime': {exc}") from None
    return Point(hw=hardware_with(hw, hw_settings), model=str(params["model"]),
                 policy=make_policy(str(params["policy"]), **policy_params), batch_size=int(params["batch_size"]),
                 prompt_len=int(params["prompt_len"]), gen_len=int(params["gen_len"]),
                 settings=tuple(dotted.items()), mode=str(params.get("mode", "fast")), runtime=runtime)


def tokens_per_s(point: Point) -> float:
    """Simulated tokens/s of `point`; NaN when it does not fit."""
    return float(simulate_point(point)["tokens_per_s"])


# ---- elasticities ----------------------------------------------------------------------------
def elasticities_of(point: Point, step: float = 0.1,
                    parameters: Sequence[str] = PARAMETERS) -> dict[str, float]:
    """{parameter: (T(p * (1 + step)) / T(p) - 1) / step} for each hardware parameter of `point`."""
    if not step > 0:
        raise PointError(f"step: expected a positive fraction, got {step!r}")
    base = tokens_per_s(point)
    if math.isnan(base):
        raise PointError(f"point {point.key} does not fit: {simulate_point(point)['reason']}")
    out = {}
    for key in parameters:
        section, name = key.split(".")
        value = getattr(getattr(point.hw, section), name)
        bumped = replace(point, hw=hardware_with(point.hw, {key: value * (1 + step)}))
        out[key] = (tokens_per_s(bumped) / base - 1) / step
    return out


def elasticities(hw_path: str | Path, point_params: Mapping[str, Any], step: float = 0.1) -> dict[str, float]:
    """Elasticity of tokens/s to each of PARAMETERS at the point `point_params` on the hardware
    config `hw_path`: +step of parameter p gives about +step * elasticities[p] of throughput."""
    return elasticities_of(point_from_params(load_hardware(hw_path), point_params), step)


def elasticity_table(point: Point, policies: Sequence[str], step: float = 0.1) -> pd.DataFrame:
    """One row per policy at `point`'s shape: throughput change (%) for +step of each parameter."""
    rows = []
    for name in policies:
        at = replace(point, policy=make_policy(name, **_policy_params(point)))
        try:
            gains = {k: 100 * step * e for k, e in elasticities_of(at, step).items()}
        except PointError:
            gains = dict.fromkeys(PARAMETERS, math.nan)
        rows.append({"policy": name, **gains})
    return pd.DataFrame(rows)


def _policy_params(point: Point) -> dict[str, Any]:
    return {k[len(POLICY_PREFIX):]: v for k, v in point.settings if k.startswith(POLICY_PREFIX)}


# ---- host-link bandwidth sweep ---------------------------------------------------------------
def bandwidth_sweep(point: Point, policies: Sequence[str], link_gbps: Sequence[float] = LINK_GBPS) -> pd.DataFrame:
    """Every policy at `point`'s shape with link.h2d_gbps = link.d2h_gbps = each value: columns
    link_gbps, policy, fits, tokens_per_s, decode_tokens_per_s (batch * (gen_len - 1) / decode_s: the
    prefill left out), bottleneck, and speedup_vs_flexgen / decode_speedup_vs_flexgen (same bandwidth)."""
    rows = []
    for gbps in link_gbps:
        hw = hardware_with(point.hw, {"link.h2d_gbps": gbps, "link.d2h_gbps": gbps})
        for name in policies:
            row = simulate_point(replace(point, hw=hw, policy=make_policy(name, **_policy_params(point))))
            decode = point.batch_size * (point.gen_len - 1) / row["decode_s"] if row["decode_s"] > 0 else math.nan
            rows.append({"link_gbps": gbps, "policy": name, "fits": row["fits"], "tokens_per_s": row["tokens_per_s"],
                         "decode_tokens_per_s": decode, "bottleneck": row["bottleneck"]})
    frame = pd.DataFrame(rows)
    base = frame[frame["policy"] == PolicyName.FLEXGEN.value].set_index("link_gbps")
    for rate, speedup in (("tokens_per_s", "speedup_vs_flexgen"), ("decode_tokens_per_s", "decode_speedup_vs_flexgen")):
        frame[speedup] = frame[rate] / frame["link_gbps"].map(base[rate]) if not base.empty else math.nan
    return frame


def stops_paying_gbps(sweep: pd.DataFrame, speedup: str = "speedup_vs_flexgen",
                      threshold: float = PAYS_SPEEDUP) -> float | None:
    """The lowest swept bandwidth from which InfiniGen's `speedup` column stays below `threshold`
    (None: it pays, or cannot be compared, over the whole sweep)."""
    ours = sweep[sweep["policy"] == PolicyName.INFINIGEN.value].sort_values("link_gbps")
    if ours.empty or ours[speedup].isna().all():
        return None
    below = (ours[speedup] < threshold).to_numpy()
    for i, gbps in enumerate(ours["link_gbps"]):
        if below[i:].all():
            return float(gbps)
    return None


# ---- memory fit ------------------------------------------------------------------------------
def max_batch(hw: HardwareConfig, model: str, policy: str, prompt_len: int, gen_len: int,
              policy_params: Mapping[str, Any] | None = None, ceiling: int = MAX_BATCH,
              runtime: RuntimeSpec = DEFAULT_SPEC) -> tuple[int, str]:
    """The largest batch whose memory fits (0 when batch 1 does not), and what stops the next one, under
    `runtime`'s per-layer policy overrides."""
    spec, pol = get_model(model), make_policy(policy, **(policy_params or {}))
    pol = runtime.for_policy(pol.name).policies.apply(pol)

    def plan(batch: int):
        return plan_memory(hw, spec, pol, batch, prompt_len, gen_len)

    first = plan(1)
    if not first.fits:
        return 0, first.reason.split(":")[0]
    lo, hi = 1, 2
    while hi <= ceiling and plan(hi).fits:  # memory grows with the batch, so fit is monotone
        lo, hi = hi, hi * 2
    if hi > ceiling:
        return lo, f"search ceiling {ceiling}"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if plan(mid).fits else (lo, mid)
    return lo, plan(hi).reason.split(":")[0]


def memory_fit(hw: HardwareConfig, model: str, policies: Sequence[str], prompt_lens: Sequence[int],
               gen_len: int, policy_params: Mapping[str, Any] | None = None,
               runtime: RuntimeSpec = DEFAULT_SPEC) -> pd.DataFrame:
    """Columns policy, prompt_len, max_batch, limit ('gpu memory' / 'host memory')."""
    rows = []
    for name in policies:
        for prompt in prompt_lens:
            batch, limit = max_batch(hw, model, name, prompt, gen_len, policy_params, runtime=runtime)
            rows.append({"policy": name, "prompt_len": prompt, "max_batch": batch, "limit": limit})
    return pd.DataFrame(rows)


# ---- timeline --------------------------------------------------------------------------------
TIMELINE_STEP = 1  # the second decode step: it waits on the first step's write-backs, as all later ones do


def step_ops(point: Point) -> list[TimedOp]:
    """Every op of one steady decode step of `point` (full replay, context prompt_len + 1), with
    times from that step's start; empty when the point does not fit."""
    short = replace(point, gen_len=TIMELINE_STEP + 2)  # prefill + decode steps 0 and 1
    sc, _ = scenario_for(short)
    if sc is None:
        return []
    ops = [op for op in trace_ops(sc) if op.step == TIMELINE_STEP]
    start = min(op.start_s for op in ops)
    return [replace(op, start_s=op.start_s - start, end_s=op.end_s - start) for op in ops]
