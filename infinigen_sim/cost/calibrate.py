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
infinigen_sim.sim.machine). InfiniGen's fetch is priced as its parts: `gathered.gather` (host gather of rows of
one KV head, `head_dim` elements, as the runtime gathers them) and `gathered.copy` (the staging
buffer's copy).

Op names are `spec.ops.Op` values in the bundle and in the cost model alike. Decode attention rows are
keyed by the cached rows before the new one (profiler.bench.kernels); the cost model counts the new row in
`kv_len`, so a row with kv_len = K answers queries at K + 1 (`card.query_kv`). The profiler times
every op as a step runs it (each layer's weights and rows read from memory), so rows are used as
they are: no cache-versus-memory correction.

A CPU bundle replayed on its own box (`sim.machine.CPU_PLACEMENT`) adds what the CPU runtime spends
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

from infinigen_sim.cost.card import CalibrationError, bundle_hardware, is_cpu_bundle, measured_rows, names_match
from infinigen_sim.cost.overheads import SPANS_PER_OP, Handoff, bundle_runtime, host_costs, span_costs
from infinigen_sim.cost.physics import DEFAULT as DEFAULT_RUNTIME
from infinigen_sim.cost.physics import CostModel, PhysicsCosts
from infinigen_sim.cost.tables import CopyTable, KernelTables, copy_tables
from infinigen_sim.spec.bundle import read_bundle
from infinigen_sim.spec.fetch import FetchFit, FetchModel, fit_fetch
from infinigen_sim.spec.hardware import HardwareConfig, load_hardware
from infinigen_sim.spec.models import ModelSpec
from infinigen_sim.spec.ops import MEASURED_OPS, Op
from infinigen_sim.spec.policies import PolicyConfig, PolicyName, make_policy
from infinigen_sim.spec.runtime import RuntimeSpec

__all__ = ["BundleCosts", "Calibration", "CalibrationError", "calibration", "calibration_columns",
           "load_calibration", "point_costs", "point_fetch_model"]
DEFAULT_POLICY = make_policy("infinigen")  # fetch.csv is fitted at its alpha and full-fetch layers


# ---- the cost model --------------------------------------------------------------------------
@dataclass
class Calibration:
    """One bundle read for the simulator: kernel and copy tables, fits, the profiled card, fetch fit."""

    path: Path
    device: str  # the bundle's device name
    cpu: bool  # a CPU bundle: the runtime's CPU mode (compute thread + copy worker thread)
    source: HardwareConfig  # the profiled card's measured ceilings
    kernels: KernelTables
    copies: dict[tuple[str, bool, str], CopyTable]  # (kind, concurrent, host memory) -> table
    fetch: FetchFit | None
    spans: dict[str, float] = field(default_factory=dict)  # model -> seconds of one runtime span (CPU)
    handoff: Handoff | None = None  # what a layer's copy-worker jobs cost the compute thread (CPU)
    host_us: dict[str, float] = field(default_factory=dict)  # host.csv: dispatch / sync -> microseconds
    runtime: RuntimeSpec = DEFAULT_RUNTIME  # the runtime the bundle measured (meta.yaml runtime)

    @classmethod
    def load(cls, profile_dir: str | Path) -> Calibration:
        bundle = read_bundle(profile_dir)  # BundleError names file and key (schema_version included)
        if measured_rows(bundle.kernels).empty:
            raise CalibrationError(f"{bundle.path}: kernels.csv has no measured rows")
        source = bundle_hardware(bundle)
        cpu = is_cpu_bundle(bundle)
        fetch = fit_fetch(bundle.fetch, DEFAULT_POLICY.full_fetch_layers, DEFAULT_POLICY.alpha) \
            if not bundle.fetch.empty else None
        return cls(Path(bundle.path), bundle.device_name, cpu, source, KernelTables.from_bundle(bundle, source),
                   copy_tables(bundle), fetch, span_costs(bundle) if cpu else {},
                   Handoff.from_bundle(bundle) if cpu else None, host_costs(bundle), bundle_runtime(bundle))

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
              dtype_bytes: int | None = None, runtime: RuntimeSpec | None = None) -> BundleCosts:
        """A fresh cost model for one point (its `extrapolated` starts empty) of `runtime` as `policy` runs it
        (default: the runtime the bundle measured)."""
        dtype_bytes = dtype_bytes or (self.kernels.dtype_bytes if self.reference(hw) is None else 2)
        return BundleCosts(self, hw, overlap=policy.overlap, dtype_bytes=dtype_bytes,
                           head_dim=model.head_dim if model is not None else None,
                           model=model.name if model is not None else None, policy=policy.name.value,
                           runtime=(runtime or self.runtime).for_policy(policy.name))

    def describe(self) -> dict[str, Any]:
        fits = {op: {"launch_us": round(f.launch_s * 1e6, 3), "efficiency": round(f.efficiency, 4),
                     "rows": f.rows, "median_abs_error_pct": round(f.median_abs_error_pct, 2)}
                for op, f in sorted(self.kernels.fits.items())}
        out: dict[str, Any] = {"bundle": str(self.path), "device": self.device, "op_fits": fits,
                               "profiled_card": self.source.to_dict(), "measured_runtime": self.runtime.name,
                               "host_us": self.host_us or "not measured (no host.csv): the runtime description's"}
        if self.cpu:
            out["cpu_runtime"] = {"span_us": {m: round(s * 1e6, 3) for m, s in sorted(self.spans.items())},
                                  "spans_per_op": {op.value: n for op, n in SPANS_PER_OP.items()},
                                  "handoff": self.handoff.describe() if self.handoff else
                                  "not measured (no transfers.csv handoff rows): not charged"}
        if self.fetch is not None:
            out["fetch_fit"] = {"model": self.fetch.model, "alpha": self.fetch.alpha, "groups": list(self.fetch.groups)}
        return out


class BundleCosts:
    """CostModel from a calibration; records in `extrapolated` every op priced outside the measured grid."""

    def __init__(self, cal: Calibration, hw: HardwareConfig, *, overlap: bool = True, dtype_bytes: int = 2,
                 head_dim: int | None = None, fallback: PhysicsCosts | None = None, model: str | None = None,
                 policy: str | None = None, runtime: RuntimeSpec | None = None) -> None:
        self.cal, self.hw, self.overlap, self.dtype_bytes, self.head_dim = cal, hw, overlap, dtype_bytes, head_dim
        self.model, self.policy = model, policy  # the point's: they pick the span and handoff rows (CPU runtime)
        measured = cal.runtime.for_policy(policy or "flexgen")  # the runtime the bundle measured
        self.runtime = runtime or measured
        self._target = PhysicsCosts(hw, dtype_bytes, self.runtime)
        self.fallback = fallback or self._target
        self.ref = cal.reference(hw)
        ref_dtype = cal.kernels.dtype_bytes if self.ref is cal.source else dtype_bytes
        self._ref = PhysicsCosts(self.ref, ref_dtype, self.runtime) if self.ref is not None else None
        # another runtime's kernels move other bytes than the measured ones: scaled by their rooflines
        self._style = None if measured.kernels == self.runtime.kernels else (
            self._target, PhysicsCosts(hw, dtype_bytes, measured))
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
        if self._style is not None:
            ours, theirs = self._style
            seconds *= ours.compute_s(op, model, *q, partial_ratio=partial_ratio) / \
                theirs.compute_s(op, model, *q, partial_ratio=partial_ratio)
        return seconds

    def _memory(self, kind: str, pageable: bool) -> str | None:
        """The host memory whose rows price a copy: pageable or pinned as asked when measured; a CPU bundle's
        only kind (its copies are memcpys); None when the bundle lacks it (priced from the other by physics)."""
        wanted = "pageable" if pageable else "pinned"
        measured = {memory for (k, _, memory) in self.cal.copies if k == kind}
        if wanted in measured:
            return wanted
        return next(iter(measured)) if self.cal.cpu and measured else None

    def _copy(self, kind: str, concurrent: bool, coords: tuple[float, ...], physics: Callable[[Any], float],
              fallback: Callable[[], float], pageable: bool = False) -> float:
        memory = self._memory(kind, pageable)
        scale = 1.0
        if memory is None and pageable and self._memory(kind, False) is not None:  # pageable from pinned rows
            memory, scale = self._memory(kind, False), physics(self._target, True) / physics(self._target, False)
            self.extrapolated.add(kind)
        table = self.cal.copies.get((kind, concurrent, memory)) or self.cal.copies.get((kind, not concurrent, memory))
        if table is None:
            self.extrapolated.add(kind)
            return fallback()
        seconds, exact = table.seconds(coords)
        if not exact or (kind, concurrent, memory) not in self.cal.copies:
            self.extrapolated.add(kind)
        if self._ref is not None:
            seconds *= physics(self._target, pageable) / physics(self._ref, pageable)
        return seconds * scale

    def h2d_s(self, nbytes: float, gathered: bool, pageable: bool = False) -> float:
        if nbytes <= 0:
            return 0.0
        if gathered and self.head_dim and self._memory("staged", False) is not None:
            row = self.head_dim * self.dtype_bytes
            return self._copy("staged", self.h2d_concurrent, (row, nbytes / row),
                              lambda c, _p: c.h2d_s(nbytes, True), lambda: self.fallback.h2d_s(nbytes, True))
        return self._copy("h2d", self.h2d_concurrent, (nbytes,), lambda c, p: c.h2d_s(nbytes, gathered, p),
                          lambda: self.fallback.h2d_s(nbytes, gathered, pageable), pageable)

    def d2h_s(self, nbytes: float, pageable: bool = False) -> float:
        if nbytes <= 0:
            return 0.0
        return self._copy("d2h", self.d2h_concurrent, (nbytes,), lambda c, p: c.d2h_s(nbytes, p),
                          lambda: self.fallback.d2h_s(nbytes, pageable), pageable)

    def gather_s(self, nbytes: float, rows: int) -> float:
        if nbytes <= 0:
            return 0.0
        # the runtime gathers one row per (token, sequence, KV head) and plane: head_dim elements
        row = self.head_dim * self.dtype_bytes if self.head_dim else nbytes / max(rows, 1)
        pageable = self.runtime.memory.host_kv == "pageable"  # gathers read the host KV cache itself
        return self._copy("gather", self.h2d_concurrent, (row, nbytes / row), lambda c, _p: c.gather_s(nbytes, rows),
                          lambda: self.fallback.gather_s(nbytes, rows), pageable)

    def memcpy_s(self, nbytes: float) -> float:
        if nbytes <= 0:
            return 0.0
        return self._copy("memcpy", False, (nbytes,), lambda c, _p: c.memcpy_s(nbytes),
                          lambda: self.fallback.memcpy_s(nbytes), True)

    def dispatch_s(self, policy: PolicyName, family: str) -> float:
        """The runtime description's ops and syncs per layer at the host's measured per-op and per-sync costs
        (host.csv), else at the description's own (marked extrapolated)."""
        host = self.runtime.host
        if not ({"dispatch", "sync"} <= set(self.cal.host_us)) or self._ref is not None:
            self.extrapolated.add("dispatch")
            return host.layer_s(policy, family)
        measured = replace(host, dispatch_us=self.cal.host_us["dispatch"], sync_us=self.cal.host_us["sync"])
        return measured.layer_s(policy, family)

    def measured_ops(self) -> frozenset[Op]:
        """The runtime-only ops (spec.ops.MEASURED_OPS) the bundle measured: the replay includes those."""
        return frozenset(op for op in MEASURED_OPS if op in self.cal.kernels.fits)

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
    """(costs(policy, model=None, dtype_bytes=None, runtime=None) -> BundleCosts for `hw`, the checkpoint
    fetch model or None, info: calibration label, profiled card, op fits, fetch fit)."""
    cal = calibration(str(Path(profile_dir).resolve()))

    def make_costs(policy: PolicyConfig, model: ModelSpec | None = None, dtype_bytes: int | None = None,
                   runtime: RuntimeSpec | None = None) -> BundleCosts:
        return cal.costs(hw, policy, model, dtype_bytes, runtime)

    info = {"calibration": cal.label(hw), **cal.describe()}
    return make_costs, (cal.fetch.fetch_model if cal.fetch is not None else None), info


# ---- for the sweep ---------------------------------------------------------------------------
def point_costs(profile: str | None, hw: HardwareConfig, policy: PolicyConfig, model: ModelSpec,
                runtime: RuntimeSpec = DEFAULT_RUNTIME) -> CostModel:
    """The cost model of one sweep point of `runtime` (as `policy` runs it): physics without a profile, else a
    fresh BundleCosts."""
    if profile is None:
        return PhysicsCosts(hw, runtime=runtime.for_policy(policy.name))
    return calibration(str(Path(profile).resolve())).costs(hw, policy, model, runtime=runtime)


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
