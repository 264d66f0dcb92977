"""The CUDA branches of the runtime and the profiler, run in CI on the CPU stand-in of tests/cuda_semantics.py,
which enforces CUDA's rules of streams and events (each test says which bug it would catch if put back).

Every policy x {OPT, GQA Llama} x overlap on/off x the InfiniGen pool runs through the engine on 'cuda'
(tests/cuda_checks.py, the same checks tests/test_cuda.py runs on a card) and must compute exactly what
the CPU branches compute in the same dtype; the kernel passes synchronise once per pass and pin no host
K/V; `profiler.collect --device cuda --quick` runs end to end (and resumes); the fetch pass reads its
counts after its copies; models and inputs are drawn on the device; fp16 attention scales q first.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from cuda_checks import check_benches, check_policy, generate, policy_cases, policy_config
from cuda_semantics import CudaRaceError, fake_cuda
from runtime_helpers import prompt_ids

from infinigen_sim.sim.scenario import INDEX_BYTES
from infinigen_sim.spec.bundle import KERNEL_KEY, read_bundle
from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.policies import infinigen_cap, kv_memory, make_policy
from profiler import collect
from profiler.bench import collection, fetch, kernels, steps, transfers
from profiler.bench.host_costs import dispatch_us, host_rows
from profiler.bench.kernel_passes import Inputs
from profiler.bench.kernels import KernelBench, KernelGrid, kernel_tasks
from profiler.bench.steps import StepBench, StepGrid
from profiler.bench.transfer_grid import TransferSweep
from profiler.runtime.cuda_api import CUDA
from profiler.runtime.engine import Engine
from profiler.runtime.model import RotaryPositions, build_model, decode_attention, prompt_attention_mass

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
TINY_GRID = KernelGrid((2,), (16, 64), (32,), 1024)


def test_the_stand_in_enforces_the_rules():
    """Each rule raises as CUDA would fail (or race); the same work correctly ordered passes."""
    with fake_cuda() as cuda:
        assert CUDA.backend is cuda and CUDA.is_available()
        host = torch.ones(64, pin_memory=True)
        dev = torch.zeros(64, device="cuda")
        assert dev.is_cuda and dev.device.type == "cuda" and host.is_pinned()
        copy = CUDA.Stream()
        copy.wait_stream(CUDA.current_stream())  # dev's zeros were written on the compute stream
        with CUDA.stream(copy):
            dev.copy_(host, non_blocking=True)
            done = CUDA.Event(blocking=True)
            done.record()
        with pytest.raises(CudaRaceError, match="host writes pinned memory that stream.* still reads"):
            host.fill_(2.0)
        with pytest.raises(CudaRaceError, match="on default reads device memory that stream.* still writes"):
            dev.sum()
        start, end = CUDA.Event(enable_timing=True), CUDA.Event(enable_timing=True)
        start.record()
        CUDA.current_stream().wait_event(done)
        total = dev.sum()
        end.record()
        with pytest.raises(RuntimeError, match="Both events must be completed before calculating elapsed time"):
            start.elapsed_time(end)
        with pytest.raises(CudaRaceError, match="without blocking=True"):
            end.synchronize()
        done.synchronize()  # blocking: the host may now reuse `host`
        host.fill_(3.0)
        assert float(total) == 64.0  # a read to the host waits for the stream
        assert start.elapsed_time(end) >= 0.0
        with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator"):
            torch.randn(4, device="cuda", generator=torch.Generator())
        with pytest.raises(RuntimeError, match="same device"):
            dev + host


@pytest.mark.parametrize("model, policy, overlap", policy_cases())
def test_every_policy_keeps_cuda_order(model, policy, overlap):
    """Catches, put back: the pool slot overwritten under layers 0-1's in-flight H2D ('index_copy_ on host
    writes pinned memory that stream1 still reads'); host waits on non-blocking events ('without
    blocking=True'). Beyond the checks of test_cuda.py: bit-identical to the CPU branches in fp16."""
    with fake_cuda() as cuda:
        result = check_policy("cuda", model, policy, overlap)
    assert not cuda.errors
    on_cpu, _ = generate("cpu", model, policy_config(policy, overlap), torch.float16)
    assert torch.equal(result.tokens, on_cpu.tokens) and torch.equal(result.logits, on_cpu.logits)


def test_infinigen_sends_int32_indices_and_pins_cap_sized_staging():
    """Put back, fails: int64 indices to the host (the simulator prices INDEX_BYTES per index); staging
    buffers as long as the host cache rather than the fetch cap (more pinned memory than the K/V)."""
    spec, policy = get_model("tiny-llama-gqa"), make_policy("infinigen")
    with fake_cuda() as cuda:
        _, engine = generate("cuda", spec.name, policy)
    cache = engine.cache
    assert {(t.dtype, t.element_size()) for t in cache.index_host.values()} == {(torch.int32, INDEX_BYTES)}
    index_d2h = [nbytes for kind, nbytes, dtype in cuda.copies if kind == "d2h" and dtype == torch.int32]
    assert index_d2h and max(index_d2h) <= INDEX_BYTES * 2 * spec.n_kv_heads * infinigen_cap(policy, cache.host_rows)
    rows = cache.host_rows
    cap = infinigen_cap(policy, rows)
    assert [p.t[0].shape[0] for p in cache.staging] == [cap, cap]
    kv = kv_memory(policy, spec, 2, 40, 8, 2).host_bytes  # fp16 host K/V of every layer, as spec counts it
    row_bytes = 2 * spec.kv_bytes_per_token(2)  # a token's K and V of one layer, batch 2
    small = sum(t.numel() * t.element_size() for t in (*cache.index_host.values(), *cache.selected_host.values()))
    assert sum(cuda.pinned_allocations) == kv + 2 * cap * row_bytes + spec.n_layers * row_bytes + small


def test_kernel_tasks_sync_once_per_pass_and_pin_no_host_kv():
    """Put back, fails: the set-up's events read before they completed (collect's first kernel task died
    with 'Both events must be completed'); every policy's host K/V pinned in every task; the inline copier
    waiting for its copies inside timed entries (more host syncs than passes)."""
    spec = get_model("tiny-opt")
    with fake_cuda() as cuda:
        bench = KernelBench(torch.device("cuda"), {spec.name: spec}, TINY_GRID, repeats=5, warmup=1, seed=0)
        real_run = kernels.run_passes
        syncs_per_pass: list[float] = []

        def counted(p, device, passes, warmup):
            before = len(cuda.host_syncs)
            out = real_run(p, device, passes, warmup)
            syncs_per_pass.append((len(cuda.host_syncs) - before) / (passes + warmup))
            return out

        kernels.run_passes = counted
        try:
            rows = [r for task in kernel_tasks([spec], "float16", TINY_GRID) for r in bench.measure(task)]
        finally:
            kernels.run_passes = real_run
    assert {r["status"] for r in rows} == {"ok"} and not cuda.errors
    assert syncs_per_pass and set(syncs_per_pass) == {1.0}
    one_layer_kv = 2 * max(TINY_GRID.kv_lens) * spec.kv_bytes_per_token(2)
    assert sum(cuda.pinned_allocations) < one_layer_kv, cuda.pinned_allocations


def test_models_and_inputs_are_drawn_on_the_device():
    """Put back (weights built in fp32 on the host, inputs drawn there, then copied): H2D traffic."""
    spec = get_model("tiny-llama-gqa")
    with fake_cuda() as cuda:
        model = KernelBench(torch.device("cuda"), {spec.name: spec}, TINY_GRID, 5, 1, 0).model(spec.name)
        StepBench(torch.device("cuda"), {spec.name: spec}, seed=0).model(spec.name)
        Inputs(model, seed=0).rand(2, 3, 4)
        assert next(model.parameters()).dtype == torch.float16 and next(model.parameters()).is_cuda
    assert [c for c in cuda.copies if c[0] == "h2d"] == []
    cos = model.embed_positions.cos  # the rotary tables are filled in after the meta build
    torch.testing.assert_close(cos.float(), RotaryPositions(spec).cos, rtol=0, atol=1e-3)


def tiny_collection(monkeypatch) -> None:
    """The quick cuda grids shrunk to tiny-opt sizes: the stand-in runs device work on one CPU core."""
    monkeypatch.setitem(kernels.GRIDS, ("cuda", True), TINY_GRID)
    monkeypatch.setitem(steps.STEP_GRIDS, ("cuda", True), StepGrid((2,), (32,), 4, 1))
    monkeypatch.setitem(transfers.LOAD_MATMUL_SIDE, "cuda", 64)
    monkeypatch.setattr(collection, "make_sweep", lambda device, models, quick: TransferSweep(
        max_bytes=16 << 10, memories=("pinned", "pageable"), row_bytes=(1024,)))


def test_collect_quick_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    """Put back (no synchronize before a pass's set-up spans are dropped): the first kernel task raises
    'Both events must be completed', and --resume meets it again."""
    tiny_collection(monkeypatch)
    out = tmp_path / "bundle"
    argv = ["--device", "cuda", "--quick", "--models", "tiny-opt", "--budget-s", "0", "--out", str(out)]
    with fake_cuda() as cuda:
        assert collect.main(argv) == 0
        printed = capsys.readouterr().out
        kernels_csv = out / "kernels.csv"
        lines = kernels_csv.read_text().splitlines(keepends=True)
        kernels_csv.write_text("".join(lines[:-5]))  # a kill during the kernel sweep
        assert collect.main([*argv, "--resume"]) == 0
    assert not cuda.errors and "no budget (--budget-s 0): estimated" in printed
    bundle = read_bundle(out)
    assert bundle.meta["device"]["type"] == "cuda" and bundle.meta["transfers"]["memory"] == ["pinned", "pageable"]
    assert bundle.meta["kernels"]["dtype"] == "float16" and "estimate_s" in bundle.meta["budget"]
    assert (bundle.kernels.status == "ok").all() and (bundle.transfers.status == "ok").all()
    assert len(bundle.kernels) == len(lines) - 1 and bundle.kernels.duplicated(list(KERNEL_KEY)).sum() == 0
    assert set(bundle.steps.policy) == {"ideal", "flexgen", "int4", "h2o", "infinigen"}


def test_fetch_pass_reads_counts_after_its_copies():
    """Put back (the step's events read without a synchronize): 'Both events must be completed'."""
    spec = get_model("tiny-llama-gqa")
    grid = fetch.FetchGrid((24, 32), windows=1, steps=3)
    plan = fetch.FetchPass("smollm2-135m", (math.inf, 1.0), grid, fetch.DEFAULT_TEXT)
    ids = prompt_ids(spec, batch=1, length=200)[0]
    with fake_cuda() as cuda:
        bench = fetch.FetchBench(plan, spec, build_model(spec, seed=0), ids, torch.device("cuda"))
        unlimited, tight = bench.measure(math.inf, 32), bench.measure(1.0, 32)
    assert not cuda.errors
    speculated = range(make_policy("infinigen").full_fetch_layers, spec.n_layers)
    for layer in speculated:  # alpha = inf selects every cached row; alpha = 1 fewer
        assert unlimited[layer]["fetched_tokens"] >= tight[layer]["fetched_tokens"] > 0
    assert unlimited[0]["fetched_tokens"] == sum(32 - 3 - 1 + t for t in range(3)) / 3


def test_tiny_benches_on_the_stand_in(monkeypatch):
    """test_cuda.py's bench check runs here too, so its own code is exercised in CI."""
    monkeypatch.setitem(transfers.LOAD_MATMUL_SIDE, "cuda", 64)  # an 8192^2 fp16 matmul is minutes on a CPU
    with fake_cuda() as cuda:
        check_benches(torch.device("cuda"))
    assert not cuda.errors


def test_fp16_attention_scales_q_before_qk():
    """Put back (q.k in fp16, then the 1/sqrt(D)): activations of a real checkpoint overflow to inf."""
    gen = torch.Generator().manual_seed(0)
    B, H, D, S = 1, 2, 64, 5
    q = torch.randn(B, H, D, generator=gen) * 40
    k = q.view(B, H, 1, D).expand(B, H, S, D).permute(2, 0, 1, 3).contiguous()  # (S, B, H, D): q.k ~ 1e5
    v = torch.randn(S, B, H, D, generator=gen)
    expected, _ = decode_attention(q.double(), k.double(), v.double())
    got, _ = decode_attention(q.half(), k.half(), v.half())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)
    mass = prompt_attention_mass(q.half().view(B, 1, H, D).expand(B, S, H, D), k.half().permute(1, 0, 2, 3))
    assert torch.isfinite(mass).all()


def test_the_engine_on_the_stand_in_pins_what_the_copy_engines_touch():
    """Flexgen's host K/V and staging rows are pinned, its device buffers are device tensors."""
    spec = get_model("tiny-opt")
    with fake_cuda(), Engine(spec, make_policy("flexgen"), "cuda", model=build_model(spec)) as engine:
        engine.generate(prompt_ids(spec, batch=1, length=12), 3)
        cache = engine.cache
        assert cache.host[0].t[0].is_pinned() and cache.staged[0].t[0].is_pinned()
        assert cache.fetch_bufs[0].t[0].is_cuda and not cache.fetch_bufs[0].t[0].is_pinned()


def test_the_paper_point_script_on_the_stand_in(monkeypatch, tmp_path, capsys):
    """experiments/gpu/paper_point.py (run_all.sh's last stage) at tiny sizes: tokens/s and H2D bytes."""
    path = Path(__file__).resolve().parent.parent / "experiments" / "gpu" / "paper_point.py"
    loaded = importlib.util.spec_from_file_location("paper_point", path)
    paper = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(paper)
    assert paper.main(["--dry-run"]) == 0 and "estimated" in capsys.readouterr().out
    for name, value in (("MODEL", "tiny-opt"), ("BATCH", 2), ("PROMPT", 24), ("GEN", 4)):
        monkeypatch.setattr(paper, name, value)
    out = tmp_path / "paper.jsonl"
    with fake_cuda() as cuda:
        assert paper.main(["--policies", "flexgen,infinigen", "--out", str(out)]) == 0
    assert not cuda.errors and "measured peak none" in capsys.readouterr().out
    flexgen, infinigen = (json.loads(line) for line in out.read_text().splitlines())
    spec = get_model("tiny-opt")
    per_row = 2 * spec.kv_bytes_per_token(2)  # batch 2, fp16 K and V
    assert flexgen["h2d_bytes_per_step"] == per_row * spec.n_layers * (24 + 25 + 26) / 3  # every row, 3 steps
    assert flexgen["fetched_fraction"] == 1.0 and flexgen["h2d_gbps_per_copy_s"] > 0
    assert 0 < infinigen["h2d_bytes_per_step"] < flexgen["h2d_bytes_per_step"] and infinigen["tokens_per_s"] > 0


def test_host_costs_time_the_dispatch_without_syncing_inside_the_clock():
    """host.csv on CUDA: a dispatch run only enqueues its bursts (no host sync among its 140 ops; one sync
    per run, after the clock stops, and the warm-up's); the sync row is `.item()` of a queued kernel."""
    with fake_cuda() as cuda:
        before = len(cuda.host_syncs)
        samples = dispatch_us(torch.device("cuda"), repeats=5, warmup=1)
        dispatch_syncs = len(cuda.host_syncs) - before
        rows = host_rows(torch.device("cuda"), repeats=5, warmup=1)
    assert len(samples) == 5 and min(samples) > 0 and dispatch_syncs == 1 + 5
    assert [r["op"] for r in rows] == ["dispatch", "sync"] and all(r["device"] == "cuda" for r in rows)
    assert all(r["median_us"] > 0 and r["status"] == "ok" for r in rows)
    assert any(what == "item of a device tensor" for _, what in cuda.host_syncs)
