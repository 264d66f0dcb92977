"""Op sweep: each runtime op timed alone over a batch x length grid, the rows of kernels.csv.

The ops are the runtime's own, on layer 0 of a one-layer copy of the model (room made for the
longest grid length in its position table): decode points time the callables of
`profiler.runtime.ops.decode_ops`; prefill points call the same model modules the engine's prefill
calls (`embed`, `input_layernorm`, `qkv`, `prefill_attention`, `o_proj`, `mlp`) and `quant.quantize`.
quantize and dequantize are timed as the engine's phase runs them: once for K, once for V.

Op names are the runtime's phases (`profiler.runtime.timing.Phase`, also used in steps.csv):
`o_proj` and `ffn` (the MLP) are separate, where `infinigen_sim.costs` prices `ffn` as both. Keys:
  n_tokens  tokens each sequence pushes through the op (1 in decode, n in prefill; the K/V rows
            converted for quantize / dequantize)
  kv_len    cached rows attention / speculate / topk read (decode attention also reads the new
            token's row: kv_len + 1); 0 for ops that read no cache
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from infinigen_sim.bundle import KERNEL_KEY, row_key
from infinigen_sim.models import Family, ModelSpec
from infinigen_sim.policies import PolicyConfig, make_policy
from profiler.runtime.engine import default_dtype
from profiler.runtime.model import Transformer, build_model, prefill_attention
from profiler.runtime.ops import decode_ops
from profiler.runtime.quant import quantize
from profiler.runtime.skew import partial_column_count
from profiler.timing import is_oom, summarize, time_fn

TOKEN_OPS = ("embed", "norm", "qkv", "o_proj", "ffn", "quantize")  # decode (n_tokens=1) and prefill (n)
DECODE_ONLY_OPS = ("lm_head",)  # prefill samples only the last position: n_tokens=1 always
CACHE_OPS = ("attention", "speculate", "topk")  # one query per sequence over kv_len cached rows
PAIRED_OPS = ("quantize", "dequantize")  # the engine's phase runs these for K and for V
OPS = (*TOKEN_OPS, *DECODE_ONLY_OPS, *CACHE_OPS, "dequantize")
OP_POLICY = "infinigen"  # its defaults carry every op parameter (partial ratio, alpha, cap, int4 group)

Op = Callable[[], object]


def octaves(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(lo << k for k in range(int(math.log2(hi // lo)) + 1))


@dataclass(frozen=True)
class KernelGrid:
    """Which (batch, length) points the sweep measures."""

    batches: tuple[int, ...]
    kv_lens: tuple[int, ...]  # decode: cached rows read by attention / speculate / topk / dequantize
    prefill_lens: tuple[int, ...]  # prefill: prompt tokens per sequence
    max_prefill_tokens: int  # prefill points with batch x n above this are not measured

    @property
    def longest(self) -> int:
        return max(*self.kv_lens, *self.prefill_lens)


GRIDS = {
    ("cuda", False): KernelGrid(octaves(1, 64), octaves(128, 32768), octaves(128, 32768), 65536),
    ("cuda", True): KernelGrid((1, 8), (128, 2048, 8192), (128, 2048), 16384),
    ("cpu", False): KernelGrid(octaves(1, 8), octaves(128, 4096), octaves(128, 4096), 16384),
    ("cpu", True): KernelGrid((1, 8), (128, 2048), (128,), 1024),
}


def dtype_name(device: torch.device) -> str:
    """The runtime's dtype on this device: float16 on CUDA, float32 on CPU."""
    return str(default_dtype(device)).removeprefix("torch.")


@dataclass(frozen=True)
class KernelPoint:
    """One op at one grid point: one row of kernels.csv."""

    op: str
    model: str
    dtype: str
    batch_size: int
    n_tokens: int
    kv_len: int

    def row(self, samples: list[float] | None, status: str = "ok") -> dict:
        row = {"op": self.op, "model": self.model, "dtype": self.dtype, "batch_size": self.batch_size,
               "n_tokens": self.n_tokens, "kv_len": self.kv_len, "median_us": "", "p10_us": "", "p90_us": "",
               "repeats": 0, "status": status}
        if samples:
            row.update(summarize(samples).as_row())
        return row

    def key(self) -> tuple[str, ...]:
        return row_key(self.row(None), KERNEL_KEY)


@dataclass(frozen=True)
class KernelTask:
    """Points that share one set of inputs: a decode step over kv_len rows, or a prefill of n tokens."""

    phase: str  # decode | prefill
    model: str
    batch_size: int
    length: int  # kv_len (decode) or n (prefill)
    points: tuple[KernelPoint, ...]

    @property
    def label(self) -> str:
        return f"{self.phase} {self.model} b{self.batch_size} {'kv' if self.phase == 'decode' else 'n'}{self.length}"


def kernel_tasks(models: list[ModelSpec], dtype: str, grid: KernelGrid) -> list[KernelTask]:
    """Every task of the grid for every model; token ops ride on the shortest decode task."""
    tasks = []
    for spec in models:
        for b in grid.batches:
            point = lambda op, n, kv: KernelPoint(op, spec.name, dtype, b, n, kv)  # noqa: E731,B023
            for i, kv in enumerate(grid.kv_lens):
                points = [point(op, 1, kv) for op in CACHE_OPS] + [point("dequantize", kv, 0)]
                if i == 0:
                    points = [point(op, 1, 0) for op in TOKEN_OPS + DECODE_ONLY_OPS] + points
                tasks.append(KernelTask("decode", spec.name, b, kv, tuple(points)))
            for n in grid.prefill_lens:
                if b * n <= grid.max_prefill_tokens:
                    points = [point(op, n, 0) for op in TOKEN_OPS] + [point("attention", n, n)]
                    tasks.append(KernelTask("prefill", spec.name, b, n, tuple(points)))
    return tasks


def kernel_points(models: list[ModelSpec], dtype: str, grid: KernelGrid) -> list[KernelPoint]:
    return [p for task in kernel_tasks(models, dtype, grid) for p in task.points]


def prefill_ops(model: Transformer, policy: PolicyConfig, batch: int, n: int, seed: int = 0) -> dict[str, Op]:
    """The engine's prefill calls for layer 0 over n prompt tokens, on seeded random inputs."""
    spec, p = model.spec, next(model.parameters())
    dev, dt = p.device, p.dtype
    gen = torch.Generator(device=dev).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, device=dev, dtype=dt, generator=gen)

    block, pos = model.layers[0], torch.arange(n, device=dev)
    tokens = torch.randint(0, spec.vocab_size, (batch, n), device=dev, generator=gen)
    x = rand(batch, n, spec.d_model)
    q = rand(batch, n, spec.n_heads, spec.head_dim)  # (B, T, H, D)
    k, v = rand(batch, n, spec.n_kv_heads, spec.head_dim), rand(batch, n, spec.n_kv_heads, spec.head_dim)
    rows = rand(n, batch, spec.kv_dim)  # token-major prompt rows of one plane, as the cache encodes them
    ops = {
        "embed": lambda: model.embed(tokens, pos),
        "norm": lambda: block.input_layernorm(x),
        "qkv": lambda: model.qkv(0, x, pos),
        "attention": lambda: prefill_attention(q, k, v),
        "o_proj": lambda: block.self_attn.o_proj(x),
        "ffn": lambda: block.mlp(x),
        "quantize": lambda: quantize(rows, policy.quant_bits, policy.quant_group),
    }
    return {name: torch.inference_mode()(fn) for name, fn in ops.items()}


def _both_planes(fn: Op) -> Op:
    """K then V: the engine's quantize / dequantize phase calls the op once per plane."""
    return lambda: (fn(), fn())


class KernelBench:
    """Runs each task's ops on a one-layer copy of its model and times them."""

    def __init__(self, device: torch.device, models: dict[str, ModelSpec], grid: KernelGrid, repeats: int,
                 warmup: int, seed: int) -> None:
        self.device, self.models, self.grid = device, models, grid
        self.repeats, self.warmup, self.seed = repeats, warmup, seed
        self.policy = make_policy(OP_POLICY)
        self._model: tuple[str, Transformer] | None = None

    def model(self, name: str) -> Transformer:
        """Layer 0 is all the ops touch; one layer keeps opt-13b's build to seconds. One model at a time."""
        if self._model is None or self._model[0] != name:
            self._model = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            spec = self.models[name]
            spec = replace(spec, n_layers=1, max_positions=max(spec.max_positions, self.grid.longest + 1))
            model = build_model(spec, self.seed).to(self.device, default_dtype(self.device)).eval()
            self._model = (name, model)
        return self._model[1]

    def ops(self, task: KernelTask) -> dict[str, Op]:
        model = self.model(task.model)
        if task.phase == "decode":
            ops = decode_ops(model, self.policy, task.batch_size, task.length, self.seed)
        else:
            ops = prefill_ops(model, self.policy, task.batch_size, task.length, self.seed)
        return {name: _both_planes(fn) if name in PAIRED_OPS else fn for name, fn in ops.items()}

    def measure(self, task: KernelTask, done: set[tuple[str, ...]] = frozenset()) -> list[dict]:
        """Rows for the task's points not in `done`; an exhausted allocator gives 'oom' rows."""
        todo = [p for p in task.points if p.key() not in done]
        if not todo:
            return []
        try:
            ops = self.ops(task)
        except Exception as exc:  # noqa: BLE001 - only allocator exhaustion is recorded, the rest re-raised
            self._reraise_unless_oom(exc)
            return [p.row(None, "oom") for p in todo]
        rows = []
        for point in todo:
            try:
                rows.append(point.row(time_fn(ops[point.op], self.device, self.repeats, self.warmup)))
            except Exception as exc:  # noqa: BLE001
                self._reraise_unless_oom(exc)
                rows.append(point.row(None, "oom"))
        return rows

    def _reraise_unless_oom(self, exc: Exception) -> None:
        if not is_oom(exc):
            raise exc
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def op_bytes(op: str, spec: ModelSpec, batch: int, n_tokens: int, kv_len: int, dtype_bytes: int) -> float:
    """Device-memory bytes an op must at least move (weights once, activations, cached rows)."""
    d, kv, f, by = spec.d_model, spec.kv_dim, spec.d_ffn, dtype_bytes
    rows = batch * n_tokens
    mlp = (2 if spec.family is Family.OPT else 3) * d * f
    cols = partial_column_count(make_policy(OP_POLICY), spec.head_dim)
    table = {
        "embed": 2 * rows * d,
        "norm": 2 * rows * d,
        "qkv": d * (d + 2 * kv) + rows * (2 * d + 2 * kv),
        "o_proj": d * d + 2 * rows * d,
        "ffn": mlp + rows * (2 * d + f),
        "lm_head": spec.vocab_size * (d + rows),
        "attention": batch * (kv_len + (n_tokens == 1)) * 2 * kv + 2 * rows * d,
        "speculate": batch * kv_len * spec.n_kv_heads * cols + d * spec.n_heads * cols,
        "topk": batch * spec.n_kv_heads * kv_len,
        "quantize": rows * 2 * kv * (1 + 0.5 / by),  # K and V in, 4-bit codes out
        "dequantize": rows * 2 * kv * (1 + 0.5 / by),
    }
    return float(table[op] * by)


# ---- summary ---------------------------------------------------------------------------------
SUMMARY_BATCH, SUMMARY_KV_LEN = 8, 2048  # the decode point the summary shows (or the nearest measured)


def _nearest(values, target: int) -> int:
    return int(min(values, key=lambda v: (abs(math.log2(v) - math.log2(target)), v)))


def summary_lines(frame, models: dict[str, ModelSpec], dtype_bytes: int, ceiling_gbps: float | None) -> list[str]:
    """Decode ops at the nearest point to (batch 8, kv 2048): time and achieved GB/s vs the memory ceiling."""
    ceiling = f"{ceiling_gbps:.1f} GB/s memory traffic = 2 x d2d copy peak (read + write)" if ceiling_gbps \
        else "none (no d2d peak measured)"
    lines = [f"kernels, decode, nearest measured point to batch {SUMMARY_BATCH}, kv_len {SUMMARY_KV_LEN}; "
             f"ceiling: {ceiling}"]
    for name, spec in models.items():
        rows = frame[(frame.model == name) & (frame.status == "ok")]
        decode = rows[(rows.n_tokens == 1) | (rows.op == "dequantize")]
        if decode.empty:
            continue
        batch = _nearest(decode.batch_size.unique(), SUMMARY_BATCH)
        decode = decode[decode.batch_size == batch]
        for op in OPS:
            picked = decode[decode.op == op]
            length = "n_tokens" if op == "dequantize" else "kv_len"
            if not picked.empty and (op in CACHE_OPS or op == "dequantize"):
                picked = picked[picked[length] == _nearest(picked[length].unique(), SUMMARY_KV_LEN)]
            for row in picked.itertuples():
                nbytes = op_bytes(op, spec, batch, int(row.n_tokens), int(row.kv_len), dtype_bytes)
                gbps = nbytes / (row.median_us * 1e3)
                share = f"{100 * gbps / ceiling_gbps:5.1f}% of ceiling" if ceiling_gbps else ""
                lines.append(f"  {name:<12} {op:<10} b{batch:<3} n{int(row.n_tokens):<5} kv{int(row.kv_len):<6}"
                             f" {row.median_us:>10.1f} us [{row.p10_us:.1f}-{row.p90_us:.1f}]"
                             f"  {gbps:>8.2f} GB/s  {share}")
    return lines
