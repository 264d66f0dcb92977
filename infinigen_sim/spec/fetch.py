"""How many rows InfiniGen's speculation selects: the power-law fetch model and its one fit.

`FetchModel` gives the rows selected per layer (before the max_fetch_ratio cap) as count = a * n^b
of the context n, optionally per layer group. The default is the paper's published workload
statistic for OPT-13B; `fit_fetch` fits one from fetch.csv rows measured on a real checkpoint
(`profiler.collect --fetch-model`). The profiler prints that fit and `sweep --profile` uses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from infinigen_sim.spec.models import ModelSpec, UnknownModelError, get_model

# InfiniGen paper (Lee et al., OSDI 2024), OPT-13B at alpha 4: on average 37 / 60 / 66 / 73
# important tokens at sequence lengths 512 / 1024 / 1536 / 2048. Workload statistics, not speed.
PAPER_OPT13B_ALPHA4 = ((512, 37.0), (1024, 60.0), (1536, 66.0), (2048, 73.0))
CHECKPOINT_SOURCE = "checkpoint"  # fetch.csv `source` of counts measured on real weights
FETCH_GROUPS = 3  # layer groups of the fit: the speculated layers in thirds of the depth


@dataclass(frozen=True)
class FetchModel:
    """Tokens InfiniGen's speculation selects per layer: count = a * n^b (before the cap).

    `groups` optionally gives per-layer-group fits as (first_layer, a, b), sorted by first_layer;
    layers before the first group use (a, b).
    """

    a: float
    b: float
    source: str = "paper default (OPT-13B, alpha 4)"
    groups: tuple[tuple[int, float, float], ...] = ()

    @classmethod
    def fit(cls, points: Sequence[tuple[float, float]], source: str) -> FetchModel:
        """Least-squares power law through (context_len, tokens) points in log-log space (numpy.polyfit)."""
        pts = np.array([(math.log(n), math.log(c)) for n, c in points if n > 0 and c > 0])
        if len(pts) < 2 or len(set(pts[:, 0])) < 2:
            raise ValueError(f"{source}: need positive counts at two or more context lengths to fit")
        b, log_a = np.polyfit(pts[:, 0], pts[:, 1], 1)
        return cls(a=math.exp(float(log_a)), b=float(b), source=source)

    @classmethod
    def measured_rows(cls, rows_per_layer: Sequence[tuple[int, float]], source: str) -> FetchModel:
        """A fixed count per layer, whatever the context: the mean rows a measured run fetched in each
        (layer, rows) of `rows_per_layer`, at least 1."""
        groups = tuple((int(layer), max(float(rows), 1.0), 0.0) for layer, rows in rows_per_layer)
        return cls(a=groups[0][1], b=0.0, source=source, groups=groups)

    def tokens(self, context_len: int, layer: int = 0) -> float:
        a, b = self.a, self.b
        for first, ga, gb in self.groups:
            if layer >= first:
                a, b = ga, gb
        return a * max(context_len, 1) ** b


DEFAULT_FETCH_MODEL = FetchModel.fit(PAPER_OPT13B_ALPHA4, source="paper default (OPT-13B, alpha 4)")


@dataclass(frozen=True)
class FetchFit:
    """A FetchModel fitted per layer group on one checkpoint's fetch.csv rows, with its report."""

    model: str  # the checkpoint the counts come from
    alpha: float
    n_layers: int  # layers of that model (groups are rescaled by depth for other models)
    fetch_model: FetchModel
    groups: tuple[dict[str, Any], ...]  # per group: layers, a, b, points, r2_log

    def for_model(self, spec: ModelSpec) -> FetchModel:
        """The same fit with groups moved to `spec`'s layers by relative depth."""
        if spec.n_layers == self.n_layers:
            return self.fetch_model
        groups = tuple((round(first * spec.n_layers / self.n_layers), a, b)
                       for first, a, b in self.fetch_model.groups)
        source = f"{self.fetch_model.source}, layer groups scaled {self.n_layers} -> {spec.n_layers} layers"
        return replace(self.fetch_model, groups=groups, source=source)


def layer_groups(n_layers: int, first: int, n_groups: int = FETCH_GROUPS) -> list[tuple[int, int]]:
    """(first, last) layers of each group: [first, L/3), [L/3, 2L/3), [2L/3, L) for 3 groups."""
    bounds = [first] + [max(first + 1, round(i * n_layers / n_groups)) for i in range(1, n_groups)] + [n_layers]
    return [(lo, hi - 1) for lo, hi in zip(bounds, bounds[1:], strict=False) if hi > lo]


def _r2_log(fit: FetchModel, points: list[tuple[float, float]]) -> float:
    """r2 of the group's curve on the mean log count per context (layers of a group differ in level)."""
    by_n: dict[float, list[float]] = {}
    for n, c in points:
        by_n.setdefault(math.log(n), []).append(math.log(c))
    logs = np.array([(x, np.mean(ys)) for x, ys in by_n.items()])
    total = float(((logs[:, 1] - logs[:, 1].mean()) ** 2).sum())
    resid = float(((logs[:, 1] - math.log(fit.a) - fit.b * logs[:, 0]) ** 2).sum())
    return 1 - resid / total if total > 0 else 1.0


def fit_fetch(fetch: pd.DataFrame, full_fetch_layers: int, alpha: float, model: str | None = None,
              n_groups: int = FETCH_GROUPS) -> FetchFit | None:
    """count = a * context^b per layer group of the speculated layers, from fetch.csv's 'checkpoint' rows of
    `model` (default: the model with most rows) at the measured alpha closest to `alpha`; None without rows."""
    rows = fetch[fetch["source"].astype(str) == CHECKPOINT_SOURCE]
    rows = rows[(rows["fetched_tokens"] > 0) & (rows["context_len"] > 0)]
    if model is not None:
        rows = rows[rows["model"].astype(str) == model]
    if rows.empty:
        return None
    model = str(rows["model"].value_counts().index[0])
    rows = rows[rows["model"].astype(str) == model]
    chosen = float(min(rows["alpha"].astype(float).unique(), key=lambda a: (abs(a - alpha), a)))
    rows = rows[rows["alpha"].astype(float) == chosen]
    try:
        n_layers = get_model(model).n_layers
    except UnknownModelError:
        n_layers = int(rows["layer"].max()) + 1
    first = min(full_fetch_layers, n_layers - 1)
    groups, reports = [], []
    for lo, hi in layer_groups(n_layers, first, n_groups):
        part = rows[(rows["layer"] >= lo) & (rows["layer"] <= hi)]
        points = list(zip(part["context_len"].astype(float), part["fetched_tokens"].astype(float), strict=True))
        if not points:
            continue
        if len({n for n, _ in points}) >= 2:
            fit = FetchModel.fit(points, source=f"{model} layers {lo}-{hi}")
        else:  # one context: a constant count
            fit = FetchModel(a=float(np.mean([c for _, c in points])), b=0.0, source=f"{model} layers {lo}-{hi}")
        groups.append((lo, fit.a, fit.b))
        reports.append({"layers": f"{lo}-{hi}", "a": round(fit.a, 6), "b": round(fit.b, 6),
                        "points": len(points), "r2_log": round(_r2_log(fit, points), 4)})
    if not groups:
        return None
    source = f"fetch.csv {CHECKPOINT_SOURCE} {model} alpha {chosen:g}: a*n^b per layer group"
    fetch_model = FetchModel(a=groups[0][1], b=groups[0][2], source=source, groups=tuple(groups))
    return FetchFit(model, chosen, n_layers, fetch_model, tuple(reports))
