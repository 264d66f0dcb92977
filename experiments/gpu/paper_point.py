"""Every policy at one paper-like point through profiler.run's engine: OPT-6.7B shapes (seeded random weights),
batch 8, prompt 1920, 32 generated tokens, fp16 on the GPU.

Prints per policy: tokens/s (decode, as profiler.run counts it), ms per decode step, the fetched fraction, and
the achieved H2D GB/s, two ways: K/V bytes fetched per decode second (what the link delivered to the whole
step) and per second of the copy stream's own H2D spans; beside the h2d pinned contiguous peak that the
bundle of the same run measured (transfers.csv; "none" without a bundle). One JSON line per policy goes to
--out. `--dry-run` prints the points and their first-principles estimate (profiler.bench.budget) instead.

    python experiments/gpu/paper_point.py --bundle OUT/bundle --out OUT/paper_point.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch

from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.policies import ALL_POLICIES, make_policy, stored_bytes_per_token
from profiler.bench import budget
from profiler.bench.transfers import peak_row
from profiler.run import RunConfig, build_engine, generate
from profiler.runtime.cuda_api import CUDA

MODEL, BATCH, PROMPT, GEN = "opt-6.7b", 8, 1920, 32


def measured_peak_gbps(bundle: Path | None) -> float | None:
    """The bundle's best h2d pinned contiguous copy measured alone (GB/s), if it has one."""
    path = bundle / "transfers.csv" if bundle else None
    if path is None or not path.is_file():
        return None
    row = peak_row(pd.read_csv(path), "h2d", "pinned")
    return None if row is None else float(row.gbps)


def run_policy(name: str) -> dict:
    """One warm-up and one measured generation of `name` at the point (profiler.run's build_engine/generate)."""
    config = RunConfig(model=MODEL, policy=name, batch_size=BATCH, prompt_len=PROMPT, gen_len=GEN, device="cuda",
                       warmup=1)
    policy = make_policy(name)
    spec = get_model(MODEL)
    with build_engine(config, policy, torch.device("cuda")) as engine:
        prompt = torch.randint(0, spec.vocab_size, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
        result = generate(engine, prompt, config)
    per_row = BATCH * stored_bytes_per_token(policy, spec, 2)
    fetched_bytes = sum(per_row * rows for step in result.steps for rows in step.fetched)
    h2d_s = sum(step.op_total_s(Op.H2D) for step in result.steps)
    steps = len(result.steps)
    return {"policy": name, "model": MODEL, "batch_size": BATCH, "prompt_len": PROMPT, "gen_len": GEN,
            "tokens_per_s": BATCH * steps / result.decode_s, "ms_per_step": 1e3 * result.decode_s / steps,
            "prefill_s": result.prefill_s, "fetched_fraction": result.fetched_fraction(policy.full_fetch_layers),
            "h2d_bytes_per_step": fetched_bytes / steps,
            "h2d_gbps_per_decode_s": fetched_bytes / result.decode_s / 1e9 if fetched_bytes else 0.0,
            "h2d_gbps_per_copy_s": fetched_bytes / h2d_s / 1e9 if h2d_s else 0.0}


def line(row: dict, peak: float | None) -> str:
    share = f"{100 * row['h2d_gbps_per_copy_s'] / peak:5.1f}% of peak" if peak and row["h2d_gbps_per_copy_s"] else ""
    return (f"  {row['policy']:<10} {row['tokens_per_s']:8.1f} tok/s  {row['ms_per_step']:8.2f} ms/step  "
            f"fetched {row['fetched_fraction']:.3f}  H2D {row['h2d_gbps_per_decode_s']:6.2f} GB/s per decode s, "
            f"{row['h2d_gbps_per_copy_s']:6.2f} GB/s per copy s  (measured peak "
            f"{f'{peak:.2f} GB/s' if peak else 'none'}) {share}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="bundle whose transfers.csv gives the measured H2D peak")
    parser.add_argument("--out", type=Path, help="JSON lines, one per policy (default: none)")
    parser.add_argument("--policies", default=",".join(ALL_POLICIES), help="comma list (default: every policy)")
    parser.add_argument("--dry-run", action="store_true", help="print the points and their estimate only")
    args = parser.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    spec, rates = get_model(MODEL), budget.Rates.of()
    head = f"paper-like point: {MODEL} shapes, batch {BATCH}, prompt {PROMPT}, gen {GEN}, fp16, cuda"
    if args.dry_run:
        seconds = {p: budget.run_s(p, spec, BATCH, PROMPT, GEN, 2, rates) for p in policies}
        print(head + f"; estimated {budget.STARTUP_S + budget.MARGIN * sum(seconds.values()):.0f} s on one "
              f"{budget.CARD} (" + ", ".join(f"{p} {s:.0f} s" for p, s in seconds.items()) + ")")
        return 0
    if not CUDA.is_available():
        print("paper_point: no CUDA device visible to torch", file=sys.stderr)
        return 2
    peak = measured_peak_gbps(args.bundle)
    print(head, flush=True)
    for name in policies:
        row = run_policy(name)
        print(line(row, peak), flush=True)
        if args.out:
            with args.out.open("a") as out:
                out.write(json.dumps({**row, "measured_h2d_peak_gbps": peak}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
