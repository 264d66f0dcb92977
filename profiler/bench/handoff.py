"""What handing a layer's jobs to the CPU runtime's copy worker costs the compute thread: transfers.csv's
'handoff.<policy>' rows.

The CPU runtime (`profiler.runtime.transfer.Copier`) runs each layer's K/V fetch and the commit of its
new row as two jobs on one worker thread beside the compute thread. On a box with spare cores only
the submits, the worker's wake-ups and the GIL its Python holds cost the compute thread; with no
free core the copies themselves do too. The jobs are the runtime's own (`_fetch_job`, `_commit_job`
of each offloaded policy's KV cache): INT4 moves six planes, H2O files its row by slot tensors,
InfiniGen gathers its rows first, and each costs the compute thread differently.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace

import torch

from infinigen_sim.spec.models import ModelSpec
from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.policies import PolicyName, fetch_tokens, infinigen_cap, make_policy, stored_bytes_per_token
from profiler.bench.stats import gc_paused
from profiler.runtime.engine import CACHES
from profiler.runtime.infinigen import SpeculationPlan
from profiler.runtime.kv_cache import DeviceCache, OffloadedCache, Runtime
from profiler.runtime.model import build_model
from profiler.runtime.timing import PhaseTimer
from profiler.runtime.transfer import Copier

HANDOFF_POLICIES = tuple(p.value for p in PolicyName if make_policy(p).offloaded)
HANDOFF_BATCH = 2  # sequences of the emulated step
HANDOFF_SAMPLES = 10  # samples per timed repeat of a handoff point
HANDOFF_LAYERS = 8  # decode layers of a sample, run alone and then with their jobs (the drift-free baseline)
DTYPE = torch.float32  # the CPU runtime's
CPU = torch.device("cpu")


def handoff_contexts(max_bytes: int, spec: ModelSpec) -> list[int]:
    """Cached tokens of the handoff points: 64, 256, ... while FlexGen's fetch stays within max_bytes."""
    flexgen = make_policy("flexgen")
    return [n for n in (64, 256, 1024, 4096) if fetch_bytes(flexgen.name.value, spec, n) <= max_bytes]


def fetch_bytes(policy: str, spec: ModelSpec, context: int) -> int:
    """Bytes one speculated layer of `policy` fetches at `context` cached tokens (InfiniGen at its cap)."""
    p = make_policy(policy)
    cap = infinigen_cap(p, context)
    rows = fetch_tokens(p, spec.n_layers - 1, context, context) if p.name is not PolicyName.INFINIGEN else cap
    return int(HANDOFF_BATCH * rows * stored_bytes_per_token(p, spec, DTYPE.itemsize))


def layer_jobs(policy: str, spec: ModelSpec, context: int, copier: Copier, timer: PhaseTimer,
               generator: torch.Generator) -> Callable[[], list[Future]]:
    """A callable handing the worker one layer's jobs of `policy`'s cache: the fetch, then the commit."""
    p = make_policy(policy)
    cache: OffloadedCache = CACHES[p.name](Runtime(spec, p, None, CPU, DTYPE, copier, timer))
    cache.allocate(HANDOFF_BATCH, context + 8, context)
    cache.reset()
    layer = spec.n_layers - 1  # speculated by InfiniGen
    entries = min(context, cache.host_rows)
    cache.entries = [entries] * spec.n_layers
    plan = None
    if p.name is PolicyName.INFINIGEN:
        cap = infinigen_cap(p, entries)
        index = torch.stack([torch.randperm(entries, generator=generator)[:cap]
                             for _ in range(HANDOFF_BATCH * spec.n_kv_heads)])
        plan = SpeculationPlan(index.view(HANDOFF_BATCH, spec.n_kv_heads, cap), torch.tensor([float(cap)]),
                               entries, None)

    def jobs() -> list[Future]:
        fetch = copier.submit(cache._fetch_job, layer, entries, plan, None, None)
        if p.name is PolicyName.H2O:
            return [fetch, copier.submit(cache._commit_slots, layer, None, None)]
        return [fetch, copier.submit(cache._commit_job, layer, 1, None)]

    return jobs


def decode_layer(spec: ModelSpec, context: int, timer: PhaseTimer, generator: torch.Generator
                 ) -> Callable[[], None]:
    """One decode layer of `spec` at `context` cached rows as the engine runs it (`Engine.decode_layer` over
    the ideal cache: its six spans, the same modules and attention), the compute-thread work a layer's
    jobs run beside. A one-layer copy of the model; its K/V rows stay on the device."""
    one = replace(spec, n_layers=1, max_positions=max(spec.max_positions, context + 1))
    model = build_model(one, int(torch.randint(0, 2**31, (1,), generator=generator)), CPU, DTYPE).eval()
    cache = DeviceCache(Runtime(one, make_policy("ideal"), model, CPU, DTYPE, Copier(CPU, False, timer), timer))
    cache.allocate(HANDOFF_BATCH, context + 1, context)
    cache.begin_step(context)  # every call writes row `context` and attends over context + 1 rows
    block, x, pos = model.layers[0], torch.randn(HANDOFF_BATCH, 1, spec.d_model, generator=generator), \
        torch.tensor([context])

    def layer() -> None:
        with timer.span(Op.NORM, 0):
            a = block.input_layernorm(x)
        with timer.span(Op.QKV, 0):
            q, k, v = model.qkv(0, a, pos)
        o = cache.attend(0, q, k, v)
        with timer.span(Op.FFN, 0):
            h = x + block.self_attn.o_proj(o)
        with timer.span(Op.NORM, 0):
            m = block.post_attention_layernorm(h)
        with timer.span(Op.FFN, 0):
            h + block.mlp(m)

    return layer


def handoff_samples(policy: str, spec: ModelSpec, context: int, samples: int,
                    generator: torch.Generator) -> list[float]:
    """Microseconds one layer's copy-worker jobs of `policy` at `context` cached tokens cost the compute
    thread, once per sample.

    As the engine runs a decode step: HANDOFF_LAYERS decode layers of `spec` at the same context
    (`decode_layer`), each handing the worker its layer's fetch and commit at its start, the previous
    layer's jobs waited for first. The sample is that block's wall time less the same layers run just
    before without jobs, per layer: the submits, the worker's wake-ups, the GIL the jobs' Python holds
    at every op boundary of the compute thread, and whatever of the jobs' copies the worker could not
    run beside it. The compute work is a real layer's and the jobs come as the engine issues them, so
    that the sample has a step's shape. (The loop it replaced, one small matmul until a single layer's
    jobs finished, gave 0.7-1.2x these figures on the 2-core CPU box, `experiments/cpu_fidelity.py`,
    2026-12-02: the shape changed, the level did not. Inside a step much of this cost lands in the
    compute thread's op spans, which the jobs slow down, rather than between them.)
    """
    timer = PhaseTimer(False)
    copier = Copier(CPU, True, timer)

    def sample(jobs: Callable[[], list[Future]], unit: Callable[[], None]) -> float:
        t0 = time.perf_counter()
        for _ in range(HANDOFF_LAYERS):
            unit()
        alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        futures: list[Future] = []
        for _ in range(HANDOFF_LAYERS):
            for future in futures:
                future.result()  # raise what a job raised
            futures = jobs()
            unit()
        with_jobs = time.perf_counter() - t0
        for future in futures:  # the last layer's jobs, outside the clock
            future.result()
        timer.collect(spec.n_layers)
        # a difference of two noisy walls: one below 0 is noise, not a gain (the worker cannot speed
        # the compute thread up), and counts as 0
        return max(with_jobs - alone, 0.0) / HANDOFF_LAYERS * 1e6

    try:
        with torch.inference_mode(), gc_paused():
            jobs = layer_jobs(policy, spec, context, copier, timer, generator)
            unit = decode_layer(spec, context, timer, generator)
            for _ in range(2):  # warm-up: worker started, allocator and kernels warm
                sample(jobs, unit)
            return [sample(jobs, unit) for _ in range(samples)]
    finally:
        copier.close()
