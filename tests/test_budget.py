"""profiler.collect's GPU budget: the estimate printed before measuring (--dry-run works without a GPU), the
default grid under 5 minutes and --quick under 2 on one H100/H200 by that estimate, cuts until a budget
fits, one-line errors for budgets nothing fits and for --budget-s on cpu."""

from __future__ import annotations

import re

import pytest

from profiler import collect
from profiler.bench import budget


def dry_run(capsys, *argv: str) -> tuple[int, str, str]:
    code = collect.main(["--device", "cuda", "--dry-run", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def estimate_s(text: str) -> float:
    return float(re.search(r"estimated (\d+) s on one h100_pcie5", text).group(1))


@pytest.mark.parametrize("argv, budget_s", [([], 300), (["--quick"], 120), (["--budget-s", "200"], 200)])
def test_dry_run_prints_a_plan_that_fits(capsys, tmp_path, argv, budget_s):
    code, out, _ = dry_run(capsys, *argv, "--out", str(tmp_path / "b"))
    assert code == 0 and "-> fits" in out and estimate_s(out) <= budget_s
    assert out.startswith("plan (cuda") and "kernels:" in out and "left out: " in out
    assert not (tmp_path / "b").exists()  # a dry run writes nothing


def test_the_whole_grid_is_estimated_and_cut_in_order(capsys):
    code, out, _ = dry_run(capsys, "--budget-s", "0")
    whole = estimate_s(out)
    assert code == 0 and "no budget (--budget-s 0)" in out and whole > 300
    plan = collect.resolve_full(collect.parse_args(["--device", "cuda", "--dry-run"]))
    fits = [budget.fit(plan, b) for b in (150, 300, 600, 900)]
    assert all(f.fits and f.estimate.total_s <= b for f, b in zip(fits, (150, 300, 600, 900), strict=True))
    cut = [len(f.left_out) for f in fits]
    assert cut == sorted(cut, reverse=True) and cut[0] > cut[-1]  # a larger budget leaves out less
    names = [name for name, _ in budget.CUTS]
    assert all(list(f.left_out) == [n for n in names if n in f.left_out] for f in fits)  # CUTS order


def test_a_budget_nothing_fits_and_cpu_budgets_fail_in_one_line(capsys):
    code, _, err = dry_run(capsys, "--budget-s", "20")
    assert code == 2 and "even the smallest grid is estimated" in err and len(err.strip().splitlines()) == 1
    assert collect.main(["--device", "cpu", "--budget-s", "60", "--dry-run"]) == 2
    assert "--budget-s: the time estimate is for --device cuda only" in capsys.readouterr().err


def test_estimates_come_from_the_card_config_and_the_stated_assumptions():
    rates = budget.Rates.of("h100_pcie5")
    assert rates.link_bps == pytest.approx(63e9 * 0.8) and rates.hbm_bps == pytest.approx(2000e9 * 0.8)
    plan = collect.resolve(collect.parse_args(["--device", "cuda", "--dry-run", "--quick"]))
    slower = budget.estimate(plan, budget.Rates(rates.hbm_bps / 2, rates.flops / 2, rates.link_bps / 2,
                                                rates.link_latency_s, rates.launch_s))
    assert slower.total_s > budget.estimate(plan, rates).total_s  # half the bandwidth: longer, never shorter
