"""The one op vocabulary: what the runtime times, what the bundle's rows are named, what the cost model prices.

Every op has one name in both worlds: the runtime's PhaseTimer spans (`profiler.runtime.timing`), the
`op` column of kernels.csv and steps.csv (`spec.bundle`), the cost model's `compute_s` ops
(`infinigen_sim.cost`) and the simulator's trace events all use `Op` values.

Compute ops (`OpInfo.priced`): "physics" ones have a roofline (`spec.work.op_work`) and are always
priced; "measured" ones (skew, score) only when a profile measured them (a physics sweep leaves
them out); "overhead" ones are the CPU runtime's own Python costs, priced from a profile only.
Copies and host work are not kernels: their cost comes from transfers.csv or the link and host
peaks of the hardware YAML.

kernels.csv axes (`OpInfo.grid`): a "tokens" op's rows vary with (batch, n_tokens) and read no cache
(kv_len 0); a "cache" op reads cached rows: in decode one query per sequence over kv_len rows
(batch, kv_len), in prefill n queries over their own n rows (n_tokens = kv_len = n).
`OpInfo.passes` says which of the profiler's kernel passes times the op: decode (one token per
sequence), cache (the policy ops of a decode step over kv_len rows) and prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Op(str, Enum):
    """Every timed thing of a prefill or decode step, by its one name."""

    # compute: one kernel (or a few) on the compute stream
    EMBED = "embed"  # token (+ learned position) embedding of the new tokens
    NORM = "norm"  # one LayerNorm / RMSNorm (a layer runs two)
    QKV = "qkv"  # the Q, K and V projections (+ RoPE)
    ATTENTION = "attention"  # softmax(QK^T)V over the rows at hand; in decode the new row is written first
    FFN = "ffn"  # after attention: the output projection W_O and the MLP (two runtime spans of this op)
    LM_HEAD = "lm_head"  # the vocabulary projection
    SPECULATE = "speculate"  # InfiniGen: partial Q x partial K^T, count above max - alpha (+ the new partial K)
    TOPK = "topk"  # InfiniGen: top-k rows per KV head over the speculated scores
    QUANTIZE = "quantize"  # INT4: group-wise 4-bit codes of K/V rows
    DEQUANTIZE = "dequantize"  # INT4: fetched codes back to K/V
    SKEW = "skew"  # InfiniGen prefill: skewing matrices, partial weights and the partial K cache of a layer
    SCORE = "score"  # H2O: accumulated attention of the prompt (prefill), the per-step score update (decode)
    # copies and host work
    GATHER = "gather"  # host: chosen rows into a staging buffer
    H2D = "h2d"  # host -> device copy (fetched K/V rows; streamed weights)
    D2H = "d2h"  # device -> host copy (the new K/V row, the prompt's K/V, speculated indices)
    COMMIT = "commit"  # host: filing a written-back row into the host cache
    WAIT = "wait"  # the compute thread blocked on a fetch's host work
    # the CPU runtime's own Python, priced only from a profile
    SPAN = "span"  # the timing bookkeeping the engine adds around every timed op
    HANDOFF = "handoff"  # what handing a layer's copy-worker jobs over costs the compute thread
    JOB = "job"  # what one copy-worker job's own Python costs the worker
    # the dispatching host thread (a runtime description's host costs; host.csv of a profile)
    DISPATCH = "dispatch"  # host time per eager op dispatched (a layer's: its ops x dispatch_us + its syncs)
    SYNC = "sync"  # host time per host<->device synchronisation beyond the wait itself

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__  # f"{op}" -> its value on every Python version


@dataclass(frozen=True)
class OpInfo:
    """How an op is priced and measured."""

    priced: str  # physics | measured | overhead | copy
    grid: str = ""  # kernels.csv axes: tokens | cache ("" for copies and host work)
    passes: tuple[str, ...] = ()  # the profiler's kernel passes that time it: decode | cache | prefill


OPS: dict[Op, OpInfo] = {
    Op.EMBED: OpInfo("physics", "tokens", ("decode", "prefill")),
    Op.NORM: OpInfo("physics", "tokens", ("decode", "prefill")),
    Op.QKV: OpInfo("physics", "tokens", ("decode", "prefill")),
    Op.ATTENTION: OpInfo("physics", "cache", ("cache", "prefill")),
    Op.FFN: OpInfo("physics", "tokens", ("decode", "prefill")),
    Op.LM_HEAD: OpInfo("physics", "tokens", ("decode",)),  # prefill samples only the last position
    Op.SPECULATE: OpInfo("physics", "cache", ("cache",)),
    Op.TOPK: OpInfo("physics", "cache", ("cache",)),
    Op.QUANTIZE: OpInfo("physics", "tokens", ("decode", "prefill")),
    Op.DEQUANTIZE: OpInfo("physics", "tokens", ("cache",)),  # n_tokens = the fetched rows
    Op.SKEW: OpInfo("measured", "tokens", ("prefill",)),
    Op.SCORE: OpInfo("measured", "cache", ("cache", "prefill")),
    Op.SPAN: OpInfo("overhead", "tokens", ("decode",)),
    Op.HANDOFF: OpInfo("overhead"),
    Op.JOB: OpInfo("overhead"),
    Op.DISPATCH: OpInfo("overhead"),
    Op.SYNC: OpInfo("overhead"),
    Op.GATHER: OpInfo("copy"),
    Op.H2D: OpInfo("copy"),
    Op.D2H: OpInfo("copy"),
    Op.COMMIT: OpInfo("copy"),
    Op.WAIT: OpInfo("copy"),
}

PHYSICS_OPS: tuple[Op, ...] = tuple(op for op, info in OPS.items() if info.priced == "physics")
MEASURED_OPS: tuple[Op, ...] = tuple(op for op, info in OPS.items() if info.priced == "measured")
COMPUTE_OPS: tuple[Op, ...] = PHYSICS_OPS + MEASURED_OPS  # what `CostModel.compute_s` prices
TOKEN_OPS: tuple[Op, ...] = tuple(op for op in COMPUTE_OPS if OPS[op].grid == "tokens")
CACHE_OPS: tuple[Op, ...] = tuple(op for op in COMPUTE_OPS if OPS[op].grid == "cache")


def ops_in_pass(kernel_pass: str) -> tuple[Op, ...]:
    """The ops one of the profiler's kernel passes times (decode | cache | prefill), in vocabulary order."""
    return tuple(op for op, info in OPS.items() if kernel_pass in info.passes)


def parse_op(name: str | Op) -> Op:
    """The Op called `name`; ValueError naming the known ones otherwise."""
    try:
        return Op(str(getattr(name, "value", name)))
    except ValueError:
        raise ValueError(f"unknown op '{name}'; known: {', '.join(op.value for op in Op)}") from None
