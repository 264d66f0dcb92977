"""Roofline costs, the CostModel interface and the memory fit."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import yaml

from infinigen_sim.cost.memory import plan_memory
from infinigen_sim.cost.physics import CostModel, PhysicsCosts
from infinigen_sim.spec.hardware import GpuSpec, HardwareConfig, HostSpec, LinkSpec, load_hardware
from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.ops import COMPUTE_OPS, PHYSICS_OPS
from infinigen_sim.spec.policies import make_policy
from infinigen_sim.spec.work import op_work

# Round numbers so every expected time below is hand-checkable.
HW = HardwareConfig(
    name="round",
    gpu=GpuSpec(name="g", memory_gib=16, fp16_tflops=100, hbm_gbps=1000, compute_efficiency=0.5,
                hbm_efficiency=0.5, launch_us=0.0, reserved_gib=0.0),
    link=LinkSpec(name="l", h2d_gbps=10, d2h_gbps=20, latency_us=10, h2d_efficiency=1.0, d2h_efficiency=1.0),
    host=HostSpec(name="h", memory_gib=64, memory_gbps=100, cores=8, gather_efficiency=0.5, reserved_gib=0.0),
)
COSTS = PhysicsCosts(HW)
OPT13B = get_model("opt-13b")


def test_physics_costs_is_a_cost_model():
    assert isinstance(COSTS, CostModel)
    yaml.safe_dump(COSTS.describe())  # goes into config.yaml as is


def test_transfers_are_latency_plus_bytes_over_effective_bandwidth():
    assert COSTS.h2d_s(1e9, gathered=False) == pytest.approx(10e-6 + 0.1)
    assert COSTS.d2h_s(1e9) == pytest.approx(10e-6 + 0.05)
    assert COSTS.h2d_s(0, gathered=True) == 0.0  # nothing to copy: no call, no latency


def test_gather_reads_and_writes_every_row_byte():
    assert COSTS.gather_s(1e9, rows=1000) == pytest.approx(2e9 / 50e9)
    assert COSTS.gather_s(0, rows=0) == 0.0


def test_op_time_is_the_roofline_max():
    for op in PHYSICS_OPS:
        work = op_work(op, OPT13B, 4, 1, 2048, partial_ratio=0.3)
        expected = max(work.flops / 50e12, work.hbm_bytes / 500e9)
        assert COSTS.compute_s(op, OPT13B, 4, 1, 2048, partial_ratio=0.3) == pytest.approx(expected)


def test_decode_projections_are_memory_bound_on_their_weights():
    d = OPT13B.d_model
    assert COSTS.compute_s("qkv", OPT13B, 1, 1, 0) == pytest.approx(
        (3 * d * d + 1 * (2 * d + 2 * d)) * 2 / 500e9)


def test_decode_attention_grows_with_the_rows_it_reads():
    short = COSTS.compute_s("attention", OPT13B, 8, 1, 1000)
    long = COSTS.compute_s("attention", OPT13B, 8, 1, 2000)
    kv_bytes = 8 * 1000 * OPT13B.kv_bytes_per_token()
    assert long - short == pytest.approx(kv_bytes / 500e9)


def test_speculation_reads_a_partial_key_cache():
    full = COSTS.compute_s("attention", OPT13B, 8, 1, 8192)
    spec = COSTS.compute_s("speculate", OPT13B, 8, 1, 8192, partial_ratio=0.3)
    assert 0.1 * full < spec < 0.5 * full


def test_prefill_attention_is_causal():
    work = op_work("attention", OPT13B, 1, 1000, 1000)
    assert work.flops == 4 * OPT13B.d_model * 1000 * 1001 / 2


def test_launch_cost_is_added_per_op():
    slow = PhysicsCosts(replace(HW, gpu=replace(HW.gpu, launch_us=7.0)))
    assert slow.compute_s("norm", OPT13B, 1, 1, 0) - COSTS.compute_s("norm", OPT13B, 1, 1, 0) == \
        pytest.approx(7e-6)


def test_unknown_op_is_an_error():
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        COSTS.compute_s("softmax", OPT13B, 1, 1, 1)
    with pytest.raises(ValueError, match="'h2d' is not a compute op"):
        COSTS.compute_s("h2d", OPT13B, 1, 1, 1)


def test_every_compute_op_has_work_and_a_roofline_time():
    for op in COMPUTE_OPS:
        work = op_work(op, OPT13B, 2, 16, 64, partial_ratio=0.3)
        assert work.flops >= 0 and work.hbm_bytes > 0
        assert COSTS.compute_s(op, OPT13B, 2, 16, 64) > 0


def test_physics_prices_no_runtime_overhead():
    """A roofline has no measured skew/score rows and no CPU-runtime Python: a physics sweep leaves them out."""
    assert COSTS.measured_ops() == frozenset()
    assert COSTS.span_s("ffn") == COSTS.handoff_s(1e6) == COSTS.job_s() == 0.0


def test_everything_fits_when_small():
    plan = plan_memory(load_hardware("a100_pcie4"), get_model("small-opt"), make_policy("flexgen"), 1, 512, 32)
    assert plan.fits and plan.reason == "" and plan.streamed_weight_bytes == 0


def test_ideal_does_not_fit_a_long_context():
    plan = plan_memory(load_hardware("a100_pcie4"), OPT13B, make_policy("ideal"), 64, 32768, 128)
    assert not plan.fits and plan.reason.startswith("gpu memory")
    assert plan.gpu_gib > 79


def test_offloaded_weights_that_do_not_fit_are_streamed():
    hw = load_hardware("rtx4090_pcie4")  # 24 GiB; OPT-13B weights are 24 GiB
    plan = plan_memory(hw, OPT13B, make_policy("flexgen"), 1, 512, 32)
    layer = OPT13B.layer_weight_bytes()
    assert plan.fits and 0 < plan.streamed_weight_bytes < layer
    assert plan.gpu_gib <= hw.gpu.memory_gib - hw.gpu.reserved_gib + 1e-9
    assert plan.host_bytes >= OPT13B.n_layers * plan.streamed_weight_bytes


def test_host_memory_bounds_offloaded_kv():
    small_host = replace(HW, gpu=replace(HW.gpu, memory_gib=80), host=replace(HW.host, memory_gib=16))
    plan = plan_memory(small_host, OPT13B, make_policy("flexgen"), 16, 32768, 128)
    assert not plan.fits and plan.reason.startswith("host memory")
    assert math.isfinite(plan.host_gib)
