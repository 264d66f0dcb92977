"""Measured tables of a profile bundle: op and copy times on grids, with fitted rooflines to extrapolate.

The pieces `cost.bundle_costs.BundleCosts` prices a point from (see cost/calibrate.py for the rules):
  KernelTables  one `Grid` per (op, model, regime) from kernels.csv and an `OpFit` per op (the rows are
                timed as a step runs the ops, weights and K/V from memory: used as they are);
  CopyTable     one `Grid` per copy layout from transfers.csv, with an affine fit that extrapolates it.
Grids are in the cost model's query convention (`card.query_kv`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from infinigen_sim.cost.card import (
    MEASURED_PARTIAL_RATIO,
    Query,
    bundle_dtype_bytes,
    copy_rows,
    kernel_seconds,
    regime,
    zoo_model,
)
from infinigen_sim.cost.grid import Grid, fit_affine
from infinigen_sim.spec.bundle import Bundle
from infinigen_sim.spec.hardware import HardwareConfig
from infinigen_sim.spec.models import ModelSpec
from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.work import op_work


# ---- fitted rooflines ------------------------------------------------------------------------
@dataclass(frozen=True)
class OpFit:
    """seconds = launch_s + roofline_s / efficiency, fitted on every measured row of one op."""

    launch_s: float
    efficiency: float  # share of the profiled card's measured ceiling
    rows: int
    median_abs_error_pct: float

    def seconds(self, roofline_s: float) -> float:
        return self.launch_s + roofline_s / self.efficiency


def _fit_op(roofline_s: np.ndarray, seconds: np.ndarray) -> OpFit:
    launch, inverse_eff = fit_affine(np.column_stack([np.ones_like(roofline_s), roofline_s]), seconds)
    if inverse_eff <= 0:  # all launch-bound: keep a tiny slope so the roofline still scales
        inverse_eff = float(np.median(seconds / np.maximum(roofline_s, 1e-30))) * 1e-3 or 1.0
    fit = OpFit(float(launch), 1.0 / float(inverse_eff), len(seconds), 0.0)
    errors = np.abs(np.array([fit.seconds(r) for r in roofline_s]) / seconds - 1) * 100
    return replace(fit, median_abs_error_pct=float(np.median(errors)))


# ---- kernels ---------------------------------------------------------------------------------
def _coords(reg: str, q: Query) -> tuple[float, float]:
    """The grid axes of a query: (batch, n_tokens) or, for decode cache ops, (batch, kv_len)."""
    return (q[0], q[2]) if reg == "decode" else (q[0], q[1])


def _query(reg: str, coords: tuple[float, ...]) -> Query:
    b, x = (int(round(c)) for c in coords)
    return {"decode": (b, 1, x), "prefill": (b, x, x), "tokens": (b, x, 0)}[reg]


@dataclass
class KernelTables:
    """Every measured op of a bundle: grids per (op, model, regime) and a roofline fit per op."""

    source: HardwareConfig  # the profiled card's measured ceilings
    dtype_bytes: int
    grids: dict[tuple[str, str, str], Grid]
    fits: dict[str, OpFit]

    @classmethod
    def from_bundle(cls, bundle: Bundle, source: HardwareConfig) -> KernelTables:
        tables = cls(source, bundle_dtype_bytes(bundle), {}, {})
        seconds = {k: v for k, v in kernel_seconds(bundle).items() if zoo_model(k[1]) is not None}
        by_op: dict[str, tuple[list[float], list[float]]] = {}
        for (op, model, _), points in seconds.items():
            spec = zoo_model(model)
            for q, s in points.items():
                by_op.setdefault(op, ([], []))[0].append(tables.roofline_s(op, spec, q))
                by_op[op][1].append(s)
        tables.fits = {op: _fit_op(np.array(r), np.array(s)) for op, (r, s) in by_op.items()}
        for (op, model, reg), points in seconds.items():
            spec = zoo_model(model)

            def ratio(value, anchor, op=op, spec=spec, reg=reg):
                return tables.fitted_s(op, spec, _query(reg, value)) / tables.fitted_s(op, spec, _query(reg, anchor))

            tables.grids[op, model, reg] = Grid.build(("batch", "kv_len" if reg == "decode" else "n_tokens"),
                                                      {_coords(reg, q): s for q, s in points.items()}, ratio)
        return tables

    def roofline_s(self, op: str, model: ModelSpec, q: Query, partial_ratio: float = MEASURED_PARTIAL_RATIO) -> float:
        """max(FLOPs / best FLOP rate, bytes / memory ceiling) on the profiled card."""
        work = op_work(op, model, *q, partial_ratio, self.dtype_bytes)
        gpu = self.source.gpu
        return max(work.flops / (gpu.fp16_tflops * 1e12), work.hbm_bytes / (gpu.hbm_gbps * 1e9))

    def fitted_s(self, op: str, model: ModelSpec, q: Query, partial_ratio: float = MEASURED_PARTIAL_RATIO) -> float:
        return self.fits[op].seconds(self.roofline_s(op, model, q, partial_ratio))

    def seconds(self, op: str, model: ModelSpec, q: Query, partial_ratio: float) -> tuple[float, bool] | None:
        """(seconds on the profiled card, exact) or None when the bundle never measured the op."""
        if op not in self.fits:
            return None
        if op != Op.SPECULATE:
            partial_ratio = MEASURED_PARTIAL_RATIO  # only speculation depends on it
        grid = self.grids.get((op, model.name, regime(op, q[1])))
        if grid is None or not _same_shapes(zoo_model(model.name), model):  # absent, or a name with other shapes
            return self.fitted_s(op, model, q, partial_ratio), False
        reg = regime(op, q[1])
        at, clamped, exact = grid.lookup(_coords(reg, q))
        anchor = _query(reg, clamped)
        if anchor == q and partial_ratio == MEASURED_PARTIAL_RATIO:
            return at, exact
        scale = self.fitted_s(op, model, q, partial_ratio) / self.fitted_s(op, model, anchor)
        return at * scale, exact and partial_ratio == MEASURED_PARTIAL_RATIO


def _same_shapes(a: ModelSpec | None, b: ModelSpec) -> bool:
    """Whether one layer (and the embedding and head) of `a` and `b` do the same work."""
    keys = ("family", "d_model", "n_heads", "n_kv_heads", "d_ffn", "vocab_size")
    return a is not None and all(getattr(a, k) == getattr(b, k) for k in keys)


# ---- transfers -------------------------------------------------------------------------------
@dataclass
class CopyTable:
    """One transfer layout: a grid over nbytes (contiguous) or (row_bytes, rows) (gathers), and an
    affine fit (a + b * nbytes [+ c * rows]) that extrapolates it."""

    grid: Grid
    coef: np.ndarray
    gathered: bool

    @classmethod
    def from_rows(cls, rows: pd.DataFrame, gathered: bool) -> CopyTable:
        nbytes, seconds = rows["nbytes"].to_numpy(float), rows["median_us"].to_numpy(float) * 1e-6
        count = rows["rows"].to_numpy(float) if gathered else None
        feats = [np.ones_like(nbytes), nbytes] + ([count] if gathered else [])
        coef = fit_affine(np.column_stack(feats), seconds)
        table = cls(None, coef, gathered)  # type: ignore[arg-type]
        if gathered:
            points = {(float(r), float(n)): s for r, n, s in zip(rows["row_bytes"], count, seconds, strict=True)}
            axes = ("row_bytes", "rows")
        else:
            points = {(float(n),): s for n, s in zip(nbytes, seconds, strict=True)}
            axes = ("nbytes",)
        table.grid = Grid.build(axes, points, lambda v, a: table.fitted_s(v) / table.fitted_s(a))
        return table

    def fitted_s(self, coords: tuple[float, ...]) -> float:
        nbytes = coords[0] * coords[1] if self.gathered else coords[0]
        feats = [1.0, nbytes] + ([coords[1]] if self.gathered else [])
        return max(float(np.dot(self.coef, feats)), 1e-9)

    def seconds(self, coords: tuple[float, ...]) -> tuple[float, bool]:
        """(seconds, exact); a copy smaller than the smallest measured one is not flagged: its time lies
        between the fitted fixed cost and the smallest copy's (the size axis is the last)."""
        at, clamped, exact = self.grid.lookup(coords)
        if not exact:
            below = coords[-1] < clamped[-1] * (1 - 1e-9) and \
                all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(coords[:-1], clamped[:-1], strict=True))
            exact = below and self.grid.lookup(clamped)[2]  # from measured nodes at the smallest size
        return at * self.fitted_s(coords) / self.fitted_s(clamped), exact


COPY_LAYOUTS = {"h2d": ("h2d", "contiguous"), "d2h": ("d2h", "contiguous"),
                "gather": ("h2d", "gathered.gather"), "staged": ("h2d", "gathered.copy"),
                "memcpy": ("h2h", "contiguous")}
MEMORIES = ("pinned", "pageable")


def copy_tables(bundle: Bundle) -> dict[tuple[str, bool, str], CopyTable]:
    """{(kind, concurrent, host memory): table} for the kinds in COPY_LAYOUTS that the bundle measured."""
    out = {}
    for kind, (direction, layout) in COPY_LAYOUTS.items():
        for concurrent in (False, True):
            for memory in MEMORIES:
                rows = copy_rows(bundle, direction, layout, concurrent, memory)
                if len(rows) >= 2:
                    out[kind, concurrent, memory] = CopyTable.from_rows(rows, gathered=kind in ("gather", "staged"))
    return out
