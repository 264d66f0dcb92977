"""What an op or a copy costs on a given card: the `CostModel` interface and its roofline default.

`CostModel` is what the SimPy replay (`infinigen_sim.sim`) asks for every duration. The default,
`PhysicsCosts`, is a roofline over the hardware YAML: FLOPs and bytes of each op (`spec.work`) against
the card's peaks times their efficiencies, plus a fixed cost per kernel and per copy. A measured
profile bundle plugs in as `cost.bundle_costs.BundleCosts`.

Op names are `spec.ops.Op` values (the runtime's phases). Besides the roofline ops a cost model may
price what only a measurement can: the runtime-only compute ops (`spec.ops.MEASURED_OPS`: skew,
score), and the CPU runtime's own Python around the ops (span bookkeeping, copy-worker handoffs and
jobs). `PhysicsCosts` prices none of those: `measured_ops()` is empty and the overheads are 0, so a
physics sweep leaves them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from infinigen_sim.spec.hardware import HardwareConfig
from infinigen_sim.spec.models import ModelSpec
from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.policies import PolicyName
from infinigen_sim.spec.runtime import RuntimeSpec, load_runtime
from infinigen_sim.spec.work import op_work


@runtime_checkable
class CostModel(Protocol):
    """Seconds for every op and transfer the replay schedules."""

    def compute_s(self, op: str, model: ModelSpec, batch: int, n_tokens: int, kv_len: int,
                  *, partial_ratio: float = 1.0) -> float:
        """GPU time of compute op `op` (spec.ops.COMPUTE_OPS) for `batch` sequences (partial_ratio: speculate)."""
        ...

    def h2d_s(self, nbytes: float, gathered: bool, pageable: bool = False) -> float:
        """Host-to-GPU copy of `nbytes`; `gathered` = from the gather staging buffer; `pageable` = from
        ordinary (not page-locked) host memory, copied as the runtime copies it (see spec.runtime.HostMemory)."""
        ...

    def d2h_s(self, nbytes: float, pageable: bool = False) -> float:
        """GPU-to-host copy of `nbytes` (into pageable host memory when `pageable`)."""
        ...

    def gather_s(self, nbytes: float, rows: int) -> float:
        """Host CPU gather of `rows` scattered K/V rows (`nbytes` in all) into a staging buffer."""
        ...

    def memcpy_s(self, nbytes: float) -> float:
        """One host thread copying `nbytes` between host buffers (a pin_memory() relay, a staging copy)."""
        ...

    def dispatch_s(self, policy: PolicyName, family: str) -> float:
        """What the dispatching host thread pays for one decode layer of `policy` (ops and syncs) in a model of
        `family` (opt | llama)."""
        ...

    def measured_ops(self) -> frozenset[Op]:
        """The runtime-only compute ops (spec.ops.MEASURED_OPS) this model prices; the replay runs those."""
        ...

    def span_s(self, op: str) -> float:
        """CPU runtime: the engine's span bookkeeping after pipeline op `op` on the compute thread."""
        ...

    def handoff_s(self, nbytes: float) -> float:
        """CPU runtime: what a layer's copy-worker jobs, moving `nbytes`, cost the compute thread."""
        ...

    def job_s(self) -> float:
        """CPU runtime: what one copy-worker job costs the worker itself."""
        ...

    def describe(self) -> dict[str, Any]:
        """Everything that decides the numbers, for config.yaml."""
        ...


DEFAULT = load_runtime()  # this project's runtime (runtimes/infinigen-sim.yaml)


@dataclass(frozen=True)
class PhysicsCosts:
    """Roofline times from the hardware YAML: peaks x efficiencies, plus fixed per-call costs, for the ops and
    copies of runtime `runtime` (its kernel style, host KV memory, gather and dispatch costs)."""

    hw: HardwareConfig
    dtype_bytes: int = 2
    runtime: RuntimeSpec = DEFAULT

    def compute_s(self, op: str, model: ModelSpec, batch: int, n_tokens: int, kv_len: int,
                  *, partial_ratio: float = 1.0) -> float:
        gpu = self.hw.gpu
        work = op_work(op, model, batch, n_tokens, kv_len, partial_ratio, self.dtype_bytes, self.runtime.kernels)
        flop_s = work.flops / (gpu.fp16_tflops * 1e12 * gpu.compute_efficiency)
        byte_s = work.hbm_bytes / (gpu.hbm_gbps * 1e9 * gpu.hbm_efficiency)
        return max(flop_s, byte_s) + gpu.launch_us * 1e-6

    def h2d_s(self, nbytes: float, gathered: bool, pageable: bool = False) -> float:
        link = self.hw.link
        return self._link_s(nbytes, link.h2d_gbps * link.h2d_efficiency, pageable)

    def d2h_s(self, nbytes: float, pageable: bool = False) -> float:
        link = self.hw.link
        return self._link_s(nbytes, link.d2h_gbps * link.d2h_efficiency, pageable)

    def _link_s(self, nbytes: float, pinned_gbps: float, pageable: bool) -> float:
        """A pinned copy at the link's achievable rate; a direct pageable one through the driver's pinned
        bounce buffers, whose host memcpy and DMA pipeline: min(link, one thread's memcpy) (first
        principles: the CUDA driver stages pageable memory through page-locked buffers). A relay's memcpy
        is priced apart (memcpy_s) and its DMA is a pinned one."""
        direct = pageable and self.runtime.memory.pageable_copy == "direct"
        gbps = min(pinned_gbps, self.hw.host.memcpy_gbps) if direct else pinned_gbps
        return _copy_s(nbytes, self.hw.link.latency_us, gbps)

    def gather_s(self, nbytes: float, rows: int) -> float:
        host = self.hw.host
        if nbytes <= 0:
            return 0.0
        per_row = rows * self.runtime.gather.row_ns * 1e-9  # index bookkeeping and a cache miss per row
        return 2.0 * nbytes / (host.memory_gbps * 1e9 * host.gather_efficiency) + per_row  # read rows + write

    def memcpy_s(self, nbytes: float) -> float:
        return nbytes / (self.hw.host.memcpy_gbps * 1e9) if nbytes > 0 else 0.0

    def dispatch_s(self, policy: PolicyName, family: str) -> float:
        return self.runtime.host.layer_s(policy, family)

    def measured_ops(self) -> frozenset[Op]:
        return frozenset()  # a roofline has no skew or score rows

    def span_s(self, op: str) -> float:
        return 0.0

    def handoff_s(self, nbytes: float) -> float:
        return 0.0

    def job_s(self) -> float:
        return 0.0

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "physics",
            "hardware": self.hw.name,
            "dtype_bytes": self.dtype_bytes,
            "compute": "max(flops / (fp16_tflops*compute_efficiency), hbm_bytes / (hbm_gbps*hbm_efficiency))"
                       " + launch_us",
            "transfer": "latency_us + bytes / (gbps*efficiency); no copy for 0 bytes; direct pageable copies at "
                        "min(link, host.memcpy_gbps)",
            "gather": "2 * bytes / (host.memory_gbps*gather_efficiency) + rows * runtime gather.row_ns",
            "runtime": self.runtime.name,
        }


def _copy_s(nbytes: float, latency_us: float, effective_gbps: float) -> float:
    if nbytes <= 0:
        return 0.0  # nothing to move: no copy is issued
    return latency_us * 1e-6 + nbytes / (effective_gbps * 1e9)


