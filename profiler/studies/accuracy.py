"""The paper's accuracy study on a real model: perplexity and top-1 agreement of each KV policy.

Teacher-forced in decode mode through the runtime engine: the first `prefix` tokens of the text are
the prompt (prefill), then every later token is fed by Engine.generate(forced=...) and predicted by a
decode step that attends only over the rows its policy keeps or fetches. Per setting: perplexity over
the decoded predictions, top1_agreement with the full-KV (`ideal`) argmax at the same positions,
fetched_fraction (rows attention read / cached rows, mean over decode steps and layers >=
full_fetch_layers) and kv_bytes_ratio (K/V bytes attention read per step over all layers, against
the full-precision cache: int4 reads every row at ~0.28 of the bytes).

Settings: InfiniGen over `alphas` at `partial_ratio`, and over `partial_ratios` at `alpha` (the paper's
defaults, 0.3 and 4, are the shared point), all under `max_fetch_ratio`; H2O at a KV budget matching
InfiniGen's measured fetched fraction at that shared point, split evenly between heavy and recent rows
(H2O's budget is fixed in rows, so B rows are chosen so that the mean of min(context, B) / context over
the decode steps equals that fraction; the CSV's heavy_ratio / recent_ratio are the runtime's, shares
of the prompt); int4 at its own budget. `python -m profiler.accuracy` is the command line.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from infinigen_sim.spec.models import ModelSpec
from infinigen_sim.spec.policies import PolicyConfig, PolicyError, PolicyName, make_policy, stored_bytes_per_token
from profiler.runtime.engine import Engine, GenerationResult
from profiler.runtime.model import Transformer
from profiler.weights.pretrained import PRETRAINED
from profiler.weights.texts import PG19_TEXT

_DEFAULT = {f.name: f.default for f in fields(PolicyConfig)}
FULL_LAYERS = _DEFAULT["full_fetch_layers"]
COLUMNS = ["policy", "alpha", "partial_ratio", "max_fetch_ratio", "heavy_ratio", "recent_ratio", "tokens",
           "perplexity", "top1_agreement", "fetched_fraction", "kv_bytes_ratio", "decode_s"]


@dataclass(frozen=True)
class AccuracyConfig:
    """What the accuracy study evaluates, and where (the flags of `python -m profiler.accuracy`)."""

    model: str = field(default="smollm2-135m", metadata={"help": "pretrained model", "choices": tuple(PRETRAINED)})
    text: str = field(default=str(PG19_TEXT), metadata={"help": "text file to evaluate", "metavar": "FILE"})
    max_tokens: int = field(default=1024, metadata={"help": "tokens of the text evaluated (prefix included)",
                                                    "unit": "tokens", "minimum": 3})
    prefix: int = field(default=64, metadata={"help": "tokens prefilled as the prompt before decoding",
                                              "unit": "tokens", "minimum": 1})
    alphas: tuple[float, ...] = field(default=(1.0, 2.0, 3.0, 4.0, 5.0, math.inf), metadata={
        "help": "InfiniGen alphas, at --partial-ratio (inf: every row)", "what": "alpha", "minimum": 0,
        "allow_inf": True})
    partial_ratios: tuple[float, ...] = field(default=(0.1, 0.2, 0.3, 0.5, 1.0), metadata={
        "help": "InfiniGen partial ratios, at --alpha", "unit": "share of head_dim", "what": "partial ratio"})
    alpha: float = field(default=_DEFAULT["alpha"], metadata={"help": "alpha of the partial-ratio sweep",
                                                              "minimum": 0, "allow_inf": True})
    partial_ratio: float = field(default=_DEFAULT["partial_ratio"], metadata={
        "help": "partial ratio of the alpha sweep", "unit": "share of head_dim"})
    max_fetch_ratio: float = field(default=_DEFAULT["max_fetch_ratio"], metadata={
        "help": "InfiniGen's per-layer cap (1 = no cap)", "unit": "share of the context"})
    policies: tuple[str, ...] = field(default=("ideal", "infinigen", "h2o", "int4"), metadata={
        "help": "policies to evaluate (ideal always runs: it is the reference)", "what": "policy"})
    out: str | None = field(default=None, metadata={"help": "CSV to write, rewritten after every setting "
                                                            "(default: none)", "metavar": "FILE.csv"})
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads (default: torch's; "
                                                                "1 on a busy box)", "minimum": 1})
    device: str = field(default="cpu", metadata={"help": "where to run (float32 on either)",
                                                 "choices": ("cpu", "cuda")})
    skew_stats: bool = field(default=False, metadata={"help": "also print the skewing statistics on the text"})


def infinigen_settings(config: AccuracyConfig) -> list[PolicyConfig]:
    """The alpha sweep at config.partial_ratio, then the partial-ratio sweep at config.alpha, deduplicated."""
    points = [(a, config.partial_ratio) for a in config.alphas]
    points += [(config.alpha, r) for r in config.partial_ratios]
    points.append((config.alpha, config.partial_ratio))  # H2O's budget is matched here
    return [make_policy("infinigen", alpha=a, partial_ratio=r, max_fetch_ratio=config.max_fetch_ratio)
            for a, r in dict.fromkeys(points)]


def h2o_budget_rows(fraction: float, contexts: list[int]) -> int:
    """Rows B >= 2 whose mean of min(c, B) / c over the decode contexts is nearest `fraction`."""
    def share(rows: int) -> float:
        return sum(min(c, rows) / c for c in contexts) / len(contexts)

    lo, hi = 2, max(contexts)
    while lo < hi:  # the fewest rows reaching the fraction (share grows with B)
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if share(mid) < fraction else (lo, mid)
    return lo - 1 if lo > 2 and fraction - share(lo - 1) < share(lo) - fraction else lo


def h2o_matching(fraction: float, contexts: list[int], prompt_len: int) -> PolicyConfig:
    """H2O with B = h2o_budget_rows rows, heavy and recent halves (ratios of the prompt, at most 1 each)."""
    rows = min(h2o_budget_rows(fraction, contexts), 2 * prompt_len)
    heavy, recent = (rows + 1) // 2, rows // 2
    return make_policy("h2o", heavy_ratio=heavy / prompt_len, recent_ratio=recent / prompt_len)


def teacher_forced(engine: Engine, ids: Tensor, prefix: int) -> tuple[GenerationResult, Tensor]:
    """Prefill ids[:, :prefix], feed the rest -> (result, logits (n, vocab) of the decode steps).

    Decode step t feeds ids[prefix + t] and predicts ids[prefix + t + 1]; the prefill's own
    prediction (full attention for every policy) is left out.
    """
    result = engine.generate(ids[:, :prefix], ids.shape[1] - prefix, forced=ids[:, prefix:], keep_logits=True)
    assert result.logits is not None
    return result, result.logits[1:, 0]


def evaluate(spec: ModelSpec, model: Transformer, policy: PolicyConfig, ids: Tensor, prefix: int,
             reference_top1: Tensor | None, device: str = "cpu") -> tuple[dict, GenerationResult, Tensor]:
    """One setting -> (CSV row, its generation, its argmax at each decoded position)."""
    with Engine(spec, policy, device, torch.float32, model=model) as engine:
        t0 = time.perf_counter()
        result, logits = teacher_forced(engine, ids, prefix)
        seconds = time.perf_counter() - t0
    logits = logits.cpu()
    targets = ids[0, prefix + 1 :]
    top1 = logits.argmax(dim=-1)
    ideal = policy.name is PolicyName.IDEAL
    all_layers = 1.0 if ideal else result.fetched_fraction(0)
    bytes_ratio = stored_bytes_per_token(policy, spec) / stored_bytes_per_token(make_policy("ideal"), spec)
    infinigen, h2o = policy.name is PolicyName.INFINIGEN, policy.name is PolicyName.H2O
    row = {
        "policy": policy.name.value,
        "alpha": policy.alpha if infinigen else None,
        "partial_ratio": policy.partial_ratio if infinigen else None,
        "max_fetch_ratio": policy.max_fetch_ratio if infinigen else None,
        "heavy_ratio": policy.heavy_ratio if h2o else None,
        "recent_ratio": policy.recent_ratio if h2o else None,
        "tokens": len(targets),
        "perplexity": math.exp(F.cross_entropy(logits, targets).item()),
        "top1_agreement": 1.0 if reference_top1 is None else (top1 == reference_top1).float().mean().item(),
        "fetched_fraction": 1.0 if ideal else result.fetched_fraction(FULL_LAYERS),
        "kv_bytes_ratio": all_layers * bytes_ratio,
        "decode_s": seconds,
    }
    return row, result, top1


def run_accuracy(config: AccuracyConfig, spec: ModelSpec, model: Transformer, ids: Tensor,
                 on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every setting the config asks for, ideal first; on_row(rows) after each (to save progress)."""
    wanted = set(config.policies)
    unknown = wanted - {p.value for p in PolicyName}
    if unknown:
        raise PolicyError(f"unknown policies: {', '.join(sorted(unknown))}")
    settings = infinigen_settings(config) if "infinigen" in wanted else []
    extra = [make_policy(name) for name in ("flexgen", "int4") if name in wanted]
    n_runs = 1 + len(settings) + ("h2o" in wanted) + len(extra)
    rows: list[dict] = []
    steps = ids.shape[1] - config.prefix - 1
    with tqdm(total=n_runs * steps, unit="tok", desc="accuracy", dynamic_ncols=True) as bar:
        def run(policy: PolicyConfig, reference: Tensor | None) -> tuple[dict, GenerationResult, Tensor]:
            bar.set_postfix_str(_label(policy), refresh=True)
            row, result, top1 = evaluate(spec, model, policy, ids, config.prefix, reference, config.device)
            rows.append(row)
            bar.update(steps)
            if on_row is not None:
                on_row(rows)
            return row, result, top1

        _, ideal_result, reference = run(make_policy("ideal"), None)
        shared = None
        for policy in settings:
            row, _, _ = run(policy, reference)
            if (policy.alpha, policy.partial_ratio) == (config.alpha, config.partial_ratio):
                shared = row["fetched_fraction"]
        if "h2o" in wanted:
            fraction = shared if shared is not None else 0.2  # no InfiniGen run: H2O's own default budget
            contexts = [s.context_len for s in ideal_result.steps]
            run(h2o_matching(fraction, contexts, config.prefix), reference)
        for policy in extra:
            run(policy, reference)
    return rows


def _label(policy: PolicyConfig) -> str:
    if policy.name is PolicyName.INFINIGEN:
        return f"infinigen a={policy.alpha:g} r={policy.partial_ratio:g}"
    if policy.name is PolicyName.H2O:
        return f"h2o {policy.heavy_ratio:.3g}+{policy.recent_ratio:.3g}"
    return policy.name.value


def _cell(value: object, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict], prefix: int) -> str:
    """The printed table: one line per setting."""
    head = (f"{'policy':<10}{'alpha':>6}{'ratio':>7}{'cap':>6}{'heavy+recent':>14}{'ppl':>9}{'top1':>8}"
            f"{'fetched':>9}{'kv bytes':>10}{'s':>7}")
    lines = [head]
    for r in rows:
        budget = "-"
        if r["heavy_ratio"] is not None:
            budget = f"{round(r['heavy_ratio'] * prefix) + round(r['recent_ratio'] * prefix)} rows"
        lines.append(f"{r['policy']:<10}{_cell(r['alpha'], 3):>6}{_cell(r['partial_ratio'], 3):>7}"
                     f"{_cell(r['max_fetch_ratio'], 3):>6}{budget:>14}{r['perplexity']:>9.3f}"
                     f"{r['top1_agreement']:>8.4f}{r['fetched_fraction']:>9.4f}{r['kv_bytes_ratio']:>10.4f}"
                     f"{r['decode_s']:>7.1f}")
    return "\n".join(lines)


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    return buffer.getvalue()


def check(config: AccuracyConfig, n_ids: int) -> None:
    """ValueError naming the flag when the text is too short for the prefix."""
    if config.prefix < 1 or config.prefix + 2 > n_ids:
        raise ValueError(f"--prefix {config.prefix}: need 1 <= prefix <= tokens - 2 ({n_ids} tokens)")
