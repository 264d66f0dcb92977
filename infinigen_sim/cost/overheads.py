"""The CPU runtime's own Python around its ops, read off a CPU bundle: span bookkeeping and copy-worker handoffs.

A CPU bundle replayed on its own box (`sim.machine.CPU_PLACEMENT`) adds what the CPU runtime spends
outside its timed ops, each from a measured row: the engine's span bookkeeping after every op on the
compute thread (kernels.csv 'span', per model), and what a layer's copy-worker jobs cost the compute
thread (transfers.csv 'handoff.<policy>', over the fetched bytes) and the worker itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from infinigen_sim.cost.card import measured_rows
from infinigen_sim.cost.grid import fit_affine
from infinigen_sim.spec.bundle import Bundle, BundleError
from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.runtime import DEFAULT_RUNTIME, RuntimeConfigError, RuntimeSpec, load_runtime

# PhaseTimer spans the CPU engine opens per simulated op on the compute thread: one each, but `ffn` is two
# (the output projection and the MLP), InfiniGen speculates a layer and then files the new token's
# partial K (two), and the copy-worker handoff and the spans themselves are no timed op
SPANS_PER_OP = {Op.FFN: 2, Op.SPECULATE: 2, Op.HANDOFF: 0, Op.SPAN: 0}


def span_costs(bundle: Bundle) -> dict[str, float]:
    """{model: seconds of one runtime span}, the median of kernels.csv's 'span' rows of each model.

    The engine wraps every timed op in a PhaseTimer span; its bookkeeping lies outside the span's own
    seconds (so outside every op's row) but inside a step's wall time."""
    rows = measured_rows(bundle.kernels)
    rows = rows[rows["op"] == Op.SPAN.value]
    return {str(model): float(part["median_us"].median()) * 1e-6 for model, part in rows.groupby("model")}


@dataclass(frozen=True)
class HandoffFit:
    """One policy's handoff: seconds = fixed_s + per_byte_s x the layer's fetched bytes."""

    fixed_s: float
    per_byte_s: float

    def layer_s(self, nbytes: float) -> float:
        return self.fixed_s + self.per_byte_s * max(nbytes, 0.0)


@dataclass(frozen=True)
class Handoff:
    """What the jobs one layer hands the CPU runtime's copy worker (its K/V fetch and the commit of the
    new row) cost the compute thread, per policy, from transfers.csv's 'handoff.<policy>' rows
    (`profiler.bench.handoff`, the runtime's own jobs): an affine fit in the fetched bytes over every
    measured context (non-negative; the slope is the share of the copy the worker could not run
    beside the compute thread). A policy without rows takes the dearest measured one. The worker
    itself pays half the fixed part per job (its wake-up and Python)."""

    fits: dict[str, HandoffFit]
    source: str

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Handoff | None:
        t = bundle.transfers
        rows = t[t["layout"].astype(str).str.startswith("handoff.") & (t["status"].astype(str) == "ok")]
        fits = {}
        for layout, part in rows.groupby("layout"):
            nbytes = part["nbytes"].to_numpy(float)
            seconds = np.maximum(pd.to_numeric(part["median_us"]).to_numpy(float), 0.01) * 1e-6
            fixed, per_byte = fit_affine(np.column_stack([np.ones_like(nbytes), nbytes]), seconds)
            fits[str(layout).removeprefix("handoff.")] = HandoffFit(float(fixed), float(per_byte))
        if not fits:
            return None
        return cls(fits, f"transfers.csv handoff rows ({', '.join(sorted(fits))})")

    def fit(self, policy: str | None) -> HandoffFit:
        return self.fits.get(policy or "") or max(self.fits.values(), key=lambda f: f.layer_s(1 << 20))

    def layer_s(self, policy: str | None, nbytes: float) -> float:
        return self.fit(policy).layer_s(nbytes)

    def job_s(self, policy: str | None) -> float:
        return self.fit(policy).fixed_s / 2

    def describe(self) -> dict[str, Any]:
        return {"fits": {p: {"fixed_us": round(f.fixed_s * 1e6, 3), "us_per_mib": round(f.per_byte_s * 1e6 * 2**20, 3)}
                         for p, f in sorted(self.fits.items())}, "source": self.source}




def host_costs(bundle: Bundle) -> dict[str, float]:
    """host.csv's measured per-op dispatch and per-sync costs, microseconds ({} when not measured)."""
    rows = measured_rows(bundle.host) if not bundle.host.empty else bundle.host
    return {str(op): float(part["median_us"].median()) for op, part in rows.groupby("op")} if len(rows) else {}


def bundle_runtime(bundle: Bundle) -> RuntimeSpec:
    """The runtime the bundle measured: meta.yaml's `runtime` (a shipped description's name), else this
    project's (every bundle before the key was written measured it)."""
    name = bundle.meta.get("runtime", DEFAULT_RUNTIME)
    try:
        return load_runtime(str(name))
    except RuntimeConfigError as exc:
        raise BundleError(f"{bundle.path / 'meta.yaml'}: key 'runtime': {exc}") from None
