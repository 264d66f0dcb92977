"""Validation: a quick CPU bundle replayed by the simulator against its own end-to-end runs.

The bundle is collected here (profiler.collect, --quick, one torch thread: a second intra-op thread
stalls for whole scheduler ticks, 8 ms a call, whenever another process holds the other core of a
shared 2-core box). Targets: median |error| <= 10 %, p95 <= 20 % over every run's decode step and
prefill, with no margin: the measured step is already the median over a run's decode steps, and a
prefill is one sample, so a stray descheduling can still cost one point of five; the target test is
an expected failure until the model reaches it (its reason says where it stands).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from infinigen_sim.validate import (
    Run,
    abs_errors,
    fetch_model_of,
    main,
    measured_times,
    validate_bundle,
)
from profiler import collect

ROOT = Path(__file__).resolve().parent.parent
MEDIAN_TARGET_PCT, P95_TARGET_PCT = 10.0, 20.0


@pytest.fixture(scope="module")
def quick_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("validate") / "quick"
    assert collect.main(["--device", "cpu", "--quick", "--threads", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def validated(quick_bundle):
    return validate_bundle(quick_bundle)


def test_predictions_are_sane(validated):
    """Whatever the accuracy: every prediction finite and within 10x of what was measured."""
    frame, _, _ = validated
    ratio = pd.concat([frame["predicted_step_s"] / frame["measured_step_s"],
                       frame["predicted_prefill_s"] / frame["measured_prefill_s"]])
    assert ratio.between(0.1, 10).all(), frame.to_string()


def test_every_run_is_replayed(quick_bundle, validated):
    frame, cal, hw = validated
    steps = pd.read_csv(quick_bundle / "steps.csv")
    assert set(frame["run_id"]) == set(steps["run_id"])
    assert set(frame["policy"]) == {"ideal", "flexgen", "int4", "h2o", "infinigen"}
    assert (frame["calibration"] == "profile").all() and cal.cpu and hw is cal.source
    for column in ("measured_step_s", "predicted_step_s", "measured_prefill_s", "predicted_prefill_s"):
        assert (frame[column] > 0).all()
    assert frame["h2o_fetch_matches"].dropna().astype(bool).all()  # H2O's budget: the same in both worlds


@pytest.mark.xfail(strict=False, reason=(
    "not reached yet: quick bundles on this box give median 24-34%, p95 46-70%, every step under-predicted. "
    "The gap lies in what the bundle does not measure: kernels.py times decode ops on hot layer-0 weights "
    "(the cache-vs-memory correction is an estimate), kernels.csv lacks InfiniGen's skew and H2O's score, "
    "transfers.csv lacks the copy-worker handoff (estimated), and the quick runs (prompt 64 < the kernel grid's "
    "128, 3 decode steps, one sample each) sit outside the kernel grid"))
def test_cpu_targets(validated):
    frame, _, _ = validated
    errors = abs_errors(frame)
    median, p95 = float(pd.Series(errors).median()), float(pd.Series(errors).quantile(0.95))
    report = frame[["run_id", "error_pct", "prefill_error_pct", "step_explained_by", "prefill_explained_by"]]
    assert median <= MEDIAN_TARGET_PCT, f"median |error| {median:.1f}%\n{report.to_string()}"
    assert p95 <= P95_TARGET_PCT, f"p95 |error| {p95:.1f}%\n{report.to_string()}"


def test_cli_writes_csv_and_markdown(quick_bundle, capsys):
    assert main([str(quick_bundle)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"median_abs_error_pct=\d+\.\d p95_abs_error_pct=\d+\.\d", printed[-1])
    frame = pd.read_csv(quick_bundle / "validation.csv")
    for column in ("policy", "model", "batch_size", "prompt_len", "gen_len", "measured_step_s", "predicted_step_s",
                   "error_pct", "measured_prefill_s", "predicted_prefill_s", "prefill_error_pct"):
        assert column in frame.columns
    text = (quick_bundle / "validation.md").read_text()
    assert "| infinigen |" in text and "InfiniGen over FlexGen" in text and text.strip().endswith(printed[-1])


def test_a_bundle_without_steps_is_a_one_line_error(quick_bundle, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("meta.yaml", "kernels.csv", "transfers.csv"):
        (bare / name).write_text((quick_bundle / name).read_text())
    result = subprocess.run([sys.executable, "-m", "infinigen_sim.validate", str(bare)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "steps.csv is missing or empty" in result.stderr


def test_another_schema_version_is_a_one_line_error(quick_bundle, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for name in ("kernels.csv", "transfers.csv", "steps.csv"):
        (old / name).write_text((quick_bundle / name).read_text())
    meta = yaml.safe_load((quick_bundle / "meta.yaml").read_text())
    (old / "meta.yaml").write_text(yaml.safe_dump({**meta, "schema_version": 0}))
    result = subprocess.run([sys.executable, "-m", "infinigen_sim.validate", str(old)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "key 'schema_version': expected 1, got 0" in result.stderr


# ---- the measured side -----------------------------------------------------------------------
def _rows(policy: str, fetched: dict[int, list[int]]) -> pd.DataFrame:
    """A two-layer run: prefill, then two decode steps with the given per-layer fetched rows."""
    base = {"run_id": "r", "model": "tiny-opt", "policy": policy, "batch_size": 1, "prompt_len": 8, "gen_len": 3,
            "alpha": 4.0, "overlap": True}
    rows = [{**base, "phase": "prefill", "step": -1, "layer": -1, "op": "wall", "seconds": 0.5, "context_len": 8,
             "fetched_tokens": 0}]
    for step, wall in ((0, 0.010), (1, 0.030)):
        for layer in (0, 1):
            rows += [{**base, "phase": "decode", "step": step, "layer": layer, "op": op, "seconds": s,
                      "context_len": 8 + step, "fetched_tokens": fetched[layer][step]}
                     for op, s in (("qkv", 0.001), ("o_proj", 0.002), ("ffn", 0.003))]
        rows.append({**base, "phase": "decode", "step": step, "layer": -1, "op": "wall", "seconds": wall,
                     "context_len": 8 + step, "fetched_tokens": 0})
    return pd.DataFrame(rows)


def test_measured_times_take_the_median_step_and_sum_o_proj_into_ffn():
    run = Run.from_rows("r", _rows("flexgen", {0: [8, 9], 1: [8, 9]}))
    times = measured_times(run)
    assert run.complete and times.prefill_s == 0.5 and times.step_s == pytest.approx(0.020)
    assert times.step_phases == {"qkv": pytest.approx(0.002), "ffn": pytest.approx(0.010)}


def test_infinigen_fetch_counts_are_replayed_per_layer():
    run = Run.from_rows("r", _rows("infinigen", {0: [8, 9], 1: [3, 5]}))
    model = fetch_model_of(run, n_layers=2)
    assert model.tokens(9, layer=1) == pytest.approx(4.0) and model.tokens(100, layer=0) == pytest.approx(8.5)
    assert fetch_model_of(Run.from_rows("r", _rows("flexgen", {0: [8, 9], 1: [8, 9]})), 2) is None
