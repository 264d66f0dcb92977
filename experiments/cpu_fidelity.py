"""Why a CPU bundle's ops used to mispredict its own steps on this shared box: three side-by-side figures.

The three measurements behind the 2026-12-02 changes to the CPU collection (issue 13), re-runnable:
  drift      a fixed nn.Linear (2, 1, 256) -> 1024 timed every 0.5 s: how far the box's speed wanders over
             seconds (why `collection.run_model` deals a model's op sweep over the rounds of its runs)
  context    tiny-opt decode attention at 128 cached rows, us per layer: the kernel bench's attention pass
             with its layers' QKV/MLP context between (as it is now, `kernel_passes.in_context`), the same
             pass with the context taken out (as it was), and inside the engine's own decode steps
  handoff    what a layer's copy-worker jobs cost the compute thread, us: the bench as it is now (decode
             layers, jobs issued per layer, `bench.handoff.handoff_samples`) beside the one it replaced
             (one small matmul in a loop until a single layer's jobs finished)
Each line is measured in this run, side by side; nothing is read from a bundle.

    python experiments/cpu_fidelity.py [--seconds 30] [--samples 10]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from infinigen_sim.spec.cli import InputError, Parser, parse_float, parse_int
from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.ops import Op
from profiler.bench import handoff
from profiler.bench.kernel_passes import Pass, cache_pass
from profiler.bench.kernels import run_passes
from profiler.bench.stats import gc_paused
from profiler.bench.steps import StepBench, StepRun
from profiler.runtime.model import build_model
from profiler.runtime.timing import PhaseTimer
from profiler.runtime.transfer import Copier

MODEL, BATCH, KV_LEN = "tiny-opt", 2, 128


def drift(seconds: float) -> str:
    layer, x = torch.nn.Linear(256, 1024), torch.randn(2, 1, 256)
    times = []
    with torch.inference_mode():
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            for _ in range(200):
                layer(x)
            times.append((time.perf_counter() - t0) / 200 * 1e6)
            time.sleep(0.5)
    lo, p10, p50, p90, hi = np.percentile(times, [0, 10, 50, 90, 100])
    return (f"drift: Linear 256->1024 on (2, 1, 256), {len(times)} samples over {seconds:g} s: "
            f"min {lo:.0f} p10 {p10:.0f} median {p50:.0f} p90 {p90:.0f} max {hi:.0f} us (max/min {hi / lo:.2f}x)")


def attention_us(p: Pass, samples: int) -> float:
    with torch.inference_mode(), gc_paused():
        got, _ = run_passes(p, torch.device("cpu"), samples, 1)
    return float(np.median(got[Op.ATTENTION]))


def context(samples: int) -> str:
    spec = get_model(MODEL)
    model = build_model(spec, 0, "cpu", torch.float32).eval()
    builder = next(b for b in cache_pass(model, spec.n_layers, BATCH, KV_LEN, 0) if Op.ATTENTION in b.ops)
    with torch.inference_mode():
        within = builder.build()
        alone = Pass([e for e in within.entries if e.op is not None], within.timer, within.n_layers, within.keep)
    with_ctx, without = attention_us(within, samples), attention_us(alone, samples)
    bench = StepBench(torch.device("cpu"), {MODEL: spec}, 0, 3)
    _, rows = next(bench.measure_runs([StepRun(MODEL, "ideal", BATCH, KV_LEN, 8)]))
    step = [r["seconds"] for r in rows if r["op"] == Op.ATTENTION.value and r["phase"] == "decode" and r["layer"] >= 0]
    return (f"context: {MODEL} attention b{BATCH} at {KV_LEN} rows: bench with layer context {with_ctx:.0f} us, "
            f"bench alone {without:.0f} us, engine step {np.median(step) * 1e6:.0f} us")


def mm_loop_samples(policy: str, samples: int, generator: torch.Generator) -> list[float]:
    """The handoff bench before 2026-12-02: one small matmul per span, looped until one layer's jobs finish."""
    spec, timer = get_model(MODEL), PhaseTimer(False)
    copier = Copier(torch.device("cpu"), True, timer)
    x, w = torch.randn(2, 256, generator=generator), torch.randn(256, 256, generator=generator)

    def unit() -> None:
        with timer.span(Op.NORM, 0):
            torch.mm(x, w)

    def sample(jobs: Callable) -> float:
        alone = []
        for _ in range(16):
            t0 = time.perf_counter()
            unit()
            alone.append(time.perf_counter() - t0)
        t0, futures, units = time.perf_counter(), jobs(), 0
        while units == 0 or not all(f.done() for f in futures):
            unit()
            units += 1
        seconds = time.perf_counter() - t0 - units * float(np.median(alone))
        for future in futures:
            future.result()
        timer.collect(spec.n_layers)
        return seconds * 1e6

    try:
        with torch.inference_mode(), gc_paused():
            jobs = handoff.layer_jobs(policy, spec, KV_LEN, copier, timer, generator)
            for _ in range(3):
                sample(jobs)
            return [sample(jobs) for _ in range(samples)]
    finally:
        copier.close()


def handoff_lines(samples: int) -> list[str]:
    spec, gen = get_model(MODEL), torch.Generator().manual_seed(0)
    lines = []
    for policy in handoff.HANDOFF_POLICIES:
        now = np.median(handoff.handoff_samples(policy, spec, KV_LEN, samples, gen))
        before = np.median(mm_loop_samples(policy, samples, gen))
        lines.append(f"handoff: {MODEL} {policy} at {KV_LEN} rows: decode layers, jobs per layer {now:.0f} us; "
                     f"matmul loop until one layer's jobs finish {before:.0f} us ({before / now:.2f}x)")
    return lines


def _arg(parse: Callable, flag: str, minimum: float) -> Callable[[str], float]:
    def check(text: str) -> float:
        try:
            return parse(text, flag, minimum)
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return check


def main(argv: list[str] | None = None) -> int:
    parser = Parser("python experiments/cpu_fidelity.py", __doc__.split("\n\n")[0],
                    epilog="Prints one drift line, one context line and a handoff line per offloaded policy; "
                           "exit status 0, 2 on a bad flag.")
    parser.add_argument("--seconds", type=_arg(parse_float, "--seconds", 0.5), default=30.0,
                        help="how long the drift probe runs [s]")
    parser.add_argument("--samples", type=_arg(parse_int, "--samples", 2), default=10,
                        help="timed passes of the attention pass; samples per handoff figure [count]")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as profiler.collect on CPU
    print(drift(args.seconds), flush=True)
    print(context(args.samples), flush=True)
    for line in handoff_lines(args.samples):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
