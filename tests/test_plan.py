"""Capacity planning: golden output for a fixed request, the ranking and Pareto rules, errors, and the
accuracy-aware plan (--max-ppl-increase: each policy at its cheapest measured setting within the limit).

Regenerate the golden files after an intended change to the simulator or the output format with
    INFINIGEN_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_plan.py
and review the diff: the simulator is deterministic, so the comparison is exact.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_accuracy_table import table_rows

from infinigen_sim.analysis.plan import AccuracyPick, PlanRequest, evaluate, h2o_at_fraction, ranked
from infinigen_sim.plan import main
from infinigen_sim.spec.accuracy import find_table, measured_fetch_model, to_csv
from infinigen_sim.spec.policies import h2o_budget, make_policy

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


# ---- accuracy-aware planning ------------------------------------------------------------------
ACCURACY_ARGS = ["--model", "smollm2-135m", "--prompt-len", "1024", "--gen-len", "16", "--target-tokens-per-s", "1",
                 "--batch-sizes", "1,8"]


def test_max_ppl_increase_plans_each_policy_at_its_cheapest_setting_within_the_limit(tmp_path, capsys):
    table = tmp_path / "accuracy.csv"
    table.write_text(to_csv(table_rows()))
    out = tmp_path / "plan.csv"
    assert main([*ACCURACY_ARGS, "--max-ppl-increase", "5", "--accuracy", str(table), "--out", str(out),
                 "a100_pcie4"]) == 0
    printed = capsys.readouterr().out
    # within +5 % of 40: infinigen a=4 (8 % fetched) beats b=0.1 (10 %); b=0.05 (+10 %) is out; h2o b=0.2 only
    for line in ("infinigen  infinigen a=4", "h2o        h2o b=0.2", "int4       int4",
                 "flexgen    full KV (lossless)"):
        assert line in printed, printed
    assert "oracle" not in printed.split("\n\n")[0].replace("oracle b=0.05", "")  # a bound, never planned
    plan = pd.read_csv(out)
    assert dict(zip(plan["policy"], plan["setting"], strict=False))["infinigen"] == "infinigen a=4"
    tight = main([*ACCURACY_ARGS, "--max-ppl-increase", "3", "--accuracy", str(table), "a100_pcie4"])
    assert tight == 0 and "h2o: no measured setting within +3 %; best +4.75 % (left out)" in capsys.readouterr().out


def test_planned_infinigen_replays_its_measured_fetch_and_h2o_its_fraction():
    request = PlanRequest("smollm2-135m", 4096, 16, 1.0, batch_sizes=(8,))
    lean, heavy = (AccuracyPick("infinigen", label, 0.0, share, make_policy("infinigen", alpha=math.inf,
                                                                           max_fetch_ratio=0.3),
                                measured_fetch_model([1.0, 1.0] + [share] * 28, label))
                   for label, share in (("lean", 0.02), ("heavy", 0.25)))
    fast, slow = (evaluate(["a100_pcie4"], request, picks=[p]).iloc[0] for p in (lean, heavy))
    assert fast["setting"] == "lean" and fast["tokens_per_s"] > slow["tokens_per_s"]
    h2o = h2o_at_fraction(0.1, 4096, 16)
    heavy_rows, recent_rows = h2o_budget(h2o, 4096)
    contexts = range(4096, 4096 + 15)
    share = sum(min(c, heavy_rows + recent_rows) / c for c in contexts) / len(contexts)
    assert share == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize(("extra", "expected"), [
    (["--accuracy", "x.csv"], "--accuracy: needs --max-ppl-increase"),
    (["--max-ppl-increase", "5", "--accuracy", "nope.csv"], "nope.csv: no such accuracy table"),
    (["--max-ppl-increase", "-1"], "--max-ppl-increase: expected a number >= 0"),
])
def test_accuracy_flags_fail_in_one_line(capsys, extra, expected):
    try:
        code = main([*ACCURACY_ARGS, *extra, "a100_pcie4"])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err, err


def test_a_model_without_a_table_is_refused(capsys):
    code = main(["--model", "opt-13b", "--prompt-len", "1024", "--gen-len", "16", "--target-tokens-per-s", "1",
                 "--max-ppl-increase", "5", "a100_pcie4"])
    err = capsys.readouterr().err
    assert code == 2 and "no accuracy table of opt-13b" in err and err.count("\n") == 1


def test_committed_smollm2_table_plans_within_5_percent(capsys):
    """The Done-when command: the committed study's table is found under profiles/ without --accuracy."""
    assert find_table("smollm2-135m") is not None
    code = main([*ACCURACY_ARGS, "--max-ppl-increase", "5", "a100_pcie4"])
    printed = capsys.readouterr().out
    assert code == 0 and "each policy at its cheapest measured setting within +5 %" in printed
    assert "infinigen  infinigen" in printed
