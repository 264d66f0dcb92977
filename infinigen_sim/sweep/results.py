"""A sweep's outputs: the partial results file it resumes from, and the one writer of results.csv and config.yaml.

DIR/results.partial.csv holds a header and one line per finished point (`spec.io.ResumableCsv`). Values
are written as Python prints them (a float by its repr), so they read back bit for bit and a resumed
sweep writes the same results.csv as an uninterrupted one. Rows are identified by their `key` column;
when a key appears twice the later row wins.

results.csv, one row per point: the parameters (hw, each --set key, model, policy, batch_size,
prompt_len, gen_len), mode, fits, reason, gpu_mem_gib, host_mem_gib, weights_streamed_pct (share of
each layer's weights copied every step), prefill_s, decode_s, total_s, tokens_per_s
(= batch_size * gen_len / total_s), speedup_vs_flexgen, decode_step_ms (the middle step), each
resource's busy share of that step (*_busy_pct), bottleneck (the busiest resource) and key.
config.yaml: everything that decided the numbers (`resolved_config`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from infinigen_sim.cost.calibrate import load_calibration
from infinigen_sim.cost.physics import PhysicsCosts
from infinigen_sim.spec.fetch import DEFAULT_FETCH_MODEL
from infinigen_sim.spec.hardware import resolve_path
from infinigen_sim.spec.io import ResumableCsv, write_text_atomic
from infinigen_sim.spec.policies import PolicyName
from infinigen_sim.sweep.grid import POLICY_PREFIX, Point, SweepGrid

PARTIAL_NAME = "results.partial.csv"
KEY = "key"
# pandas before 3.1 parses floats exactly only when asked; 3.1 always does, and deprecates asking
_EXACT_FLOATS = {} if tuple(map(int, pd.__version__.split(".")[:2])) >= (3, 1) else {"float_precision": "round_trip"}


def finished_keys(path: Path) -> set[str]:
    """Keys of the complete rows in `path`, after cutting off a torn last line (none when there is no file)."""
    return {row[KEY] for row in ResumableCsv(path).complete_rows() if row.get(KEY)}


def read_rows(path: Path, keys: Sequence[str]) -> pd.DataFrame:
    """The rows of `keys`, in that order; KeyError naming the first key without a row."""
    frame = pd.read_csv(path, **_EXACT_FLOATS)
    frame = frame.drop_duplicates(subset=KEY, keep="last").set_index(KEY, drop=False)
    missing = [k for k in keys if k not in frame.index]
    if missing:
        raise KeyError(f"{path}: no row for {missing[0]} ({len(missing)} missing)")
    return frame.loc[list(keys)].reset_index(drop=True)


def append_rows(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Append finished points' rows to the partial file, on disk before they count as done."""
    ResumableCsv(path).append(rows, columns)


def header(path: Path) -> list[str]:
    """The partial file's columns ([] when it is missing or empty)."""
    return ResumableCsv(path).header()


def config_conflict(path: Path, config: dict[str, Any]) -> str | None:
    """What in the earlier run's config.yaml would give its rows other numbers than this run's; None when nothing."""
    if not path.exists():
        return None
    old = yaml.safe_load(path.read_text()) or {}
    new = yaml.safe_load(yaml.safe_dump(config, sort_keys=False))  # tuples -> lists, as the file holds them
    for key in ("version", "mode", "fetch_model", "costs"):
        if old.get(key) != new.get(key):
            return f"'{key}'"
    for key in ("hardware", "policies", "runtimes"):
        for name in old.get(key, {}).keys() & new.get(key, {}).keys():
            if old[key][name] != new[key][name]:
                return f"'{key}: {name}'"
    return None


def add_speedup(frame: pd.DataFrame) -> None:
    """tokens_per_s / flexgen's at the same point (everything but the policy equal); NaN without one."""
    same = [c for c in frame.columns[: frame.columns.get_loc("gen_len") + 1] if c != "policy"]
    base = frame[frame["policy"] == PolicyName.FLEXGEN.value].set_index(same)["tokens_per_s"]
    base = base[~base.index.duplicated()]
    lookup = pd.MultiIndex.from_frame(frame[same]) if len(same) > 1 else frame[same[0]]
    frame["speedup_vs_flexgen"] = frame["tokens_per_s"].to_numpy() / base.reindex(lookup).to_numpy()


# ---- results.csv and config.yaml -----------------------------------------------------------------
def resolved_config(hw_configs: Sequence[str], grid: SweepGrid, settings: dict[str, tuple[Any, ...]],
                    points: Sequence[Point], mode: str) -> dict[str, Any]:
    """Everything that decided the numbers, for config.yaml."""
    try:
        package_version = version("infinigen-sim")
    except PackageNotFoundError:
        package_version = "unknown"
    hardware = {}
    for point in points:
        name = "|".join([point.hw.name, *(f"{k}={v}" for k, v in point.settings if not k.startswith(POLICY_PREFIX))])
        hardware.setdefault(name, point.hw.to_dict())
    policies, runtimes = {}, {}
    for point in points:
        policies.setdefault(point.policy.name.value, {**asdict(point.policy), "name": point.policy.name.value})
        runtimes.setdefault(point.runtime.name, point.runtime.to_dict())
    return {
        "version": package_version,
        "mode": mode,
        "hw_configs": [str(resolve_path(h)) for h in hw_configs],
        "grid": {k: list(v) for k, v in asdict(grid).items()},
        "settings": {k: list(v) for k, v in settings.items()},
        "hardware": hardware,
        "policies": policies,
        "runtimes": runtimes,
        "fetch_model": {**asdict(DEFAULT_FETCH_MODEL), "groups": [list(g) for g in DEFAULT_FETCH_MODEL.groups]},
        "costs": _costs_description(points),
        "decode": "prefill emits the first token; gen_len - 1 decode steps emit the rest",
        "points": len(points),
    }


def _costs_description(points: Sequence[Point]) -> dict[str, Any]:
    if not points:
        return {}
    if points[0].profile is None:
        return PhysicsCosts(points[0].hw).describe()
    return {"profile": str(Path(points[0].profile).resolve()),
            "calibration": {point.hw.name: load_calibration(point.profile, point.hw)[2]["calibration"]
                            for point in points},
            **load_calibration(points[0].profile, points[0].hw)[2]}


def write_outputs(out_dir: Path, frame: pd.DataFrame, config: dict[str, Any]) -> None:
    """results.csv and config.yaml, each written whole or not at all."""
    write_text_atomic(out_dir / "results.csv", frame.to_csv(index=False, float_format="%.6g"))
    write_config(out_dir, config)


def write_config(out_dir: Path, config: dict[str, Any]) -> None:
    write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))


# ---- the printed table ---------------------------------------------------------------------------
def summary_table(frame: pd.DataFrame) -> str:
    """Per hardware/settings/model: tokens/s of each policy at each context, for the largest batch
    at which InfiniGen (or, without it, any policy) fits, and InfiniGen's speedup over FlexGen."""
    if frame.empty:
        return "(no points)"
    groups = list(frame.columns[: frame.columns.get_loc("model") + 1])
    policies = list(dict.fromkeys(frame["policy"]))
    anchor = PolicyName.INFINIGEN.value if PolicyName.INFINIGEN.value in policies else None
    blocks = []
    for values, part in frame.groupby(groups, sort=False, dropna=False):
        lines = []
        for (prompt, gen), shape in part.groupby(["prompt_len", "gen_len"], sort=False):
            fits = shape[shape["fits"] & ((shape["policy"] == anchor) if anchor else True)]
            if fits.empty:
                lines.append({"prompt": prompt, "gen": gen, "batch": "-"})
                continue
            batch = fits["batch_size"].max()
            at = shape[shape["batch_size"] == batch].set_index("policy")
            line = {"prompt": prompt, "gen": gen, "batch": batch}
            line.update({p: _fmt(at["tokens_per_s"].get(p)) for p in policies})
            if anchor:
                line["infinigen/flexgen"] = _fmt(at["speedup_vs_flexgen"].get(anchor), "x")
                line["bound by"] = at["bottleneck"].get(anchor) or "-"
            lines.append(line)
        title = ", ".join(f"{k}={_plain(v)}" for k, v in zip(groups, values, strict=True))
        table = pd.DataFrame(lines).fillna("-").to_string(index=False)
        blocks.append(f"{title} (tokens/s at the largest batch where "
                      f"{anchor or 'a policy'} fits)\n{table}")
    return "\n\n".join(blocks)


def _plain(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _fmt(value: Any, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}{suffix}" if suffix else f"{value:.1f}"
