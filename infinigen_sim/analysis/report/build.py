"""Capacity-planning report: report.html (PNG plots embedded as base64, one self-contained file) and
report.md (PNG plots under images/, referenced by relative path) from a sweep's results.

Given hardware configs, a compact sweep (COMPACT_GRID) is run first (`compact_results`); the command
line (`infinigen_sim.report`) writes its results.csv and config.yaml beside the report. Sections
(SECTIONS): throughput vs batch, speedup over FlexGen vs context length, speedup vs host-link
bandwidth (re-simulated), a decode-step timeline, memory fit, bottlenecks, sensitivity (elasticities)
and uncertainty. The timeline, bandwidth and sensitivity
sections are for one chosen point (`--point`; by default the first hardware, InfiniGen, the largest
prompt and the largest batch at which InfiniGen fits there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from infinigen_sim.analysis.report.doc import Doc
from infinigen_sim.analysis.report.sections import SECTION_BUILDERS, Context, Results, rows_where
from infinigen_sim.spec.hardware import parse_value
from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.policies import ALL_POLICIES, PolicyName
from infinigen_sim.sweep.grid import SweepGrid, expand_points
from infinigen_sim.sweep.results import resolved_config
from infinigen_sim.sweep.run import run_sweep

COMPACT_GRID = SweepGrid(models=("llama-3-8b",), batch_sizes=(1, 2, 4, 8, 16, 32, 64),
                         prompt_lens=(2048, 8192, 32768), gen_lens=(128,))
POINT_KEYS = ("hw", "policy", "batch_size", "prompt_len", "gen_len")


class ReportError(ValueError):
    """Input a report cannot be built from; the message names the flag or file."""


def load_results(results_dir: str | Path) -> Results:
    """results.csv (required, at least one row) and config.yaml (optional) of a sweep folder."""
    path = Path(results_dir)
    csv = path / "results.csv"
    if not csv.is_file():
        raise ReportError(f"{path}: no results.csv (give a sweep output folder or hardware configs)")
    try:
        frame = pd.read_csv(csv)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise ReportError(f"{csv}: cannot read ({str(exc).splitlines()[0]})") from None
    missing = [c for c in ("hw", "model", "policy", "batch_size", "prompt_len", "gen_len", "fits", "tokens_per_s",
                           "bottleneck") if c not in frame.columns]
    if frame.empty or missing:
        raise ReportError(f"{csv}: " + ("no rows" if frame.empty else f"missing column(s) {', '.join(missing)}"))
    config_path = path / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    except yaml.YAMLError as exc:
        raise ReportError(f"{config_path}: malformed YAML ({getattr(exc, 'problem', exc)})") from None
    frame["bottleneck"] = frame["bottleneck"].fillna("")
    return Results(frame, config if isinstance(config, dict) else {}, path)


def compact_results(hw_configs: Sequence[str | Path], model: str, out_dir: Path,
                    runtimes: Sequence[str] = COMPACT_GRID.runtime) -> Results:
    """COMPACT_GRID for `model` on `hw_configs` under `runtimes`, simulated in memory (the caller writes it
    to `out_dir`)."""
    grid = SweepGrid(models=(model,), batch_sizes=COMPACT_GRID.batch_sizes, prompt_lens=COMPACT_GRID.prompt_lens,
                     gen_lens=COMPACT_GRID.gen_lens, runtime=tuple(runtimes))
    points = expand_points(hw_configs, grid)
    frame = run_sweep(points)
    frame["bottleneck"] = frame["bottleneck"].fillna("")
    return Results(frame, resolved_config([str(h) for h in hw_configs], grid, {}, points, "fast"), Path(out_dir))


# ---- the chosen point ------------------------------------------------------------------------
def parse_point(text: str | None) -> dict[str, Any]:
    """--point KEY=VAL,... -> {key: value} (values as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ReportError(f"--point '{item}': expected KEY=VALUE[,KEY=VALUE...], e.g. batch_size=16")
        out[key.strip()] = parse_value(value.strip())
    return out


def choose_point(results: Results, model: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Point.params of the chosen point; every given value must be one the results hold."""
    frame = results.frame[results.frame["model"] == model]
    known = (*POINT_KEYS, *results.settings)
    for key in given:
        if key not in known:
            raise ReportError(f"--point: unknown key '{key}' (expected one of {', '.join(known)})")
    chosen: dict[str, Any] = {"model": model}
    for key in ("hw", *results.settings, "gen_len", "prompt_len", "policy", "batch_size"):
        values = list(dict.fromkeys(frame[key]))
        if key in given:
            value = _match(given[key], values)
            if value is None:
                raise ReportError(f"--point {key}={given[key]}: not in the results (have {_list(values)})")
        elif key == "prompt_len":
            value = max(values)
        elif key == "policy":
            value = PolicyName.INFINIGEN.value if PolicyName.INFINIGEN.value in values else values[0]
        elif key == "batch_size":
            fits = frame[frame["fits"] & rows_where(frame, chosen)]
            value = int(fits["batch_size"].max()) if not fits.empty else min(values)
        else:
            value = values[0]
        chosen[key] = _plain(value)
        frame = frame[frame[key] == value] if key != "policy" else frame
    return chosen


def _match(value: Any, values: list[Any]) -> Any:
    for candidate in values:
        if str(candidate) == str(value) or (_is_number(candidate) and _is_number(value) and candidate == value):
            return candidate
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _list(values: list[Any]) -> str:
    return ", ".join(str(v) for v in values)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


# ---- entry points ----------------------------------------------------------------------------
def build_report(results: Results, model: str | None = None, point: Mapping[str, Any] | None = None) -> Doc:
    """Every section for `model` (default: the results' first) at the chosen point; nothing written yet."""
    models = list(dict.fromkeys(results.frame["model"]))
    model = model or models[0]
    get_model(model)
    if model not in models:
        raise ReportError(f"--model {model}: not in the results (have {_list(models)})")
    chosen = choose_point(results, model, point or {})
    frame = results.frame[results.frame["model"] == model]
    policies = [p for p in ALL_POLICIES if p in set(frame["policy"])]
    ctx = Context(results, frame, chosen, policies)
    doc = Doc(f"Capacity report: {model}")
    for build in SECTION_BUILDERS:
        build(doc, ctx)
    return doc


def write_report(results_dir: str | Path, out_dir: str | Path | None = None, *, model: str | None = None,
                 point: Mapping[str, Any] | None = None) -> Path:
    """report.html (self-contained) and report.md + images/*.png in `out_dir` (default `results_dir`)
    from a sweep folder; returns the path of report.html. Raises ReportError (and the loaders'
    HardwareError, UnknownModelError) with a one-line message on bad input."""
    out = Path(out_dir) if out_dir is not None else Path(results_dir)
    return build_report(load_results(results_dir), model, point).write(out)
