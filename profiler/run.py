"""Run one generation of the runtime: `python -m profiler.run --model M --policy P [...]`.

Seeded random prompt token ids through the engine (zoo models with installed weights, e.g.
smollm2-135m, run those weights unless --random-weights); prints prefill_s, decode_s, tokens_per_s
(batch * decode steps / decode_s, FlexGen's decode throughput) and the mean fetched fraction
(layers >= full_fetch_layers, every step: rows fetched / context rows). With --check, the full-KV
(`ideal`) engine is teacher-forced on the same token sequence and the logits compared. Errors are
one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import fields
from pathlib import Path

import torch

from infinigen_sim.models import ModelSpec, UnknownModelError, get_model
from infinigen_sim.policies import ALL_POLICIES, PolicyConfig, PolicyError, make_policy
from profiler.runtime.checkpoint import PRETRAINED, CheckpointError, load_checkpoint, load_pretrained
from profiler.runtime.engine import Engine, GenerationResult, default_device
from profiler.runtime.model import Transformer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_POLICY_HELP = {f.name: f.metadata.get("help", "") for f in fields(PolicyConfig)}
POLICY_FLAGS = ("alpha", "partial_ratio", "max_fetch_ratio", "full_fetch_layers", "pool_ratio")


class UsageError(ValueError):
    """A bad command line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m profiler.run", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-opt", help="model zoo name (ignored with --checkpoint)")
    p.add_argument("--policy", default="infinigen", help=f"one of {', '.join(ALL_POLICIES)}")
    for name in POLICY_FLAGS:  # defaults stay in PolicyConfig: unset flags are not passed on
        kind = int if name == "full_fetch_layers" else float
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=_POLICY_HELP[name])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=16)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--checkpoint", type=Path, default=None, help="local HF OPT/Llama checkpoint directory")
    p.add_argument("--seed", type=int, default=0, help="weights (without --checkpoint) and prompt")
    p.add_argument("--random-weights", action="store_true",
                   help=f"seeded random weights even for models with installed ones ({', '.join(PRETRAINED)})")
    p.add_argument("--no-overlap", action="store_true", help="fetch a layer's KV only when it starts")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations before the measured one")
    p.add_argument("--check", action="store_true", help="compare with the ideal policy, teacher-forced")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--trace", type=Path, default=None, help="write a torch.profiler Chrome trace")
    return p


def policy_from_args(args: argparse.Namespace) -> PolicyConfig:
    overrides = {name: getattr(args, name) for name in POLICY_FLAGS if getattr(args, name) is not None}
    if args.no_overlap:
        overrides["overlap"] = False
    return make_policy(args.policy, **overrides)


def check_sizes(args: argparse.Namespace) -> None:
    for flag in ("batch_size", "prompt_len", "gen_len"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")


def resolve_device(name: str | None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device available")
    return torch.device(name) if name else default_device()


def load_weights(args: argparse.Namespace) -> tuple[ModelSpec, Transformer] | None:
    """(spec, model) from --checkpoint or an installed pretrained model; None for seeded random weights."""
    if args.checkpoint is not None:
        return load_checkpoint(args.checkpoint)
    if args.model in PRETRAINED and not args.random_weights:
        return load_pretrained(args.model)
    return None


def build_engine(args: argparse.Namespace, policy: PolicyConfig, device: torch.device) -> Engine:
    dtype = DTYPES[args.dtype] if args.dtype else None
    loaded = load_weights(args)
    if loaded is not None:
        spec, model = loaded
        return Engine(spec, policy, device, dtype, args.seed, model=model)
    return Engine(get_model(args.model), policy, device, dtype, args.seed)


def fetched_fraction(result: GenerationResult, first_layer: int) -> float:
    ratios = [s.fetched[i] / s.context_len for s in result.steps for i in range(first_layer, len(s.fetched))]
    return sum(ratios) / len(ratios) if ratios else 0.0


def generate(engine: Engine, prompt: torch.Tensor, args: argparse.Namespace) -> GenerationResult:
    for _ in range(args.warmup):
        engine.generate(prompt, args.gen_len)
    if args.trace is None:
        return engine.generate(prompt, args.gen_len, keep_logits=args.check)
    engine.timer.trace = True
    activities = [torch.profiler.ProfilerActivity.CPU]
    if engine.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        result = engine.generate(prompt, args.gen_len, keep_logits=args.check)
    prof.export_chrome_trace(str(args.trace))
    return result


def compare(result: GenerationResult, args: argparse.Namespace, prompt: torch.Tensor, engine: Engine) -> dict:
    """The ideal policy on the same weights, teacher-forced on the tokens `result` produced."""
    ideal = make_policy("ideal")
    loaded = load_weights(args)  # fresh weights: OPT's InfiniGen folds its skew into the engine's copy
    if loaded is not None:
        spec, model = loaded
        reference = Engine(spec, ideal, engine.device, engine.dtype, args.seed, model=model)
    else:
        reference = Engine(engine.spec, ideal, engine.device, engine.dtype, args.seed)
    with reference:
        ref = reference.generate(prompt, args.gen_len, forced=result.tokens, keep_logits=True)
    assert result.logits is not None and ref.logits is not None
    agree = (result.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean().item()
    return {"top1_agreement": agree, "max_abs_logit_diff": (result.logits - ref.logits).abs().max().item()}


def run(args: argparse.Namespace) -> dict:
    check_sizes(args)
    policy = policy_from_args(args)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # a shared 2-core box: OpenMP barriers stall on busy cores
    print(f"device: {device.type}", file=sys.stderr if args.json else sys.stdout)
    with build_engine(args, policy, device) as engine:
        gen = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(0, engine.spec.vocab_size, (args.batch_size, args.prompt_len), generator=gen)
        engine.check_lengths(args.prompt_len, args.gen_len)
        result = generate(engine, prompt, args)
        steps = len(result.steps)
        out = {
            "policy": policy.name.value, "model": engine.spec.name, "device": device.type,
            "dtype": str(engine.dtype).removeprefix("torch."), "batch_size": args.batch_size,
            "prompt_len": args.prompt_len, "gen_len": args.gen_len, "overlap": policy.overlap,
            "threads": torch.get_num_threads(),
            "alpha": policy.alpha, "max_fetch_ratio": policy.max_fetch_ratio,
            "prefill_s": result.prefill_s, "decode_s": result.decode_s,
            "tokens_per_s": args.batch_size * steps / result.decode_s if steps else 0.0,
            "fetched_fraction": fetched_fraction(result, policy.full_fetch_layers),
        }
        if args.check:
            out.update(compare(result, args, prompt, engine))
    return out


def _jsonable(value: object) -> object:
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        out = run(args)
    except (UsageError, PolicyError, UnknownModelError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: _jsonable(v) for k, v in out.items()}, allow_nan=False))
    else:
        for key, value in out.items():
            print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
