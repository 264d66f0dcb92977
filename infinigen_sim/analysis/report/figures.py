"""The report's plots: each function takes frames and returns one matplotlib `Figure`. Built with the
object API, never pyplot, so no global figure state and no GUI backend: `Figure.savefig` renders PNGs
with Agg whatever backend the caller has chosen. Colours are fixed per policy so every plot reads
the same."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from infinigen_sim.analysis.sensitivity import PAYS_SPEEDUP
from infinigen_sim.sim.machine import TimedOp
from infinigen_sim.sim.scenario import RESOURCES
from infinigen_sim.spec.ops import Op

COLORS = {"ideal": "black", "flexgen": "tab:red", "int4": "tab:orange", "h2o": "tab:green", "infinigen": "tab:blue"}
KINDS = {"compute": "tab:gray", "speculate": "tab:purple", "gather": "tab:brown", "H2D KV": "tab:blue",
         "H2D weights": "tab:cyan", "D2H": "tab:red"}


def _plain_ticks(ax) -> None:
    """Log axes labelled 2, 20, 200 rather than 2x10^0."""
    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() != "log":
            continue
        if axis is ax.yaxis:
            axis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(NullFormatter())


def _color(policy: str) -> str:
    return COLORS.get(policy, "tab:olive")


def _grid(n: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def throughput_vs_batch(part: pd.DataFrame, policies: Sequence[str]) -> Figure:
    """One panel per prompt length: tokens/s vs batch (log-log), a line per policy."""
    prompts = sorted(part["prompt_len"].unique())
    fig, axes = _grid(len(prompts))
    for ax, prompt in zip(axes, prompts, strict=True):
        at = part[(part["prompt_len"] == prompt) & part["fits"]]
        for name in policies:
            mine = at[at["policy"] == name].sort_values("batch_size")
            ax.plot(mine["batch_size"], mine["tokens_per_s"], marker="o", ms=3, label=name, color=_color(name))
        ax.set_xscale("log", base=2)
        ax.set(yscale="log", title=f"prompt {prompt}, gen {part['gen_len'].iloc[0]}", xlabel="batch",
               ylabel="generated tokens/s")
        ax.grid(True, which="both", alpha=0.3)
        _plain_ticks(ax)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def speedup_vs_context(panels: Sequence[tuple[str, pd.DataFrame, int]], policies: Sequence[str]) -> Figure:
    """One panel per setup: tokens/s over FlexGen's vs prompt length at the setup's batch."""
    fig, axes = _grid(len(panels))
    for ax, (label, part, batch) in zip(axes, panels, strict=True):
        at = part[(part["batch_size"] == batch) & part["fits"]].sort_values("prompt_len")
        for name in policies:
            mine = at[at["policy"] == name]
            ax.plot(mine["prompt_len"], mine["speedup_vs_flexgen"], marker="o", ms=3, label=name, color=_color(name))
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set(title=f"{label}, batch {batch}", xlabel="prompt length (tokens)", ylabel="speedup over FlexGen")
        ax.grid(True, which="both", alpha=0.3)
        _plain_ticks(ax)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def bandwidth(sweep: pd.DataFrame, policies: Sequence[str], actual_gbps: float) -> Figure:
    """tokens/s and speedup over FlexGen vs host-link GB/s; the hardware's own link marked."""
    fig, (left, right) = _grid(2, width=5.0, height=3.6)
    for name in policies:
        mine = sweep[(sweep["policy"] == name) & sweep["fits"]]
        left.plot(mine["link_gbps"], mine["tokens_per_s"], marker="o", ms=3, label=name, color=_color(name))
        right.plot(mine["link_gbps"], mine["speedup_vs_flexgen"], marker="o", ms=3, label=name, color=_color(name))
    for ax in (left, right):
        ax.axvline(actual_gbps, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="host link GB/s per direction")
        ax.grid(True, which="both", alpha=0.3)
    left.set(yscale="log", ylabel="generated tokens/s", title="throughput")
    for ax in (left, right):
        _plain_ticks(ax)
    right.axhline(PAYS_SPEEDUP, color="gray", lw=0.8)
    right.set(ylabel="speedup over FlexGen", title=f"speedup (line: {PAYS_SPEEDUP:g}x)")
    left.legend(fontsize="small")
    fig.tight_layout()
    return fig


def op_kind(op: TimedOp) -> str:
    """compute / speculate / gather / H2D KV / H2D weights / D2H."""
    if op.resource == "gpu":
        return "speculate" if op.op in (Op.SPECULATE, Op.TOPK) else "compute"
    if op.resource == "host_cpu":
        return "gather"
    if op.resource == "h2d_link":
        return "H2D weights" if op.what == "weights" else "H2D KV"
    return "D2H"


def _gantt(ax, ops: Sequence[TimedOp], title: str) -> None:
    for op in ops:
        if op.end_s <= op.start_s:
            continue
        row = RESOURCES.index(op.resource)
        ax.broken_barh([(1e3 * op.start_s, 1e3 * (op.end_s - op.start_s))], (row - 0.4, 0.8),
                       facecolors=KINDS[op_kind(op)], alpha=1.0 if op.layer % 2 == 0 else 0.6)
    ax.set_yticks(range(len(RESOURCES)), RESOURCES)
    ax.set_ylim(len(RESOURCES) - 0.5, -0.5)
    ax.set(xlabel="ms from the step's start", title=title)
    ax.grid(True, axis="x", alpha=0.3)


def zoom_window(ops: Sequence[TimedOp], first_layer: int, n_layers: int) -> tuple[float, float]:
    """Seconds from the first GPU op of `first_layer` to the last GPU op of the n-th layer after it."""
    gpu = [op for op in ops if op.resource == "gpu" and first_layer <= op.layer < first_layer + n_layers]
    return min(op.start_s for op in gpu), max(op.end_s for op in gpu)


def timeline(ops_by_policy: Mapping[str, Sequence[TimedOp]], zoom_layers: int = 4) -> Figure:
    """Gantt of one decode step per policy; the first policy also zoomed on `zoom_layers` middle
    layers (steady state: past any full-fetch layers, before the LM head)."""
    names = list(ops_by_policy)
    fig = Figure(figsize=(12, 2.2 * (len(names) + 1)))
    axes = fig.subplots(len(names) + 1, 1, squeeze=False).ravel()
    first = ops_by_policy[names[0]]
    _gantt(axes[0], first, f"{names[0]}: one decode step")
    mid = max(op.layer for op in first) // 2
    start_s, end_s = zoom_window(first, mid, zoom_layers)
    _gantt(axes[1], [op for op in first if op.end_s >= start_s and op.start_s <= end_s],
           f"{names[0]}: layers {mid}-{mid + zoom_layers - 1} (zoom)")
    axes[1].set_xlim(1e3 * start_s, 1e3 * end_s)
    for ax, name in zip(axes[2:], names[1:], strict=True):
        _gantt(ax, ops_by_policy[name], f"{name}: one decode step")
    fig.legend(handles=[Patch(color=c, label=k) for k, c in KINDS.items()], loc="upper right", ncols=len(KINDS),
               fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def memory(panels: Sequence[tuple[str, pd.DataFrame]], policies: Sequence[str]) -> Figure:
    """One panel per setup: the largest batch that fits vs prompt length, a line per policy."""
    fig, axes = _grid(len(panels))
    for ax, (label, fit) in zip(axes, panels, strict=True):
        for name in policies:
            mine = fit[(fit["policy"] == name) & (fit["max_batch"] > 0)]
            ax.plot(mine["prompt_len"], mine["max_batch"], marker="o", ms=3, label=name, color=_color(name))
        ax.set_xscale("log", base=2)
        ax.set(yscale="log", title=label, xlabel="prompt length (tokens)", ylabel="largest batch")
        ax.grid(True, which="both", alpha=0.3)
        _plain_ticks(ax)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    return fig
