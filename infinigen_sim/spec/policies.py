"""KV policies: the one definition of what each policy keeps where, fetches and computes.

Both worlds import this module: the simulator turns `layer_work` into timed events, the runtime
(`profiler.runtime`) implements the same names with real tensors and must fetch exactly the rows
counted here (the runtime's fetch count for InfiniGen comes from real speculation instead of a
`FetchModel`, then goes through the same `infinigen_fetch_count` cap).

The decode step both worlds follow (overlap on; with overlap off, a layer's fetch is issued only
when its own compute starts, so copy and compute serialise):
  1. embed the new token; issue the fetch of layer 0 (everything the policy fetches, full for
     InfiniGen since layers < full_fetch_layers are never speculated);
  2. at the start of layer i, issue the fetch of layer i+1 on the copy stream; for InfiniGen with
     i+1 >= full_fetch_layers the fetch is preceded by speculation of layer i+1 on the GPU
     (layer i's attention input x partial W_Q(i+1) x partial K(i+1)^T), a small D2H of the chosen
     indices, and a host-side gather of the chosen rows into a staging buffer;
  3. layer i: norm + QKV projection -> the new token's K/V written back to host (D2H; INT4
     quantises it first) -> wait for layer i's fetch (INT4 dequantises it) -> attention over the
     fetched rows plus the new token -> output projection + FFN;
  4. final norm, LM head, sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from enum import Enum

from infinigen_sim.spec.fetch import DEFAULT_FETCH_MODEL, FetchModel
from infinigen_sim.spec.models import ModelSpec


class PolicyName(str, Enum):
    """The KV policies both worlds implement."""

    IDEAL = "ideal"  # all KV on the GPU, no transfers
    FLEXGEN = "flexgen"  # all KV in host memory, a layer's whole KV fetched every step
    INT4 = "int4"  # flexgen with group-wise asymmetric 4-bit K/V
    H2O = "h2o"  # heavy hitters + recent tokens within a fixed budget, held in host memory
    INFINIGEN = "infinigen"  # speculate, gather and prefetch only the important rows


ALL_POLICIES: tuple[str, ...] = tuple(p.value for p in PolicyName)
OFFLOADED = frozenset({PolicyName.FLEXGEN, PolicyName.INT4, PolicyName.H2O, PolicyName.INFINIGEN})


class PolicyError(ValueError):
    """A policy name or parameter that is not valid."""


@dataclass(frozen=True)
class PolicyConfig:
    """One KV policy and its parameters (defaults are the paper's)."""

    name: PolicyName
    overlap: bool = field(default=True, metadata={"help": "prefetch layer i+1's KV during layer i"})
    alpha: float = field(default=4.0, metadata={"help": "InfiniGen: fetch tokens scoring above max - alpha "
                                                        "(inf: every token)", "minimum": 0.0, "allow_inf": True})
    partial_ratio: float = field(default=0.3, metadata={"help": "InfiniGen: share of W_Q/K columns kept"})
    max_fetch_ratio: float = field(default=0.2, metadata={"help": "InfiniGen: per-layer cap, share of tokens"})
    full_fetch_layers: int = field(default=2, metadata={"help": "InfiniGen: first layers fetch all KV"})
    heavy_ratio: float = field(default=0.1, metadata={"help": "H2O: heavy-hitter budget, share of prompt"})
    recent_ratio: float = field(default=0.1, metadata={"help": "H2O: recent-token budget, share of prompt"})
    quant_bits: int = field(default=4, metadata={"help": "INT4: bits per K/V element"})
    quant_group: int = field(default=64, metadata={
        "help": "INT4: elements sharing one scale and zero; their codes fill whole bytes"})
    pool_ratio: float | None = field(
        default=None, metadata={"help": "InfiniGen: host KV pool size, share of tokens (None = unlimited)"}
    )
    head_layers: int = field(default=0, metadata={
        "help": "H2O: the first layers keep a budget of their own (a runtime description's override)"})
    head_heavy_ratio: float = field(default=0.0, metadata={"help": "H2O: heavy-hitter share in those layers"})
    head_recent_ratio: float = field(default=0.0, metadata={"help": "H2O: recent-token share in those layers"})

    def __post_init__(self) -> None:
        if not isinstance(self.name, PolicyName):
            object.__setattr__(self, "name", parse_policy_name(self.name))
        checks = {
            "alpha": self.alpha >= 0,
            "partial_ratio": 0 < self.partial_ratio <= 1,
            "max_fetch_ratio": 0 < self.max_fetch_ratio <= 1,
            "full_fetch_layers": self.full_fetch_layers >= 0,
            "heavy_ratio": 0 <= self.heavy_ratio <= 1,
            "recent_ratio": 0 <= self.recent_ratio <= 1,
            "quant_bits": self.quant_bits in (2, 4, 8),
            "quant_group": self.quant_group > 0 and self.quant_group * self.quant_bits % 8 == 0,
            "pool_ratio": self.pool_ratio is None or 0 < self.pool_ratio <= 1,
            "head_layers": self.head_layers >= 0,
            "head_heavy_ratio": 0 <= self.head_heavy_ratio <= 1,
            "head_recent_ratio": 0 <= self.head_recent_ratio <= 1,
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            key = bad[0]
            raise PolicyError(f"policy {self.name.value}: bad {key}={getattr(self, key)!r} ({_HELP[key]})")

    @property
    def offloaded(self) -> bool:
        return self.name in OFFLOADED

    def with_overrides(self, **kwargs: object) -> PolicyConfig:
        unknown = set(kwargs) - {f.name for f in fields(self)}
        if unknown:
            raise PolicyError(f"unknown policy parameter(s): {', '.join(sorted(unknown))}")
        return replace(self, **kwargs)


_HELP = {f.name: f.metadata.get("help", "") for f in fields(PolicyConfig)}


def parse_policy_name(name: str | PolicyName) -> PolicyName:
    try:
        return PolicyName(str(getattr(name, "value", name)).strip().lower())
    except ValueError:
        raise PolicyError(f"unknown policy '{name}'; known: {', '.join(ALL_POLICIES)}") from None


def make_policy(name: str | PolicyName, **params: object) -> PolicyConfig:
    """A policy with the paper's defaults, overridden by `params`."""
    return PolicyConfig(parse_policy_name(name)).with_overrides(**params)


def infinigen_cap(policy: PolicyConfig, context_len: int) -> int:
    """Per-layer cap on fetched rows: max_fetch_ratio of the tokens, at least one."""
    return max(1, math.floor(policy.max_fetch_ratio * context_len))


def infinigen_fetch_count(policy: PolicyConfig, layer: int, context_len: int, selected: float) -> int:
    """Rows InfiniGen fetches for `layer`: all for the first layers, else `selected` under the cap."""
    if layer < policy.full_fetch_layers:
        return context_len
    return int(min(max(1, round(selected)), infinigen_cap(policy, context_len), context_len))


def h2o_budget(policy: PolicyConfig, prompt_len: int, layer: int | None = None) -> tuple[int, int]:
    """(heavy, recent) token budget of `layer`, fixed from the prompt length for the whole generation; the
    first `head_layers` layers keep their own shares (None: a layer past them)."""
    head = layer is not None and layer < policy.head_layers
    heavy = max(1, round((policy.head_heavy_ratio if head else policy.heavy_ratio) * prompt_len))
    recent = max(1, round((policy.head_recent_ratio if head else policy.recent_ratio) * prompt_len))
    return heavy, recent


def h2o_kept(policy: PolicyConfig, prompt_len: int, layer: int | None = None) -> int:
    """Rows H2O keeps for `layer`: its heavy + recent budget, at most the prompt."""
    return min(prompt_len, sum(h2o_budget(policy, prompt_len, layer)))


def fetch_tokens(policy: PolicyConfig, layer: int, context_len: int, prompt_len: int,
                 fetch_model: FetchModel = DEFAULT_FETCH_MODEL) -> int:
    """K/V rows per sequence copied host->GPU for `layer` at a step with `context_len` cached tokens."""
    name = policy.name
    if name is PolicyName.IDEAL:
        return 0
    if name in (PolicyName.FLEXGEN, PolicyName.INT4):
        return context_len
    if name is PolicyName.H2O:
        return min(context_len, sum(h2o_budget(policy, prompt_len, layer)))
    return infinigen_fetch_count(policy, layer, context_len, fetch_model.tokens(context_len, layer))


def stored_bytes_per_token(policy: PolicyConfig, model: ModelSpec, dtype_bytes: int = 2) -> float:
    """Host (or GPU, for ideal) bytes of one token's K and V in one layer as the policy stores them."""
    elems = 2 * model.kv_dim
    if policy.name is PolicyName.INT4:
        # packed codes + one fp16 scale and one fp16 zero point per group
        return elems * policy.quant_bits / 8 + elems / policy.quant_group * 2 * 2
    return float(elems * dtype_bytes)


@dataclass(frozen=True)
class LayerWork:
    """What one decoder layer moves and computes in one decode step, for the whole batch."""

    attend_tokens: int  # rows attention reads per sequence (fetched + the new token)
    fetch_tokens: int  # rows copied host->GPU per sequence
    fetch_bytes: float  # host->GPU bytes of K and V for the batch
    gathered: bool  # rows are scattered in host memory: a host gather precedes the copy
    writeback_bytes: float  # the new token's K/V, GPU->host
    speculate: bool  # InfiniGen speculation for this layer runs during the previous layer
    dequant_elems: int  # INT4: K/V elements dequantised on the GPU
    quant_elems: int  # INT4: K/V elements quantised on the GPU (the new token)


def layer_work(policy: PolicyConfig, model: ModelSpec, layer: int, batch: int, context_len: int,
               prompt_len: int, fetch_model: FetchModel = DEFAULT_FETCH_MODEL,
               dtype_bytes: int = 2) -> LayerWork:
    """The work of `layer` at a decode step whose cache holds `context_len` tokens."""
    n_fetch = fetch_tokens(policy, layer, context_len, prompt_len, fetch_model)
    per_token = stored_bytes_per_token(policy, model, dtype_bytes)
    is_int4 = policy.name is PolicyName.INT4
    speculated = policy.name is PolicyName.INFINIGEN and layer >= policy.full_fetch_layers
    attend = context_len + 1 if policy.name is PolicyName.IDEAL else n_fetch + 1
    return LayerWork(
        attend_tokens=attend,
        fetch_tokens=n_fetch,
        fetch_bytes=batch * n_fetch * per_token,
        gathered=speculated,
        writeback_bytes=0.0 if policy.name is PolicyName.IDEAL else batch * per_token,
        speculate=speculated,
        dequant_elems=batch * n_fetch * 2 * model.kv_dim if is_int4 else 0,
        quant_elems=batch * 2 * model.kv_dim if is_int4 else 0,
    )


@dataclass(frozen=True)
class MemoryUse:
    """Bytes a policy keeps on the GPU and in host memory besides the weights."""

    gpu_bytes: float
    host_bytes: float


def kv_memory(policy: PolicyConfig, model: ModelSpec, batch: int, prompt_len: int, gen_len: int,
              dtype_bytes: int = 2) -> MemoryUse:
    """KV-related memory at the end of generation (the peak), excluding model weights.

    Offloaded policies keep double buffers for two layers' fetched KV on the GPU; InfiniGen adds
    its partial W_Q and partial K cache for every layer; H2O keeps only its budget.
    """
    total = prompt_len + gen_len
    layers = model.n_layers
    fp_token = model.kv_bytes_per_token(dtype_bytes)
    name = policy.name
    if name is PolicyName.IDEAL:
        return MemoryUse(gpu_bytes=float(layers * batch * total * fp_token), host_bytes=0.0)
    per_token = stored_bytes_per_token(policy, model, dtype_bytes)
    if name is PolicyName.H2O:
        kept = [min(total, sum(h2o_budget(policy, prompt_len, layer)) + 1) for layer in range(layers)]
        return MemoryUse(gpu_bytes=2.0 * batch * max(kept) * fp_token,
                         host_bytes=float(batch * sum(kept) * per_token))
    host_tokens = total
    if name is PolicyName.INFINIGEN and policy.pool_ratio is not None:
        host_tokens = max(1, math.ceil(policy.pool_ratio * total))
    host = float(layers * batch * host_tokens * per_token)
    buffers = 2.0 * batch * total * fp_token  # two layers in flight (full-fetch layers need it)
    if name is PolicyName.INT4:
        buffers += 2.0 * batch * total * per_token  # quantised staging beside the dequantised copy
    if name is PolicyName.INFINIGEN:
        partial_cols = math.ceil(policy.partial_ratio * model.head_dim)
        partial_wq = layers * model.d_model * model.n_heads * partial_cols * dtype_bytes
        partial_k = layers * batch * total * model.n_kv_heads * partial_cols * dtype_bytes
        buffers += partial_wq + partial_k
    return MemoryUse(gpu_bytes=buffers, host_bytes=host)
