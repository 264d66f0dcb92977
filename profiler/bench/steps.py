"""End-to-end runs for steps.csv: each policy x a small batch x prompt grid through the runtime engine.

Validation data, not a cost table: one row per (run, phase, step, layer, op) with the seconds the
engine's PhaseTimer summed for that op, the step's context length and the K/V rows per sequence
fetched for that layer. Layer -1 holds what lies outside the decoder layers (embed, final norm,
lm_head) and, as op `wall`, the step's wall time, written last so that its presence marks a finished
run. Each run first does one untimed generation (allocator, kernels and copy worker warmed up), then
`repeats` recorded ones on the same prompt, in rounds over the runs of a model (one generation of
every run, then the next round), so that a slow spell of a shared box lands on one repeat of many
runs rather than on every repeat of one; every row is the median over the repeats (the wall of a
step, the prefill, each phase; the fetched rows too). Python's garbage collector is paused while a
generation is timed (`stats.gc_paused`, as timeit does).
The model is built once per zoo entry and shared by its runs: no policy writes the weights (InfiniGen
keeps its skew beside the model), so every run sees the weights as built whatever ran before it, and
the runs go in the order the policies are given (ideal first: the yardstick, then the offloaded ones).
Op names are `infinigen_sim.spec.ops.Op` values: the engine's spans summed per (layer, op).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch

from infinigen_sim.spec.bundle import STEP_KEY, WALL_OP, row_key
from infinigen_sim.spec.models import ModelSpec
from infinigen_sim.spec.policies import PolicyConfig, make_policy
from profiler.bench.stats import gc_paused, release_memory
from profiler.runtime.engine import Engine, default_dtype
from profiler.runtime.model import Transformer, build_model
from profiler.runtime.timing import MODEL_LAYER, StepRecord

SECONDS_DIGITS = 9  # steps.csv keeps nanoseconds: perf_counter's resolution, and a third of the bytes


@dataclass(frozen=True)
class StepGrid:
    """Which end-to-end runs validate the bundle."""

    batches: tuple[int, ...]
    prompt_lens: tuple[int, ...]
    gen_len: int  # tokens generated per run: gen_len - 1 decode steps
    repeats: int = 3  # recorded generations per run; rows are their medians


# Every point inside the kernel grid of the same device and mode (kernels.GRIDS).
STEP_GRIDS = {
    ("cuda", False): StepGrid((1, 8), (512, 1536), 32, 3),
    ("cuda", True): StepGrid((1, 8), (512,), 8, 3),
    ("cpu", False): StepGrid((4,), (512,), 14, 3),  # the four CPU presets: a bundle under 2 MB
    ("cpu", True): StepGrid((2,), (128, 256), 12, 5),  # 5 rounds: the ops go between (run_model)
}


@dataclass(frozen=True)
class StepRun:
    """One generation of one model under one policy."""

    model: str
    policy: str
    batch_size: int
    prompt_len: int
    gen_len: int

    @property
    def run_id(self) -> str:
        return f"{self.model}/{self.policy}/b{self.batch_size}/p{self.prompt_len}/g{self.gen_len}"

    @property
    def final_key(self) -> tuple[str, ...]:
        """The key of the run's last row (the last decode step's wall time)."""
        last = {"run_id": self.run_id, "phase": "decode", "step": self.gen_len - 2, "layer": MODEL_LAYER,
                "op": WALL_OP}
        return row_key(last, STEP_KEY)


def step_runs(models: list[ModelSpec], policies: list[str], grid: StepGrid) -> list[StepRun]:
    """Runs that fit each model's position table, the policies in the order given."""
    return [StepRun(spec.name, policy, b, prompt, grid.gen_len)
            for spec in models for policy in policies for b in grid.batches for prompt in grid.prompt_lens
            if prompt + grid.gen_len <= spec.max_positions]


def record_rows(run: StepRun, policy: PolicyConfig, phase: str, record: StepRecord) -> list[dict]:
    """One row per (layer, op) of a step record; the wall-time row last."""
    base = {"run_id": run.run_id, "model": run.model, "policy": run.policy, "batch_size": run.batch_size,
            "prompt_len": run.prompt_len, "gen_len": run.gen_len, "alpha": policy.alpha,
            "overlap": policy.overlap, "phase": phase, "step": record.step, "context_len": record.context_len}
    rows = [{**base, "layer": MODEL_LAYER, "op": op, "seconds": s, "fetched_tokens": 0}
            for op, s in record.model_op_s.items()]
    for layer, phases in enumerate(record.layer_op_s):
        rows += [{**base, "layer": layer, "op": op, "seconds": s, "fetched_tokens": record.fetched[layer]}
                 for op, s in phases.items()]
    rows.append({**base, "layer": MODEL_LAYER, "op": WALL_OP, "seconds": record.wall_s,
                 "fetched_tokens": sum(record.fetched)})
    return rows


class StepBench:
    """Runs generations through the engine, one shared model per zoo entry."""

    def __init__(self, device: torch.device, models: dict[str, ModelSpec], seed: int, repeats: int = 1) -> None:
        self.device, self.models, self.seed, self.repeats = device, models, seed, repeats
        self._model: tuple[str, Transformer] | None = None

    def model(self, name: str) -> Transformer:
        if self._model is None or self._model[0] != name:
            self._model = None
            release_memory(self.device)
            built = build_model(self.models[name], self.seed, self.device, default_dtype(self.device)).eval()
            self._model = (name, built)
        return self._model[1]

    def measure_runs(self, runs: list[StepRun], before_round: Callable[[int], None] = lambda r: None
                     ) -> Iterator[tuple[StepRun, list[dict]]]:
        """(run, rows) for every run, in rounds per group (a model; on CUDA a model, batch and prompt,
        so that the group's caches fit); a group's runs are yielded once its last round has run.
        `before_round(r)` runs before round r of every group, after its warm-up."""
        groups: dict[tuple, list[StepRun]] = {}  # in order of first appearance
        for run in runs:
            key = (run.model,) if self.device.type == "cpu" else (run.model, run.batch_size, run.prompt_len)
            groups.setdefault(key, []).append(run)
        for members in groups.values():
            results: dict[StepRun, list] = {run: [] for run in members}
            with ExitStack() as stack:
                engines, prompts = {}, {}
                for run in members:
                    spec = self.models[run.model]
                    gen = torch.Generator().manual_seed(self.seed)
                    prompts[run] = torch.randint(0, spec.vocab_size, (run.batch_size, run.prompt_len), generator=gen)
                    engines[run] = stack.enter_context(Engine(spec, make_policy(run.policy), self.device, None,
                                                              self.seed, model=self.model(run.model)))
                    engines[run].generate(prompts[run], run.gen_len)  # warm-up
                for r in range(self.repeats):
                    before_round(r)
                    for run in members:
                        with gc_paused():
                            results[run].append(engines[run].generate(prompts[run], run.gen_len))
            engines = prompts = None  # the group's caches go before the next group allocates its own
            release_memory(self.device)
            for run in members:
                yield run, run_rows(run, results[run])


def run_rows(run: StepRun, results: list) -> list[dict]:
    """A run's rows: the median over its recorded generations of every (phase, step, layer, op)."""
    policy = make_policy(run.policy)
    repeats = []
    for result in results:
        rows = record_rows(run, policy, "prefill", result.prefill)
        for record in result.steps:
            rows += record_rows(run, policy, "decode", record)
        repeats.append(rows)
    return median_rows(repeats)


def median_rows(repeats: list[list[dict]]) -> list[dict]:
    """The first repeat's rows, each with seconds (and fetched rows) the median over the repeats of its key.

    A (layer, op) that only some repeats recorded counts 0 seconds in the others."""
    values: dict[tuple[str, ...], list[tuple[float, int]]] = {}
    order: dict[tuple[str, ...], dict] = {}
    for rows in repeats:
        for row in rows:
            key = row_key(row, STEP_KEY)
            order.setdefault(key, row)
            values.setdefault(key, []).append((row["seconds"], row["fetched_tokens"]))
    out = []
    for key, row in order.items():
        got = values[key] + [(0.0, 0)] * (len(repeats) - len(values[key]))
        seconds, fetched = zip(*got, strict=True)
        out.append({**row, "seconds": round(float(np.median(seconds)), SECONDS_DIGITS),
                    "fetched_tokens": int(round(np.median(fetched)))})
    return out


def summary_lines(frame, models: dict[str, ModelSpec], dtype_bytes: int, ceiling_gbps: float | None) -> list[str]:
    """Per run: prefill and mean decode step, tokens/s, and the weights-read bandwidth of a decode step."""
    if frame.empty:
        return ["steps: none"]
    ceiling = f"{ceiling_gbps:.1f} GB/s" if ceiling_gbps else "none"
    lines = [f"steps (end to end; GB/s = layer weights and LM head read once per decode step, ceiling {ceiling})"]
    walls = frame[frame.op == WALL_OP]
    for run_id, run in walls.groupby("run_id", sort=False):
        spec = models.get(str(run.model.iloc[0]))
        decode = run[run.phase == "decode"]
        if spec is None or decode.empty:
            continue
        step_s = float(decode.seconds.mean())
        read = spec.n_layers * spec.layer_weight_bytes(dtype_bytes) + spec.vocab_size * spec.d_model * dtype_bytes
        gbps = read / step_s / 1e9
        share = f" {100 * gbps / ceiling_gbps:5.1f}% of ceiling" if ceiling_gbps else ""
        fetched = float(decode.fetched_tokens.mean()) / spec.n_layers
        prefill_ms = 1e3 * float(run[run.phase == "prefill"].seconds.sum())
        lines.append(f"  {run_id:<36} prefill {prefill_ms:8.1f} ms  decode {1e3 * step_s:7.2f} ms/step "
                     f"{int(run.batch_size.iloc[0]) / step_s:8.1f} tok/s  {gbps:6.2f} GB/s{share}  "
                     f"fetched {fetched:.0f} rows/layer")
    return lines
