"""`python -m profiler.run`: one generation of the runtime under one KV policy.

Thin entry: parse (`RunConfig` and the policy's own `PolicyConfig` fields), load the weights, seed the
prompt, run, print. Seeded random prompt token ids go through the engine (zoo models with installed
weights, e.g. smollm2-135m, run those weights unless --random-weights); it prints prefill_s, decode_s,
tokens_per_s (batch * decode steps / decode_s, FlexGen's decode throughput) and the mean fetched
fraction (layers >= full_fetch_layers, every step: rows fetched / context rows). With --check, the
full-KV (`ideal`) engine on the same weights is teacher-forced on the same token sequence and the
logits compared. With --skew FILE InfiniGen speculates with an offline skew calibration instead of
fitting one on each prompt. Errors are one line on stderr with exit status 2.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from infinigen_sim.spec.cli import (
    InputError,
    Parser,
    add_dataclass_arguments,
    check_writable,
    dataclass_from_args,
    report_error,
)
from infinigen_sim.spec.io import write_text_atomic
from infinigen_sim.spec.models import ModelSpec, UnknownModelError, get_model
from infinigen_sim.spec.policies import ALL_POLICIES, PolicyConfig, PolicyError, make_policy, parse_policy_name
from infinigen_sim.spec.trace import chrome_trace, trace_json
from profiler.runtime.cuda_api import CUDA
from profiler.runtime.engine import RUNTIME_DESCRIPTION, Engine, GenerationResult, default_device
from profiler.runtime.model import Transformer
from profiler.weights.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_spec, weight_files
from profiler.weights.pretrained import PRETRAINED, load_pretrained, pretrained_loader
from profiler.weights.skew_file import load_skew, read_header

PROG = "python -m profiler.run"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class RunConfig:
    """What one run generates, where, and what it reports (the flags besides the policy's)."""

    model: str = field(default="tiny-opt", metadata={"help": "model zoo name (ignored with --checkpoint)"})
    policy: str = field(default="infinigen", metadata={"help": f"KV policy: {', '.join(ALL_POLICIES)}"})
    batch_size: int = field(default=2, metadata={"help": "sequences decoded together", "unit": "sequences",
                                                 "minimum": 1})
    prompt_len: int = field(default=256, metadata={"help": "prompt length", "unit": "tokens", "minimum": 1})
    gen_len: int = field(default=16, metadata={"help": "tokens generated (gen_len - 1 decode steps)",
                                               "unit": "tokens", "minimum": 1})
    device: str | None = field(default=None, metadata={"help": "where to run (default: cuda when available)",
                                                       "choices": ("cuda", "cpu")})
    dtype: str | None = field(default=None, metadata={"help": "weights and KV (default: float16 on cuda, float32 "
                                                              "on cpu)", "choices": tuple(DTYPES)})
    checkpoint: str | None = field(default=None, metadata={
        "help": "local HF OPT/Llama checkpoint folder (default: the zoo model's seeded or installed weights)",
        "metavar": "DIR"})
    seed: int = field(default=0, metadata={"help": "seed of the weights (without --checkpoint) and the prompt"})
    random_weights: bool = field(default=False, metadata={
        "help": f"seeded random weights even for models with installed ones ({', '.join(PRETRAINED)})"})
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads (default: torch's)",
                                                        "minimum": 1})
    warmup: int = field(default=1, metadata={"help": "untimed generations before the measured one",
                                             "unit": "generations", "minimum": 0})
    check: bool = field(default=False, metadata={"help": "compare with the ideal policy, teacher-forced"})
    json: bool = field(default=False, metadata={"help": "one JSON object on stdout"})
    trace: str | None = field(default=None, metadata={
        "help": "write the measured generation's timeline as a Chrome trace in the simulator's shape (tracks: "
                "compute / H2D / D2H streams, dispatching thread, copy worker; ts and dur in us); "
                "`infinigen_sim.validate BUNDLE --trace FILE` puts the prediction beside it (default: none)",
        "metavar": "FILE.json"})
    skew: str | None = field(default=None, metadata={
        "help": "infinigen: offline skew calibration of the model (python -m profiler.accuracy --calibrate; "
                "default: fitted on each prompt)", "metavar": "FILE"})


def build_parser() -> Parser:
    parser = Parser(PROG, "Run one generation of the runtime under one KV policy on seeded random prompts; print "
                          "its times, throughput and fetched fraction.",
                    epilog="Units: lengths in tokens, times in seconds, tokens_per_s in tokens/s. Exit status: 0 "
                           "done, 2 bad input (checked before any weight is read) or an unwritable --trace, "
                           "130 interrupted.")
    add_dataclass_arguments(parser.add_argument_group("run"), RunConfig)
    policy = parser.add_argument_group("policy (defaults: the paper's; shares are of the context or prompt)")
    add_dataclass_arguments(policy, PolicyConfig, skip=("name",))
    return parser


def resolve_device(name: str | None) -> torch.device:
    if name == "cuda" and not CUDA.is_available():
        raise InputError("--device cuda: no CUDA device available")
    return torch.device(name) if name else default_device()


def load_weights(config: RunConfig) -> tuple[ModelSpec, Transformer] | None:
    """(spec, model) from --checkpoint or an installed pretrained model; None for seeded random weights."""
    if config.checkpoint is not None:
        return load_checkpoint(config.checkpoint)
    if config.model in PRETRAINED and not config.random_weights:
        return load_pretrained(config.model)
    return None


def build_engine(config: RunConfig, policy: PolicyConfig, device: torch.device) -> Engine:
    dtype = DTYPES[config.dtype] if config.dtype else None
    loaded = load_weights(config)
    if loaded is not None:
        spec, model = loaded
        return Engine(spec, policy, device, dtype, config.seed, model=model)
    return Engine(get_model(config.model), policy, device, dtype, config.seed)


def generate(engine: Engine, prompt: torch.Tensor, config: RunConfig) -> GenerationResult:
    """The warm-up generations, then the measured one (its timeline kept with --trace)."""
    for _ in range(config.warmup):
        engine.generate(prompt, config.gen_len)
    engine.timer.trace = config.trace is not None
    return engine.generate(prompt, config.gen_len, keep_logits=config.check)


def trace_metadata(engine: Engine, policy: PolicyConfig, config: RunConfig, result: GenerationResult) -> dict:
    """What `infinigen_sim.validate --trace` needs to predict the same run: its point, and the rows each
    layer fetched at each decode step (InfiniGen's speculation is workload, not timing)."""
    return {"source": "profiler.run", "runtime": RUNTIME_DESCRIPTION, "model": engine.spec.name,
            "device": engine.device.type, "dtype": str(engine.dtype).removeprefix("torch."),
            "policy": policy.name.value, "alpha": policy.alpha,
            "overlap": policy.overlap, "batch_size": config.batch_size, "prompt_len": config.prompt_len,
            "gen_len": config.gen_len, "threads": torch.get_num_threads(),
            "fetched_per_step": [list(map(int, step.fetched)) for step in result.steps],
            "step_wall_s": [step.wall_s for step in result.steps], "prefill_wall_s": result.prefill.wall_s}


def compare(result: GenerationResult, prompt: torch.Tensor, engine: Engine) -> dict:
    """The ideal policy on the engine's own weights (no policy writes them), teacher-forced on the
    tokens `result` produced."""
    with Engine(engine.spec, make_policy("ideal"), engine.device, engine.dtype, model=engine.model) as reference:
        ref = reference.generate(prompt, result.tokens.shape[1], forced=result.tokens, keep_logits=True)
    assert result.logits is not None and ref.logits is not None
    agree = (result.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean().item()
    return {"top1_agreement": agree, "max_abs_logit_diff": (result.logits - ref.logits).abs().max().item()}


def check_before_work(config: RunConfig) -> torch.device:
    """Everything that can be checked before any weight is read: the device, the --trace path, the model's
    shapes (the zoo, or --checkpoint's config.json and weight files) and the lengths against its positions."""
    device = resolve_device(config.device)
    if config.trace is not None:
        check_writable("--trace", config.trace, folder=False)
    try:
        spec = read_checkpoint_spec(config.checkpoint) if config.checkpoint is not None else get_model(config.model)
    except UnknownModelError as exc:
        raise InputError(f"--model: {exc}") from None
    total = config.prompt_len + config.gen_len
    if total > spec.max_positions:
        raise InputError(f"--prompt-len {config.prompt_len} + --gen-len {config.gen_len} = {total} tokens exceeds "
                         f"{spec.name}'s max_positions {spec.max_positions}")
    if config.checkpoint is not None:
        weight_files(Path(config.checkpoint))
    elif config.model in PRETRAINED and not config.random_weights:
        pretrained_loader(config.model)  # its packages and weights file are there
    return device


def run(config: RunConfig, policy: PolicyConfig) -> dict:
    """One generation (and its check) -> the printed figures."""
    device = check_before_work(config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)  # a shared 2-core box: OpenMP barriers stall on busy cores
    if config.skew is not None:
        if policy.name.value != "infinigen":
            raise InputError(f"--skew: only the infinigen policy speculates, not {policy.name.value}")
        read_header(config.skew)  # before the weights load
    with build_engine(config, policy, device) as engine:
        print(f"device: {device.type}", file=sys.stderr if config.json else sys.stdout)  # after any error
        engine.check_lengths(config.prompt_len, config.gen_len)
        if config.skew is not None:
            spec = engine.spec
            engine.cache.configure(calibration=load_skew(config.skew, spec.name, spec.n_kv_heads, spec.head_dim,
                                                         spec.n_layers, policy.full_fetch_layers))
        gen = torch.Generator().manual_seed(config.seed)
        prompt = torch.randint(0, engine.spec.vocab_size, (config.batch_size, config.prompt_len), generator=gen)
        result = generate(engine, prompt, config)
        if config.trace is not None:
            trace = chrome_trace(engine.timer.timeline, metadata=trace_metadata(engine, policy, config, result))
            write_text_atomic(Path(config.trace), trace_json(trace))
        steps = len(result.steps)
        out = {
            "policy": policy.name.value, "model": engine.spec.name, "device": device.type,
            "dtype": str(engine.dtype).removeprefix("torch."), "batch_size": config.batch_size,
            "prompt_len": config.prompt_len, "gen_len": config.gen_len, "overlap": policy.overlap,
            "threads": torch.get_num_threads(), "alpha": policy.alpha, "max_fetch_ratio": policy.max_fetch_ratio,
            "prefill_s": result.prefill_s, "decode_s": result.decode_s,
            "tokens_per_s": config.batch_size * steps / result.decode_s if steps else 0.0,
            "fetched_fraction": result.fetched_fraction(policy.full_fetch_layers),
        }
        if policy.name.value == "infinigen":
            out["skew"] = Path(config.skew).name if config.skew else "fitted on the prompt"
        if config.check:
            out.update(compare(result, prompt, engine))
    return out


def _jsonable(value: object) -> object:
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def policy_from_args(args: object, name: str) -> PolicyConfig:
    """The policy the flags ask for; an unknown --policy is named as the flag (a bad parameter by its field)."""
    try:
        parse_policy_name(name)
    except PolicyError as exc:
        raise InputError(f"--policy: {exc}") from None
    return dataclass_from_args(PolicyConfig, args, skip=("name",), name=name)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, its one line already printed)
        return int(exc.code or 0)
    config = dataclass_from_args(RunConfig, args)
    try:
        policy = policy_from_args(args, config.policy)
        out = run(config, policy)
    except (InputError, PolicyError, UnknownModelError, CheckpointError, ValueError) as exc:
        return report_error(PROG, exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if config.json:
        print(json.dumps({k: _jsonable(v) for k, v in out.items()}, allow_nan=False))
    else:
        for key, value in out.items():
            print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
