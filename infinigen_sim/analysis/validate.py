"""The simulator against the runtime it models: every run of a bundle's steps.csv replayed and compared.

For every run in the bundle's steps.csv the same point (model, policy, batch, prompt, gen_len, alpha,
overlap) is replayed event by event, costed ONLY from the bundle's kernels.csv and transfers.csv
(`cost.calibrate.BundleCosts`). Timings from steps.csv are never fed to the model; the only thing taken
from a run is workload: InfiniGen's fetched rows per layer (what speculation chose, the mean over
the run's decode steps, exact per layer through a FetchModel of one group per layer with b = 0).
H2O's fetch is its fixed budget in both worlds and is checked, not copied.

Without --hw the hardware is the profiled box itself (`cost.card.bundle_hardware`: its measured
ceilings). A CPU bundle is replayed with `sim.scenario.CPU_PLACEMENT`, the runtime's CPU mode: the
'gpu' is the compute thread (torch's intra-op threads), the copy worker thread runs gathers and
host->"device" copies, and device->host copies run inline on the compute thread; K/V elements are
fp32 (the CPU runtime's dtype).

Measured step = the median over a run's decode steps of each step's wall time, itself the median
over the run's repeated generations (profiler.bench.steps); prefill = the median prefill wall time. Both
are robust to a stray descheduling on a shared box. Predicted step = the median replayed decode step.
`summary_markdown` ends with `median_abs_error_pct=X p95_abs_error_pct=Y` over every step and prefill
error. Runtime phases and simulated ops share one vocabulary (`spec.ops.Op`); the only pairing made
here is the copy worker's per-job Python (`job`, simulated) against the runtime's `commit` phase,
which holds it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from infinigen_sim.cost.calibrate import Calibration, CalibrationError, calibration
from infinigen_sim.sim.machine import Machine, Recorder
from infinigen_sim.sim.processes import generate
from infinigen_sim.sim.scenario import CPU_PLACEMENT, GPU_PLACEMENT, PREFILL, Scenario
from infinigen_sim.spec.bundle import WALL_OP, read_bundle
from infinigen_sim.spec.fetch import FetchModel
from infinigen_sim.spec.hardware import HardwareConfig
from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.policies import PolicyConfig, PolicyName, h2o_budget, make_policy
from infinigen_sim.spec.runtime import RuntimeSpec

COMPARED_AS = {Op.JOB: Op.COMMIT}  # the copy worker's own Python per job: inside the runtime's commit phase
WORKER_PHASES = (Op.H2D, Op.GATHER, Op.COMMIT)  # the CPU runtime runs these on its copy worker
NOT_WORK = (Op.WAIT, Op.HANDOFF, Op.SPAN)  # not a timed phase of the runtime: inside its wall time, outside its phases


@dataclass(frozen=True)
class Run:
    """One end-to-end run of steps.csv: its point and its rows."""

    run_id: str
    model: str
    policy: PolicyConfig
    batch_size: int
    prompt_len: int
    gen_len: int
    rows: pd.DataFrame

    @classmethod
    def from_rows(cls, run_id: str, rows: pd.DataFrame) -> Run:
        first = rows.iloc[0]
        overlap = str(first["overlap"]).strip().lower() in ("true", "1")
        policy = make_policy(str(first["policy"]), alpha=float(first["alpha"]), overlap=overlap)
        return cls(run_id, str(first["model"]), policy, int(first["batch_size"]), int(first["prompt_len"]),
                   int(first["gen_len"]), rows)

    @property
    def complete(self) -> bool:
        """Every decode step has its wall row (the last one marks a finished run)."""
        walls = self.rows[(self.rows["op"] == WALL_OP) & (self.rows["phase"] == "decode")]
        prefill = (self.rows["phase"] == "prefill") & (self.rows["op"] == WALL_OP)
        return len(walls) == self.gen_len - 1 and bool(prefill.any())


def runs_of(steps: pd.DataFrame) -> list[Run]:
    return [Run.from_rows(str(run_id), rows) for run_id, rows in steps.groupby("run_id", sort=False)]


# ---- measured --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Times:
    """One run's (or replay's) prefill and decode-step seconds, with per-phase seconds of each."""

    prefill_s: float
    step_s: float  # median decode step
    prefill_phases: dict[str, float]
    step_phases: dict[str, float]  # per phase, the median over decode steps


def measured_times(run: Run) -> Times:
    rows = run.rows.assign(phase_name=run.rows["op"].astype(str))
    walls = rows[rows["op"] == WALL_OP]
    prefill = float(walls[walls["phase"] == "prefill"]["seconds"].iloc[0])
    decode_walls = walls[walls["phase"] == "decode"]["seconds"]
    work = rows[rows["op"] != WALL_OP]
    per_step = work.groupby(["phase", "step", "phase_name"])["seconds"].sum()
    prefill_phases = per_step.loc["prefill"].groupby("phase_name").sum().to_dict() if "prefill" in per_step else {}
    decode = per_step.loc["decode"] if "decode" in per_step.index.get_level_values(0) else pd.Series(dtype=float)
    step_phases = decode.unstack(fill_value=0.0).median().to_dict() if len(decode) else {}
    return Times(prefill, float(np.median(decode_walls)) if len(decode_walls) else 0.0, prefill_phases, step_phases)


def fetch_model_of(run: Run, n_layers: int) -> FetchModel | None:
    """InfiniGen: the run's fetched rows per layer (mean over decode steps) as a FetchModel; else None."""
    if run.policy.name is not PolicyName.INFINIGEN:
        return None
    rows = run.rows[(run.rows["phase"] == "decode") & (run.rows["layer"] >= 0)]
    per_layer = rows.groupby(["layer", "step"])["fetched_tokens"].first().groupby("layer").mean()
    if per_layer.empty:
        return None
    return FetchModel.measured_rows([(layer, count) for layer, count in per_layer.items() if layer < n_layers],
                                    f"measured in {run.run_id}")


def h2o_fetch_matches(run: Run) -> bool | None:
    """H2O: whether the runtime fetched exactly the simulator's budget rows in every speculated layer."""
    if run.policy.name is not PolicyName.H2O:
        return None
    rows = run.rows[(run.rows["phase"] == "decode") & (run.rows["layer"] >= 0)]
    fetched = rows.groupby(["step", "layer"])["fetched_tokens"].first()
    contexts = rows.groupby(["step", "layer"])["context_len"].first()
    budget = [sum(h2o_budget(run.policy, run.prompt_len, int(layer))) for layer in fetched.index.get_level_values(1)]
    return bool((fetched == np.minimum(contexts, budget)).all())


# ---- predicted -------------------------------------------------------------------------------
def scenario(cal: Calibration, hw: HardwareConfig, run: Run, runtime: RuntimeSpec | None = None,
             fetch: FetchModel | None = None) -> Scenario:
    """The run's point on `hw` under `runtime` (default: the one the bundle measured): the profiled box
    itself (its dtype, and the CPU runtime's placement for a CPU bundle), or another card (fp16 K/V, copy
    engines). InfiniGen's fetched rows: `fetch`, else the run's rows."""
    model = get_model(run.model)
    own_box = cal.reference(hw) is None
    dtype_bytes = cal.kernels.dtype_bytes if own_box else 2
    runtime = (runtime or cal.runtime).for_policy(run.policy.name)
    costs = cal.costs(hw, run.policy, model, dtype_bytes, runtime)
    fetch = fetch or fetch_model_of(run, model.n_layers)
    extra = {"fetch_model": fetch} if fetch is not None else {}
    placement = CPU_PLACEMENT if cal.cpu and own_box else GPU_PLACEMENT
    return Scenario(costs, model, run.policy, run.batch_size, run.prompt_len, run.gen_len,
                    dtype_bytes=dtype_bytes, placement=placement, runtime=runtime, **extra)


def predicted_times(sc: Scenario) -> Times:
    """A full replay: prefill, the median decode step, and seconds per phase (median over steps)."""
    recorder = Recorder(keep_ops=True)
    m = Machine(sc, recorder)
    marks: dict[int, float] = {}
    m.env.process(generate(m, marks))
    m.env.run()
    steps = [marks[s] - marks[s - 1] for s in range(sc.n_decode_steps)]  # marks[-1] = prefill end
    per_step: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for op in recorder.ops:
        per_step[op.step][COMPARED_AS.get(op.op, op.op).value] += op.end_s - op.start_s
    names = {name for step, phases in per_step.items() if step != PREFILL for name in phases}
    step_phases = {name: float(np.median([per_step[s].get(name, 0.0) for s in range(sc.n_decode_steps)]))
                   for name in names}
    return Times(marks[PREFILL], float(np.median(steps)) if steps else 0.0, dict(per_step[PREFILL]), step_phases)


# ---- the comparison --------------------------------------------------------------------------
def _error_pct(predicted: float, measured: float) -> float:
    return 100.0 * (predicted - measured) / measured if measured > 0 else math.nan


def explain(measured: dict[str, float], predicted: dict[str, float], wall_m: float, wall_p: float,
            worker: bool) -> str:
    """The phase whose predicted - measured seconds is largest in size, with the unattributed rest.

    Compute-thread phases are compared one by one; what the wall holds beyond them (Python glue,
    waits; the model's span bookkeeping and copy-worker handoffs) is 'unattributed'. On the CPU the
    worker phases overlap compute and are compared apart.
    """
    names = set(measured) | set(predicted)
    deltas = {n: predicted.get(n, 0.0) - measured.get(n, 0.0) for n in names if n not in NOT_WORK}
    compute = [n for n in names if n not in NOT_WORK and not (worker and n in WORKER_PHASES)]
    rest_m = wall_m - sum(measured.get(n, 0.0) for n in compute)
    rest_p = wall_p - sum(predicted.get(n, 0.0) for n in compute)
    deltas["unattributed"] = rest_p - rest_m
    name = max(deltas, key=lambda n: abs(deltas[n]))
    return f"{name} {1e3 * predicted.get(name, rest_p if name == 'unattributed' else 0.0):.3g} ms predicted vs " \
           f"{1e3 * measured.get(name, rest_m if name == 'unattributed' else 0.0):.3g} ms measured"


def validate_bundle(bundle_dir: str | Path, hw: HardwareConfig | None = None, runtime: RuntimeSpec | None = None
                    ) -> tuple[pd.DataFrame, Calibration, HardwareConfig]:
    """One row per complete run of steps.csv: measured and predicted prefill and step, errors, explanations
    (predicted under `runtime`, default the runtime the bundle says it measured)."""
    bundle = read_bundle(bundle_dir)
    if bundle.steps.empty:
        raise CalibrationError(f"{bundle.path}: steps.csv is missing or empty: nothing to validate "
                               f"(collect with steps; meta says: {bundle.meta.get('steps', 'nothing')})")
    cal = calibration(str(Path(bundle_dir).resolve()))
    hw = hw or cal.source
    rows = []
    for run in runs_of(bundle.steps):
        if not run.complete:
            continue
        measured = measured_times(run)
        sc = scenario(cal, hw, run, runtime)
        predicted = predicted_times(sc)
        rows.append({
            "run_id": run.run_id, "policy": run.policy.name.value, "model": run.model,
            "batch_size": run.batch_size, "prompt_len": run.prompt_len, "gen_len": run.gen_len,
            "alpha": run.policy.alpha, "overlap": run.policy.overlap,
            "measured_step_s": measured.step_s, "predicted_step_s": predicted.step_s,
            "error_pct": _error_pct(predicted.step_s, measured.step_s),
            "measured_prefill_s": measured.prefill_s, "predicted_prefill_s": predicted.prefill_s,
            "prefill_error_pct": _error_pct(predicted.prefill_s, measured.prefill_s),
            "step_explained_by": explain(measured.step_phases, predicted.step_phases, measured.step_s,
                                         predicted.step_s, cal.cpu),
            "prefill_explained_by": explain(measured.prefill_phases, predicted.prefill_phases,
                                            measured.prefill_s, predicted.prefill_s, cal.cpu),
            "h2o_fetch_matches": h2o_fetch_matches(run),
            "runtime": sc.runtime.name, "calibration": cal.label(hw),
            "extrapolated": ",".join(sorted(sc.costs.extrapolated)),
        })
    if not rows:
        raise CalibrationError(f"{bundle.path}: steps.csv holds no complete run")
    return pd.DataFrame(rows), cal, hw


# ---- outputs ---------------------------------------------------------------------------------
def abs_errors(frame: pd.DataFrame) -> np.ndarray:
    """|error| of every step and prefill prediction, in percent."""
    return np.abs(np.concatenate([frame["error_pct"].to_numpy(float), frame["prefill_error_pct"].to_numpy(float)]))


def speedups(frame: pd.DataFrame) -> pd.DataFrame:
    """InfiniGen's decode-step speedup over FlexGen, measured and predicted, per shared point."""
    key = ["model", "batch_size", "prompt_len", "gen_len", "alpha", "overlap"]
    flex = frame[frame["policy"] == PolicyName.FLEXGEN.value].set_index(key)
    inf = frame[frame["policy"] == PolicyName.INFINIGEN.value].set_index(key)
    both = flex.index.intersection(inf.index)
    if both.empty:
        return pd.DataFrame()
    out = pd.DataFrame({"measured": flex.loc[both, "measured_step_s"] / inf.loc[both, "measured_step_s"],
                        "predicted": flex.loc[both, "predicted_step_s"] / inf.loc[both, "predicted_step_s"]})
    return out.reset_index()[["model", "batch_size", "prompt_len", "measured", "predicted"]]


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def summary_markdown(frame: pd.DataFrame, cal: Calibration, hw: HardwareConfig, worst: int = 5) -> str:
    """validation.md: per-policy error, InfiniGen/FlexGen speedups, the worst points and their phase."""
    errors = abs_errors(frame)
    runtime = frame["runtime"].iloc[0] if "runtime" in frame and len(frame) else cal.runtime.name
    lines = [f"# Validation of {cal.path}", "",
             f"device: {cal.device}; hardware: {hw.name} ({cal.label(hw)}); runtime: {runtime} "
             f"(bundle measured {cal.runtime.name}); placement: "
             f"{'CPU runtime (compute thread + copy worker)' if cal.cpu else 'GPU (copy engines)'}; "
             f"{len(frame)} runs", "",
             "| policy | runs | step median abs err % | step p95 abs err % | prefill median abs err % | "
             "prefill p95 abs err % |", "|---|---|---|---|---|---|"]
    for policy, part in frame.groupby("policy", sort=False):
        step, pre = part["error_pct"].abs().to_numpy(), part["prefill_error_pct"].abs().to_numpy()
        lines.append(f"| {policy} | {len(part)} | {_pct(step, 50):.1f} | {_pct(step, 95):.1f} | "
                     f"{_pct(pre, 50):.1f} | {_pct(pre, 95):.1f} |")
    ratio = speedups(frame)
    if not ratio.empty:
        lines += ["", "InfiniGen over FlexGen, decode step speedup:", "",
                  "| model | batch | prompt | measured | predicted |", "|---|---|---|---|---|"]
        lines += [f"| {r.model} | {r.batch_size} | {r.prompt_len} | {r.measured:.2f}x | {r.predicted:.2f}x |"
                  for r in ratio.itertuples()]
    long = pd.concat([
        frame.assign(what="step", err=frame["error_pct"], why=frame["step_explained_by"]),
        frame.assign(what="prefill", err=frame["prefill_error_pct"], why=frame["prefill_explained_by"])],
        ignore_index=True)
    long = long.iloc[long["err"].abs().to_numpy().argsort()[::-1]]
    lines += ["", f"Worst {worst} points (the phase with the largest predicted - measured gap):", "",
              "| run | what | error % | phase |", "|---|---|---|---|"]
    lines += [f"| {r.run_id} | {r.what} | {r.err:+.1f} | {r.why} |" for r in long.head(worst).itertuples()]
    if frame["extrapolated"].astype(bool).any():
        ops = sorted({op for ops in frame["extrapolated"] for op in str(ops).split(",") if op})
        lines += ["", f"Priced outside the measured grid (extrapolated): {', '.join(ops)}"]
    lines += ["", f"median_abs_error_pct={_pct(errors, 50):.1f} p95_abs_error_pct={_pct(errors, 95):.1f}"]
    return "\n".join(lines) + "\n"
