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

import numpy as np
import torch

from infinigen_sim.spec.models import ModelSpec
from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.policies import PolicyName, fetch_tokens, infinigen_cap, make_policy, stored_bytes_per_token
from profiler.bench.stats import gc_paused
from profiler.runtime.engine import CACHES
from profiler.runtime.infinigen import SpeculationPlan
from profiler.runtime.kv_cache import OffloadedCache, Runtime
from profiler.runtime.timing import PhaseTimer
from profiler.runtime.transfer import Copier

HANDOFF_POLICIES = tuple(p.value for p in PolicyName if make_policy(p).offloaded)
HANDOFF_BATCH = 2  # sequences of the emulated step
HANDOFF_SAMPLES = 10  # samples per timed repeat of a handoff point
HANDOFF_UNITS = 16  # compute-thread units timed alone before each sample (the drift-free baseline)
DTYPE = torch.float32  # the CPU runtime's


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
    cache: OffloadedCache = CACHES[p.name](Runtime(spec, p, None, torch.device("cpu"), DTYPE, copier, timer))
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


def handoff_samples(policy: str, spec: ModelSpec, context: int, samples: int,
                    generator: torch.Generator) -> list[float]:
    """Microseconds one layer's copy-worker jobs of `policy` at `context` cached tokens cost the compute
    thread, once per sample.

    The compute thread hands the worker the layer's fetch and commit, as the engine does, and runs
    decode-shaped work meanwhile: one small matmul in a runtime span at a time (Python-bound, as a
    small model's decode is), until both jobs are done. The sample is its wall time less as many
    units timed alone just before: the submits, the worker's wake-ups, the GIL the jobs hold, and
    whatever of the jobs' copies the worker could not run beside the compute thread.
    """
    timer = PhaseTimer(False)
    copier = Copier(torch.device("cpu"), True, timer)
    x, w = torch.randn(2, 256, generator=generator), torch.randn(256, 256, generator=generator)

    def unit() -> None:
        with timer.span(Op.NORM, 0):
            torch.mm(x, w)

    def sample(jobs: Callable[[], list[Future]]) -> float:
        alone = []
        for _ in range(HANDOFF_UNITS):
            t0 = time.perf_counter()
            unit()
            alone.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        futures = jobs()
        units = 0
        while units == 0 or not all(f.done() for f in futures):
            unit()
            units += 1
        seconds = time.perf_counter() - t0 - units * float(np.median(alone))
        for future in futures:
            future.result()  # raise what a job raised
        timer.collect(spec.n_layers)
        return seconds * 1e6

    try:
        with torch.inference_mode(), gc_paused():
            jobs = layer_jobs(policy, spec, context, copier, timer, generator)
            for _ in range(3):  # warm-up: worker started, allocator and kernels warm
                sample(jobs)
            return [sample(jobs) for _ in range(samples)]
    finally:
        copier.close()
