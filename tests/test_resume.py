"""Resuming a sweep: rows are appended as chunks finish; --resume runs only the points without a row and
writes the same results.csv, byte for byte, as a run that was never interrupted."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infinigen_sim.sweep import run as sweep
from infinigen_sim.sweep.__main__ import main
from infinigen_sim.sweep.grid import SweepGrid, expand_points
from infinigen_sim.sweep.point import row_columns, simulate_point
from infinigen_sim.sweep.results import PARTIAL_NAME, append_rows

GRID = SweepGrid(models=("small-opt", "small-llama-gqa"), batch_sizes=(1, 4), prompt_lens=(256, 512), gen_lens=(8,))
ARGS = ["a100_pcie4", "--models", "small-opt,small-llama-gqa", "--batch-sizes", "1,4", "--prompt-lens", "256,512",
        "--gen-lens", "8"]  # GRID on the command line: 2 models x 5 policies x 2 x 2 = 40 points
LONG_ARGS = ["a100_pcie4", "--models", "small-opt,small-llama-gqa", "--batch-sizes", "1,2,4,8,16",
             "--prompt-lens", "256,512,1024,2048,4096", "--gen-lens", "8,16,32"]  # 750 points in 4 chunks, ~1 s


def _results(out: Path) -> bytes:
    return (out / "results.csv").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("reference")
    assert main([*ARGS, "--out", str(out)]) == 0
    assert not (out / PARTIAL_NAME).exists()  # removed once results.csv is written
    return _results(out)


@pytest.fixture
def count_points(monkeypatch) -> list[str]:
    """Keys of the points simulated in this process (--jobs 1 runs them here)."""
    keys: list[str] = []

    def counting(point):
        keys.append(point.key)
        return simulate_point(point)

    monkeypatch.setattr(sweep, "simulate_point", counting)
    return keys


def test_a_torn_partial_file_resumes_to_the_same_csv(tmp_path, reference, count_points):
    points = expand_points(["a100_pcie4"], GRID)
    partial = tmp_path / PARTIAL_NAME
    append_rows(partial, [simulate_point(p) for p in points[:14]], row_columns(points[0]))
    whole = partial.read_bytes()
    partial.write_bytes(whole[:whole.rfind(b"\n", 0, -1) + 40])  # a kill 40 bytes into the 14th row
    assert main([*ARGS, "--out", str(tmp_path), "--resume"]) == 0
    assert _results(tmp_path) == reference
    assert count_points == [p.key for p in points[13:]]  # the torn row again, then only what was missing
    assert not partial.exists()


def test_a_killed_sweep_resumes_to_the_same_csv(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    run = subprocess.Popen([sys.executable, "-m", "infinigen_sim.sweep", *LONG_ARGS, "--out", str(killed)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = killed / PARTIAL_NAME
    deadline = time.monotonic() + 60
    while run.poll() is None and time.monotonic() < deadline:
        if partial.exists() and partial.read_bytes().count(b"\n") > 1:  # at least one chunk's rows are in
            run.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert run.wait(timeout=60) == -signal.SIGKILL, "the sweep finished before it could be killed"
    assert not (killed / "results.csv").exists()
    n_done = partial.read_bytes().count(b"\n") - 1
    assert 0 < n_done < 750

    assert main([*LONG_ARGS, "--out", str(killed), "--resume"]) == 0
    assert main([*LONG_ARGS, "--out", str(whole)]) == 0
    assert _results(killed) == _results(whole)


def test_resume_without_a_partial_file_just_runs(tmp_path, reference):
    assert main([*ARGS, "--out", str(tmp_path), "--resume"]) == 0
    assert _results(tmp_path) == reference


def test_a_partial_file_needs_resume(tmp_path, capsys):
    (tmp_path / PARTIAL_NAME).write_text("hw,model\n")
    assert main([*ARGS, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "add --resume" in err and "new --out" in err, err
    assert not (tmp_path / "results.csv").exists()


@pytest.mark.parametrize(("change", "expected"), [
    (["--mode", "full"], "another 'mode'"),
    (["--set", "link.h2d_gbps=7"], "other columns"),
])
def test_resume_refuses_another_sweeps_partial_file(tmp_path, capsys, change, expected):
    assert main([*ARGS, "--out", str(tmp_path)]) == 0
    (tmp_path / PARTIAL_NAME).write_bytes(_results(tmp_path))  # a sweep killed after its last row
    assert main([*ARGS, *change, "--out", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_a_complete_partial_file_resumes_without_simulating(tmp_path, count_points):
    assert main([*ARGS, "--out", str(tmp_path)]) == 0
    (tmp_path / PARTIAL_NAME).write_bytes(_results(tmp_path))
    count_points.clear()
    assert main([*ARGS, "--out", str(tmp_path), "--resume"]) == 0
    assert count_points == [] and not (tmp_path / PARTIAL_NAME).exists()
