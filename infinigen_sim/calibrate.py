"""Calibration: a measured profile bundle as a `CostModel`, and InfiniGen fetch counts from a checkpoint.

`BundleCosts` answers every duration the replay asks for from the bundle's kernels.csv and
transfers.csv (`bundle.py`):
  inside the grid    log-log multilinear interpolation between measured points (exact at them);
  outside the grid   the value at the nearest grid point (the query clamped into the measured box),
                     scaled by the op's fitted roofline `launch + roofline_s / efficiency` (`OpFit`,
                     fitted per op on every model of the bundle); the lookup is marked extrapolated;
  a model the bundle lacks   the fitted roofline on that model's shapes (marked extrapolated);
  another card       every figure times physics(target) / physics(profiled card), where the profiled
                     card is the `bundle_hardware` built from the bundle's measured ceilings; the
                     label becomes 'profile-scaled:<bundle device> -> <hw name>'.
Grid nodes the collection did not measure (out of memory, or outside a non-rectangular grid such as
prefill's token cap) are filled from the nearest measured node by the same fitted roofline, and a
lookup that leans on one is marked extrapolated too.

Which transfer row prices a copy: pinned host memory when the bundle measured it, else pageable;
with overlap on, copies run beside compute and take the `concurrent` rows, with it off the `alone`
rows (a CPU bundle's D2H runs inline on the compute thread: always `alone`, see `Placement` in
pipeline.py). InfiniGen's fetch is priced as its parts: `gathered.gather` (host gather of rows of
one KV head, `head_dim` elements, as the runtime gathers them) and `gathered.copy` (the staging
buffer's copy).

Op names: the runtime times `o_proj` and `ffn` (the MLP) apart; the cost model's `ffn` is their sum.
Decode attention rows are keyed by the cached rows before the new one (kernels.py); the cost model
counts the new row in `kv_len`, so a row with kv_len = K answers queries at K + 1. kernels.py times
every op as a step runs it (each layer's weights and rows read from memory), so rows are used as
they are: no cache-versus-memory correction.

A CPU bundle replayed on its own box (`pipeline.CPU_PLACEMENT`) adds what the CPU runtime spends
outside its timed ops, each from a measured row: the engine's span bookkeeping after every op on the
compute thread (kernels.csv 'span', per model; `span_s`), and what a layer's copy-worker jobs cost
the compute thread (transfers.csv 'handoff.<policy>', over the fetched bytes; `handoff_s`) and the worker
(`job_s`). A bundle without those rows charges nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from infinigen_sim.bundle import Bundle, read_bundle
from infinigen_sim.costs import RUNTIME_OPS, CostModel, PhysicsCosts
from infinigen_sim.hardware import HardwareConfig, load_hardware
from infinigen_sim.models import ModelSpec
from infinigen_sim.policies import FetchModel, PolicyConfig, make_policy
from infinigen_sim.tables import (
    CalibrationError,
    CopyTable,
    KernelTables,
    _rows,
    _zoo,
    bundle_hardware,
    copy_tables,
    fit_affine,
    is_cpu_bundle,
    names_match,
)

__all__ = ["BundleCosts", "Calibration", "CalibrationError", "FetchFit", "bundle_hardware", "calibration",
           "calibration_columns", "fit_fetch", "load_calibration", "point_costs", "point_fetch_model"]


# ---- fetch counts from a checkpoint ----------------------------------------------------------
FETCH_SOURCE = "checkpoint"
FETCH_GROUPS = 4  # layer groups of the fetch fit (consecutive layers share a power law)


@dataclass(frozen=True)
class FetchFit:
    """InfiniGen's selected rows per layer group as a power law of the context, from fetch.csv."""

    model: str  # the checkpoint the counts come from
    alpha: float
    n_layers: int  # layers of that model (groups are rescaled by depth for other models)
    fetch_model: FetchModel
    groups: tuple[dict[str, Any], ...]  # per group: first/last layer, a, b, points, r2

    def for_model(self, spec: ModelSpec) -> FetchModel:
        """The same fit with groups moved to `spec`'s layers by relative depth."""
        if spec.n_layers == self.n_layers:
            return self.fetch_model
        groups = tuple((round(first * spec.n_layers / self.n_layers), a, b)
                       for first, a, b in self.fetch_model.groups)
        source = f"{self.fetch_model.source}, layer groups scaled {self.n_layers} -> {spec.n_layers} layers"
        return replace(self.fetch_model, groups=groups, source=source)


def fit_fetch(fetch: pd.DataFrame, alpha: float = make_policy("infinigen").alpha,
              n_groups: int = FETCH_GROUPS) -> FetchFit | None:
    """count = a * context^b per group of consecutive speculated layers, from the 'checkpoint' rows
    at the alpha closest to `alpha` (of the model with most rows); None without such rows."""
    rows = fetch[(fetch["source"].astype(str) == FETCH_SOURCE)].copy()
    rows = rows[(rows["fetched_tokens"] > 0) & (rows["context_len"] > 0)]
    if rows.empty:
        return None
    model = str(rows["model"].value_counts().index[0])
    rows = rows[rows["model"] == model]
    chosen = float(min(rows["alpha"].unique(), key=lambda a: (abs(float(a) - alpha), float(a))))
    rows = rows[rows["alpha"].astype(float) == chosen]
    full = make_policy("infinigen").full_fetch_layers
    layers = sorted(int(layer) for layer in rows["layer"].unique() if int(layer) >= full) or \
        sorted(int(layer) for layer in rows["layer"].unique())
    spec = _zoo(model)
    n_layers = spec.n_layers if spec is not None else max(layers) + 1
    chunks = [list(c) for c in np.array_split(layers, min(n_groups, len(layers))) if len(c)]
    groups, reports = [], []
    for chunk in chunks:
        part = rows[rows["layer"].isin(chunk)]
        points = list(zip(part["context_len"].astype(float), part["fetched_tokens"].astype(float), strict=True))
        fit = FetchModel.fit(points, source=model) if len(set(p[0] for p in points)) >= 2 else \
            FetchModel(a=float(np.mean([p[1] for p in points])), b=0.0, source=model)
        logs = np.log(np.array(points))
        predicted = np.log(fit.a) + fit.b * logs[:, 0]
        total = ((logs[:, 1] - logs[:, 1].mean()) ** 2).sum()
        r2 = 1 - ((logs[:, 1] - predicted) ** 2).sum() / total if total > 0 else 1.0
        groups.append((int(chunk[0]), fit.a, fit.b))
        reports.append({"layers": f"{chunk[0]}-{chunk[-1]}", "a": round(fit.a, 6), "b": round(fit.b, 6),
                        "points": len(points), "r2_log": round(float(r2), 4)})
    first = groups[0]
    source = f"fetch.csv {FETCH_SOURCE} {model} alpha {chosen:g}: a*n^b per layer group"
    fetch_model = FetchModel(a=first[1], b=first[2], source=source, groups=tuple(groups))
    return FetchFit(model, chosen, n_layers, fetch_model, tuple(reports))


# ---- the cost model --------------------------------------------------------------------------
@dataclass
class Calibration:
    """One bundle read for the simulator: kernel and copy tables, fits, the profiled card, fetch fit."""

    path: Path
    device: str  # the bundle's device name
    cpu: bool  # a CPU bundle: the runtime's CPU mode (compute thread + copy worker thread)
    source: HardwareConfig  # the profiled card's measured ceilings
    kernels: KernelTables
    copies: dict[tuple[str, bool], CopyTable]
    fetch: FetchFit | None
    spans: dict[str, float] = field(default_factory=dict)  # model -> seconds of one runtime span (CPU)
    handoff: Handoff | None = None  # what a layer's copy-worker jobs cost the compute thread (CPU)

    @classmethod
    def load(cls, profile_dir: str | Path) -> Calibration:
        bundle = read_bundle(profile_dir)  # BundleError names file and key (schema_version included)
        if _rows(bundle.kernels).empty:
            raise CalibrationError(f"{bundle.path}: kernels.csv has no measured rows")
        source = bundle_hardware(bundle)
        cpu = is_cpu_bundle(bundle)
        return cls(Path(bundle.path), bundle.device_name, cpu, source, KernelTables.from_bundle(bundle, source),
                   copy_tables(bundle), fit_fetch(bundle.fetch) if not bundle.fetch.empty else None,
                   span_costs(bundle) if cpu else {}, Handoff.from_bundle(bundle) if cpu else None)

    def span_s(self, model: str) -> float:
        """One runtime span on the compute thread: the model's measured row, else the median of all."""
        if model in self.spans:
            return self.spans[model]
        return float(np.median(list(self.spans.values()))) if self.spans else 0.0

    def reference(self, hw: HardwareConfig) -> HardwareConfig | None:
        """The hardware the tables must be scaled from to price `hw`; None when `hw` is the profiled card.

        Another card: the profiled card's measured ceilings. The profiled card with --set overrides:
        its config file as written (the overrides are priced by physics ratios).
        """
        if hw == self.source or (hw.gpu.name == self.source.gpu.name and hw.source_file == self.source.source_file):
            return None
        if not names_match(self.device, hw.gpu.name):
            return self.source
        try:
            base = load_hardware(hw.source_file) if hw.source_file else hw
        except (ValueError, OSError):
            base = hw
        return None if base == hw else base

    def label(self, hw: HardwareConfig) -> str:
        """'profile', or 'profile-scaled:<bundle device> -> <hw name>' when the figures are scaled."""
        return "profile" if self.reference(hw) is None else f"profile-scaled:{self.device} -> {hw.name}"

    def costs(self, hw: HardwareConfig, policy: PolicyConfig, model: ModelSpec | None = None,
              dtype_bytes: int | None = None) -> BundleCosts:
        """A fresh cost model for one point (its `extrapolated` starts empty)."""
        dtype_bytes = dtype_bytes or (self.kernels.dtype_bytes if self.reference(hw) is None else 2)
        return BundleCosts(self, hw, overlap=policy.overlap, dtype_bytes=dtype_bytes,
                           head_dim=model.head_dim if model is not None else None,
                           model=model.name if model is not None else None, policy=policy.name.value)

    def describe(self) -> dict[str, Any]:
        fits = {op: {"launch_us": round(f.launch_s * 1e6, 3), "efficiency": round(f.efficiency, 4),
                     "rows": f.rows, "median_abs_error_pct": round(f.median_abs_error_pct, 2)}
                for op, f in sorted(self.kernels.fits.items())}
        out: dict[str, Any] = {"bundle": str(self.path), "device": self.device, "op_fits": fits,
                               "profiled_card": self.source.to_dict()}
        if self.cpu:
            out["cpu_runtime"] = {"span_us": {m: round(s * 1e6, 3) for m, s in sorted(self.spans.items())},
                                  "spans_per_op": SPANS_PER_OP,
                                  "handoff": self.handoff.describe() if self.handoff else
                                  "not measured (no transfers.csv handoff rows): not charged"}
        if self.fetch is not None:
            out["fetch_fit"] = {"model": self.fetch.model, "alpha": self.fetch.alpha, "groups": list(self.fetch.groups)}
        return out


# CPU runtime: PhaseTimer spans the engine opens per pipeline op on the compute thread: one each, but
# `ffn` is o_proj + MLP, InfiniGen speculates a layer and then files the new token's partial K, and the
# copy-worker handoff is no timed op
SPANS_PER_OP = {"ffn": 2, "speculate": 2, "handoff": 0, "span": 0}


def span_costs(bundle: Bundle) -> dict[str, float]:
    """{model: seconds of one runtime span}, the median of kernels.csv's 'span' rows of each model.

    The engine wraps every timed op in a PhaseTimer span; its bookkeeping lies outside the span's own
    seconds (so outside every op's row) but inside a step's wall time."""
    rows = _rows(bundle.kernels)
    rows = rows[rows["op"] == "span"]
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
    (`profiler.handoff`, the runtime's own jobs): an affine fit in the fetched bytes over every
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


class BundleCosts:
    """CostModel from a calibration; records in `extrapolated` every op priced outside the measured grid."""

    def __init__(self, cal: Calibration, hw: HardwareConfig, *, overlap: bool = True, dtype_bytes: int = 2,
                 head_dim: int | None = None, fallback: PhysicsCosts | None = None, model: str | None = None,
                 policy: str | None = None) -> None:
        self.cal, self.hw, self.overlap, self.dtype_bytes, self.head_dim = cal, hw, overlap, dtype_bytes, head_dim
        self.model, self.policy = model, policy  # the point's: they pick the span and handoff rows (CPU runtime)
        self.fallback = fallback or PhysicsCosts(hw, dtype_bytes)
        self.ref = cal.reference(hw)
        ref_dtype = cal.kernels.dtype_bytes if self.ref is cal.source else dtype_bytes
        self._target = PhysicsCosts(hw, dtype_bytes)
        self._ref = PhysicsCosts(self.ref, ref_dtype) if self.ref is not None else None
        # copies beside compute take the 'concurrent' rows; a CPU bundle's D2H runs inline (alone)
        self.h2d_concurrent = overlap
        self.d2h_concurrent = overlap and not cal.cpu
        self.extrapolated: set[str] = set()

    @property
    def calibration(self) -> str:
        return self.cal.label(self.hw)

    def compute_s(self, op: str, model: ModelSpec, batch: int, n_tokens: int, kv_len: int,
                  *, partial_ratio: float = 1.0) -> float:
        q = (max(batch, 1), max(n_tokens, 1), max(kv_len, 0))
        found = self.cal.kernels.seconds(op, model, q, partial_ratio)
        if found is None:
            self.extrapolated.add(op)
            return self.fallback.compute_s(op, model, batch, n_tokens, kv_len, partial_ratio=partial_ratio)
        seconds, exact = found
        if not exact:
            self.extrapolated.add(op)
        if self._ref is not None:
            seconds *= self._target.compute_s(op, model, *q, partial_ratio=partial_ratio) / \
                self._ref.compute_s(op, model, *q, partial_ratio=partial_ratio)
        return seconds

    def _copy(self, kind: str, concurrent: bool, coords: tuple[float, ...], physics: Callable[[Any], float],
              fallback: Callable[[], float]) -> float:
        table = self.cal.copies.get((kind, concurrent)) or self.cal.copies.get((kind, not concurrent))
        if table is None:
            self.extrapolated.add(kind)
            return fallback()
        seconds, exact = table.seconds(coords)
        if not exact or (kind, concurrent) not in self.cal.copies:
            self.extrapolated.add(kind)
        if self._ref is not None:
            seconds *= physics(self._target) / physics(self._ref)
        return seconds

    def h2d_s(self, nbytes: float, gathered: bool) -> float:
        if nbytes <= 0:
            return 0.0
        if gathered and self.head_dim and ("staged", self.h2d_concurrent) in self.cal.copies:
            row = self.head_dim * self.dtype_bytes
            return self._copy("staged", self.h2d_concurrent, (row, nbytes / row), lambda c: c.h2d_s(nbytes, True),
                              lambda: self.fallback.h2d_s(nbytes, True))
        return self._copy("h2d", self.h2d_concurrent, (nbytes,), lambda c: c.h2d_s(nbytes, gathered),
                          lambda: self.fallback.h2d_s(nbytes, gathered))

    def d2h_s(self, nbytes: float) -> float:
        if nbytes <= 0:
            return 0.0
        return self._copy("d2h", self.d2h_concurrent, (nbytes,), lambda c: c.d2h_s(nbytes),
                          lambda: self.fallback.d2h_s(nbytes))

    def gather_s(self, nbytes: float, rows: int) -> float:
        if nbytes <= 0:
            return 0.0
        # the runtime gathers one row per (token, sequence, KV head) and plane: head_dim elements
        row = self.head_dim * self.dtype_bytes if self.head_dim else nbytes / (2 * max(rows, 1))
        return self._copy("gather", self.h2d_concurrent, (row, nbytes / row), lambda c: c.gather_s(nbytes, rows),
                          lambda: self.fallback.gather_s(nbytes, rows))

    def measured_ops(self) -> frozenset[str]:
        """The runtime-only ops (costs.RUNTIME_OPS) the bundle measured: the replay includes those."""
        return frozenset(op for op in RUNTIME_OPS if op in self.cal.kernels.fits)

    def span_s(self, op: str) -> float:
        """CPU runtime: the engine's span bookkeeping after pipeline op `op` on the compute thread
        (SPANS_PER_OP spans of the point's model; 0 on a GPU or another card)."""
        if not self.cal.cpu or self._ref is not None or self.model is None:
            return 0.0
        return SPANS_PER_OP.get(op, 1) * self.cal.span_s(self.model)

    def handoff_s(self, nbytes: float) -> float:
        """CPU runtime: seconds a layer's copy-worker jobs, moving `nbytes`, cost the compute thread
        (0 on a GPU or another card)."""
        if self.cal.handoff is None or self._ref is not None:
            return 0.0
        return self.cal.handoff.layer_s(self.policy, nbytes)

    def job_s(self) -> float:
        """CPU runtime: seconds one copy-worker job costs the worker itself (0 on a GPU or another card)."""
        return self.cal.handoff.job_s(self.policy) if self.cal.handoff is not None and self._ref is None else 0.0

    def describe(self) -> dict[str, Any]:
        return {"kind": "profile", "calibration": self.calibration, "bundle": str(self.cal.path),
                "dtype_bytes": self.dtype_bytes, "h2d_rows": "concurrent" if self.h2d_concurrent else "alone",
                "d2h_rows": "concurrent" if self.d2h_concurrent else "alone",
                "scaled_from": None if self.ref is None else self.ref.name,
                "extrapolated": sorted(self.extrapolated), **self.cal.describe()}


@lru_cache(maxsize=8)
def calibration(profile_dir: str) -> Calibration:
    """The calibration of a bundle folder, read once per process."""
    return Calibration.load(profile_dir)


def load_calibration(profile_dir: str | Path, hw: HardwareConfig
                     ) -> tuple[Callable[..., BundleCosts], FetchModel | None, dict[str, Any]]:
    """(costs(policy, model=None, dtype_bytes=None) -> BundleCosts for `hw`, the checkpoint fetch model
    or None, info: calibration label, profiled card, op fits, fetch fit)."""
    cal = calibration(str(Path(profile_dir).resolve()))

    def make_costs(policy: PolicyConfig, model: ModelSpec | None = None, dtype_bytes: int | None = None) -> BundleCosts:
        return cal.costs(hw, policy, model, dtype_bytes)

    info = {"calibration": cal.label(hw), **cal.describe()}
    return make_costs, (cal.fetch.fetch_model if cal.fetch is not None else None), info


# ---- for the sweep ---------------------------------------------------------------------------
def point_costs(profile: str | None, hw: HardwareConfig, policy: PolicyConfig, model: ModelSpec) -> CostModel:
    """The cost model of one sweep point: physics without a profile, else a fresh BundleCosts."""
    if profile is None:
        return PhysicsCosts(hw)
    return calibration(str(Path(profile).resolve())).costs(hw, policy, model)


def point_fetch_model(profile: str | None, model: ModelSpec, default: FetchModel) -> FetchModel:
    """The bundle's checkpoint fetch fit moved to `model`'s layers, else `default`."""
    if profile is None:
        return default
    fit = calibration(str(Path(profile).resolve())).fetch
    return default if fit is None else fit.for_model(model)


def calibration_columns(costs: CostModel) -> dict[str, Any]:
    """The sweep's `calibration` ('physics' | 'profile' | 'profile-scaled:<device> -> <hw>') and
    `extrapolated` (any op of the point priced outside the measured grid) columns; read after replay."""
    if isinstance(costs, BundleCosts):
        return {"calibration": costs.calibration, "extrapolated": bool(costs.extrapolated)}
    return {"calibration": "physics", "extrapolated": False}
