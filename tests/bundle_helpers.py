"""Synthetic profile bundles for the calibration and bad-input tests: every row of a small grid, with times
given by a function, written as profiler.collect writes a finished bundle."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from infinigen_sim.spec.bundle import (
    FETCH_COLUMNS,
    HOST_COLUMNS,
    KERNEL_COLUMNS,
    SCHEMA_VERSION,
    STEP_COLUMNS,
    TRANSFER_COLUMNS,
)
from infinigen_sim.spec.grids import MetaGrid, kernel_keys
from infinigen_sim.spec.models import get_model

A100 = "NVIDIA A100 80GB PCIe"  # gpu.name of infinigen_sim/hw_configs/a100_pcie4.yaml
TINY = get_model("tiny-opt")
KERNEL_OPS = ("embed", "norm", "qkv", "ffn", "lm_head", "quantize")
BATCHES, KV_LENS, PREFILL_LENS = (1, 8), (128, 2048), (128, 512)
SIZES = [4096 << k for k in range(13)]  # 4 KiB .. 16 MiB


def kernel_rows(seconds, model: str = "tiny-opt") -> list[dict]:
    """Every op of the kernels.py grid for `model`; seconds(op, batch, n_tokens, kv_len) gives its time."""
    keys = []
    for b in BATCHES:
        keys += [(op, b, 1, 0) for op in KERNEL_OPS]
        for kv in KV_LENS:
            keys += [(op, b, 1, kv) for op in ("attention", "speculate", "topk")] + [("dequantize", b, kv, 0)]
        for n in PREFILL_LENS:
            keys += [(op, b, n, 0) for op in KERNEL_OPS if op != "lm_head"] + [("attention", b, n, n)]
    return [{"op": op, "model": model, "dtype": "float16", "batch_size": b, "n_tokens": n, "kv_len": kv,
             "median_us": 1e6 * seconds(op, b, n, kv), "p10_us": 1e6 * seconds(op, b, n, kv),
             "p90_us": 1e6 * seconds(op, b, n, kv), "repeats": 5, "status": "ok"} for op, b, n, kv in keys]


def transfer_rows(copy_s: float, gather_s: float = 0.0) -> list[dict]:
    """Flat copy times (alone and concurrent) at every size, d2d at 1 us, gathers at `gather_s`."""
    rows = []

    def row(direction, memory, layout, concurrent, nbytes, row_bytes, seconds):
        rows.append({"direction": direction, "memory": memory, "layout": layout, "concurrent": concurrent,
                     "nbytes": nbytes, "row_bytes": row_bytes, "rows": nbytes // row_bytes if row_bytes else 0,
                     "median_us": seconds * 1e6, "p10_us": seconds * 1e6, "p90_us": seconds * 1e6,
                     "gbps": nbytes / seconds / 1e9, "repeats": 5, "status": "ok"})

    for concurrent in (False, True):
        for n in SIZES:
            row("h2d", "pinned", "contiguous", concurrent, n, 0, copy_s * (2 if concurrent else 1))
            row("d2h", "pinned", "contiguous", concurrent, n, 0, copy_s * (2 if concurrent else 1))
        for row_bytes in (128, 1024):
            for count in (1, 64, 4096):
                row("h2d", "pinned", "gathered.gather", concurrent, count * row_bytes, row_bytes, gather_s or copy_s)
                row("h2d", "pinned", "gathered.copy", concurrent, count * row_bytes, row_bytes, copy_s)
    for n in SIZES:
        row("d2d", "device", "contiguous", False, n, 0, 1e-6)
    return rows


def write_bundle(path: Path, kernels: list[dict], transfers: list[dict], device: str = A100,
                 device_type: str = "cuda", version: int = SCHEMA_VERSION, fetch: list[dict] | None = None,
                 steps: list[dict] | None = None, host_us: dict[str, float] | None = None) -> Path:
    """A finished bundle; `host_us` the host.csv costs (default: dispatch 4 us, sync 7 us; {} for none)."""
    path.mkdir(parents=True, exist_ok=True)
    meta = {"schema_version": version, "completed_utc": "2026-12-01T00:00:00Z",
            "device": {"type": device_type, "name": device, "memory_gib": 80},
            "host": {"cpu_model": "test host", "physical_cores": 2, "memory_gib": 64},
            "kernels": {"dtype": kernels[0]["dtype"] if kernels else "float16"}}
    (path / "meta.yaml").write_text(yaml.safe_dump(meta))
    pd.DataFrame(kernels, columns=KERNEL_COLUMNS).to_csv(path / "kernels.csv", index=False)
    pd.DataFrame(transfers, columns=TRANSFER_COLUMNS).to_csv(path / "transfers.csv", index=False)
    if fetch is not None:
        pd.DataFrame(fetch, columns=FETCH_COLUMNS).to_csv(path / "fetch.csv", index=False)
    if steps is not None:
        pd.DataFrame(steps, columns=STEP_COLUMNS).to_csv(path / "steps.csv", index=False)
    host_us = {"dispatch": 4.0, "sync": 7.0} if host_us is None else host_us
    if host_us:
        pd.DataFrame([{"op": op, "device": device_type, "median_us": us, "p10_us": us, "p90_us": us, "repeats": 5,
                       "status": "ok"} for op, us in host_us.items()], columns=HOST_COLUMNS).to_csv(
            path / "host.csv", index=False)
    return path


GRID_META = {"settings": {"models": ["tiny-opt"]},
             "kernels": {"dtype": "float16", "grid": {"batches": list(BATCHES), "kv_lens": list(KV_LENS),
                                                      "prefill_lens": list(PREFILL_LENS), "max_prefill_tokens": 4096}},
             "transfers": {"memory": ["pinned"],
                           "sizes_bytes": {"min": SIZES[0], "max": SIZES[-1], "spacing": "octave"}}}


def grid_bundle(path: Path, seconds=lambda op, b, n, kv: 1e-5 * (1 + b * (n + kv) / 512)) -> Path:
    """A finished bundle whose meta.yaml records its grid (as profiler.collect writes it) and whose tables
    hold every row of it: kernels from spec.grids' expansion, the copies of `transfer_rows`."""
    axes = MetaGrid(**GRID_META["kernels"]["grid"])
    kernels = []
    for op, model, dtype, *lengths in kernel_keys(["tiny-opt"], "float16", axes):
        b, n, kv = map(int, lengths)
        us = round(1e6 * seconds(op, b, n, kv), 3)
        kernels.append({"op": op, "model": model, "dtype": dtype, "batch_size": b, "n_tokens": n, "kv_len": kv,
                        "median_us": us, "p10_us": us, "p90_us": us, "repeats": 5, "status": "ok"})
    write_bundle(path, kernels, transfer_rows(3e-3))
    meta = yaml.safe_load((path / "meta.yaml").read_text())
    (path / "meta.yaml").write_text(yaml.safe_dump({**meta, **GRID_META}, sort_keys=False))
    return path
