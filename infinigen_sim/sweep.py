"""Sweep points (hardware x model x policy x request shape), write results.csv and config.yaml.

    python -m infinigen_sim.sweep HW_CONFIG [HW_CONFIG ...] [--models ...] [--set KEY=V1,V2] ...

A point is a frozen, picklable `Point` keyed by its parameters (`Point.key`); `simulate_point` turns
one into one result row. Points run in chunks on an executor (`infinigen_sim.backends`: this process,
a local process pool with --jobs N, or Ray tasks with --ray [ADDRESS]). A point whose memory does not
fit is reported with fits=False and a reason, and is not simulated.

Rows are appended to DIR/results.partial.csv as chunks finish; results.csv is written from it, in
point order, once every point is done, and the partial file removed. After a kill, --resume runs
only the points without a row there.

results.csv, one row per point: the parameters (hw, each --set key, model, policy, batch_size,
prompt_len, gen_len), mode, fits, reason, gpu_mem_gib, host_mem_gib, weights_streamed_pct (share of
each layer's weights copied every step), prefill_s, decode_s, total_s, tokens_per_s
(= batch_size * gen_len / total_s), speedup_vs_flexgen, decode_step_ms (the middle step), each
resource's busy share of that step (*_busy_pct), bottleneck (the busiest resource) and key.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import closing, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from tqdm import tqdm

from infinigen_sim import partial_results
from infinigen_sim.backends import LOCAL_RAY, BackendError, Executor, chunk_size, chunked, make_executor
from infinigen_sim.bundle import BundleError, write_text_atomic
from infinigen_sim.calibrate import (
    CalibrationError,
    load_calibration,
)
from infinigen_sim.costs import PhysicsCosts
from infinigen_sim.hardware import HardwareError, load_hardware, parse_value, resolve_path
from infinigen_sim.models import UnknownModelError
from infinigen_sim.pipeline import chrome_trace_json, trace_ops
from infinigen_sim.points import (
    POLICY_PREFIX,
    Point,
    SweepGrid,
    expand_points,
    row_columns,
    scenario_for,
    simulate_point,
)
from infinigen_sim.policies import (
    DEFAULT_FETCH_MODEL,
    PolicyConfig,
    PolicyError,
    PolicyName,
    parse_policy_name,
)

ERROR = "infinigen_sim.sweep: error: "  # every error is this and one line
MODES = ("fast", "full")
MAX_CHUNK = {"fast": 250, "full": 4}  # points per task, about a second: a fast point takes 2-7 ms, a full ~0.3 s


class SweepInputError(ValueError):
    """A command-line value that cannot be used; the message names the flag."""


@dataclass(frozen=True)
class SweepOptions:
    """How a sweep runs and where it writes."""

    out: str = field(default="results", metadata={"help": "output folder for results.csv and config.yaml"})
    jobs: int = field(default=1, metadata={
        "help": "local worker processes; with --ray and no ADDRESS, the local Ray instance's CPUs (1: all)"})
    mode: str = field(default="fast", metadata={
        "help": "fast: a few layers and steps, extrapolated (within 0.5%% of full); full: every event"})
    trace: str | None = field(default=None, metadata={
        "help": "write a Chrome trace (Perfetto) of the first fitting point's full replay to this file"})
    ray: str | None = field(default=None, metadata={
        "help": "run the points as Ray tasks, on a new local Ray instance or on the cluster at ADDRESS (auto, "
                "HOST:6379, ray://HOST:10001); give it after HW_CONFIG; needs pip install 'infinigen-sim[dist]'"})
    profile: str | None = field(default=None, metadata={
        "help": "profile bundle folder (python -m profiler.collect): op and copy times from its measurements, "
                "scaled by physics to other cards; adds columns calibration and extrapolated"})
    resume: bool = field(default=False, metadata={
        "help": "finish an interrupted sweep: skip the points already in DIR/results.partial.csv"})
    report: bool = field(default=False, metadata={
        "help": "also write the capacity-planning report (DIR/report/report.html and report.md)"})


# ---- running ---------------------------------------------------------------------------------
def iter_rows(points: Sequence[Point], executor: Executor, progress: bool = False,
              already_done: int = 0) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Simulate `points` on `executor` in chunks; yields (index of the chunk's first point, its rows) as
    chunks finish, in any order. The progress bar counts `already_done` points as finished."""
    if not points:
        return
    size = chunk_size(len(points), executor.workers, MAX_CHUNK.get(points[0].mode, MAX_CHUNK["full"]))
    bar = tqdm(total=already_done + len(points), initial=already_done, disable=not progress, file=sys.stderr,
               unit="pt", leave=False)
    with bar, closing(executor.map_chunks(simulate_point, chunked(points, size))) as finished:
        for index, rows in finished:
            bar.update(len(rows))
            yield index * size, rows


def run_sweep(points: Sequence[Point], jobs: int = 1, progress: bool = False,
              executor: Executor | None = None) -> pd.DataFrame:
    """Simulate `points` on `executor` (default: a process pool when jobs > 1); one row per point, in
    point order, with speedup_vs_flexgen."""
    with nullcontext(executor) if executor else make_executor(jobs) as ex:
        parts = dict(iter_rows(points, ex, progress))
    frame = pd.DataFrame([row for start in sorted(parts) for row in parts[start]])
    if not frame.empty:
        _add_speedup(frame)
    return frame


def run_sweep_to(out_dir: Path, points: Sequence[Point], executor: Executor,
                 progress: bool = False) -> pd.DataFrame:
    """Simulate the points without a row in DIR/results.partial.csv, appending each chunk's rows as it
    finishes; then every point's row read back from that file, in point order, with speedup_vs_flexgen."""
    path = Path(out_dir) / partial_results.PARTIAL_NAME
    if not points:
        return pd.DataFrame()
    done = partial_results.finished_keys(path)
    todo = [point for point in points if point.key not in done]
    columns = row_columns(points[0])
    for _, rows in iter_rows(todo, executor, progress, len(points) - len(todo)):
        partial_results.append_rows(path, rows, columns)
    frame = partial_results.read_rows(path, [point.key for point in points])
    _add_speedup(frame)
    return frame


def check_resume(out_dir: Path, points: Sequence[Point], config: dict[str, Any], resume: bool) -> int:
    """How many of `points` DIR/results.partial.csv already holds; SweepInputError when that file is
    there without --resume, or was written by another sweep (other columns, hardware, policies or mode)."""
    path = Path(out_dir) / partial_results.PARTIAL_NAME
    if not path.exists():
        return 0
    if not resume:
        raise SweepInputError(f"{path} exists (an interrupted sweep): add --resume to finish it, "
                              f"or choose a new --out")
    done = partial_results.finished_keys(path)
    found = partial_results.header(path)
    if found and points and found != row_columns(points[0]):
        raise SweepInputError(f"--resume: {path} has other columns than this sweep; choose a new --out")
    conflict = _config_conflict(Path(out_dir) / "config.yaml", config)
    if conflict:
        raise SweepInputError(f"--resume: {out_dir / 'config.yaml'} has another {conflict} than this sweep; "
                              f"rerun with the same config files and arguments, or choose a new --out")
    return sum(point.key in done for point in points)


def _config_conflict(path: Path, config: dict[str, Any]) -> str | None:
    """What in the earlier run's config.yaml would give its rows other numbers than this run's; None when nothing."""
    if not path.exists():
        return None
    old = yaml.safe_load(path.read_text()) or {}
    new = yaml.safe_load(yaml.safe_dump(config, sort_keys=False))  # tuples -> lists, as the file holds them
    for key in ("version", "mode", "fetch_model", "costs"):
        if old.get(key) != new.get(key):
            return f"'{key}'"
    for key in ("hardware", "policies"):
        for name in old.get(key, {}).keys() & new.get(key, {}).keys():
            if old[key][name] != new[key][name]:
                return f"'{key}: {name}'"
    return None


def _add_speedup(frame: pd.DataFrame) -> None:
    """tokens_per_s / flexgen's at the same point (everything but the policy equal); NaN without one."""
    same = [c for c in frame.columns[: frame.columns.get_loc("gen_len") + 1] if c != "policy"]
    base = frame[frame["policy"] == PolicyName.FLEXGEN.value].set_index(same)["tokens_per_s"]
    base = base[~base.index.duplicated()]
    lookup = pd.MultiIndex.from_frame(frame[same]) if len(same) > 1 else frame[same[0]]
    frame["speedup_vs_flexgen"] = frame["tokens_per_s"].to_numpy() / base.reindex(lookup).to_numpy()


# ---- outputs ---------------------------------------------------------------------------------
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


def resolved_config(hw_configs: Sequence[str], grid: SweepGrid, settings: dict[str, tuple[Any, ...]],
                    points: Sequence[Point], mode: str) -> dict[str, Any]:
    """Everything that decided the numbers, for config.yaml."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version("infinigen-sim")
    except PackageNotFoundError:
        package_version = "unknown"
    hardware = {}
    for point in points:
        name = "|".join([point.hw.name, *(f"{k}={v}" for k, v in point.settings if not k.startswith(POLICY_PREFIX))])
        hardware.setdefault(name, point.hw.to_dict())
    policies = {}
    for point in points:
        policies.setdefault(point.policy.name.value, {**asdict(point.policy), "name": point.policy.name.value})
    return {
        "version": package_version,
        "mode": mode,
        "hw_configs": [str(resolve_path(h)) for h in hw_configs],
        "grid": {k: list(v) for k, v in asdict(grid).items()},
        "settings": {k: list(v) for k, v in settings.items()},
        "hardware": hardware,
        "policies": policies,
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
    write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))


# ---- command line ----------------------------------------------------------------------------
class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{ERROR}{message}\n")


def build_parser() -> argparse.ArgumentParser:
    grid, options = SweepGrid(), SweepOptions()
    parser = _OneLineParser(
        prog="python -m infinigen_sim.sweep",
        description="Simulate KV-offloaded LLM decoding over a grid of points; write DIR/results.csv "
                    "(times in s, tokens/s, memory in GiB) and DIR/config.yaml.",
        epilog="Units: lengths in tokens, bandwidths in GB/s (1e9 B/s), compute in TFLOP/s, memory in GiB, "
               "latencies in microseconds, times in seconds. Example: --set link.h2d_gbps=16,32,64 "
               "--set policy.alpha=4")
    parser.add_argument("hw_configs", nargs="+", metavar="HW_CONFIG",
                        help="hardware YAML, a path or a bare name in hw_configs/ (e.g. a100_pcie4)")
    for f in fields(SweepGrid):
        default = ",".join(str(v) for v in getattr(grid, f.name))
        parser.add_argument(f"--{f.name.replace('_', '-')}", default=default,
                            help=f"{f.metadata['help']}; comma list (default {default})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE[,VALUE...]",
                        help="override a dotted hardware key (link.h2d_gbps, gpu.fp16_tflops, ...) or a "
                             "policy parameter (policy.alpha, policy.overlap, ...); a comma list sweeps it")
    for f in fields(SweepOptions):
        kwargs: dict[str, Any] = {"default": getattr(options, f.name),
                                  "help": f"{f.metadata['help']} (default %(default)s)"}
        if f.name == "jobs":
            kwargs["type"] = int
        if f.name == "mode":
            kwargs["choices"] = MODES
        if f.name == "ray":  # --ray alone: a local instance; give it after HW_CONFIG, or as --ray=ADDRESS
            kwargs.update(nargs="?", const=LOCAL_RAY, metavar="ADDRESS", help=f.metadata["help"])
        if f.name in ("resume", "report"):
            kwargs.update(action="store_true", help=f.metadata["help"])
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() and int(item) > 0 for item in items):
        raise SweepInputError(f"{flag}: expected a comma list of positive whole numbers, got '{text}'")
    return tuple(int(item) for item in items)


def _name_list(flag: str, text: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(","))
    if not all(items):
        raise SweepInputError(f"{flag}: expected a comma list of names, got '{text}'")
    return items


_POLICY_FIELDS = {f.name: f.type for f in fields(PolicyConfig) if f.name != "name"}


def parse_settings(items: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """--set KEY=V1[,V2...] -> {key: values}; policy.* values are checked against PolicyConfig."""
    settings: dict[str, tuple[Any, ...]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in text.split(",")]
        if not sep or not key or not all(values):
            raise SweepInputError(f"--set '{item}': expected KEY=VALUE[,VALUE...], e.g. link.h2d_gbps=16,32")
        if key in settings:
            raise SweepInputError(f"--set {key}: given twice; give one comma list instead")
        settings[key] = tuple(_setting_value(key, parse_value(v)) for v in values)
    return settings


def _setting_value(key: str, value: Any) -> Any:
    if not key.startswith(POLICY_PREFIX):
        return value  # hardware keys are checked by the loader, which names file and key
    name = key[len(POLICY_PREFIX):]
    if name not in _POLICY_FIELDS:
        raise SweepInputError(f"--set {key}: unknown policy parameter (expected one of "
                              f"{', '.join(POLICY_PREFIX + k for k in _POLICY_FIELDS)})")
    kind = str(_POLICY_FIELDS[name])
    ok = {"bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "float | None": value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))}
    if not ok.get(kind, False):
        raise SweepInputError(f"--set {key}: expected a {kind.replace('None', 'null')}, got {value!r}")
    return float(value) if kind.startswith("float") and value is not None else value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out)
    try:
        grid, settings, points = _parse_sweep(args)
        config = resolved_config(args.hw_configs, grid, settings, points, args.mode)
        done = check_resume(out_dir, points, config, args.resume)
    except (SweepInputError, HardwareError, PolicyError, UnknownModelError, BundleError, CalibrationError) as exc:
        flag = "--models: " if isinstance(exc, UnknownModelError) else ""
        flag = "--profile: " if isinstance(exc, (BundleError, CalibrationError)) else flag
        flag = "--policies: " if isinstance(exc, PolicyError) and "unknown policy" in str(exc) else flag
        print(f"{ERROR}{flag}{exc}".replace("\n", " "), file=sys.stderr)
        return 2
    if POLICY_PREFIX + "alpha" in settings:
        print(f"note: policy.alpha does not change simulated fetch counts; they come from the fetch model "
              f"({DEFAULT_FETCH_MODEL.source})", file=sys.stderr)
    if done:
        print(f"resuming: {done} of {len(points)} points already in {out_dir / partial_results.PARTIAL_NAME}",
              file=sys.stderr)
    try:
        frame = _run(args, out_dir, points, config)
        if args.trace:
            _write_trace(Path(args.trace), points)
    except BackendError as exc:
        print(f"{ERROR}{exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{ERROR}cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: finished points are in {out_dir / partial_results.PARTIAL_NAME}; "
              f"rerun with --resume to finish", file=sys.stderr)
        return 130
    print(summary_table(frame))
    print(f"\nwrote {out_dir / 'results.csv'} ({len(frame)} points) and {out_dir / 'config.yaml'}")
    if args.report:
        from infinigen_sim.report import ReportError, write_report  # floor 5: reached from the entry point only

        try:
            print(f"wrote {write_report(out_dir, out_dir / 'report')}")
        except (ReportError, ValueError) as exc:
            print(f"{ERROR}--report: {exc}".replace("\n", " "), file=sys.stderr)
            return 2
    return 0


def _run(args: argparse.Namespace, out_dir: Path, points: Sequence[Point], config: dict[str, Any]) -> pd.DataFrame:
    """Start the executor, run what is left, write results.csv and config.yaml, drop the partial file."""
    with make_executor(args.jobs, args.ray) as executor:
        write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))  # before any row
        frame = run_sweep_to(out_dir, points, executor, progress=len(points) >= 50 and sys.stderr.isatty())
    write_outputs(out_dir, frame, config)
    (out_dir / partial_results.PARTIAL_NAME).unlink(missing_ok=True)
    return frame


def _parse_sweep(args: argparse.Namespace) -> tuple[SweepGrid, dict[str, tuple[Any, ...]], list[Point]]:
    """The grid, the --set values and the points the command line asks for; SweepInputError and the
    loaders' errors name the flag."""
    grid = SweepGrid(models=_name_list("--models", args.models),
                     policies=tuple(parse_policy_name(p).value for p in _name_list("--policies", args.policies)),
                     batch_sizes=_int_list("--batch-sizes", args.batch_sizes),
                     prompt_lens=_int_list("--prompt-lens", args.prompt_lens),
                     gen_lens=_int_list("--gen-lens", args.gen_lens))
    if args.jobs < 1:
        raise SweepInputError(f"--jobs: expected a positive whole number, got {args.jobs}")
    settings = parse_settings(args.set)
    if args.profile is not None:
        load_calibration(args.profile, load_hardware(args.hw_configs[0]))  # a bad bundle fails here, in one line
    return grid, settings, expand_points(args.hw_configs, grid, settings, args.mode, args.profile)


def _write_trace(path: Path, points: Sequence[Point]) -> None:
    for point in points:
        sc, _ = scenario_for(point)
        if sc is not None:
            write_text_atomic(path, chrome_trace_json(trace_ops(sc)))
            print(f"trace of {point.key} -> {path}", file=sys.stderr)
            return
    print("no fitting point: no trace written", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
