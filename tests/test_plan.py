"""Capacity planning: golden output for a fixed request, the ranking and Pareto rules, and errors.

Regenerate the golden files after an intended change to the simulator or the output format with
    INFINIGEN_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_plan.py
and review the diff: the simulator is deterministic, so the comparison is exact.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from infinigen_sim.analysis.plan import PlanRequest, evaluate, ranked
from infinigen_sim.plan import main

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("INFINIGEN_UPDATE_GOLDEN") == "1"
GOLDEN_ARGS = ["--model", "llama-3-8b", "--prompt-len", "32768", "--gen-len", "128", "--target-tokens-per-s", "10",
               "--batch-sizes", "1,4,16,64", "a100_pcie4", "rtx4090_pcie4", "l4_pcie4"]
SMALL = PlanRequest("small-opt", 1024, 8, 1000.0, batch_sizes=(1, 4, 16))


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with INFINIGEN_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from the golden file (INFINIGEN_UPDATE_GOLDEN=1 regenerates)"


def test_plan_output_matches_golden(tmp_path, capsys):
    out = tmp_path / "plan.csv"
    assert main([*GOLDEN_ARGS, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.replace(str(out), "PLAN.csv")
    _check_golden("plan_llama3_8b_32k.txt", printed)
    _check_golden("plan_llama3_8b_32k.csv", out.read_text())


@pytest.fixture(scope="module")
def small_plan() -> pd.DataFrame:
    return evaluate(["a100_pcie4", "a100_sxm4", "l4_pcie4"], SMALL)


def test_unpriced_hardware_ranks_after_priced_and_is_kept(small_plan):
    order = ranked(small_plan)
    assert order["meets_target"].all() and len(order) == small_plan["meets_target"].sum()
    priced = order["usd_per_mtok"].notna().to_numpy()
    assert priced.any() and not priced.all()
    assert list(priced) == sorted(priced, reverse=True)  # every priced row before every unpriced one
    assert (order[priced]["usd_per_mtok"].diff().dropna() >= 0).all()
    assert "a100_pcie4" in set(order["hw"])  # the unpriced config is listed, not dropped


def test_cost_and_latency_follow_their_definitions(small_plan):
    row = small_plan[small_plan["fits"] & (small_plan["hw"] == "a100_sxm4")].iloc[0]
    assert row["ms_per_token"] == pytest.approx(1e3 * row["decode_s"] / (row["gen_len"] - 1))
    assert row["usd_per_mtok"] == pytest.approx(1.79 / 3600 / row["tokens_per_s"] * 1e6)


def test_pareto_front_is_not_dominated(small_plan):
    fits = small_plan[small_plan["fits"]]
    front = fits[fits["on_pareto"]]
    assert not front.empty
    for _, row in front.iterrows():
        better = fits[(fits["tokens_per_s"] > row["tokens_per_s"]) & (fits["ms_per_token"] < row["ms_per_token"])]
        assert better.empty
    for _, row in fits[~fits["on_pareto"]].iterrows():  # everything off the front is matched or beaten
        assert ((front["tokens_per_s"] >= row["tokens_per_s"]) & (front["ms_per_token"] <= row["ms_per_token"])).any()


def test_unmet_target_names_the_best_and_exits_1(capsys):
    code = main(["--model", "small-opt", "--prompt-len", "1024", "--gen-len", "8", "--target-tokens-per-s", "1e9",
                 "--batch-sizes", "1,4", "a100_pcie4", "l4_pcie4"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("no configuration meets >= 1e+09 tokens/s: best achievable is ") and " on " in err


BASE = {"--model": "small-opt", "--prompt-len": "256", "--gen-len": "4", "--target-tokens-per-s": "1",
        "--batch-sizes": "1"}


@pytest.mark.parametrize(("flags", "positional", "expected"), [
    ({"--model": "opt-14b"}, ["a100_pcie4"], "--model: unknown model 'opt-14b'"),
    ({"--policies": "flexgen,magic"}, ["a100_pcie4"], "--policies: unknown policy 'magic'"),
    ({"--batch-sizes": "1,x"}, ["a100_pcie4"], "--batch-sizes: expected a comma list of whole numbers >= 1"),
    ({"--gen-len": "1"}, ["a100_pcie4"], "--gen-len: expected a whole number >= 2"),
    ({"--target-tokens-per-s": "-3"}, ["a100_pcie4"], "--target-tokens-per-s: expected a number >= 0"),
    ({"--target-tokens-per-s": "0"}, ["a100_pcie4"], "--target-tokens-per-s: expected a positive number"),
    ({}, ["a100_pcie4", "--bogus"], "unrecognized arguments: --bogus"),
    ({}, ["no_such_gpu"], "no_such_gpu: no such hardware config"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, flags, positional, expected):
    argv = [x for item in {**BASE, **flags}.items() for x in item] + positional
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err, err


def test_command_line_has_no_traceback():
    result = subprocess.run([sys.executable, "-m", "infinigen_sim.plan", "--model", "small-opt", "--prompt-len",
                             "256", "--gen-len", "4", "--target-tokens-per-s", "1", "nope"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1
