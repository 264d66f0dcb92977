"""InfiniGen's speculated rows on a real checkpoint against context length: fetch.csv and its summary.

For each alpha and context length n, `FetchBench` prefills windows of a long text (Tiny Shakespeare
by default) through the runtime engine under the `infinigen` policy and decodes `steps` teacher-forced
tokens at contexts n - steps - 1 ... n - 2 (so n fits SmolLM2's 8192 positions). After each step it
reads, per speculated layer, the rows the speculation selected (skew.Selection, the runtime's rule:
per query head the rows above its max - alpha, the mean over every query head, before the
max_fetch_ratio cap) from the cache, the same number the copy worker caps into the rows it fetches.
The skew is fitted on each window's prompt, or taken from an offline calibration file (`skew`).
One fetch.csv row per (model, 'checkpoint', alpha, layer, n): fetched_tokens is
that count averaged over windows x steps (= samples); layers below full_fetch_layers fetch every
row and record the context. This is what spec.fetch.FetchModel models ("before the cap"); the
simulator applies the cap itself. The summary prints `spec.fetch.fit_fetch`, the one fit
`sweep --profile` uses: count = a * n^b per layer group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from infinigen_sim.spec.bundle import FETCH_KEY, row_key
from infinigen_sim.spec.fetch import CHECKPOINT_SOURCE, fit_fetch, layer_groups
from infinigen_sim.spec.models import ModelSpec
from infinigen_sim.spec.policies import infinigen_cap, make_policy
from profiler.runtime.engine import Engine
from profiler.runtime.model import Transformer
from profiler.runtime.skew import DEFAULT_SELECTION, SkewCalibration
from profiler.weights.pretrained import load_pretrained
from profiler.weights.skew_file import load_skew
from profiler.weights.texts import SHAKESPEARE_TEXT, load_text_ids

DEFAULT_TEXT = SHAKESPEARE_TEXT


@dataclass(frozen=True)
class FetchGrid:
    """Which contexts the fetch pass measures, and how many decode steps average each count."""

    contexts: tuple[int, ...]
    windows: int  # text windows per context (evenly spaced through the text)
    steps: int  # teacher-forced decode steps per window


FETCH_GRIDS = {  # quick -> grid
    False: FetchGrid((512, 1024, 2048, 4096, 8192), windows=2, steps=8),
    True: FetchGrid((512, 1024), windows=1, steps=4),
}


def csv_alpha(alpha: float) -> float | int:
    """alpha as fetch.csv holds it: 4, not 4.0, so that a key read back equals the key written."""
    return int(alpha) if float(alpha).is_integer() else float(alpha)


def window_starts(n_ids: int, length: int, windows: int) -> list[int]:
    """`windows` start offsets of `length`-token windows spread evenly over n_ids tokens."""
    if length > n_ids:
        raise ValueError(f"a {length}-token window does not fit in a {n_ids}-token text")
    if windows == 1:
        return [0]
    return [round(i * (n_ids - length) / (windows - 1)) for i in range(windows)]


@torch.inference_mode()
def speculated_counts(engine: Engine, prompt: Tensor, forced: Tensor) -> list[list[float]]:
    """Prefill prompt (1, S), decode the forced tokens (1, steps) -> [step][layer] rows selected.

    The steps are driven one by one (Engine.generate does the same loop) so that each step's
    speculation count can be read before the next overwrites it.
    """
    S, steps = prompt.shape[1], forced.shape[1]
    engine.setup_caches(1, S, steps)
    engine.prefill(prompt.to(engine.device))
    cache, n_layers = engine.cache, engine.spec.n_layers
    counts = []
    for t in range(steps):
        engine.decode_one_token(forced[:, t : t + 1].to(engine.device), S + t)  # drains the copy worker
        engine.timer.discard()  # drop the step's phase spans, once complete
        counts.append([float(cache.selected_host[layer]) if layer in cache.speculated else float(S + t)
                       for layer in range(n_layers)])
    return counts


@dataclass(frozen=True)
class FetchPass:
    """What a fetch pass measures: a pretrained checkpoint, alphas, the grid and the text."""

    model: str  # a weights.pretrained.PRETRAINED zoo name
    alphas: tuple[float, ...]
    grid: FetchGrid
    text: Path
    skew: Path | None = None  # offline skew calibration (profiler.weights.skew_file); None: fitted per prompt

    def units(self, max_positions: int) -> list[tuple[float, int]]:
        """(alpha, context) points, those that fit the model's positions."""
        return [(a, n) for a in self.alphas for n in self.grid.contexts if n <= max_positions]

    def keys(self, alpha: float, context_len: int, n_layers: int) -> list[tuple[str, ...]]:
        """fetch.csv keys of one (alpha, context) point, one per layer."""
        return [row_key({"model": self.model, "source": CHECKPOINT_SOURCE, "alpha": csv_alpha(alpha), "layer": layer,
                         "context_len": context_len}, FETCH_KEY) for layer in range(n_layers)]

    def describe(self) -> dict:
        """meta.yaml's `fetch` section."""
        return {"model": self.model, "source": CHECKPOINT_SOURCE, "alphas": [float(a) for a in self.alphas],
                "contexts": list(self.grid.contexts), "windows": self.grid.windows, "steps": self.grid.steps,
                "text": self.text.name,
                "skew": self.skew.name if self.skew is not None else "fitted on each prompt",
                "rank": f"{DEFAULT_SELECTION.rank} (skew.Selection)",
                "fetched_tokens": "rows InfiniGen's speculation selected (per query head above max - alpha), "
                                  "mean over query heads and samples = windows x decode steps, before the "
                                  "max_fetch_ratio cap; layers below full_fetch_layers: the context",
                "context_len": "nominal n: the decode steps run at contexts n - steps - 1 ... n - 2"}


class FetchBench:
    """Counts InfiniGen's speculated rows of one checkpoint over windows of one tokenised text."""

    def __init__(self, fetch: FetchPass, spec: ModelSpec, model: Transformer, ids: Tensor, device: torch.device,
                 dtype: torch.dtype | None = None, calibration: SkewCalibration | None = None) -> None:
        self.fetch, self.spec, self.model = fetch, spec, model
        self.ids = ids  # (n,) the whole text
        self.device, self.dtype, self.calibration = device, dtype, calibration

    @classmethod
    def load(cls, fetch: FetchPass, device: torch.device, dtype: torch.dtype | None = None) -> FetchBench:
        """The checkpoint's weights and the text's token ids (CheckpointError if not installed)."""
        spec, model = load_pretrained(fetch.model)
        calibration = None
        if fetch.skew is not None:
            calibration = load_skew(fetch.skew, fetch.model, spec.n_kv_heads, spec.head_dim, spec.n_layers,
                                    make_policy("infinigen").full_fetch_layers)
        return cls(fetch, spec, model, load_text_ids(fetch.model, fetch.text)[0], device, dtype, calibration)

    def measure(self, alpha: float, context_len: int) -> list[dict]:
        """One row per layer: the mean rows selected at `context_len` over windows x steps."""
        steps = self.fetch.grid.steps
        prompt_len = context_len - steps - 1  # the last step's context stays below max_positions
        policy = make_policy("infinigen", alpha=alpha)
        per_step: list[list[float]] = []
        for start in window_starts(len(self.ids), prompt_len + steps, self.fetch.grid.windows):
            window = self.ids[start : start + prompt_len + steps].unsqueeze(0)  # (1, S + steps)
            with Engine(self.spec, policy, self.device, self.dtype, model=self.model) as engine:
                engine.cache.configure(calibration=self.calibration)
                per_step += speculated_counts(engine, window[:, :prompt_len], window[:, prompt_len:])
        samples = len(per_step)
        return [{"model": self.fetch.model, "source": CHECKPOINT_SOURCE, "alpha": csv_alpha(alpha), "layer": layer,
                 "context_len": context_len, "fetched_tokens": sum(s[layer] for s in per_step) / samples,
                 "samples": samples} for layer in range(self.spec.n_layers)]


def summary_lines(frame: pd.DataFrame, n_layers: int, full_fetch_layers: int,
                  max_fetch_ratio: float = make_policy("infinigen").max_fetch_ratio) -> list[str]:
    """Per model and alpha: mean rows selected per layer group at each context, capped share, the fit."""
    rows_all = frame[frame["source"] == CHECKPOINT_SOURCE]
    if rows_all.empty:
        return ["fetch: none"]
    lines = []
    policy = make_policy("infinigen", max_fetch_ratio=max_fetch_ratio)
    groups = layer_groups(n_layers, full_fetch_layers)
    for (model, alpha), rows in rows_all.groupby(["model", "alpha"]):
        lines.append(f"fetch {model} alpha {alpha:g} (rows selected by speculation, mean over heads and "
                     f"samples, before the {max_fetch_ratio:g} cap; share = min(count, cap) / n over layers "
                     f">= {full_fetch_layers})")
        head = "  context  samples  " + "  ".join(f"layers {lo:>2}-{hi:<2}" for lo, hi in groups)
        lines.append(head + "  selected/n  fetched/n")
        for n, at_n in rows.groupby("context_len"):
            spec_rows = at_n[at_n["layer"] >= full_fetch_layers]
            means = [spec_rows[(spec_rows["layer"] >= lo) & (spec_rows["layer"] <= hi)]["fetched_tokens"].mean()
                     for lo, hi in groups]
            cap = infinigen_cap(policy, int(n))
            selected = float(spec_rows["fetched_tokens"].mean()) / n
            fetched = float(spec_rows["fetched_tokens"].clip(upper=cap).mean()) / n
            lines.append(f"  {int(n):>7}  {int(at_n['samples'].min()):>7}  "
                         + "  ".join(f"{m:>12.1f}" for m in means) + f"  {selected:>10.4f}  {fetched:>9.4f}")
        if rows["context_len"].nunique() >= 2:
            lines += fit_lines(rows, str(model), float(alpha), full_fetch_layers)
    return lines


def fit_lines(rows: pd.DataFrame, model: str, alpha: float, full_fetch_layers: int) -> list[str]:
    """spec.fetch.fit_fetch of one model's rows at one alpha: per group a, b, points and r2, then the model."""
    fit = fit_fetch(rows, full_fetch_layers, alpha, model)
    if fit is None:
        return ["  fit: no positive counts"]
    lines = [f"  fit layers {r['layers']:>5}: count = {r['a']:.3f} * n^{r['b']:.3f}  "
             f"({r['points']} points; r2 of the mean log count per context {r['r2_log']:.3f})" for r in fit.groups]
    fm = fit.fetch_model
    groups = tuple((g, round(a, 4), round(b, 4)) for g, a, b in fm.groups)
    lines.append(f"  FetchModel(a={fm.a:.4g}, b={fm.b:.4g}, groups={groups!r}): spec.fetch.fit_fetch, "
                 "as sweep --profile fits it")
    return lines
