"""Capacity planning: the cheapest hardware, policy and batch that meet a throughput target.

Every (hardware, policy, batch) is simulated at the one request shape. Definitions:
  tokens_per_s   generated tokens per second of the whole run, batch * gen_len / (prefill_s + decode_s)
                 (the sweep's definition: the prefill counts against throughput)
  ms_per_token   per-sequence time per output token after the first, 1e3 * decode_s / (gen_len - 1):
                 each decode step emits one token for every sequence in the batch (prefill_s, the
                 time to the first token, is reported apart as ttft_s)
  usd_per_mtok   cost_per_hour_usd / 3600 / tokens_per_s * 1e6, dollars per million generated tokens
A configuration meets the target when tokens_per_s >= the target and (if given) ms_per_token <= the
limit. Hardware without a price is ranked after every priced one, marked 'no price'.

Accuracy-aware (`max_ppl_increase`): with an accuracy table of the model (infinigen_sim.spec.accuracy,
written by profiler.accuracy) each policy is searched only at its cheapest measured setting whose
perplexity is within the limit of full KV's: the one fetching the fewest rows (ties: the lower
perplexity). ideal and flexgen read every row at full precision (lossless); int4 and h2o are the
table's rows with the runtime's layers (full_layers 0); infinigen any of its rows, simulated with
that row's measured per-layer fetched fractions (spec.accuracy.measured_fetch_model); h2o at its
measured fetched fraction (a fixed budget of fraction / mean(1 / context) rows over the request's
decode steps, heavy and recent halves). A policy with no setting within the limit is left out; the
oracle is a bound, never planned.
The command line is `infinigen_sim.plan`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from infinigen_sim.spec.accuracy import measured_fetch_model
from infinigen_sim.spec.fetch import FetchModel
from infinigen_sim.spec.policies import ALL_POLICIES, PolicyConfig, make_policy
from infinigen_sim.spec.runtime import DEFAULT_RUNTIME
from infinigen_sim.sweep.grid import SweepGrid, expand_points
from infinigen_sim.sweep.run import run_sweep

NO_PRICE = "no price"


@dataclass(frozen=True)
class PlanRequest:
    """What a deployment must deliver, and the space searched for it."""

    model: str = field(metadata={"help": "model name from the zoo (infinigen_sim.spec.models)"})
    prompt_len: int = field(metadata={"help": "prompt length", "unit": "tokens", "minimum": 1})
    gen_len: int = field(metadata={"help": "tokens generated per sequence (ms/token needs a decode step)",
                                   "unit": "tokens", "minimum": 2})
    target_tokens_per_s: float = field(metadata={"help": "generated tokens/s the deployment must reach",
                                                 "unit": "tokens/s", "minimum": 0.0})
    max_ms_per_token: float | None = field(default=None, metadata={
        "help": "per-sequence ms per output token after the first must not exceed this", "unit": "ms",
        "minimum": 0.0})
    policies: tuple[str, ...] = field(default=ALL_POLICIES, metadata={"help": "KV policies", "what": "policy"})
    batch_sizes: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 32, 64, 128, 256), metadata={
        "help": "batch sizes searched", "unit": "sequences", "minimum": 1, "what": "batch size"})
    runtime: str = field(default=DEFAULT_RUNTIME, metadata={
        "help": "runtime description: a name in infinigen_sim/runtimes/ (infinigen-sim: this project's runtime; "
                "infinigen-artifact: the paper's) or a YAML path", "metavar": "NAME|PATH"})
    max_ppl_increase: float | None = field(default=None, metadata={
        "help": "plan each policy at its cheapest measured setting within this perplexity increase over full KV "
                "(needs an accuracy table: --accuracy, or the model's under profiles/)", "unit": "%",
        "minimum": 0.0})
    accuracy: str | None = field(default=None, metadata={
        "help": "accuracy table (profiler.accuracy --out; default with --max-ppl-increase: the newest "
                "profiles/*/accuracy.csv of --model)", "metavar": "FILE.csv"})


@dataclass(frozen=True)
class AccuracyPick:
    """The setting a policy is planned at: from the accuracy table, or full KV (lossless)."""

    policy: str
    setting: str
    ppl_increase_pct: float
    fetched_fraction: float
    config: PolicyConfig
    fetch_model: FetchModel | None = None
    perplexity: float | None = None


LOSSLESS = ("ideal", "flexgen")  # every row at full precision: full KV's perplexity


def pick_settings(table: pd.DataFrame, model: str, policies: Sequence[str], limit_pct: float,
                  source: str) -> tuple[list[AccuracyPick], list[str]]:
    """Per policy the cheapest setting of `model` within limit_pct, and a note per policy left out."""
    rows = table[table["model"] == model]
    ideal = rows[rows["policy"] == "ideal"].iloc[0]
    picks, notes = [], []
    for policy in policies:
        if policy in LOSSLESS:
            picks.append(AccuracyPick(policy, "full KV (lossless)", 0.0, 1.0, make_policy(policy), None,
                                      float(ideal["perplexity"])))
            continue
        mine = rows[rows["policy"] == policy]
        if policy in ("h2o", "int4"):
            mine = mine[mine["full_layers"] == 0]  # the runtime's and the simulator's (every layer)
        within = mine[mine["ppl_increase_pct"] <= limit_pct]
        if within.empty:
            best = f"; best +{mine['ppl_increase_pct'].min():.2f} %" if not mine.empty else ""
            notes.append(f"{policy}: no measured setting within +{limit_pct:g} %{best} (left out)")
            continue
        row = within.sort_values(["fetched_fraction", "perplexity"], kind="stable").iloc[0]
        picks.append(_pick(policy, row, source))
    return picks, notes


def _pick(policy: str, row: pd.Series, source: str) -> AccuracyPick:
    fetch_model = None
    if policy == "infinigen":
        config = make_policy("infinigen", alpha=row["alpha"], partial_ratio=row["partial_ratio"],
                             max_fetch_ratio=row["max_fetch_ratio"])
        fetch_model = measured_fetch_model(row["layer_fetched_fraction"], f"{source}: '{row['setting']}'")
    elif policy == "h2o":
        config = make_policy("h2o")  # the budget follows the request's shape (h2o_at_fraction)
    else:
        config = make_policy(policy)
    return AccuracyPick(policy, str(row["setting"]), float(row["ppl_increase_pct"]), float(row["fetched_fraction"]),
                        config, fetch_model, float(row["perplexity"]))


def h2o_at_fraction(fraction: float, prompt_len: int, gen_len: int) -> PolicyConfig:
    """H2O whose fixed budget reads `fraction` of the cached rows on average over the request's decode steps."""
    contexts = range(prompt_len, prompt_len + max(gen_len - 1, 1))
    rows = fraction / (sum(1 / c for c in contexts) / len(contexts))
    share = min(1.0, rows / 2 / prompt_len)
    return make_policy("h2o", heavy_ratio=share, recent_ratio=share)


# ---- search ----------------------------------------------------------------------------------
def evaluate(hw_configs: Sequence[str | Path], request: PlanRequest, jobs: int = 1,
             picks: Sequence[AccuracyPick] | None = None) -> pd.DataFrame:
    """Every (hardware, policy, batch) at the request's shape, with the plan columns added; with `picks`
    each policy at its picked setting (and a `setting` column)."""
    policies = request.policies if picks is None else tuple(p.policy for p in picks)
    grid = SweepGrid(models=(request.model,), policies=policies, batch_sizes=request.batch_sizes,
                     prompt_lens=(request.prompt_len,), gen_lens=(request.gen_len,), runtime=(request.runtime,))
    points = expand_points(hw_configs, grid)
    if picks is not None:
        chosen = {p.policy: p for p in picks}
        points = [replace(pt, policy=_planned_policy(chosen[pt.policy.name.value], request),
                          fetch_model=chosen[pt.policy.name.value].fetch_model) for pt in points]
    frame = run_sweep(points, jobs)
    if picks is not None:
        frame["setting"] = frame["policy"].map({p.policy: p.setting for p in picks})
    prices = {p.hw.name: p.hw.cost_per_hour_usd for p in points}
    return add_plan_columns(frame, prices, request)


def _planned_policy(pick: AccuracyPick, request: PlanRequest) -> PolicyConfig:
    if pick.policy == "h2o":
        return h2o_at_fraction(pick.fetched_fraction, request.prompt_len, request.gen_len)
    return pick.config


def add_plan_columns(frame: pd.DataFrame, prices: dict[str, float | None], request: PlanRequest) -> pd.DataFrame:
    """ttft_s, ms_per_token, cost_per_hour_usd, usd_per_mtok, meets_target, on_pareto, rank."""
    out = frame.copy()
    out["ttft_s"] = out["prefill_s"]
    out["ms_per_token"] = 1e3 * out["decode_s"] / (out["gen_len"] - 1)
    out["cost_per_hour_usd"] = out["hw"].map(lambda name: prices.get(name)).astype(float)
    out["usd_per_mtok"] = out["cost_per_hour_usd"] / 3600 / out["tokens_per_s"] * 1e6
    fast_enough = out["tokens_per_s"] >= request.target_tokens_per_s
    if request.max_ms_per_token is not None:
        fast_enough &= out["ms_per_token"] <= request.max_ms_per_token
    out["meets_target"] = out["fits"] & fast_enough
    out["on_pareto"] = pareto_mask(out)
    order = ranked(out)
    out["rank"] = pd.Series(range(1, len(order) + 1), index=order.index).reindex(out.index).astype("Int64")
    return out


def pareto_mask(frame: pd.DataFrame) -> pd.Series:
    """True where no other fitting point has both more tokens/s and fewer ms per token (ties kept once:
    the first in the frame's order)."""
    mask = pd.Series(False, index=frame.index)
    fits = frame[frame["fits"] & frame["tokens_per_s"].notna()]
    best = -math.inf
    for index, row in fits.sort_values(["ms_per_token", "tokens_per_s"], ascending=[True, False],
                                       kind="stable").iterrows():
        if row["tokens_per_s"] > best:
            mask[index] = True
            best = row["tokens_per_s"]
    return mask


def ranked(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows meeting the target, cheapest first: priced by $/Mtok, then unpriced by tokens/s."""
    meets = frame[frame["meets_target"]]
    priced = meets[meets["usd_per_mtok"].notna()].sort_values(
        ["usd_per_mtok", "tokens_per_s", "key"], ascending=[True, False, True], kind="stable")
    unpriced = meets[meets["usd_per_mtok"].isna()].sort_values(
        ["tokens_per_s", "key"], ascending=[False, True], kind="stable")
    return pd.concat([priced, unpriced])


def best_per_hardware(frame: pd.DataFrame) -> pd.DataFrame:
    """The first-ranked configuration of each hardware that meets the target, in rank order."""
    return ranked(frame).drop_duplicates("hw", keep="first")


# ---- text ------------------------------------------------------------------------------------
_SHOWN = {"hw": "hardware", "policy": "policy", "batch_size": "batch", "tokens_per_s": "tokens/s",
          "ms_per_token": "ms/token", "ttft_s": "ttft s", "cost_per_hour_usd": "$/hour", "usd_per_mtok": "$/Mtok",
          "bottleneck": "bound by"}


def table_text(rows: pd.DataFrame) -> str:
    """Rows as an aligned table; unpriced hardware reads 'no price'; the accuracy setting when planned so."""
    columns = {**_SHOWN, "setting": "setting"} if "setting" in rows.columns else _SHOWN
    shown = rows[list(columns)].copy()
    shown["tokens_per_s"] = shown["tokens_per_s"].map(lambda v: f"{v:.4g}")
    shown["ms_per_token"] = shown["ms_per_token"].map(lambda v: f"{v:.4g}")
    shown["ttft_s"] = shown["ttft_s"].map(lambda v: f"{v:.4g}")
    shown["cost_per_hour_usd"] = shown["cost_per_hour_usd"].map(lambda v: NO_PRICE if pd.isna(v) else f"{v:.4g}")
    shown["usd_per_mtok"] = shown["usd_per_mtok"].map(lambda v: NO_PRICE if pd.isna(v) else f"{v:.4g}")
    return shown.rename(columns=columns).to_string(index=False)


def picks_text(picks: Sequence[AccuracyPick], notes: Sequence[str], source: str, table: pd.DataFrame,
               request: PlanRequest) -> str:
    """Which setting each policy is planned at, and why the others are left out."""
    ideal = table[(table["model"] == request.model) & (table["policy"] == "ideal")].iloc[0]
    lines = [f"accuracy: {source} ({request.model} on {ideal['text']}, prompt {ideal['prompt_len']} + "
             f"{ideal['eval_tokens']} evaluated tokens, full-KV perplexity {ideal['perplexity']:.3f}); each policy "
             f"at its cheapest measured setting within +{request.max_ppl_increase:g} % perplexity:"]
    for p in picks:
        how = {"infinigen": "fetch = its measured per-layer fraction x context",
               "h2o": "its measured fraction of the rows on average (fixed budget)"}.get(p.policy, "")
        lines.append(f"  {p.policy:<10} {p.setting:<28} ppl {p.perplexity:8.3f} {p.ppl_increase_pct:+7.2f} %  "
                     f"fetched {p.fetched_fraction:.4f}  {how}".rstrip())
    lines += [f"  {note}" for note in notes]
    if ideal["prompt_len"] != request.prompt_len:
        lines.append(f"  (measured at prompt {ideal['prompt_len']}, planned at {request.prompt_len}: fetched fractions "
                     "held constant; alpha settings select a falling share at longer contexts, so their fetch is "
                     "overstated there)")
    return "\n".join(lines)


def target_text(request: PlanRequest) -> str:
    limit = f" and <= {request.max_ms_per_token:g} ms/token" if request.max_ms_per_token is not None else ""
    return f">= {request.target_tokens_per_s:g} tokens/s{limit}"


def report_text(frame: pd.DataFrame, request: PlanRequest) -> str:
    """What the command prints when something meets the target."""
    best = best_per_hardware(frame)
    fitting = frame[frame["fits"]]
    pareto = frame[frame["on_pareto"]].sort_values("ms_per_token", kind="stable")
    lines = [
        f"{request.model}, prompt {request.prompt_len} + {request.gen_len} generated tokens; target "
        f"{target_text(request)}; runtime {frame['runtime'].iloc[0]}",
        f"searched {len(frame)} configurations ({frame['hw'].nunique()} hardware x {frame['policy'].nunique()} "
        f"policies x {len(request.batch_sizes)} batch sizes), {len(fitting)} fit in memory, "
        f"{int(frame['meets_target'].sum())} meet the target",
        "tokens/s = batch * gen_len / (prefill + decode); ms/token = per-sequence decode time per output "
        "token after the first; ttft = prefill; $/Mtok = $/hour / 3600 / tokens/s * 1e6",
        "",
        "Cheapest configuration per hardware meeting the target (priced first, by $/Mtok):",
        table_text(best),
        "",
    ]
    if "setting" in frame.columns:  # accuracy-aware: each policy at its planned setting
        per_policy = ranked(frame).drop_duplicates("policy", keep="first")
        lines += ["Cheapest configuration per policy meeting the target, at its planned setting:",
                  table_text(per_policy), ""]
    lines += [
        "Pareto front, throughput vs per-token latency (all fitting configurations; * = meets the target):",
        table_text(pareto.assign(policy=[f"{p}{' *' if m else ''}" for p, m in
                                         zip(pareto["policy"], pareto["meets_target"], strict=True)])),
    ]
    return "\n".join(lines)


def unmet_text(frame: pd.DataFrame, request: PlanRequest) -> str:
    """One line when nothing meets the target: the best throughput reachable, and where."""
    fitting = frame[frame["fits"] & frame["tokens_per_s"].notna()]
    if fitting.empty:
        return (f"no configuration fits in memory for {request.model} at prompt {request.prompt_len} + "
                f"{request.gen_len} (batch sizes {','.join(map(str, request.batch_sizes))})")
    top = fitting.loc[fitting["tokens_per_s"].idxmax()]
    text = (f"no configuration meets {target_text(request)}: best achievable is {top['tokens_per_s']:.4g} tokens/s "
            f"({top['policy']}, batch {top['batch_size']} on {top['hw']}, {top['ms_per_token']:.4g} ms/token)")
    if request.max_ms_per_token is not None:
        within = fitting[fitting["ms_per_token"] <= request.max_ms_per_token]
        if within.empty:
            text += f"; none is within {request.max_ms_per_token:g} ms/token"
        else:
            top = within.loc[within["tokens_per_s"].idxmax()]
            text += (f"; within {request.max_ms_per_token:g} ms/token: {top['tokens_per_s']:.4g} tokens/s "
                     f"({top['policy']}, batch {top['batch_size']} on {top['hw']})")
    return text


CSV_COLUMNS = ["rank", "meets_target", "on_pareto", "hw", "model", "policy", "batch_size", "prompt_len", "gen_len",
               "fits", "tokens_per_s", "ms_per_token", "ttft_s", "cost_per_hour_usd", "usd_per_mtok", "bottleneck",
               "gpu_mem_gib", "host_mem_gib", "weights_streamed_pct", "reason", "key"]


def plan_csv(frame: pd.DataFrame) -> str:
    """Every evaluated configuration: ranked ones first in rank order, then the rest in search order."""
    ordered = pd.concat([ranked(frame), frame[~frame["meets_target"]]])
    columns = [*CSV_COLUMNS[:6], "setting", *CSV_COLUMNS[6:]] if "setting" in frame.columns else CSV_COLUMNS
    return ordered[columns].to_csv(index=False, float_format="%.6g")
