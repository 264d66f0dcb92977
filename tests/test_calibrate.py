"""Calibration: a synthetic bundle's times come back exactly; interpolation, extrapolation, scaling, errors."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from bundle_helpers import A100, BATCHES, KV_LENS, PREFILL_LENS, TINY, kernel_rows, transfer_rows, write_bundle  # noqa: E402
from hypothesis import given, settings
from hypothesis import strategies as st

from infinigen_sim.cost.calibrate import DEFAULT_POLICY, BundleCosts, Calibration, load_calibration
from infinigen_sim.cost.card import bundle_hardware
from infinigen_sim.cost.grid import Grid, fit_affine
from infinigen_sim.sim import simulate_full
from infinigen_sim.sim.scenario import CPU_PLACEMENT, Scenario
from infinigen_sim.sim.trace import trace_ops
from infinigen_sim.spec.bundle import (
    BundleError,
    read_bundle,
)
from infinigen_sim.spec.fetch import fit_fetch
from infinigen_sim.spec.hardware import load_hardware
from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.policies import make_policy


@pytest.fixture
def flat_bundle(tmp_path) -> Path:
    """Every op 1 ms, every copy 3 ms (6 ms concurrent)."""
    return write_bundle(tmp_path / "flat", kernel_rows(lambda *key: 1e-3), transfer_rows(3e-3))


def linear_in_batch(op, b, n, kv):
    """100 us per sequence at every point: log-log linear in batch with slope 1."""
    return 100e-6 * b * (1 + (n > 1)) * (1 + kv / 4096)


@pytest.fixture
def linear_bundle(tmp_path) -> Path:
    return write_bundle(tmp_path / "linear", kernel_rows(linear_in_batch), transfer_rows(3e-3))


def costs_of(bundle: Path, hw: str = "a100_pcie4", **policy) -> BundleCosts:
    make_costs, _, _ = load_calibration(bundle, load_hardware(hw))
    return make_costs(make_policy("flexgen", **policy), TINY)


# ---- exact replay ----------------------------------------------------------------------------
def test_a_flat_bundle_replays_exactly(flat_bundle):
    """One layer, overlap off: embed 1 + fetch 3 + norm 1 + qkv 1 + attention 1 + norm 1 + ffn 1 +
    final norm 1 + lm_head 1 = 11 ms per decode step; the write-back (3 ms, alone) runs beside it."""
    costs = costs_of(flat_bundle, overlap=False)
    model = replace(TINY, n_layers=1)
    sc = Scenario(costs, model, make_policy("flexgen", overlap=False), batch=1, prompt_len=256, gen_len=3)
    res = simulate_full(sc)
    assert res.step_s == pytest.approx(11e-3, rel=1e-12)
    assert res.decode_s == pytest.approx(22e-3, rel=1e-12)
    # prefill: embed 1, norm 1, qkv 1, store 3 (serial without overlap), attention 1, norm 1, ffn 1, norm 1, head 1
    assert res.prefill_s == pytest.approx(11e-3, rel=1e-12)
    assert not costs.extrapolated and costs.calibration == "profile"


def test_copies_beside_compute_take_the_concurrent_figure(flat_bundle):
    assert costs_of(flat_bundle, overlap=True).h2d_s(1 << 20, False) == pytest.approx(6e-3)
    assert costs_of(flat_bundle, overlap=False).h2d_s(1 << 20, False) == pytest.approx(3e-3)


def test_cpu_placement_runs_copies_on_the_worker_and_inline(flat_bundle):
    """CPU mode, one layer, overlap on: the fetch (6 ms, concurrent) runs on the worker from the step's
    start while embed and norm run; the write-back (3 ms, alone: inline D2H) sits on the compute thread."""
    costs = costs_of(flat_bundle, overlap=True)
    model = replace(TINY, n_layers=1)
    sc = Scenario(costs, model, make_policy("flexgen"), batch=1, prompt_len=256, gen_len=3, placement=CPU_PLACEMENT)
    costs.d2h_concurrent = False
    res = simulate_full(sc)
    # embed 1, then fetch 6 on the worker from t=1 while norm, qkv, write-back (1+1+3) run: attention at 7
    # then attention 1 + norm 1 + ffn 1 + final norm 1 + lm_head 1 = 12 ms
    assert res.step_s == pytest.approx(12e-3, rel=1e-12)
    assert res.busy_s["h2d_link"] == 0 and res.busy_s["host_cpu"] == pytest.approx(6e-3)


def cpu_runtime_bundle(tmp_path, handoff_us: float = 500.0) -> Path:
    """The flat bundle as a CPU one, with a 0.1 ms span per op, a flat handoff and InfiniGen's skew."""
    kernels = [dict(r, dtype="float32") for r in kernel_rows(lambda *key: 1e-3)]
    extra = [("span", b, 1, 0, 100.0) for b in BATCHES]
    extra += [("skew", b, n, 0, 1e3) for b in BATCHES for n in PREFILL_LENS]
    kernels += [{"op": op, "model": "tiny-opt", "dtype": "float32", "batch_size": b, "n_tokens": n, "kv_len": kv,
                 "median_us": us, "p10_us": us, "p90_us": us, "repeats": 5, "status": "ok"}
                for op, b, n, kv, us in extra]
    transfers = transfer_rows(3e-3) + [
        {"direction": "h2d", "memory": "pinned", "layout": "handoff.flexgen", "concurrent": True, "nbytes": n,
         "row_bytes": 0, "rows": n >> 12, "median_us": handoff_us, "p10_us": handoff_us, "p90_us": handoff_us,
         "gbps": "", "repeats": 50, "status": "ok"} for n in (16 << 10, 1 << 20, 16 << 20)]
    return write_bundle(tmp_path / "cpu", kernels, transfers, device="cpu: test host", device_type="cpu")


def test_cpu_runtime_spans_and_handoffs_come_from_measured_rows(tmp_path):
    """One layer, overlap on: every compute-thread op is followed by its span (0.1 ms; ffn is the output
    projection + MLP: two), the layer pays its handoff (0.5 ms) and the worker half of its fixed part
    per job (0.25 ms) before the fetch (6 ms) it starts at the end of embed:
    embed 1.1 | norm 1.1, qkv 1.1, write-back 3.1, handoff 0.5 -> 6.9 | fetch ready at 1.1 + 0.25 + 6 = 7.35 |
    attention 1.1, norm 1.1, ffn 1.2 -> 10.75 | final norm 1.1, lm_head 1.1 -> 12.95 ms."""
    path = cpu_runtime_bundle(tmp_path)
    cal = Calibration.load(path)
    assert cal.span_s("tiny-opt") == pytest.approx(1e-4) and cal.span_s("opt-13b") == pytest.approx(1e-4)
    costs = cal.costs(cal.source, make_policy("flexgen"), TINY)
    assert costs.handoff_s(1 << 20) == pytest.approx(5e-4) and costs.job_s() == pytest.approx(2.5e-4)
    assert costs.span_s("ffn") == pytest.approx(2e-4) and costs.span_s("handoff") == 0
    sc = Scenario(costs, replace(TINY, n_layers=1), make_policy("flexgen"), batch=1, prompt_len=256, gen_len=3,
                  dtype_bytes=4, placement=CPU_PLACEMENT)
    costs.d2h_concurrent = False
    assert simulate_full(sc).step_s == pytest.approx(12.95e-3, rel=1e-9)
    other = cal.costs(load_hardware("a100_pcie4"), make_policy("flexgen"), TINY)  # another card: no CPU runtime
    assert other.handoff_s(1 << 20) == 0 and other.span_s("qkv") == 0 and other.job_s() == 0


def test_a_handoff_grows_with_the_bytes_a_layer_fetches(tmp_path):
    path = cpu_runtime_bundle(tmp_path)
    t = pd.read_csv(path / "transfers.csv")
    rows = t.layout == "handoff.flexgen"
    for column in ("median_us", "p10_us", "p90_us"):  # one spread-free sample set: p10 = median = p90
        t.loc[rows, column] = 100.0 + t.loc[rows, "nbytes"] / 2**20 * 10.0
    twice = t[rows].median_us * 2
    t = pd.concat([t, t[rows].assign(layout="handoff.infinigen", median_us=twice, p10_us=twice, p90_us=twice)])
    t.to_csv(path / "transfers.csv", index=False)
    handoff = Calibration.load(path).handoff
    assert handoff.fit("flexgen").fixed_s == pytest.approx(100e-6, rel=1e-3)
    assert handoff.layer_s("flexgen", 8 << 20) == pytest.approx(180e-6, rel=1e-3)
    assert handoff.layer_s("infinigen", 8 << 20) == pytest.approx(360e-6, rel=1e-3)
    assert handoff.layer_s("h2o", 0) == pytest.approx(200e-6, rel=1e-3)  # unmeasured: the dearest policy


def test_measured_skew_runs_on_the_speculated_layers_only(tmp_path):
    cal = Calibration.load(cpu_runtime_bundle(tmp_path))
    policy = make_policy("infinigen")
    sc = Scenario(cal.costs(cal.source, policy, TINY), replace(TINY, n_layers=3), policy, batch=1, prompt_len=128,
                  gen_len=2, dtype_bytes=4, placement=CPU_PLACEMENT)
    skewed = sorted(op.layer for op in trace_ops(sc) if op.op == "skew")
    assert skewed == list(range(policy.full_fetch_layers, 3))


# ---- interpolation ---------------------------------------------------------------------------
def test_grid_points_are_exact(linear_bundle):
    costs = costs_of(linear_bundle)
    for b in BATCHES:
        assert costs.compute_s("qkv", TINY, b, 1, 0) == pytest.approx(100e-6 * b, rel=1e-12)
        assert costs.compute_s("ffn", TINY, b, 128, 0) == pytest.approx(200e-6 * b, rel=1e-12)
        for kv in KV_LENS:  # decode attention: kernels.csv kv_len excludes the new row, the cost model counts it
            expected = 100e-6 * b * (1 + kv / 4096)
            assert costs.compute_s("attention", TINY, b, 1, kv + 1) == pytest.approx(expected, rel=1e-12)
        assert costs.compute_s("attention", TINY, b, 512, 512) == pytest.approx(200e-6 * b * (1 + 512 / 4096))
    assert not costs.extrapolated


def test_interpolation_is_log_log_linear_between_grid_points(linear_bundle):
    costs = costs_of(linear_bundle)
    for b in (2, 3, 4, 5, 7):
        assert costs.compute_s("norm", TINY, b, 1, 0) == pytest.approx(100e-6 * b, rel=1e-9)
    assert not costs.extrapolated


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(1, 8), min_size=2, max_size=6), st.integers(128, 2048))
def test_interpolation_is_monotone(batches, kv_len):
    grid = Grid.build(("batch", "kv_len"), {(1, 128): 1.0, (8, 128): 5.0, (1, 2048): 3.0, (8, 2048): 40.0},
                      lambda value, anchor: 1.0)
    values = [grid.lookup((b, kv_len))[0] for b in sorted(batches)]
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:], strict=False))
    assert all(grid.lookup((b, kv_len))[2] for b in batches)


def test_a_missing_node_is_filled_and_marked():
    grid = Grid.build(("batch", "n_tokens"), {(1, 128): 1.0, (8, 128): 8.0, (1, 512): 4.0},
                      lambda value, anchor: value[0] * value[1] / (anchor[0] * anchor[1]))
    assert grid.lookup((8, 512))[0] == pytest.approx(32.0)
    assert grid.lookup((8, 512))[2] is False and grid.lookup((1, 512))[2] is True


# ---- extrapolation ---------------------------------------------------------------------------
def test_outside_the_grid_is_scaled_by_the_fitted_roofline_and_flagged(linear_bundle):
    costs = costs_of(linear_bundle)
    edge = costs.compute_s("attention", TINY, 8, 1, 2049)
    assert not costs.extrapolated
    beyond = costs.compute_s("attention", TINY, 8, 1, 16385)
    assert beyond > edge and "attention" in costs.extrapolated
    more = costs.compute_s("qkv", TINY, 64, 1, 0)
    assert more > costs.compute_s("qkv", TINY, 8, 1, 0) and "qkv" in costs.extrapolated


def test_a_model_absent_from_the_bundle_uses_the_fitted_efficiencies(linear_bundle):
    costs = costs_of(linear_bundle)
    big = get_model("opt-13b")
    assert costs.compute_s("ffn", big, 8, 1, 0) > costs.compute_s("ffn", TINY, 8, 1, 0)
    assert "ffn" in costs.extrapolated


def test_copy_sizes_beyond_the_sweep_are_flagged(flat_bundle):
    costs = costs_of(flat_bundle, overlap=False)
    costs.h2d_s(1 << 20, False)
    assert not costs.extrapolated
    costs.h2d_s(1 << 30, False)
    assert "h2d" in costs.extrapolated


# ---- other cards -----------------------------------------------------------------------------
def test_another_card_is_scaled_and_says_so(linear_bundle):
    same, other = costs_of(linear_bundle), costs_of(linear_bundle, "h100_pcie5")
    assert same.calibration == "profile"
    assert other.calibration == f"profile-scaled:{A100} -> h100_pcie5"
    big_prefill = ("ffn", TINY, 8, 512, 0)
    assert other.compute_s(*big_prefill) != same.compute_s(*big_prefill)
    assert other.h2d_s(1 << 20, False) < same.h2d_s(1 << 20, False)  # PCIe 5 vs PCIe 4


def test_overridden_profiled_card_is_scaled(linear_bundle):
    make_costs, _, info = load_calibration(linear_bundle, load_hardware("a100_pcie4", {"link.h2d_gbps": 63.0}))
    costs = make_costs(make_policy("flexgen", overlap=False), TINY)
    assert info["calibration"] == f"profile-scaled:{A100} -> a100_pcie4"
    assert costs.h2d_s(1 << 24, False) < costs_of(linear_bundle, overlap=False).h2d_s(1 << 24, False)


def test_a_cpu_bundle_describes_its_own_box(tmp_path):
    kernels = [dict(r, dtype="float32") for r in kernel_rows(linear_in_batch)]
    path = write_bundle(tmp_path / "cpu", kernels, transfer_rows(1e-4), device="cpu: test host", device_type="cpu")
    cal = Calibration.load(path)
    hw = bundle_hardware(read_bundle(path))
    assert cal.cpu and cal.label(cal.source) == "profile" and hw.gpu.name == "cpu: test host"
    assert cal.label(load_hardware("a100_pcie4")) == "profile-scaled:cpu: test host -> a100_pcie4"
    assert cal.kernels.dtype_bytes == 4 and hw.gpu.compute_efficiency == 1.0


# ---- errors and fetch counts -----------------------------------------------------------------
def test_another_schema_version_is_a_clear_error(tmp_path):
    path = write_bundle(tmp_path / "old", kernel_rows(lambda *k: 1e-3), transfer_rows(1e-3), version=99)
    with pytest.raises(BundleError, match=r"meta.yaml: key 'schema_version': expected 2, got 99"):
        load_calibration(path, load_hardware("a100_pcie4"))


def test_checkpoint_fetch_counts_replace_the_default_fetch_model(tmp_path):
    rows = [{"model": "smollm2-135m", "source": "checkpoint", "alpha": alpha, "layer": layer, "context_len": n,
             "fetched_tokens": (3 if layer < 16 else 5) * n ** 0.5 * (alpha / 4), "samples": 4}
            for alpha in (2.0, 4.0) for layer in range(30) for n in (256, 512, 1024, 2048)]
    path = write_bundle(tmp_path / "fetch", kernel_rows(lambda *k: 1e-3), transfer_rows(1e-3), fetch=rows)
    _, fetch_model, info = load_calibration(path, load_hardware("a100_pcie4"))
    assert fetch_model is not None and "smollm2-135m" in fetch_model.source
    assert fetch_model.tokens(1024, layer=5) == pytest.approx(3 * 32)
    assert fetch_model.tokens(1024, layer=29) == pytest.approx(5 * 32)
    assert [g["layers"] for g in info["fetch_fit"]["groups"]] == ["2-9", "10-19", "20-29"]  # thirds of the depth
    assert all(g["r2_log"] > 0.999 for g in info["fetch_fit"]["groups"])
    assert info["fetch_fit"]["alpha"] == DEFAULT_POLICY.alpha  # the measured alpha nearest the default
    fit = fit_fetch(pd.read_csv(path / "fetch.csv"), DEFAULT_POLICY.full_fetch_layers, DEFAULT_POLICY.alpha)
    scaled = fit.for_model(get_model("opt-13b"))  # 40 layers: groups by relative depth
    assert [g[0] for g in scaled.groups] == [round(g[0] * 40 / 30) for g in fit.fetch_model.groups]


def test_no_checkpoint_rows_keep_the_default(flat_bundle):
    assert load_calibration(flat_bundle, load_hardware("a100_pcie4"))[1] is None


def test_missing_kernels_are_a_clear_error(tmp_path):
    path = write_bundle(tmp_path / "empty", [], transfer_rows(1e-3))
    with pytest.raises(ValueError, match="kernels.csv has no measured rows"):
        Calibration.load(path)


def test_costs_are_finite_everywhere(linear_bundle):
    costs = costs_of(linear_bundle)
    for op in ("embed", "norm", "qkv", "attention", "ffn", "lm_head", "speculate", "topk", "quantize", "dequantize"):
        for b, n, kv in ((1, 1, 1), (3, 1, 700), (64, 1, 65536), (2, 4096, 4096), (1, 100, 0)):
            assert math.isfinite(costs.compute_s(op, TINY, b, n, kv, partial_ratio=0.5))


# ---- the sweep's hooks -----------------------------------------------------------------------
def test_sweep_hooks_label_each_point(linear_bundle):
    from infinigen_sim.cost.calibrate import calibration_columns, point_costs, point_fetch_model
    from infinigen_sim.cost.physics import PhysicsCosts
    from infinigen_sim.sim import simulate
    from infinigen_sim.spec.fetch import DEFAULT_FETCH_MODEL

    hw, policy, model = load_hardware("h100_pcie5"), make_policy("infinigen"), get_model("opt-13b")
    physics = point_costs(None, hw, policy, model)
    assert isinstance(physics, PhysicsCosts)
    assert calibration_columns(physics) == {"calibration": "physics", "extrapolated": False}
    costs = point_costs(str(linear_bundle), hw, policy, model)
    assert point_fetch_model(str(linear_bundle), model, DEFAULT_FETCH_MODEL) is DEFAULT_FETCH_MODEL
    simulate(Scenario(costs, model, policy, batch=4, prompt_len=1024, gen_len=8))
    assert calibration_columns(costs) == {"calibration": f"profile-scaled:{A100} -> h100_pcie5",
                                          "extrapolated": True}  # opt-13b is not in the bundle


def test_fit_affine_is_exact_non_negative_least_squares():
    """The hand-kept fit (numpy only: GPU nodes without scipy run the simulator) equals scipy's NNLS."""
    nnls = pytest.importorskip("scipy.optimize").nnls
    rng = np.random.default_rng(0)
    for _ in range(200):
        features = np.column_stack([np.ones(12), rng.uniform(0.1, 10, 12), rng.uniform(0.1, 10, 12)])
        seconds = np.abs(features @ rng.normal(1, 2, 3)) + 0.01
        ours = fit_affine(features, seconds)
        reference = nnls(features / seconds[:, None], np.ones(12))[0]
        assert (ours >= 0).all()
        assert np.allclose(ours, reference, rtol=1e-6, atol=1e-9)
