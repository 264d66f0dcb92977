"""The report's sections: each `section_*` appends one titled part (text, tables, figures) to a `Doc`
from a `Context` (the results of one model, its setups and the chosen point). Re-simulation (bandwidth
sweep, timeline, elasticities, memory fit) goes through `infinigen_sim.analysis.sensitivity`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

import infinigen_sim.analysis.report.figures as figs
from infinigen_sim.analysis.report.doc import Doc
from infinigen_sim.analysis.sensitivity import (
    LINK_GBPS,
    PARAMETERS,
    PAYS_SPEEDUP,
    Point,
    bandwidth_sweep,
    elasticity_table,
    hardware_with,
    memory_fit,
    point_from_params,
    step_ops,
    stops_paying_gbps,
)
from infinigen_sim.sim.scenario import RESOURCES
from infinigen_sim.spec.hardware import HardwareConfig, from_raw, load_hardware
from infinigen_sim.spec.policies import PolicyName
from infinigen_sim.spec.runtime import DEFAULT_RUNTIME, RuntimeSpec, load_runtime, runtime_from_raw

SECTIONS = ("Summary", "Throughput vs batch", "Speedup over FlexGen vs context length",
            "Speedup vs host-link bandwidth", "Decode-step timeline", "Memory fit", "Bottlenecks",
            "Sensitivity", "Uncertainty")


@dataclass(frozen=True)
class Results:
    """A sweep's rows and the config.yaml that produced them."""

    frame: pd.DataFrame
    config: dict[str, Any]
    source: Path

    @property
    def settings(self) -> list[str]:
        """The runtime and --set columns (between hw and model), which with hw name a setup."""
        columns = list(self.frame.columns)
        return columns[columns.index("hw") + 1: columns.index("model")]

    def hardware(self, name: str, settings: Mapping[str, Any]) -> HardwareConfig:
        """The hardware a row ran on: from config.yaml (else hw_configs/), with its --set values."""
        hw_settings = {k: _plain(v) for k, v in settings.items() if not k.startswith("policy.") and k != "runtime"}
        for entry in (self.config.get("hardware") or {}).values():
            if isinstance(entry, dict) and entry.get("name") == name:
                return hardware_with(from_raw(dict(entry), str(self.source / "config.yaml"), name), hw_settings)
        return load_hardware(name, hw_settings)

    def runtime(self, name: str | None) -> RuntimeSpec:
        """The runtime description a row ran under: from config.yaml (else infinigen_sim/runtimes/)."""
        entry = (self.config.get("runtimes") or {}).get(name) if name else None
        if isinstance(entry, dict):
            return runtime_from_raw(dict(entry), str(self.source / "config.yaml"), str(name))
        return load_runtime(name or DEFAULT_RUNTIME)


def _list(values: list[Any]) -> str:
    return ", ".join(str(v) for v in values)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


# ---- sections --------------------------------------------------------------------------------
@dataclass
class Context:
    """What every section reads: the rows of one model, the setups, the chosen point."""

    results: Results
    frame: pd.DataFrame  # rows of the chosen model
    point: dict[str, Any]
    policies: list[str]

    def setups(self) -> list[tuple[str, pd.DataFrame]]:
        """(label, rows) per hardware + --set values."""
        keys = ["hw", *self.results.settings]
        out = []
        for values, part in self.frame.groupby(keys, sort=False, dropna=False):
            values = values if isinstance(values, tuple) else (values,)
            label = ", ".join([str(values[0]), *(f"{k}={v}" for k, v in zip(keys[1:], values[1:], strict=True))])
            out.append((label, part))
        return out

    def anchor_batch(self, part: pd.DataFrame) -> int:
        """The chosen point's batch in the chosen setup; elsewhere the largest where its policy fits
        at the largest prompt."""
        if (part["hw"] == self.point["hw"]).all() and all(
                (part[k] == self.point[k]).all() for k in self.results.settings):
            return int(self.point["batch_size"])
        at = part[(part["prompt_len"] == part["prompt_len"].max()) & part["fits"]
                  & (part["policy"] == self.point["policy"])]
        return int(at["batch_size"].max()) if not at.empty else int(part["batch_size"].min())

    def point_on(self, policy: str | None = None) -> Point:
        params = {k: v for k, v in self.point.items() if k != "hw"}
        if policy:
            params["policy"] = policy
        settings = {k: self.point[k] for k in self.results.settings}
        return point_from_params(self.results.hardware(self.point["hw"], settings), params,
                                 self.results.runtime(self.point.get("runtime")))


def section_summary(doc: Doc, ctx: Context) -> None:
    doc.heading("Summary")
    r, p = ctx.results, ctx.point
    doc.paragraph(f"Source: {r.source} ({len(r.frame)} rows; mode {r.config.get('mode', 'unknown')}). Model "
                  f"{p['model']}; {len(ctx.setups())} hardware setup(s); policies {', '.join(ctx.policies)}.")
    doc.paragraph("Chosen point (timeline, bandwidth sweep, sensitivity): "
                  + ", ".join(f"{k}={v}" for k, v in p.items()))
    at = ctx.frame[rows_where(ctx.frame, {k: v for k, v in p.items() if k != "model"})]
    if not at.empty and bool(at["fits"].iloc[0]):
        row = at.iloc[0]
        doc.paragraph(f"There {p['policy']} reaches {_num(float(row['tokens_per_s']))} tokens/s "
                      f"({_x(row.get('speedup_vs_flexgen'))} FlexGen), bound by {row['bottleneck']} in decode; "
                      f"the prefill is {_pct(100 * row['prefill_s'] / row['total_s'])}% of the run.")
    doc.paragraph("tokens/s = batch * gen_len / (prefill_s + decode_s): the prefill counts against throughput, "
                  "so at long prompts it weighs more than the decode policy. Speedups are tokens/s over FlexGen's "
                  "at the same hardware, model, batch and lengths.")
    if not r.config:
        doc.paragraph("config.yaml missing: hardware was reloaded from hw_configs/ by name.")


def section_throughput(doc: Doc, ctx: Context) -> None:
    doc.heading("Throughput vs batch")
    doc.paragraph("Generated tokens/s against batch size, one panel per prompt length; a missing point did not "
                  "fit in memory.")
    for i, (label, part) in enumerate(ctx.setups()):
        doc.heading(label, 3)
        doc.figure(figs.throughput_vs_batch(part, ctx.policies), f"throughput_vs_batch_{i}",
                   f"tokens/s vs batch, {label}")


def section_speedup_context(doc: Doc, ctx: Context) -> None:
    doc.heading("Speedup over FlexGen vs context length")
    if PolicyName.FLEXGEN.value not in ctx.policies:
        doc.paragraph("No FlexGen rows in the results: speedup is not defined.")
        return
    panels = [(label, part, ctx.anchor_batch(part)) for label, part in ctx.setups()]
    doc.paragraph("Each policy's tokens/s over FlexGen's, at one batch per setup (the chosen point's, or the "
                  "largest at which the chosen policy fits at the longest prompt).")
    doc.figure(figs.speedup_vs_context(panels, ctx.policies), "speedup_vs_context", "speedup over FlexGen vs prompt")
    for label, part, batch in panels:
        at = part[part["batch_size"] == batch]
        table = at.pivot_table(index="prompt_len", columns="policy", values="speedup_vs_flexgen", sort=False)
        doc.heading(f"{label}, batch {batch}", 3)
        doc.table(table.reindex(columns=[c for c in ctx.policies if c in table.columns]).map(_x).reset_index())


def section_bandwidth(doc: Doc, ctx: Context) -> None:
    doc.heading("Speedup vs host-link bandwidth")
    point = ctx.point_on()
    sweep = bandwidth_sweep(point, ctx.policies, LINK_GBPS)
    doc.paragraph(f"The chosen point re-simulated with link.h2d_gbps = link.d2h_gbps swept over "
                  f"{_list(list(LINK_GBPS))} GB/s (this hardware: {point.hw.link.h2d_gbps:g}). "
                  f"InfiniGen pays while its speedup over FlexGen is at least {PAYS_SPEEDUP:g}x.")
    if PolicyName.INFINIGEN.value in ctx.policies and PolicyName.FLEXGEN.value in ctx.policies:
        doc.paragraph(" ".join(_pays_text(stops_paying_gbps(sweep, column), what) for column, what in (
            ("speedup_vs_flexgen", "end to end"), ("decode_speedup_vs_flexgen", "in decode alone"))))
    doc.figure(figs.bandwidth(sweep, ctx.policies, point.hw.link.h2d_gbps), "speedup_vs_bandwidth",
               "tokens/s and speedup over FlexGen vs host-link bandwidth")
    table = sweep.pivot_table(index="link_gbps", columns="policy", values="speedup_vs_flexgen", sort=False)
    mine = sweep[sweep["policy"] == ctx.point["policy"]].set_index("link_gbps")
    table = table.reindex(columns=[c for c in ctx.policies if c in table.columns]).map(_x)
    doc.table(table.assign(**{f"{ctx.point['policy']} decode-only": mine["decode_speedup_vs_flexgen"].map(_x),
                              f"{ctx.point['policy']} bound by": mine["bottleneck"]}).reset_index())


def _pays_text(edge: float | None, what: str) -> str:
    if edge is None:
        return f"InfiniGen pays {what} over the whole range (up to {max(LINK_GBPS)} GB/s)."
    return f"InfiniGen stops paying {what} from {edge:g} GB/s."


def section_timeline(doc: Doc, ctx: Context) -> None:
    doc.heading("Decode-step timeline")
    shown = list(dict.fromkeys([ctx.point["policy"], PolicyName.FLEXGEN.value]))
    ops = {name: step_ops(ctx.point_on(name)) for name in shown if name in ctx.policies}
    ops = {name: o for name, o in ops.items() if o}
    if not ops:
        doc.paragraph("The chosen point does not fit in memory: no timeline.")
        return
    doc.paragraph("One steady decode step (the second: context prompt_len + 1) of a full replay: compute, "
                  "gather, H2D and D2H on each resource, layers alternately shaded; the second panel zooms on "
                  "four middle layers of the chosen policy (steady state).")
    doc.figure(figs.timeline(ops, zoom_layers=4), "decode_step_timeline", "decode-step timeline")
    rows = []
    for name, step in ops.items():
        step_s = max(op.end_s for op in step)
        busy = {r: sum(op.end_s - op.start_s for op in step if op.resource == r) for r in RESOURCES}
        rows.append({"policy": name, "step ms": _num(1e3 * step_s),
                     **{f"{r} busy %": f"{100 * busy[r] / step_s:.1f}" for r in RESOURCES}})
    doc.table(pd.DataFrame(rows))


def section_memory(doc: Doc, ctx: Context) -> None:
    doc.heading("Memory fit")
    gen = int(ctx.point["gen_len"])
    doc.paragraph(f"The largest batch that fits GPU and host memory (gen_len {gen}), and what stops the next "
                  "one; weights that do not fit are streamed from host each step (see weights_streamed_pct).")
    panels = []
    for label, part in ctx.setups():
        settings = {k: _plain(part[k].iloc[0]) for k in ctx.results.settings}
        policy_params = {k[len("policy."):]: v for k, v in settings.items() if k.startswith("policy.")}
        fit = memory_fit(ctx.results.hardware(part["hw"].iloc[0], settings), ctx.point["model"], ctx.policies,
                         [int(p) for p in sorted(part["prompt_len"].unique())], gen, policy_params,
                         ctx.results.runtime(settings.get("runtime")))
        panels.append((label, fit))
    doc.figure(figs.memory(panels, ctx.policies), "memory_fit", "largest batch that fits vs prompt length")
    for label, fit in panels:
        cells = fit.assign(cell=[f"{b} ({lim.replace(' memory', '')})" for b, lim in
                                 zip(fit["max_batch"], fit["limit"], strict=True)])
        doc.heading(label, 3)
        doc.table(cells.pivot_table(index="policy", columns="prompt_len", values="cell", aggfunc="first",
                                    sort=False).reset_index())


def section_bottlenecks(doc: Doc, ctx: Context) -> None:
    doc.heading("Bottlenecks")
    doc.paragraph("The busiest resource over the middle decode step, each resource's busy share of that step, "
                  "and the prefill's share of the run, at each setup's batch.")
    busy = [f"{r}_busy_pct" for r in RESOURCES]
    for label, part in ctx.setups():
        batch = ctx.anchor_batch(part)
        at = part[part["batch_size"] == batch]
        table = at[["policy", "prompt_len", "tokens_per_s", "decode_step_ms", "bottleneck"]].copy()
        table["bottleneck"] = table["bottleneck"].where(at["fits"], "does not fit")
        table["tokens_per_s"] = at["tokens_per_s"].map(_num)
        table["decode_step_ms"] = at["decode_step_ms"].map(_num)
        for column in busy:
            table[column.replace("_busy_pct", " %")] = at[column].map(_pct)
        table["prefill %"] = (100 * at["prefill_s"] / at["total_s"]).map(_pct)
        doc.heading(f"{label}, batch {batch}", 3)
        doc.table(table)


def section_sensitivity(doc: Doc, ctx: Context) -> None:
    doc.heading("Sensitivity")
    table = elasticity_table(ctx.point_on(), ctx.policies)
    doc.paragraph("Throughput change (%) when one hardware peak is raised 10% at the chosen point's shape, "
                  "per policy (arc elasticity x 10); '-': the policy does not fit there.")
    mine = table[table["policy"] == ctx.point["policy"]]
    if not mine.empty and not mine[list(PARAMETERS)].isna().all(axis=1).iloc[0]:
        row = mine.iloc[0]
        doc.paragraph(f"{ctx.point['policy']}: " + "; ".join(
            f"+10% {k} gives {row[k]:+.2f}% throughput" for k in PARAMETERS) + ".")
    doc.table(table.assign(**{k: table[k].map(lambda v: "-" if pd.isna(v) else f"{v:+.2f}") for k in PARAMETERS}))


def section_uncertainty(doc: Doc, ctx: Context) -> None:
    doc.heading("Uncertainty")
    frame = ctx.frame
    if "calibration" not in frame.columns:
        doc.paragraph("Every figure here comes from physics defaults: the hardware YAML's peaks times fixed "
                      "efficiencies, with no measurement of this hardware behind it. How far the simulator is "
                      "from a measured runtime is what `python -m infinigen_sim.validate BUNDLE` prints (median "
                      "and p95 step error; the repository's bundles hold theirs in profiles/*/validation.md). "
                      "Calibrate with --profile BUNDLE for measured op and copy times.")
        return
    fits = frame[frame["fits"]]
    labels = ", ".join(f"{label} ({n} rows)" for label, n in fits["calibration"].value_counts().items())
    extrapolated = int(fits["extrapolated"].astype(bool).sum())
    doc.paragraph(f"Calibrated from a profile bundle: {labels}. {extrapolated} of {len(fits)} fitting rows price "
                  "at least one op or copy outside the bundle's measured grid (column extrapolated), from "
                  "the fitted rooflines; those are less certain than rows inside the grid.")


SECTION_BUILDERS = (section_summary, section_throughput, section_speedup_context, section_bandwidth,
                    section_timeline, section_memory, section_bottlenecks, section_sensitivity, section_uncertainty)


def rows_where(frame: pd.DataFrame, params: Mapping[str, Any]) -> pd.Series:
    """True on the rows whose columns equal every value of `params`."""
    mask = pd.Series(True, index=frame.index)
    for key, value in params.items():
        mask &= frame[key] == value
    return mask


def _x(value: Any) -> str:
    return "-" if pd.isna(value) else f"{value:.3g}x"


def _pct(value: Any) -> str:
    return "-" if pd.isna(value) else f"{value:.1f}"


def _num(value: Any) -> Any:
    """Four significant digits, no exponent: 0.1234, 12.34, 1234, 12345."""
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return value
