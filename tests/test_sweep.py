"""The sweep: points, rows, outputs, and the command line's errors."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from infinigen_sim.spec.hardware import HW_DIR, all_config_paths, load_hardware
from infinigen_sim.spec.policies import make_policy
from infinigen_sim.sweep.__main__ import main
from infinigen_sim.sweep.grid import Point, SweepGrid, expand_points
from infinigen_sim.sweep.point import simulate_point
from infinigen_sim.sweep.run import run_sweep

SMALL_GRID = SweepGrid(models=("small-opt",), batch_sizes=(1, 4), prompt_lens=(256,), gen_lens=(8,))
SMALL_ARGS = ["--models", "small-opt", "--batch-sizes", "1,4", "--prompt-lens", "256", "--gen-lens", "8"]


def test_points_are_picklable_and_keyed_by_their_parameters():
    points = expand_points(["a100_pcie4"], SMALL_GRID, {"link.h2d_gbps": (16, 32)})
    assert len(points) == 2 * 5 * 2
    assert len({p.key for p in points}) == len(points)
    assert pickle.loads(pickle.dumps(points[0])) == points[0]
    assert points[0].key == ("hw=a100_pcie4|runtime=infinigen-sim|link.h2d_gbps=16|model=small-opt|policy=ideal|"
                             "batch_size=1|"
                             "prompt_len=256|gen_len=8")


@pytest.mark.parametrize("path", all_config_paths(), ids=lambda p: p.stem)
def test_every_hardware_config_runs_a_small_point(path):
    row = simulate_point(Point(load_hardware(path), "small-llama-gqa", make_policy("infinigen"), 1, 256, 4))
    assert row["fits"] and row["total_s"] > 0 and row["tokens_per_s"] > 0


def test_a_point_that_does_not_fit_is_reported_not_simulated():
    row = simulate_point(Point(load_hardware("a100_pcie4"), "opt-13b", make_policy("ideal"), 64, 32768, 128))
    assert row["fits"] is False and row["reason"].startswith("gpu memory")
    assert all(math.isnan(row[c]) for c in ("prefill_s", "decode_s", "total_s", "tokens_per_s"))
    assert row["bottleneck"] == "" and row["gpu_mem_gib"] > 79


def test_speedup_is_relative_to_flexgen_at_the_same_point():
    frame = run_sweep(expand_points(["a100_pcie4"], SMALL_GRID))
    flexgen = frame[frame.policy == "flexgen"]
    assert (flexgen.speedup_vs_flexgen == 1.0).all()
    row = frame[(frame.policy == "infinigen") & (frame.batch_size == 4)].iloc[0]
    base = flexgen[flexgen.batch_size == 4].iloc[0]
    assert row.speedup_vs_flexgen == pytest.approx(row.tokens_per_s / base.tokens_per_s)
    assert row.tokens_per_s == pytest.approx(4 * 8 / row.total_s)


def test_speedup_is_empty_without_flexgen():
    grid = SweepGrid(models=("small-opt",), policies=("ideal", "infinigen"), batch_sizes=(1,),
                     prompt_lens=(256,), gen_lens=(8,))
    assert run_sweep(expand_points(["a100_pcie4"], grid)).speedup_vs_flexgen.isna().all()


def test_a_swept_setting_makes_one_row_per_value(tmp_path):
    assert main(["a100_pcie4", *SMALL_ARGS, "--policies", "flexgen", "--set", "link.h2d_gbps=16,32",
                 "--out", str(tmp_path)]) == 0
    frame = pd.read_csv(tmp_path / "results.csv")
    assert len(frame) == 4 and sorted(frame["link.h2d_gbps"]) == [16, 16, 32, 32]
    slow, fast = (frame[frame["link.h2d_gbps"] == v].total_s.to_numpy() for v in (16, 32))
    assert (fast <= slow).all() and fast[-1] < slow[-1]  # batch 1 is bound by the host dispatching the ops
    assert "link.h2d_gbps" in (tmp_path / "config.yaml").read_text()


def test_policy_settings_reach_the_policy(tmp_path):
    assert main(["a100_pcie4", *SMALL_ARGS, "--policies", "infinigen", "--set", "policy.overlap=true,false",
                 "--out", str(tmp_path)]) == 0
    frame = pd.read_csv(tmp_path / "results.csv")
    overlapped = frame[frame["policy.overlap"]].total_s.to_numpy()
    serial = frame[~frame["policy.overlap"]].total_s.to_numpy()
    assert (overlapped < serial).all()


def test_two_runs_write_byte_identical_csv(tmp_path):
    for name, jobs in (("a", "1"), ("b", "1"), ("c", "2")):
        assert main(["a100_pcie4", *SMALL_ARGS, "--jobs", jobs, "--out", str(tmp_path / name)]) == 0
    first = (tmp_path / "a" / "results.csv").read_bytes()
    assert first == (tmp_path / "b" / "results.csv").read_bytes() == (tmp_path / "c" / "results.csv").read_bytes()


def test_trace_is_written(tmp_path):
    trace = tmp_path / "t.json"
    assert main(["a100_pcie4", *SMALL_ARGS, "--out", str(tmp_path), "--trace", str(trace)]) == 0
    assert trace.read_text().startswith('{"traceEvents":')


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infinigen_sim.sweep", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


BAD_YAML = "gpu: {name: x, memory_gib: 8\n"  # unclosed mapping
A100 = HW_DIR / "a100_pcie4.yaml"
UNKNOWN_KEY = f"base: {A100}\ngpu: {{tensor_cores: 3}}\n"
NEGATIVE = f"base: {A100}\nlink: {{d2h_gbps: -8}}\n"


@pytest.mark.parametrize(("args", "expected"), [
    (["a100_pcie4", "--models", "opt-14b"], "--models: unknown model 'opt-14b'"),
    (["a100_pcie4", "--policies", "flexgen,magic"], "--policies: unknown policy 'magic'"),
    (["a100_pcie4", "--batch-sizes", "1,x"], "--batch-sizes: expected a comma list of whole numbers >= 1"),
    (["a100_pcie4", "--prompt-lens", "0"], "--prompt-lens: expected a comma list"),
    (["a100_pcie4", "--set", "link.h2d_gbps"], "--set 'link.h2d_gbps': expected KEY=VALUE"),
    (["a100_pcie4", "--set", "link.h2d_gbps=-5"], "key 'link.h2d_gbps': expected a positive number"),
    (["a100_pcie4", "--set", "gpu.warp_size=32"], "--set unknown key 'gpu.warp_size'"),
    (["a100_pcie4", "--set", "policy.alpha=-1"], "--set policy.alpha: policy ideal: bad alpha=-1.0"),
    (["a100_pcie4", "--set", "policy.overlap=maybe"], "--set policy.overlap: expected a true or false"),
    (["no_such_gpu"], "no_such_gpu: no such hardware config"),
    (["a100_pcie4", "--jobs", "two"], "argument --jobs: expected a whole number >= 1"),
    (["BAD_YAML"], "malformed YAML"),
    (["UNKNOWN_KEY"], "unknown key 'gpu.tensor_cores'"),
    (["NEGATIVE"], "key 'link.d2h_gbps': expected a positive number (in GB/s), got -8"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, expected):
    files = {"BAD_YAML": BAD_YAML, "UNKNOWN_KEY": UNKNOWN_KEY, "NEGATIVE": NEGATIVE}
    if args[0] in files:
        path = tmp_path / f"{args[0].lower()}.yaml"
        path.write_text(files[args[0]])
        args = [str(path)]
    result = _cli(*args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_help_states_units():
    result = _cli("--help")
    assert result.returncode == 0
    for unit in ("tokens", "GB/s", "TFLOP/s", "GiB", "seconds"):
        assert unit in result.stdout
