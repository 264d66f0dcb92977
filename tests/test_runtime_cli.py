"""`python -m profiler.run`: every policy end to end with --json, --help with defaults and units, and
one-line errors with exit 2. Runs name --device cpu (fp32), so the 1e-4 logit tolerance holds on a GPU box too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infinigen_sim.spec.policies import ALL_POLICIES
from profiler.run import PROG, main

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--prompt-len", "48", "--gen-len", "4", "--warmup", "0", "--device", "cpu"]  # fp32: on a GPU box too


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_intra_op_thread
    return subprocess.run([sys.executable, "-m", "profiler.run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_every_policy_runs_with_json(policy):
    done = cli("--model", "tiny-llama-gqa", "--policy", policy, "--check", "--json", *SMALL)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for key in ("policy", "model", "prefill_s", "decode_s", "tokens_per_s", "fetched_fraction",
                "top1_agreement", "max_abs_logit_diff"):
        assert key in out
    assert out["policy"] == policy and out["model"] == "tiny-llama-gqa"
    assert out["tokens_per_s"] > 0 and 0.0 <= out["top1_agreement"] <= 1.0
    assert "device: cpu" in done.stderr


def test_unlimited_infinigen_agrees_fully_through_the_cli(capsys):
    assert main(["--model", "tiny-opt", "--alpha", "inf", "--max-fetch-ratio", "1", "--check", "--json", *SMALL]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top1_agreement"] == 1.0 and out["max_abs_logit_diff"] < 1e-4
    assert out["fetched_fraction"] == 1.0 and out["alpha"] == "inf"


def test_text_output_and_trace(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert main(["--policy", "flexgen", "--no-overlap", "--trace", str(trace), *SMALL]) == 0
    text = capsys.readouterr().out
    assert "tokens_per_s:" in text and "overlap: False" in text
    assert "traceEvents" in json.loads(trace.read_text())


@pytest.mark.parametrize("args, message", [
    (["--model", "gpt-5"], "unknown model"),
    (["--policy", "lru"], "unknown policy"),
    (["--alpha", "-1"], "argument --alpha: expected a number >= 0"),
    (["--max-fetch-ratio", "0"], "bad max_fetch_ratio"),
    (["--batch-size", "0"], "argument --batch-size: expected a whole number >= 1, got '0'"),
    (["--prompt-len", "5000"], "exceeds"),
    (["--gen-len", "x"], "argument --gen-len: expected a whole number"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--checkpoint", "/nonexistent"], "no config.json"),
    (["--trace", "/proc/trace.json"], "--trace /proc/trace.json: cannot write in /proc"),
])
def test_errors_exit_2_with_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith(f"{PROG}: error:")


def test_help_shows_defaults_and_units(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--prompt-len PROMPT_LEN prompt length [tokens] (default: 256)",
                     "[sequences] (default: 2)", "--alpha ALPHA InfiniGen: fetch tokens scoring above max - alpha "
                     "(inf: every token) (default: 4.0)", "--overlap, --no-overlap", "(default: infinigen)"):
        assert expected in text


def test_error_in_a_subprocess_has_no_traceback():
    done = cli("--policy", "nope")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
