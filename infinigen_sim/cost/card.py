"""The profiled box read off a bundle: its measured rows, host memory kind, dtype, and its card as a
HardwareConfig of the measured ceilings (what `cost.tables` fits rooflines against).
"""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd

from infinigen_sim.spec.bundle import Bundle
from infinigen_sim.spec.hardware import GpuSpec, HardwareConfig, HostSpec, LinkSpec
from infinigen_sim.spec.models import ModelSpec, UnknownModelError, get_model
from infinigen_sim.spec.ops import CACHE_OPS, COMPUTE_OPS, Op
from infinigen_sim.spec.policies import make_policy
from infinigen_sim.spec.work import op_work

MEASURED_PARTIAL_RATIO = make_policy("infinigen").partial_ratio  # the profiler speculates with the defaults
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


class CalibrationError(ValueError):
    """A bundle that cannot calibrate the simulator; the message names the bundle and what is missing."""


def zoo_model(name: str) -> ModelSpec | None:
    """The zoo spec called `name`, None for a model the zoo lacks."""
    try:
        return get_model(name)
    except UnknownModelError:
        return None


def measured_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Measured rows only (status ok, a positive median)."""
    ok = frame[(frame["status"].astype(str) == "ok")].copy()
    ok["median_us"] = pd.to_numeric(ok["median_us"], errors="coerce")
    return ok[ok["median_us"] > 0]


def copy_rows(bundle: Bundle, direction: str, layout: str, concurrent: bool, memory: str) -> pd.DataFrame:
    t = measured_rows(bundle.transfers)
    pick = (t["direction"] == direction) & (t["layout"] == layout) & (t["memory"] == memory) & \
           (t["concurrent"].astype(str) == str(concurrent))
    return t[pick]


def host_memory(bundle: Bundle) -> str:
    """pinned when the bundle measured it (CUDA), else pageable."""
    memories = set(measured_rows(bundle.transfers)["memory"])
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
    for (op, model, _), points in kernel_seconds(bundle).items():
        spec = zoo_model(model)
        for q, seconds in points.items():
            fastest_us = min(fastest_us, seconds * 1e6)
            if spec is not None:
                flops = op_work(op, spec, *q, MEASURED_PARTIAL_RATIO, dtype_bytes).flops
                best_flops = max(best_flops, flops / seconds)
    if best_flops <= 0:
        raise CalibrationError(f"{bundle.path}: kernels.csv has no measured row of a zoo model")

    def peak_gbps(direction: str, mem: str) -> tuple[float, float]:
        rows = copy_rows(bundle, direction, "contiguous", False, mem)
        if rows.empty:
            raise CalibrationError(f"{bundle.path}: transfers.csv has no {direction} {mem} contiguous copy")
        gbps = rows["nbytes"] / (rows["median_us"] * 1e3)
        return float(gbps.max()), float(rows["median_us"].min())

    h2d, h2d_lat = peak_gbps("h2d", memory)
    d2h, d2h_lat = peak_gbps("d2h", memory)
    d2d = copy_rows(bundle, "d2d", "contiguous", False, "device")
    hbm = 2 * float((d2d["nbytes"] / (d2d["median_us"] * 1e3)).max()) if not d2d.empty else 2 * max(h2d, d2h)
    gather = copy_rows(bundle, "h2d", "gathered.gather", False, memory)
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


# ---- kernel rows ---------------------------------------------------------------------------------
Query = tuple[int, int, int]  # (batch, n_tokens, kv_len) in the cost model's convention (spec.work)


def regime(op: str, n_tokens: int) -> str:
    """Which grid of an op answers a query: token ops have one; cache ops one per phase."""
    if op in CACHE_OPS:
        return "decode" if n_tokens == 1 else "prefill"
    return "tokens"


def query_kv(op: str, n_tokens: int, kv_len: int) -> int:
    """A kernels.csv row's kv_len in the cost model's convention: the profiler keys a decode attention (and
    score) row by the cached rows before the new one, which spec.work counts in kv_len."""
    return kv_len + 1 if op in (Op.ATTENTION, Op.SCORE) and n_tokens == 1 else kv_len


def kernel_seconds(bundle: Bundle) -> dict[tuple[str, str, str], dict[Query, float]]:
    """{(op, model, regime): {query: seconds}} of every measured compute-op row of kernels.csv."""
    out: dict[tuple[str, str, str], dict[Query, float]] = {}
    for row in measured_rows(bundle.kernels).itertuples():
        op = str(row.op)
        if op not in COMPUTE_OPS:
            continue  # the runtime's overheads (span) are read apart
        n_tokens = int(row.n_tokens)
        q = (int(row.batch_size), n_tokens, query_kv(op, n_tokens, int(row.kv_len)))
        out.setdefault((op, str(row.model), regime(op, n_tokens)), {})[q] = float(row.median_us) * 1e-6
    return out
