"""experiments/bench_*.py: --help starts nothing, a bad flag is one line (exit 2), and SIGTERM leaves no process
behind (bench_ray once left its pool workers and Ray's agents running: Ray's core replaced the SIGTERM handler
with one that aborts).

Each benchmark runs with an environment variable set to a fresh tag; every process it starts (pool workers,
Ray's GCS, raylet, agents and workers) inherits it, so a leftover is found by scanning /proc for the tag.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("bench_sweep.py", "bench_ray.py")
TAG_VAR = "INFINIGEN_BENCH_TEST_TAG"


def tagged(tag: str) -> dict[int, str]:
    """{pid: command line} of the live processes whose environment carries `tag`."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"{TAG_VAR}={tag}".encode() in (proc / "environ").read_bytes():
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_starts_nothing(script):
    result = subprocess.run([sys.executable, f"experiments/{script}", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage:") and "exit status" in result.stdout
    assert "points" not in result.stderr and "Ray started" not in result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_flag_is_one_line(script):
    result = subprocess.run([sys.executable, f"experiments/{script}", "--bogus"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "unrecognized arguments" in result.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="scans /proc")
@pytest.mark.parametrize(("script", "started"), [("bench_sweep.py", "fast:"), ("bench_ray.py", "Ray started")])
def test_sigterm_leaves_no_process_behind(tmp_path, script, started):
    if script == "bench_ray.py" and importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (the dist extra)")
    tag = uuid.uuid4().hex
    out = tmp_path / "out.txt"
    with out.open("w") as stdout:
        proc = subprocess.Popen([sys.executable, f"experiments/{script}"], cwd=ROOT, stdout=stdout,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, TAG_VAR: tag})
    try:
        deadline = time.monotonic() + 180
        while started not in out.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert started in out.read_text(), out.read_text()
        time.sleep(1)  # the pool (bench_sweep's full pass, bench_ray's first local run) is up
        assert len(tagged(tag)) > 1  # the benchmark and what it started
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err, err[-2000:]
    left = tagged(tag)
    for _ in range(40):  # Ray's processes exit on their own schedule once shut down
        if not left:
            break
        time.sleep(0.25)
        left = tagged(tag)
    for pid in left:  # do not leave them to the next test either
        os.kill(pid, signal.SIGKILL)
    assert left == {}


def test_cpu_fidelity_prints_its_side_by_side_figures():
    """experiments/cpu_fidelity.py (the figures behind the CPU collection's rounds, in-context ops and
    handoff bench): one drift line, one context line, one handoff line per offloaded policy, all measured."""
    result = subprocess.run([sys.executable, "experiments/cpu_fidelity.py", "--seconds", "0.5", "--samples", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["drift", "context"] + ["handoff"] * 4
    assert re.search(r"bench with layer context \d+ us, bench alone \d+ us, engine step \d+ us", lines[1])
    assert all(re.search(r"jobs per layer \d+ us; .* \d+ us \(\d+\.\d+x\)", line) for line in lines[2:])
