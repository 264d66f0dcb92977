"""What one replay is of: a point (costs, model, policy, request shape) and where its copies run.

Resources, each capacity 1 and first come first served: `gpu` (the compute stream: kernels run in
issue order), `h2d_link` and `d2h_link` (the two copy engines), `host_cpu` (the copy worker: the
gather thread), `dispatch` (the host thread that dispatches the model's ops, as the runtime description
prices them; it also runs what that runtime does on its main thread: a gather, a pin_memory() relay,
a synchronous pageable copy).

Placement (`Placement`): on a GPU box the copies run on their own copy engines and the gather on a
host thread. The runtime's CPU mode (`CPU_PLACEMENT`) has no copy engines: the copy worker thread
runs the gathers and the host->"device" copies (one FIFO resource, `host_cpu`), and device->host
copies run inline on the compute thread (`gpu`) in program order: the indices after top-k, the new
token's K/V after QKV, each prefill layer's K/V store before its attention. Two costs of that
runtime's Python ride on the compute thread when the cost model prices them: a `span` after every
op (its timer's bookkeeping) and, per offloaded layer, a `handoff` (what handing its fetch and commit
jobs to the worker costs the compute thread); the worker pays a `job` per job.
"""

from __future__ import annotations

from dataclasses import dataclass

from infinigen_sim.cost.physics import DEFAULT as DEFAULT_RUNTIME
from infinigen_sim.cost.physics import CostModel
from infinigen_sim.spec.fetch import DEFAULT_FETCH_MODEL, FetchModel
from infinigen_sim.spec.models import ModelSpec
from infinigen_sim.spec.policies import PolicyConfig
from infinigen_sim.spec.runtime import RuntimeSpec

RESOURCES = ("gpu", "h2d_link", "d2h_link", "host_cpu", "dispatch")
INDEX_BYTES = 4  # one int32 index per selected row: InfiniGen's indices copied GPU->host
PREFILL = -1  # step id of the prefill in logs and traces


@dataclass(frozen=True)
class Placement:
    """Where copies run: own copy engines (a GPU box) or the compute and worker threads (CPU runtime)."""

    h2d: str = "h2d_link"  # resource that runs host->device copies
    gather: str = "host_cpu"  # resource that runs the host gather
    d2h_inline: bool = False  # device->host copies run on `gpu`, in program order
    handoff: bool = False  # a layer's copy-worker jobs cost the compute thread `costs.handoff_s(bytes)`,
    # each job the worker `costs.job_s()`
    spans: bool = False  # each op on `gpu` is followed by the runtime's timing bookkeeping, `costs.span_s(op)`
    dispatch: bool = True  # a host thread dispatches the ops (`dispatch`) and the runtime description's host
    # costs, syncs and pageable copies apply; the CPU runtime's op rows already hold its dispatch


GPU_PLACEMENT = Placement()
CPU_PLACEMENT = Placement(h2d="host_cpu", gather="host_cpu", d2h_inline=True, handoff=True, spans=True,
                          dispatch=False)


@dataclass(frozen=True)
class Scenario:
    """One point to replay: costs, model, policy and the shape of the request."""

    costs: CostModel
    model: ModelSpec
    policy: PolicyConfig
    batch: int  # sequences decoded together
    prompt_len: int  # tokens
    gen_len: int  # tokens generated; prefill emits the first, gen_len - 1 decode steps the rest
    fetch_model: FetchModel = DEFAULT_FETCH_MODEL
    streamed_weight_bytes: float = 0.0  # per layer, copied host->GPU every step (weights that do not fit)
    dtype_bytes: int = 2  # bytes per K/V element before the policy's own encoding (fp32 on the CPU runtime: 4)
    placement: Placement = GPU_PLACEMENT
    runtime: RuntimeSpec = DEFAULT_RUNTIME  # as the policy runs it (RuntimeSpec.for_policy)

    @property
    def pageable_kv(self) -> bool:
        """The host K/V is pageable and the placement's copies are real host<->device ones (a GPU's)."""
        return self.placement.dispatch and self.runtime.memory.host_kv == "pageable"

    @property
    def n_decode_steps(self) -> int:
        return max(self.gen_len - 1, 0)
