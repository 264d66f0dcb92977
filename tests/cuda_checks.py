"""Checks of the runtime and the profiler on a CUDA device, shared by tests/test_cuda.py (a real card) and
tests/test_cuda_semantics.py (the CPU stand-in of tests/cuda_semantics.py), so CI runs the GPU tests' own code.

`check_policy`: one generation in fp16 on the device, its logits finite, its host buffers pinned; exact
policies (flexgen, InfiniGen with alpha=inf and the cap at 1) equal full KV within fp16 tolerance, the
others' top-1 agrees with the same policy in fp32 on the CPU teacher-forced on the same tokens (random
tiny weights make a lossy policy's agreement with full KV meaningless as a threshold: see the values
below). `check_benches`: a tiny transfer point and kernel task (every policy op) give status ok and GB/s > 0.
"""

from __future__ import annotations

import math

import torch
from runtime_helpers import prompt_ids

from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.policies import PolicyConfig, make_policy
from profiler.bench.kernels import KernelBench, KernelGrid, kernel_tasks
from profiler.bench.transfer_grid import TransferPoint, TransferSweep
from profiler.bench.transfers import TransferBench
from profiler.runtime.engine import Engine, GenerationResult
from profiler.runtime.model import build_model

MODELS = ("tiny-opt", "tiny-llama-gqa")
POLICIES = ("ideal", "flexgen", "int4", "h2o", "infinigen", "infinigen-pool", "infinigen-unlimited")
EXACT = ("ideal", "flexgen", "infinigen-unlimited")  # fetch every row: full KV up to fp16 rounding
FP16_ATOL = 2e-2  # logits ~1 in size; fp16 keeps 11 bits, and a GPU's kernels round differently from full KV's
MIN_AGREEMENT = 0.75  # measured on CPU fp16 vs fp32, teacher-forced, 8 tokens: 0.94-1.0 for every lossy policy
GEN_LEN = 8
BATCH, PROMPT = 2, 40


def policy_config(name: str, overlap: bool) -> PolicyConfig:
    """A POLICIES name as a config: the InfiniGen pool keeps 60% of the rows, 'unlimited' fetches all."""
    if name == "infinigen-pool":
        return make_policy("infinigen", pool_ratio=0.6, overlap=overlap)
    if name == "infinigen-unlimited":
        return make_policy("infinigen", alpha=math.inf, max_fetch_ratio=1.0, overlap=overlap)
    return make_policy(name, overlap=overlap)


def policy_cases() -> list[tuple[str, str, bool]]:
    """(model, policy, overlap): every policy x both families x overlap on/off (ideal and the unlimited
    InfiniGen once per family: overlap changes nothing they run)."""
    cases = []
    for model in MODELS:
        for policy in POLICIES:
            overlaps = (True,) if policy in ("ideal", "infinigen-unlimited") else (True, False)
            cases += [(model, policy, overlap) for overlap in overlaps]
    return cases


def generate(device: str, model_name: str, policy: PolicyConfig, dtype: torch.dtype | None = None,
             forced: torch.Tensor | None = None) -> tuple[GenerationResult, Engine]:
    """One generation of seeded prompts on the model's seed-0 weights (built on the host, moved by the engine)."""
    spec = get_model(model_name)
    with Engine(spec, policy, device, dtype, model=build_model(spec, seed=0)) as engine:
        result = engine.generate(prompt_ids(spec, batch=BATCH, length=PROMPT), GEN_LEN, forced=forced,
                                 keep_logits=True)
    return result, engine


def pinned_buffers(cache: object) -> dict[str, torch.Tensor]:
    """The host buffers the copy engines read or write: each must be pinned on CUDA."""
    found: dict[str, torch.Tensor] = {}
    for name in ("host", "staged", "staging"):
        for i, planes in enumerate(getattr(cache, name, [])):
            found |= {f"{name}[{i}].{j}": t for j, t in enumerate(planes.t)}
    for name in ("index_host", "selected_host"):
        found |= {f"{name}[{i}]": t for i, t in getattr(cache, name, {}).items()}
    found |= {f"slots[{i}]": t for i, t in enumerate(getattr(cache, "slots", []))}
    return found


def check_policy(device: str, model_name: str, policy_name: str, overlap: bool) -> GenerationResult:
    """One generation on `device` in its dtype (fp16 on CUDA), checked as the module docstring says."""
    policy = policy_config(policy_name, overlap)
    result, engine = generate(device, model_name, policy)
    logits = result.logits.float().cpu()
    assert torch.isfinite(logits).all()
    unpinned = [name for name, t in pinned_buffers(engine.cache).items() if not t.is_pinned()]
    assert not unpinned, unpinned
    if policy_name in EXACT:
        reference, _ = generate(device, model_name, make_policy("ideal"), forced=result.tokens)
        diff = (logits - reference.logits.float().cpu()).abs().max().item()
        assert diff <= FP16_ATOL, f"{policy_name}: max |logit - full KV's| {diff:.4f} > {FP16_ATOL}"
    else:
        same, _ = generate("cpu", model_name, policy, torch.float32, forced=result.tokens.cpu())
        agreement = (logits.argmax(-1) == same.logits.argmax(-1)).float().mean().item()
        assert agreement >= MIN_AGREEMENT, f"{policy_name}: top-1 agreement with fp32 CPU {agreement:.3f}"
    return result


def check_benches(device: torch.device) -> tuple[list[dict], list[dict]]:
    """A tiny copy point (pinned H2D, 1 MiB) and a tiny kernel task (a cache pass of tiny-opt): status
    ok, GB/s above 0; returns their rows."""
    sweep = TransferSweep(max_bytes=1 << 20, memories=("pinned",), row_bytes=(256,))
    bench = TransferBench(device, sweep, repeats=5, warmup=1, generator=torch.Generator().manual_seed(0))
    try:
        copies = bench.measure(TransferPoint("h2d", "pinned", "contiguous", False, 1 << 20))
        copies += bench.measure(TransferPoint("h2d", "pinned", "gathered", False, 64 << 10, 256))
    finally:
        bench.close()
    assert {r["status"] for r in copies} == {"ok"} and all(r["gbps"] > 0 for r in copies)
    spec = get_model("tiny-opt")
    grid = KernelGrid((2,), (64,), (32,), 1024)
    kernels = KernelBench(device, {spec.name: spec}, grid, repeats=5, warmup=1, seed=0)
    task = next(t for t in kernel_tasks([spec], "float16", grid) if t.kernel_pass == "cache")
    rows = kernels.measure(task)
    assert {r["status"] for r in rows} == {"ok"} and all(r["median_us"] > 0 for r in rows)
    return copies, rows
