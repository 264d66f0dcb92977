"""Measured tables of a profile bundle: op and copy times on grids, fitted rooflines, the profiled box.

The pieces `calibrate.BundleCosts` prices a point from (see calibrate.py for the lookup rules):
  Grid          seconds on a rectangular grid of log coordinates; log-log multilinear between nodes,
                unmeasured nodes filled from the nearest measured one and remembered as filled;
  KernelTables  one Grid per (op, model, regime) from kernels.csv and an `OpFit` per op (the rows
                are timed as a step runs the ops, weights and K/V from memory: used as they are);
  CopyTable     one Grid per copy layout from transfers.csv, with an affine fit that extrapolates it;
  bundle_hardware   the profiled box as a HardwareConfig of its measured ceilings.
Op names: the runtime times `o_proj` and `ffn` (the MLP) apart; the cost model's `ffn` is their sum.
Decode attention (and score) rows are keyed by the cached rows before the new one (kernels.py); the
cost model counts the new row in `kv_len`, so a row with kv_len = K answers queries at K + 1.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from infinigen_sim.bundle import Bundle
from infinigen_sim.costs import op_work
from infinigen_sim.hardware import GpuSpec, HardwareConfig, HostSpec, LinkSpec
from infinigen_sim.models import ModelSpec, get_model
from infinigen_sim.policies import make_policy

RUNTIME_PARTS = {"ffn": ("o_proj", "ffn")}  # cost-model op -> runtime ops whose times add up to it
TOKEN_OPS = ("embed", "norm", "qkv", "ffn", "lm_head", "quantize", "dequantize", "skew")  # axes (batch, n_tokens)
CACHE_OPS = ("attention", "speculate", "topk", "score")  # decode axes (batch, kv_len); prefill (batch, n), kv = n
MEASURED_PARTIAL_RATIO = make_policy("infinigen").partial_ratio  # kernels.py speculates with the defaults
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


class CalibrationError(ValueError):
    """A bundle that cannot calibrate the simulator; the message names the bundle and what is missing."""


# ---- grids -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """Seconds on a rectangular grid of log coordinates; unmeasured nodes filled (and remembered)."""

    axes: tuple[str, ...]
    nodes: tuple[np.ndarray, ...]  # sorted log(value) per axis
    log_s: np.ndarray  # log seconds at every node, shape (len(nodes[0]), ...)
    measured: np.ndarray  # bool, same shape: False where the node was filled

    @classmethod
    def build(cls, axes: tuple[str, ...], points: dict[tuple[float, ...], float],
              ratio: Callable[[tuple[float, ...], tuple[float, ...]], float]) -> Grid:
        """`points` {coordinates: seconds}; a missing node = nearest measured one x ratio(node, that one)."""
        nodes = tuple(np.log(sorted({p[i] for p in points})) for i in range(len(axes)))
        shape = tuple(len(n) for n in nodes)
        log_s, measured = np.zeros(shape), np.zeros(shape, dtype=bool)
        known = {tuple(round(math.log(v), 9) for v in p): (p, s) for p, s in points.items()}
        have = np.array([[math.log(v) for v in p] for p in points])
        for index in itertools.product(*(range(n) for n in shape)):
            coords = tuple(float(nodes[a][i]) for a, i in enumerate(index))
            hit = known.get(tuple(round(c, 9) for c in coords))
            if hit is not None:
                log_s[index], measured[index] = math.log(hit[1]), True
                continue
            nearest = int(np.argmin(((have - np.array(coords)) ** 2).sum(axis=1)))
            anchor = tuple(points)[nearest]
            value = tuple(math.exp(c) for c in coords)
            log_s[index] = math.log(points[anchor] * ratio(value, anchor))
        return cls(axes, nodes, log_s, measured)

    def lookup(self, query: tuple[float, ...]) -> tuple[float, tuple[float, ...], bool]:
        """(seconds at the query clamped into the grid, the clamped query, exact) where exact means
        inside the grid and interpolated from measured nodes only."""
        exact, corners = True, []
        clamped = []
        for axis, value in zip(self.nodes, query, strict=True):
            x = math.log(max(value, 1e-300))
            lo, hi = float(axis[0]), float(axis[-1])
            if x < lo - 1e-9 or x > hi + 1e-9:
                exact = False
            x = min(max(x, lo), hi)
            clamped.append(math.exp(x))
            i = int(np.searchsorted(axis, x, side="right")) - 1
            i = min(max(i, 0), len(axis) - 1)
            if i == len(axis) - 1 or abs(x - axis[i]) < 1e-12:
                corners.append(((i, 1.0),))
            else:
                frac = (x - axis[i]) / (axis[i + 1] - axis[i])
                corners.append(((i, 1.0 - frac), (i + 1, frac)))
        log_s = 0.0
        for combo in itertools.product(*corners):
            weight = math.prod(w for _, w in combo)
            if weight <= 0:
                continue
            index = tuple(i for i, _ in combo)
            log_s += weight * self.log_s[index]
            exact = exact and bool(self.measured[index])
        return math.exp(log_s), tuple(clamped), exact


# ---- the profiled card -----------------------------------------------------------------------
def _rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Measured rows only (status ok, a positive median)."""
    ok = frame[(frame["status"].astype(str) == "ok")].copy()
    ok["median_us"] = pd.to_numeric(ok["median_us"], errors="coerce")
    return ok[ok["median_us"] > 0]


def _copy_rows(bundle: Bundle, direction: str, layout: str, concurrent: bool, memory: str) -> pd.DataFrame:
    t = _rows(bundle.transfers)
    pick = (t["direction"] == direction) & (t["layout"] == layout) & (t["memory"] == memory) & \
           (t["concurrent"].astype(str) == str(concurrent))
    return t[pick]


def host_memory(bundle: Bundle) -> str:
    """pinned when the bundle measured it (CUDA), else pageable."""
    memories = set(_rows(bundle.transfers)["memory"])
    return "pinned" if "pinned" in memories else "pageable"


def is_cpu_bundle(bundle: Bundle) -> bool:
    return str(bundle.meta.get("device", {}).get("type", "")) == "cpu"


def bundle_dtype_bytes(bundle: Bundle) -> int:
    dtype = str(bundle.meta.get("kernels", {}).get("dtype", ""))
    if not dtype and not bundle.kernels.empty:
        dtype = str(bundle.kernels["dtype"].iloc[0])
    return DTYPE_BYTES.get(dtype.removeprefix("torch."), 2)


def bundle_hardware(bundle: Bundle) -> HardwareConfig:
    """The profiled box as a HardwareConfig of its measured ceilings (every efficiency 1).

    gpu.fp16_tflops: the best FLOP rate any measured op reached; gpu.hbm_gbps: twice the best d2d
    copy (read + write); gpu.launch_us: the fastest measured op; link.*: the best contiguous copy of
    each direction measured alone, latency the smallest copy's time; host.memory_gbps: the best
    gather's rate x 2 (read rows + write staging). A CPU bundle's 'gpu' is the CPU itself.
    """
    memory, dtype_bytes = host_memory(bundle), bundle_dtype_bytes(bundle)
    best_flops, fastest_us = 0.0, math.inf
    for (op, model, _), points in _kernel_seconds(bundle).items():
        spec = _zoo(model)
        for q, seconds in points.items():
            fastest_us = min(fastest_us, seconds * 1e6)
            if spec is not None:
                flops = op_work(op, spec, *q, MEASURED_PARTIAL_RATIO, dtype_bytes).flops
                best_flops = max(best_flops, flops / seconds)
    if best_flops <= 0:
        raise CalibrationError(f"{bundle.path}: kernels.csv has no measured row of a zoo model")

    def peak_gbps(direction: str, mem: str) -> tuple[float, float]:
        rows = _copy_rows(bundle, direction, "contiguous", False, mem)
        if rows.empty:
            raise CalibrationError(f"{bundle.path}: transfers.csv has no {direction} {mem} contiguous copy")
        gbps = rows["nbytes"] / (rows["median_us"] * 1e3)
        return float(gbps.max()), float(rows["median_us"].min())

    h2d, h2d_lat = peak_gbps("h2d", memory)
    d2h, d2h_lat = peak_gbps("d2h", memory)
    d2d = _copy_rows(bundle, "d2d", "contiguous", False, "device")
    hbm = 2 * float((d2d["nbytes"] / (d2d["median_us"] * 1e3)).max()) if not d2d.empty else 2 * max(h2d, d2h)
    gather = _copy_rows(bundle, "h2d", "gathered.gather", False, memory)
    gather_gbps = 2 * float((gather["nbytes"] / (gather["median_us"] * 1e3)).max()) if not gather.empty else hbm
    name = bundle.device_name
    meta_mem = bundle.meta.get("device", {}).get("memory_gib")
    host_gib = bundle.meta.get("host", {}).get("memory_gib", meta_mem)
    cores = bundle.meta.get("host", {}).get("physical_cores", 1)
    return HardwareConfig(
        name=f"{_slug(name)}-profile",
        gpu=GpuSpec(name=name, memory_gib=_positive(meta_mem, 80.0), fp16_tflops=best_flops / 1e12,
                    hbm_gbps=hbm, compute_efficiency=1.0, hbm_efficiency=1.0, launch_us=fastest_us,
                    reserved_gib=0.0 if is_cpu_bundle(bundle) else 1.0),
        link=LinkSpec(name="memcpy (worker thread)" if is_cpu_bundle(bundle) else f"{memory} host link",
                      h2d_gbps=h2d, d2h_gbps=d2h, latency_us=min(h2d_lat, d2h_lat), h2d_efficiency=1.0,
                      d2h_efficiency=1.0),
        host=HostSpec(name=str(bundle.meta.get("host", {}).get("cpu_model", "host")),
                      memory_gib=_positive(host_gib, 64.0), memory_gbps=gather_gbps,
                      cores=int(cores) if isinstance(cores, int) and cores > 0 else 1, gather_efficiency=1.0,
                      reserved_gib=0.0),
        source_file=f"{bundle.path} (measured ceilings)",
    )


def names_match(a: str, b: str) -> bool:
    x, y = _slug(a), _slug(b)
    return x == y or (len(x) > 3 and len(y) > 3 and (x in y or y in x))


def _positive(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and value > 0 else default


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


RUNTIME_OPS_OF = {"o_proj": ("ffn",), "ffn": ("ffn",), **{op: (op,) for op in (*TOKEN_OPS, *CACHE_OPS)
                                                         if op != "ffn"}}


def _query_kv(op: str, row: Any) -> int:
    """A kernels.csv row's kv_len in the cost model's convention (decode attention counts the new row)."""
    kv = int(row.kv_len)
    return kv + 1 if op in ("attention", "score") and int(row.n_tokens) == 1 else kv


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


def fit_affine(features: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Non-negative coefficients c with features @ c ~ seconds, least squares in relative error."""
    weighted = features / seconds[:, None]
    target = np.ones(len(seconds))
    active = list(range(features.shape[1]))
    while active:
        coef = np.linalg.lstsq(weighted[:, active], target, rcond=None)[0]
        if (coef >= 0).all():
            out = np.zeros(features.shape[1])
            out[active] = coef
            return out
        active.pop(int(np.argmin(coef)))  # drop the most negative term and refit
    return np.zeros(features.shape[1])


def _fit_op(roofline_s: np.ndarray, seconds: np.ndarray) -> OpFit:
    launch, inverse_eff = fit_affine(np.column_stack([np.ones_like(roofline_s), roofline_s]), seconds)
    if inverse_eff <= 0:  # all launch-bound: keep a tiny slope so the roofline still scales
        inverse_eff = float(np.median(seconds / np.maximum(roofline_s, 1e-30))) * 1e-3 or 1.0
    fit = OpFit(float(launch), 1.0 / float(inverse_eff), len(seconds), 0.0)
    errors = np.abs(np.array([fit.seconds(r) for r in roofline_s]) / seconds - 1) * 100
    return replace(fit, median_abs_error_pct=float(np.median(errors)))


# ---- kernels ---------------------------------------------------------------------------------
Query = tuple[int, int, int]  # (batch, n_tokens, kv_len) in the cost model's convention


def regime(op: str, n_tokens: int) -> str:
    """Which grid of an op answers a query: token ops have one; cache ops one per phase."""
    if op in CACHE_OPS:
        return "decode" if n_tokens == 1 else "prefill"
    return "tokens"


def _coords(reg: str, q: Query) -> tuple[float, float]:
    """The grid axes of a query: (batch, n_tokens) or, for decode cache ops, (batch, kv_len)."""
    return (q[0], q[2]) if reg == "decode" else (q[0], q[1])


def _query(reg: str, coords: tuple[float, ...]) -> Query:
    b, x = (int(round(c)) for c in coords)
    return {"decode": (b, 1, x), "prefill": (b, x, x), "tokens": (b, x, 0)}[reg]


def _kernel_seconds(bundle: Bundle) -> dict[tuple[str, str, str], dict[Query, float]]:
    """{(cost op, model, regime): {query: seconds}} with o_proj + ffn summed into the cost model's ffn."""
    rows = _rows(bundle.kernels)
    parts: dict[tuple[str, str, Query], dict[str, float]] = {}
    for row in rows.itertuples():
        op = str(row.op)
        target = next((k for k, v in RUNTIME_PARTS.items() if op in v), op)
        if target not in (*TOKEN_OPS, *CACHE_OPS):
            continue
        q = (int(row.batch_size), int(row.n_tokens), _query_kv(op, row))
        parts.setdefault((target, str(row.model), q), {})[op] = float(row.median_us) * 1e-6
    out: dict[tuple[str, str, str], dict[Query, float]] = {}
    for (op, model, q), seconds in parts.items():
        if set(seconds) != set(RUNTIME_PARTS.get(op, (op,))):
            continue  # a composite op with a part missing at this point
        out.setdefault((op, model, regime(op, q[1])), {})[q] = sum(seconds.values())
    return out


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
        seconds = {k: v for k, v in _kernel_seconds(bundle).items() if _zoo(k[1]) is not None}
        by_op: dict[str, tuple[list[float], list[float]]] = {}
        for (op, model, _), points in seconds.items():
            spec = _zoo(model)
            for q, s in points.items():
                by_op.setdefault(op, ([], []))[0].append(tables.roofline_s(op, spec, q))
                by_op[op][1].append(s)
        tables.fits = {op: _fit_op(np.array(r), np.array(s)) for op, (r, s) in by_op.items()}
        for (op, model, reg), points in seconds.items():
            spec = _zoo(model)

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
        if op != "speculate":
            partial_ratio = MEASURED_PARTIAL_RATIO  # only speculation depends on it
        grid = self.grids.get((op, model.name, regime(op, q[1])))
        if grid is None or not _same_shapes(_zoo(model.name), model):  # absent, or a name with other shapes
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


def _zoo(name: str) -> ModelSpec | None:
    try:
        return get_model(name)
    except KeyError:
        return None


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
                "gather": ("h2d", "gathered.gather"), "staged": ("h2d", "gathered.copy")}


def copy_tables(bundle: Bundle) -> dict[tuple[str, bool], CopyTable]:
    """{(kind, concurrent): table} for the kinds in COPY_LAYOUTS that the bundle measured."""
    memory, out = host_memory(bundle), {}
    for kind, (direction, layout) in COPY_LAYOUTS.items():
        for concurrent in (False, True):
            rows = _copy_rows(bundle, direction, layout, concurrent, memory)
            if len(rows) >= 2:
                out[kind, concurrent] = CopyTable.from_rows(rows, gathered=kind in ("gather", "staged"))
    return out
