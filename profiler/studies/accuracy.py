"""The paper's accuracy study on a real model: perplexity against fetched fraction for every KV policy.

Protocol (the defaults): a P = 1024-token prompt of the evaluation text (PG-19's first book) prefilled
at full attention, then E = 1024 teacher-forced positions, each predicted by the masked full-sequence
forward of masked.py (= the decode path, row for row). InfiniGen's skew and partial columns are fitted
once, offline, on 2048 tokens of another text (Tiny Shakespeare; calibrate.py), per KV head, post-RoPE.

Settings (`settings`): ideal (the reference); InfiniGen over `alphas` (under max_fetch_ratio, with the
count floor min_fetch_ratio) and over fixed `budgets` (alpha inf under a cap of the budget: floor(b x
context) rows per step), for every skew mode, rank rule and partial ratio asked for; the oracle at the
same per-(layer, step) row counts as each InfiniGen setting of the first skew mode and partial ratio;
H2O at each budget (a fixed row budget B whose mean share of the evaluated contexts is the budget,
split evenly between heavy and recent rows); INT4. Per setting: perplexity, per-chunk perplexity,
top-1 agreement with full KV, fetched fraction (mean over steps and layers >= full_fetch_layers, and
per layer) and K/V bytes read; the rows follow infinigen_sim.spec.accuracy, the table the planner reads.
`python -m profiler.accuracy` is the command line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch.nn.functional as F
from tqdm import tqdm

from infinigen_sim.spec.models import ModelSpec
from infinigen_sim.spec.policies import PolicyConfig, make_policy, stored_bytes_per_token
from profiler.runtime.model import Transformer
from profiler.runtime.skew import RANKS, Selection, SkewCalibration
from profiler.studies.masked import FullAttention, PassResult, Selector, Window, eval_pass, run_prefix
from profiler.studies.selectors import HeavyHitterRows, InfiniGenRows, OracleRows, QuantizedRows
from profiler.weights.pretrained import PRETRAINED
from profiler.weights.texts import PG19_TEXT, SHAKESPEARE_TEXT

_DEFAULT = {f.name: f.default for f in fields(PolicyConfig)}
FULL_LAYERS = _DEFAULT["full_fetch_layers"]
SKEW_MODES = ("offline", "prompt", "none")
STUDY_POLICIES = ("ideal", "infinigen", "oracle", "h2o", "int4")
# No count floor by default: the runtime's rule (skew.Selection with min_fetch_ratio 0); the fixed-budget
# rows show what a floor would buy (--min-fetch-ratio sets one for the alpha settings).
DEFAULT_MIN_FETCH_RATIO = 0.0
# SmolLM2-135M's partial ratio, read off the measured sweep (profiles/smollm2-135m-accuracy-2026-12-01/
# partial_ratio.csv, 10 % budget, 1024 + 1024 tokens of PG-19): ppl +24.1 % at 0.1, +11.6 % at 0.2, +7.9 % at
# 0.3 (the paper's OPT value), +3.8 % at 0.5, +4.4 % at 1.0: the knee is 0.5, i.e. 32 of its 64 head
# columns, about the paper's 0.3 x 128 = 38 columns of OPT. profiler.run's default stays the paper's 0.3.
DEFAULT_PARTIAL_RATIO = 0.5


@dataclass(frozen=True)
class AccuracyConfig:
    """What the accuracy study evaluates, and where (the flags of `python -m profiler.accuracy`)."""

    model: str = field(default="smollm2-135m", metadata={"help": "pretrained model", "choices": tuple(PRETRAINED)})
    text: str = field(default=str(PG19_TEXT), metadata={"help": "text evaluated", "metavar": "FILE"})
    prompt_len: int = field(default=1024, metadata={"help": "tokens prefilled at full attention", "unit": "tokens",
                                                    "minimum": 1})
    eval_tokens: int = field(default=1024, metadata={"help": "positions predicted after the prompt (teacher-forced)",
                                                     "unit": "tokens", "minimum": 1})
    policies: tuple[str, ...] = field(default=STUDY_POLICIES, metadata={
        "help": "policies (ideal always runs: the reference; oracle needs infinigen)", "what": "policy"})
    alphas: tuple[float, ...] = field(default=(4.0, 6.0, 8.0, math.inf), metadata={
        "help": "InfiniGen alphas, under --max-fetch-ratio (inf: the cap decides)", "what": "alpha", "minimum": 0,
        "allow_inf": True})
    budgets: tuple[float, ...] = field(default=(0.05, 0.1, 0.2), metadata={
        "help": "fixed fetched fractions: InfiniGen and the oracle (floor(b x context) rows), H2O's budget",
        "unit": "share of the context", "what": "budget", "minimum": 0})
    partial_ratios: tuple[float, ...] = field(default=(DEFAULT_PARTIAL_RATIO,), metadata={
        "help": "InfiniGen partial ratios (the sweep: 0.1,0.2,0.3,0.5,1; the default is SmolLM2's knee of that "
                "sweep, 32 of 64 columns)", "unit": "share of head_dim",
        "what": "partial ratio"})
    max_fetch_ratio: float = field(default=_DEFAULT["max_fetch_ratio"], metadata={
        "help": "cap of the alpha settings", "unit": "share of the context"})
    min_fetch_ratio: float = field(default=DEFAULT_MIN_FETCH_RATIO, metadata={
        "help": "count floor of the alpha settings", "unit": "share of the context"})
    skews: tuple[str, ...] = field(default=("offline",), metadata={
        "help": f"InfiniGen skew modes: {', '.join(SKEW_MODES)} (offline: --skew-file, or fitted on "
                "--calibration-text; prompt: fitted on each prompt; none: unskewed columns)", "what": "skew mode"})
    ranks: tuple[str, ...] = field(default=("sum",), metadata={
        "help": f"GQA ranking rules: {', '.join(RANKS)} (skew.Selection)", "what": "rank rule"})
    skew_file: str | None = field(default=None, metadata={
        "help": "offline skew calibration to use (default: fitted now on --calibration-text)", "metavar": "FILE"})
    calibration_text: str = field(default=str(SHAKESPEARE_TEXT), metadata={
        "help": "text the offline skew is fitted on (not the evaluated one)", "metavar": "FILE"})
    calibration_tokens: int = field(default=2048, metadata={"help": "tokens of it used", "unit": "tokens",
                                                            "minimum": 16})
    calibrate: str | None = field(default=None, metadata={
        "help": "only fit the offline skew on --calibration-text, write it here and exit", "metavar": "FILE"})
    baseline_full_layers: int = field(default=0, metadata={
        "help": "first layers H2O and INT4 leave full (0: every layer, as the runtime; 2: the paper's artifact)",
        "unit": "layers", "minimum": 0})
    chunk: int = field(default=256, metadata={"help": "positions per perplexity chunk", "unit": "tokens",
                                              "minimum": 1})
    out: str | None = field(default=None, metadata={"help": "CSV to write, rewritten after every setting "
                                                            "(default: none)", "metavar": "FILE.csv"})
    plot: str | None = field(default=None, metadata={"help": "plot perplexity vs fetched fraction here",
                                                      "metavar": "FILE.png"})
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads (default: torch's)",
                                                        "minimum": 1})
    device: str = field(default="cpu", metadata={"help": "where to run (float32 on either)",
                                                 "choices": ("cpu", "cuda")})


@dataclass(frozen=True)
class Setting:
    """One row of the study: a policy, its parameters and how its rows are chosen."""

    label: str
    policy: str  # a spec.accuracy.POLICIES name
    config: PolicyConfig
    budget: float | None = None
    skew: str | None = None
    selection: Selection | None = None
    count_of: str | None = None  # oracle: the InfiniGen setting whose row counts it uses
    full_layers: int = 0


def _infinigen_label(alpha: float, budget: float | None, ratio: float, skew: str, rank: str,
                     config: AccuracyConfig) -> str:
    head = f"infinigen b={budget:g}" if budget is not None else f"infinigen a={alpha:g}"
    extra = [f"r={ratio:g}" if len(config.partial_ratios) > 1 else "", f"skew={skew}" if len(config.skews) > 1
             else "", f"rank={rank}" if len(config.ranks) > 1 else ""]
    return " ".join([head, *(e for e in extra if e)])


def infinigen_settings(config: AccuracyConfig) -> list[Setting]:
    """Alphas then budgets, for every skew mode, rank rule and partial ratio; alpha inf under the cap c is
    the budget-c setting (one row)."""
    cap = config.max_fetch_ratio
    points = [(a, None, cap) if math.isfinite(a) else (a, cap, cap) for a in config.alphas]
    points += [(math.inf, b, b) for b in config.budgets]
    out: dict[tuple, Setting] = {}
    for skew in config.skews:
        for rank in config.ranks:
            for ratio in config.partial_ratios:
                for alpha, budget, limit in points:
                    floor = config.min_fetch_ratio if budget is None else 0.0  # a budget fixes the count
                    policy = make_policy("infinigen", alpha=alpha, partial_ratio=ratio, max_fetch_ratio=limit)
                    label = _infinigen_label(alpha, budget, ratio, skew, rank, config)
                    out.setdefault((skew, rank, ratio, alpha, limit), Setting(
                        label, "infinigen", policy, budget, skew, Selection(rank, floor),
                        full_layers=policy.full_fetch_layers))
    return list(out.values())


def h2o_budget_rows(fraction: float, contexts: list[int]) -> int:
    """Rows B >= 2 whose mean of min(c, B) / c over the decode contexts is nearest `fraction`."""
    def share(rows: int) -> float:
        return sum(min(c, rows) / c for c in contexts) / len(contexts)

    lo, hi = 2, max(contexts)
    while lo < hi:  # the fewest rows reaching the fraction (share grows with B)
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if share(mid) < fraction else (lo, mid)
    return lo - 1 if lo > 2 and fraction - share(lo - 1) < share(lo) - fraction else lo


def h2o_setting(fraction: float, contexts: list[int], prompt_len: int, full_layers: int) -> Setting:
    """H2O with B = h2o_budget_rows rows, heavy and recent halves (ratios of the prompt, at most 1 each)."""
    rows = min(h2o_budget_rows(fraction, contexts), 2 * prompt_len)
    heavy, recent = (rows + 1) // 2, rows // 2
    policy = make_policy("h2o", heavy_ratio=heavy / prompt_len, recent_ratio=recent / prompt_len)
    return Setting(f"h2o b={fraction:g}", "h2o", policy, budget=fraction, full_layers=full_layers)


def settings(config: AccuracyConfig, contexts: list[int]) -> list[Setting]:
    """Every setting the config asks for, in run order (ideal first, each oracle after its InfiniGen)."""
    wanted = set(config.policies)
    out = [Setting("ideal", "ideal", make_policy("ideal"))]
    if "infinigen" in wanted or "oracle" in wanted:
        ig = infinigen_settings(config)
        paired = {s.label for s in ig if s.skew == config.skews[0] and s.config.partial_ratio ==
                  config.partial_ratios[0]}
        for s in ig:
            out.append(s)
            if "oracle" in wanted and s.label in paired:
                label = "oracle " + s.label.removeprefix("infinigen ")
                out.append(Setting(label, "oracle", s.config, s.budget, None, s.selection, s.label, s.full_layers))
    if "h2o" in wanted:
        out += [h2o_setting(b, contexts, config.prompt_len, config.baseline_full_layers) for b in config.budgets]
    if "int4" in wanted:
        out.append(Setting("int4", "int4", make_policy("int4"), full_layers=config.baseline_full_layers))
    return out


@dataclass
class Study:
    """What every pass shares: the model, the window, the prompt's pass, the full-KV pass, calibrations."""

    spec: ModelSpec
    model: Transformer
    window: Window
    calibrations: dict[str, SkewCalibration | None]  # skew mode -> calibration (prompt: None)
    text: str
    chunk: int = 256

    def __post_init__(self) -> None:
        self.selectors: dict[str, InfiniGenRows] = {}
        self.ideal: PassResult | None = None

    def prepare(self) -> None:
        """The prompt's pass and the full-KV pass every other pass starts from (the ideal setting's row)."""
        self.prefix = run_prefix(self.model, self.window)
        self.ideal = eval_pass(self.model, self.window, self.prefix, FullAttention(), keep_trace=True)
        self.reference_top1 = self.ideal.logits.argmax(dim=-1)

    def selector(self, s: Setting) -> Selector:
        if s.policy == "infinigen":
            sel = InfiniGenRows(self.model, s.config, s.selection, self.calibrations[s.skew], self.prefix)
            self.selectors[s.label] = sel
            return sel
        if s.policy == "oracle":
            return OracleRows(s.full_layers, self.selectors[s.count_of].rows, s.selection.rank)
        if s.policy == "h2o":
            return HeavyHitterRows(s.config, self.window.prompt_len, s.full_layers)
        if s.policy == "int4":
            return QuantizedRows(s.config, s.full_layers)
        return FullAttention()

    def run(self, s: Setting) -> dict:
        t0 = time.perf_counter()
        if self.ideal is None:
            self.prepare()
        result = self.ideal if s.policy == "ideal" else eval_pass(self.model, self.window, self.prefix,
                                                                  self.selector(s), start=self.ideal.trace)
        return self.row(s, result, time.perf_counter() - t0)

    def row(self, s: Setting, result: PassResult, seconds: float) -> dict:
        """The spec.accuracy row of one setting's pass."""
        targets = self.window.targets.to(result.logits.device)
        nll = F.cross_entropy(result.logits, targets, reduction="none")
        layer_share = (result.rows.double() / self.window.positions.double()).mean(dim=1)  # (L,)
        ig = s.policy in ("infinigen", "oracle")
        quant = stored_bytes_per_token(s.config, self.spec) / stored_bytes_per_token(make_policy("ideal"), self.spec)
        per_byte = [quant if s.policy == "int4" and layer >= s.full_layers else 1.0
                    for layer in range(len(layer_share))]
        return {
            "model": self.spec.name, "setting": s.label, "policy": s.policy,
            "alpha": s.config.alpha if ig else None, "budget": s.budget,
            "max_fetch_ratio": s.config.max_fetch_ratio if ig else None,
            "partial_ratio": s.config.partial_ratio if s.policy == "infinigen" else None,
            "skew": s.skew, "rank": s.selection.rank if ig else None,
            "min_fetch_ratio": s.selection.min_fetch_ratio if s.policy == "infinigen" else None,
            "count_of": s.count_of,
            "heavy_ratio": s.config.heavy_ratio if s.policy == "h2o" else None,
            "recent_ratio": s.config.recent_ratio if s.policy == "h2o" else None,
            "full_layers": s.full_layers if s.policy != "ideal" else self.spec.n_layers, "text": self.text,
            "prompt_len": self.window.prompt_len, "eval_tokens": self.window.eval_tokens,
            "fetched_fraction": float(layer_share[FULL_LAYERS:].mean()),
            "kv_bytes_ratio": float(sum(f * b for f, b in zip(layer_share.tolist(), per_byte, strict=True))
                                    / len(per_byte)),
            "perplexity": math.exp(nll.mean().item()),
            "top1_agreement": (result.logits.argmax(-1).cpu() == self.reference_top1.cpu()).float().mean().item(),
            "chunk_perplexity": [math.exp(c.mean().item()) for c in nll.split(self.chunk)],
            "layer_fetched_fraction": layer_share.tolist(), "seconds": seconds,
        }


def run_study(study: Study, todo: list[Setting], on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every setting in order, with a progress bar (ETA over settings); on_row(rows) after each."""
    rows: list[dict] = []
    with tqdm(total=len(todo), unit="setting", desc="accuracy", dynamic_ncols=True) as bar:
        for s in todo:
            bar.set_postfix_str(s.label, refresh=True)
            rows.append(study.run(s))
            ideal = rows[0]["perplexity"]
            rows[-1]["ppl_increase_pct"] = 100 * (rows[-1]["perplexity"] / ideal - 1)
            bar.update(1)
            if on_row is not None:
                on_row(rows)
    return rows
