"""Validation: a quick CPU bundle replayed by the simulator against its own end-to-end runs.

The bundle is the newest committed quick CPU bundle (`profiles/cpu-quick-*`: profiler.collect --quick,
tiny-opt and small-opt, every policy, batch 2 at prompts 128 and 256, 11 decode steps, each run's rows
the median of 5 generations, the model's op sweep dealt over those 5 rounds so that the ops and the
runs sample the same spells of a shared box; one torch thread). The replay is deterministic, so the
targets over every run's decode step and prefill (median |error| <= 10 %, p95 <= 20 %) are asserted
exactly: a change to the simulator or the calibration that loses them fails here. A fresh collection's
figures are a measurement, not a test: README gives the command and three fresh bundles' lines
(2026-12-02: 1.7 / 7.4, 2.5 / 8.0, 2.1 / 8.6). profiler.collect itself is tested in test_collect.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from infinigen_sim.analysis.validate import Run, abs_errors, fetch_model_of, measured_times, validate_bundle
from infinigen_sim.spec.ops import Op
from infinigen_sim.validate import main

ROOT = Path(__file__).resolve().parent.parent
MEDIAN_TARGET_PCT, P95_TARGET_PCT = 10.0, 20.0


@pytest.fixture(scope="module")
def quick_bundle(tmp_path_factory) -> Path:
    """A copy of the newest committed quick CPU bundle (tests write validation output beside it)."""
    source = sorted(p for p in ROOT.glob("profiles/cpu-quick-*") if not p.name.endswith("-validation"))[-1]
    out = tmp_path_factory.mktemp("validate") / "quick"
    shutil.copytree(source, out)
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


def _report(frame: pd.DataFrame) -> str:
    return frame[["run_id", "error_pct", "prefill_error_pct", "step_explained_by", "prefill_explained_by"]].to_string()


def test_cpu_median_target(validated):
    frame, _, _ = validated
    median = float(pd.Series(abs_errors(frame)).median())
    assert median <= MEDIAN_TARGET_PCT, f"median |error| {median:.1f}%\n{_report(frame)}"


def test_cpu_p95_target(validated):
    frame, _, _ = validated
    p95 = float(pd.Series(abs_errors(frame)).quantile(0.95))
    assert p95 <= P95_TARGET_PCT, f"p95 |error| {p95:.1f}%\n{_report(frame)}"


def test_small_model_steps_within_target(validated):
    """small-opt: every decode step within 20 %."""
    frame, _, _ = validated
    small = frame[frame["model"] == "small-opt"]
    assert len(small) == 10 and (small["error_pct"].abs() <= P95_TARGET_PCT).all(), _report(small)


def test_cli_writes_csv_and_markdown_beside_the_bundle(quick_bundle, capsys):
    before = sorted(p.name for p in quick_bundle.iterdir())
    assert main([str(quick_bundle)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"median_abs_error_pct=\d+\.\d p95_abs_error_pct=\d+\.\d", printed[-1])
    assert sorted(p.name for p in quick_bundle.iterdir()) == before  # a bundle is never written to
    out = quick_bundle.with_name(f"{quick_bundle.name}-validation")
    frame = pd.read_csv(out / "validation.csv")
    for column in ("policy", "model", "batch_size", "prompt_len", "gen_len", "measured_step_s", "predicted_step_s",
                   "error_pct", "measured_prefill_s", "predicted_prefill_s", "prefill_error_pct"):
        assert column in frame.columns
    text = (out / "validation.md").read_text()
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
    assert result.returncode == 2 and "key 'schema_version': expected 2, got 0" in result.stderr


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
                     for op, s in (("qkv", 0.001), ("norm", 0.0005), ("ffn", 0.005))]
        rows.append({**base, "phase": "decode", "step": step, "layer": -1, "op": "wall", "seconds": wall,
                     "context_len": 8 + step, "fetched_tokens": 0})
    return pd.DataFrame(rows)


def test_measured_times_take_the_median_step_and_sum_each_phase_over_layers():
    run = Run.from_rows("r", _rows("flexgen", {0: [8, 9], 1: [8, 9]}))
    times = measured_times(run)
    assert run.complete and times.prefill_s == 0.5 and times.step_s == pytest.approx(0.020)
    assert times.step_phases == {"qkv": pytest.approx(0.002), "norm": pytest.approx(0.001),
                                 "ffn": pytest.approx(0.010)}


def test_infinigen_fetch_counts_are_replayed_per_layer():
    run = Run.from_rows("r", _rows("infinigen", {0: [8, 9], 1: [3, 5]}))
    model = fetch_model_of(run, n_layers=2)
    assert model.tokens(9, layer=1) == pytest.approx(4.0) and model.tokens(100, layer=0) == pytest.approx(8.5)
    assert fetch_model_of(Run.from_rows("r", _rows("flexgen", {0: [8, 9], 1: [8, 9]})), 2) is None


# ---- the runtime's timeline beside the prediction --------------------------------------------
def test_trace_puts_one_measured_step_beside_its_prediction(quick_bundle, tmp_path, capsys):
    from profiler.run import main as run_main

    trace = tmp_path / "run.json"
    assert run_main(["--model", "tiny-opt", "--policy", "infinigen", "--batch-size", "2", "--prompt-len", "128",
                     "--gen-len", "6", "--threads", "1", "--trace", str(trace)]) == 0
    out = tmp_path / "val"
    assert main([str(quick_bundle), "--trace", str(trace), "--trace-step", "2", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out.splitlines()[-1]
    both = json.loads((out / "trace_side_by_side.json").read_text())
    names = {e["pid"]: e["args"]["name"] for e in both["traceEvents"] if e.get("name") == "process_name"}
    assert set(names.values()) == {"measured: gpu", "measured: host", "predicted: gpu", "predicted: host"}
    events = [e for e in both["traceEvents"] if e["ph"] == "X"]
    measured = [e for e in events if names[e["pid"]].startswith("measured")]
    predicted = [e for e in events if names[e["pid"]].startswith("predicted")]
    for side in (measured, predicted):
        assert {e["args"]["step"] for e in side} == {2}
        assert min(e["ts"] for e in side) == 0.0
        assert {"attention", "ffn", "gather"} <= {e["name"] for e in side}  # compute thread and copy worker
        assert {e["cat"] for e in side} >= {"gpu", "host_cpu"}
    assert {e["name"] for e in measured} <= {op.value for op in Op}
    info = both["otherData"]
    assert info["step"] == 2 and info["run"]["policy"] == "infinigen" and info["measured_step_us"] > 0


def test_a_trace_of_another_device_or_a_foreign_file_is_one_line(quick_bundle, tmp_path):
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"traceEvents": [{"ph": "X", "name": "x"}]}')
    cuda = tmp_path / "cuda.json"
    cuda.write_text(json.dumps({"traceEvents": [], "otherData": {
        "model": "tiny-opt", "policy": "flexgen", "alpha": 4, "overlap": True, "batch_size": 1, "prompt_len": 8,
        "gen_len": 3, "device": "cuda", "fetched_per_step": []}}))
    for path, needle in ((foreign, "not a trace this project wrote"), (cuda, "a cuda run, but the bundle measured cpu"),
                         (tmp_path / "none.json", "cannot read")):
        result = subprocess.run([sys.executable, "-m", "infinigen_sim.validate", str(quick_bundle), "--trace",
                                 str(path), "--out", str(tmp_path / f"out-{path.stem}")], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
        assert not (tmp_path / f"out-{path.stem}").exists()
