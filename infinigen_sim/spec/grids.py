"""The collection grids: which rows a finished profile bundle holds, said once for both worlds.

`profiler.collect` plans its kernel passes from `kernel_passes` and `pass_points`
(`profiler.bench.kernels.kernel_tasks`) and records the grid it used in meta.yaml (`kernels.grid`,
`settings.models`, `kernels.dtype`; `transfers.memory` and `transfers.sizes_bytes`; `fetch`).
`spec.bundle.read_bundle` expands the same meta back into the keys the tables must hold
(`kernel_keys`, `copy_keys`, `fetch_keys`), so a table missing a row of its grid (a file cut at a
line boundary, a deleted row) is refused instead of being filled in by interpolation. Keys are
tuples of strings in the column order of `spec.bundle.KERNEL_KEY`, `TRANSFER_KEY` and `FETCH_KEY`,
numbers written as `spec.bundle.row_key` writes them (4, not 4.0; True / False).

Only the copies the calibration cannot do without are expanded: contiguous h2d and d2h of every
host memory kind, alone and concurrent, at every octave size (`cost.tables.COPY_LAYOUTS`); the
gathers' row counts and the CPU handoff rows depend on profiler code the meta does not record.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from infinigen_sim.spec.models import UnknownModelError, get_model
from infinigen_sim.spec.ops import OPS, Op, ops_in_pass
from infinigen_sim.spec.schema import MAX_ITEMS, DottedReader

KERNEL_PASSES = ("decode", "cache", "prefill")  # one token per sequence; policy ops over kv_len rows; prefill
COPY_DIRECTIONS = ("h2d", "d2h")  # the contiguous copies every calibration prices
CONTIGUOUS = "contiguous"


class KernelGridAxes(Protocol):
    """A kernel grid's axes (profiler.bench.kernels.KernelGrid, or meta.yaml's kernels.grid read back)."""

    batches: Sequence[int]
    kv_lens: Sequence[int]  # decode: cached rows the cache pass's ops read
    prefill_lens: Sequence[int]  # prefill: prompt tokens per sequence
    max_prefill_tokens: int  # prefill points with batch x n above this are not measured


def kernel_passes(grid: KernelGridAxes) -> list[tuple[str, int, int]]:
    """(kernel pass, batch, length) of every pass of the grid, per batch: a decode pass (length 1), a cache
    pass per kv_len and a prefill pass per prompt length n with batch x n <= max_prefill_tokens."""
    out = []
    for b in grid.batches:
        out += [("decode", b, 1)] + [("cache", b, kv) for kv in grid.kv_lens]
        out += [("prefill", b, n) for n in grid.prefill_lens if b * n <= grid.max_prefill_tokens]
    return out


def point_lengths(kernel_pass: str, op: Op, length: int) -> tuple[int, int]:
    """(n_tokens, kv_len) of `op`'s row in a pass over `length` (1, kv_len or the prompt n)."""
    reads_cache = OPS[op].grid == "cache"
    if kernel_pass == "decode":
        return 1, 0
    if kernel_pass == "cache":  # one query per sequence over `length` rows; a tokens op converts them
        return (1, length) if reads_cache else (length, 0)
    return length, length if reads_cache else 0  # prefill: n queries over their own n rows


def pass_points(kernel_pass: str, length: int) -> list[tuple[Op, int, int]]:
    """(op, n_tokens, kv_len) of every row one pass over `length` writes, in vocabulary order."""
    return [(op, *point_lengths(kernel_pass, op, length)) for op in ops_in_pass(kernel_pass)]


def kernel_keys(models: Sequence[str], dtype: str, grid: KernelGridAxes) -> Iterator[tuple[str, ...]]:
    """Every kernels.csv key (op, model, dtype, batch_size, n_tokens, kv_len) of the grid, lazily."""
    for model in models:
        for kernel_pass, b, length in kernel_passes(grid):
            for op, n_tokens, kv_len in pass_points(kernel_pass, length):
                yield op.value, model, dtype, str(b), str(n_tokens), str(kv_len)


def octave_sizes(min_bytes: int, max_bytes: int) -> list[int]:
    """min_bytes, 2 x min_bytes, ... up to max_bytes: the copy sweep's sizes."""
    return [min_bytes << k for k in range(int(math.log2(max_bytes // min_bytes)) + 1)]


def copy_keys(memories: Sequence[str], min_bytes: int, max_bytes: int) -> Iterator[tuple[str, ...]]:
    """transfers.csv keys of the contiguous h2d and d2h copies, alone and concurrent, of every memory kind."""
    for memory in memories:
        for concurrent in ("False", "True"):
            for direction in COPY_DIRECTIONS:
                for nbytes in octave_sizes(min_bytes, max_bytes):
                    yield direction, memory, CONTIGUOUS, concurrent, str(nbytes), "0"


def number_text(value: float) -> str:
    """A number as row_key writes it: 4 for 4.0, inf for infinity."""
    value = float(value)
    return str(int(value)) if value.is_integer() else str(value)


def fetch_keys(model: str, source: str, alphas: Sequence[float], contexts: Sequence[int], n_layers: int,
               max_positions: int) -> Iterator[tuple[str, ...]]:
    """fetch.csv keys (model, source, alpha, layer, context_len) of a fetch pass: every layer at every
    (alpha, context) whose context fits the model's positions (profiler.bench.fetch.FetchPass.units)."""
    for alpha in alphas:
        for n in contexts:
            if n <= max_positions:
                yield from ((model, source, number_text(alpha), str(layer), str(n)) for layer in range(n_layers))


# ---- the grid meta.yaml records, read back ---------------------------------------------------------
MAX_AXIS = MAX_ITEMS  # values of one grid axis in meta.yaml; more is a damaged meta, not a grid
HOST_MEMORIES = ("pinned", "pageable")
COLLECTOR = "profiler.collect"  # meta.yaml `tool` of a bundle profiler.collect wrote


@dataclass(frozen=True)
class MetaGrid:
    """meta.yaml's kernels.grid (the axes of profiler.bench.kernels.KernelGrid)."""

    batches: list[int]
    kv_lens: list[int]
    prefill_lens: list[int]
    max_prefill_tokens: int


def expected_keys(meta: dict[str, Any], where: str, error: type[ValueError]) -> dict[str, tuple[str, Iterator]]:
    """{table: (the meta section that lists them, its expected keys, lazily)} for each table whose grid the
    bundle's meta records; `error` (one line naming `where` and the key) on a meta value of another kind.
    A timing bundle profiler.collect wrote (meta `tool`, and `repeats`, which a --fetch-only pass does not
    write) always records its kernel and copy grids: one without them was edited, and is refused rather than
    read unchecked."""
    m, out = DottedReader(meta, where, error), {}
    if meta.get("tool") == COLLECTOR and "repeats" in meta:
        for section in ("kernels.grid", "transfers.sizes_bytes"):
            if not m.has(section):
                raise error(f"{where}: key '{section}' missing: every {COLLECTOR} bundle records the grid it measured")
    if m.has("kernels.grid"):
        axes = MetaGrid(*(m.numbers(f"kernels.grid.{axis}") for axis in ("batches", "kv_lens", "prefill_lens")),
                        m.number("kernels.grid.max_prefill_tokens"))
        out["kernels.csv"] = ("kernels.grid", kernel_keys(m.texts("settings.models"), m.text("kernels.dtype"), axes))
    if m.has("transfers.sizes_bytes"):
        memories = m.texts("transfers.memory", HOST_MEMORIES)
        low = m.number("transfers.sizes_bytes.min")
        high = m.number("transfers.sizes_bytes.max", minimum=low)
        m.text("transfers.sizes_bytes.spacing", ("octave",))
        if high > low << MAX_AXIS:
            raise error(f"{where}: key 'transfers.sizes_bytes.max': more than {MAX_AXIS} octaves above min")
        out["transfers.csv"] = ("transfers.sizes_bytes", copy_keys(memories, low, high))
    if m.has("fetch"):
        model = m.text("fetch.model")
        try:
            spec = get_model(model)
        except UnknownModelError as exc:
            raise error(f"{where}: key 'fetch.model': {exc}") from None
        alphas = m.numbers("fetch.alphas", whole=False, minimum=0, allow_inf=True)
        keys = fetch_keys(model, m.text("fetch.source"), alphas, m.numbers("fetch.contexts"), spec.n_layers,
                          spec.max_positions)
        out["fetch.csv"] = ("fetch", keys)
    return out
