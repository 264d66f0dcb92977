"""A bundle's runtime rows price a runtime description: host.csv's dispatch and sync, pageable copies,
host memcpys (h2h rows), the gather by row size; without them the description's and physics' own, flagged."""

from __future__ import annotations

from pathlib import Path

import pytest
from bundle_helpers import SIZES, TINY, kernel_rows, transfer_rows, write_bundle

from infinigen_sim.cost.calibrate import load_calibration
from infinigen_sim.cost.physics import PhysicsCosts
from infinigen_sim.spec.hardware import load_hardware
from infinigen_sim.spec.policies import PolicyName, make_policy
from infinigen_sim.spec.runtime import load_runtime

ARTIFACT = load_runtime("infinigen-artifact")


def extra_rows(direction: str, memory: str, seconds: float) -> list[dict]:
    """Flat contiguous rows of one direction and host memory, alone and concurrent."""
    return [{"direction": direction, "memory": memory, "layout": "contiguous", "concurrent": concurrent,
             "nbytes": n, "row_bytes": 0, "rows": 0, "median_us": seconds * 1e6, "p10_us": seconds * 1e6,
             "p90_us": seconds * 1e6, "gbps": n / seconds / 1e9, "repeats": 5, "status": "ok"}
            for concurrent in (False, True) for n in SIZES]


def costs(bundle: Path, policy: str = "infinigen", runtime=ARTIFACT):
    make_costs, _, _ = load_calibration(bundle, load_hardware("a100_pcie4"))
    return make_costs(make_policy(policy), TINY, runtime=runtime)


@pytest.fixture
def full_bundle(tmp_path) -> Path:
    """Pinned copies 3 ms, pageable 5 ms, host memcpys 2 ms; host.csv dispatch 4 us, sync 7 us."""
    transfers = transfer_rows(3e-3) + extra_rows("h2d", "pageable", 5e-3) + extra_rows("d2h", "pageable", 5e-3)
    return write_bundle(tmp_path / "b", kernel_rows(lambda *key: 1e-3), transfers + extra_rows("h2h", "pageable", 2e-3))


def test_dispatch_uses_the_hosts_measured_costs(full_bundle):
    c = costs(full_bundle)
    host = ARTIFACT.for_policy("infinigen").host
    ops, syncs = host.ops_per_layer.infinigen, host.syncs_per_layer.infinigen
    assert c.dispatch_s(PolicyName.INFINIGEN, "opt") == pytest.approx(1e-6 * (4.0 * ops + 7.0 * syncs))
    assert "dispatch" not in c.extrapolated


def test_without_host_rows_the_description_prices_dispatch_and_says_so(tmp_path):
    bundle = write_bundle(tmp_path / "b", kernel_rows(lambda *key: 1e-3), transfer_rows(3e-3), host_us={})
    c = costs(bundle)
    assert c.dispatch_s(PolicyName.INFINIGEN, "opt") == pytest.approx(
        ARTIFACT.for_policy("infinigen").host.layer_s("infinigen", "opt"))
    assert "dispatch" in c.extrapolated


def test_pageable_copies_come_from_pageable_rows(full_bundle):
    c = costs(full_bundle, "flexgen")
    assert c.h2d_s(1 << 20, False, pageable=True) == pytest.approx(5e-3)
    assert c.h2d_s(1 << 20, False, pageable=False) == pytest.approx(6e-3)  # pinned, beside compute: 2 x 3 ms
    assert c.d2h_s(1 << 20, pageable=True) == pytest.approx(5e-3)
    assert "h2d" not in c.extrapolated and "d2h" not in c.extrapolated


def test_pageable_from_pinned_rows_is_scaled_by_physics_and_flagged(tmp_path):
    bundle = write_bundle(tmp_path / "b", kernel_rows(lambda *key: 1e-3), transfer_rows(3e-3))
    c = costs(bundle, "flexgen")
    physics = PhysicsCosts(load_hardware("a100_pcie4"), runtime=ARTIFACT.for_policy("flexgen"))
    ratio = physics.h2d_s(1 << 20, False, True) / physics.h2d_s(1 << 20, False, False)
    assert ratio > 1
    assert c.h2d_s(1 << 20, False, pageable=True) == pytest.approx(6e-3 * ratio)
    assert "h2d" in c.extrapolated


def test_host_memcpy_comes_from_h2h_rows(full_bundle, tmp_path):
    assert costs(full_bundle).memcpy_s(1 << 20) == pytest.approx(2e-3)
    bare = costs(write_bundle(tmp_path / "bare", kernel_rows(lambda *key: 1e-3), transfer_rows(3e-3)))
    hw = load_hardware("a100_pcie4")
    assert bare.memcpy_s(1 << 20) == pytest.approx((1 << 20) / (hw.host.memcpy_gbps * 1e9))
    assert "memcpy" in bare.extrapolated


def test_gathers_are_priced_by_row_size(tmp_path):
    """Gathers of 128 B rows at 2x the time of 1 KiB rows of the same bytes: the row axis is looked up."""
    rows = transfer_rows(3e-3)
    for row in rows:
        if row["layout"] == "gathered.gather":
            row["median_us"] = row["p10_us"] = row["p90_us"] = 1e3 * (2 if row["row_bytes"] == 128 else 1)
    c = costs(write_bundle(tmp_path / "b", kernel_rows(lambda *key: 1e-3), rows),
              runtime=load_runtime("infinigen-sim"))
    c.head_dim = 0  # price by the rows given, not the model's per-head row
    small, large = c.gather_s(64 * 1024, 512), c.gather_s(64 * 1024, 64)  # 128 B rows vs 1 KiB rows
    assert small == pytest.approx(2 * large)
