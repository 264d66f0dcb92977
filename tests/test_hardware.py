"""Hardware configs: every shipped file loads, `base:` and `--set` work, configs round-trip, errors are one line."""

from __future__ import annotations

import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from infinigen_sim.spec.hardware import (
    GpuSpec,
    HardwareError,
    HostSpec,
    LinkSpec,
    all_config_paths,
    load_hardware,
    load_raw,
)

SHIPPED = {"a100_pcie4", "a100_sxm4", "a6000_pcie3", "a6000_pcie4", "h100_pcie5", "h200_pcie5",
           "l4_pcie4", "rtx4090_pcie4", "gh200_c2c"}
PEAKS = ["gpu.memory_gib", "gpu.fp16_tflops", "gpu.hbm_gbps", "link.h2d_gbps", "link.d2h_gbps",
         "host.memory_gib", "host.memory_gbps", "host.cores"]
# Every numeric field a `--set` may touch, as (dotted key, its plausible range, is a whole number).
NUMERIC = [(f"{section}.{f.name}", f.metadata["range"], f.type == "int")
           for section, cls in (("gpu", GpuSpec), ("link", LinkSpec), ("host", HostSpec))
           for f in fields(cls) if f.type in ("float", "int")]


def get(cfg, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def valid_raw() -> dict:
    """A complete config mapping (a100_pcie4, merged), safe to mutate."""
    return load_raw(next(p for p in all_config_paths() if p.stem == "a100_pcie4"))


def assert_one_line(exc: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


@pytest.mark.parametrize("path", all_config_paths(), ids=lambda p: p.stem)
def test_shipped_config_loads_with_positive_peaks(path):
    cfg = load_hardware(path)
    assert cfg.name == path.stem
    for key in PEAKS:
        assert get(cfg, key) > 0, key
    assert cfg.link.latency_us >= 0
    assert cfg.cost_per_hour_usd is None or cfg.cost_per_hour_usd > 0


def test_shipped_set_includes_the_nine():
    assert SHIPPED <= {p.stem for p in all_config_paths()}


def test_load_by_bare_name_equals_load_by_path():
    path = next(p for p in all_config_paths() if p.stem == "h100_pcie5")
    assert load_hardware("h100_pcie5") == load_hardware(path)


def test_base_inheritance_changes_only_link_and_host():
    pcie3, pcie4 = load_hardware("a6000_pcie3").to_dict(), load_hardware("a6000_pcie4").to_dict()
    assert pcie3.pop("name") == "a6000_pcie3" and pcie4.pop("name") == "a6000_pcie4"
    assert pcie3["link"] != pcie4["link"] and pcie3["host"] != pcie4["host"]
    assert {k: v for k, v in pcie3.items() if k not in ("link", "host")} == \
           {k: v for k, v in pcie4.items() if k not in ("link", "host")}
    own = yaml.safe_load(next(p for p in all_config_paths() if p.stem == "a6000_pcie3").read_text())
    assert set(own) == {"base", "name", "link", "host"}  # the GPU really comes from the base


def test_set_override_replaces_one_field():
    base = load_hardware("a100_pcie4")
    cfg = load_hardware("a100_pcie4", {"gpu.hbm_gbps": 1000, "cost_per_hour_usd": 2.5})
    assert cfg.gpu.hbm_gbps == 1000 and cfg.cost_per_hour_usd == 2.5
    assert cfg.link == base.link and cfg.host == base.host and cfg.gpu.fp16_tflops == base.gpu.fp16_tflops


@pytest.mark.parametrize("path", all_config_paths(), ids=lambda p: p.stem)
def test_shipped_config_round_trips(path, tmp_path):
    cfg = load_hardware(path)
    assert load_hardware(write(tmp_path / "copy.yaml", cfg.to_dict())) == cfg


@st.composite
def overrides(draw) -> dict:
    """A few numeric fields set to random valid values."""
    chosen = draw(st.lists(st.sampled_from(NUMERIC), min_size=1, max_size=5, unique=True))
    out = {}
    for key, (low, high), whole in chosen:
        if key.endswith("reserved_gib"):
            high = min(high, 0.5)  # below every shipped memory_gib and every drawn one
        if key.endswith("memory_gib"):
            low = max(low, 16.0)  # above the default reserved_gib (1 on the GPU, 8 on the host)
        out[key] = draw(st.integers(int(low), int(high)) if whole else st.floats(low, high))
    return out


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(SHIPPED)), over=overrides())
def test_random_valid_overrides_validate_and_round_trip(name, over):
    cfg = load_hardware(name, over)
    for key, value in over.items():
        assert get(cfg, key) == value
    with tempfile.TemporaryDirectory() as tmp:
        assert load_hardware(write(Path(tmp) / "copy.yaml", cfg.to_dict())) == cfg


@settings(max_examples=40, deadline=None)
@given(field=st.sampled_from(NUMERIC), value=st.one_of(st.floats(max_value=-1e-9), st.just(float("nan"))))
def test_random_negative_override_is_rejected(field, value):
    key = field[0]
    with pytest.raises(HardwareError) as exc:
        load_hardware("a100_pcie4", {key: value})
    assert_one_line(exc, "a100_pcie4.yaml", key)


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("gpu: [1, 2\nlink: {}\n")
    with pytest.raises(HardwareError) as exc:
        load_hardware(path)
    assert_one_line(exc, str(path), "malformed YAML", "line")


def test_unknown_key(tmp_path):
    raw = valid_raw()
    raw["gpu"]["foo"] = 1
    path = write(tmp_path / "unknown.yaml", raw)
    with pytest.raises(HardwareError) as exc:
        load_hardware(path)
    assert_one_line(exc, str(path), "gpu.foo")


def test_negative_bandwidth(tmp_path):
    raw = valid_raw()
    raw["link"]["h2d_gbps"] = -31.5
    path = write(tmp_path / "negative.yaml", raw)
    with pytest.raises(HardwareError) as exc:
        load_hardware(path)
    assert_one_line(exc, str(path), "link.h2d_gbps", "positive")


def test_missing_required_key(tmp_path):
    raw = valid_raw()
    del raw["gpu"]["hbm_gbps"]
    path = write(tmp_path / "missing.yaml", raw)
    with pytest.raises(HardwareError) as exc:
        load_hardware(path)
    assert_one_line(exc, str(path), "missing", "gpu.hbm_gbps")


def test_circular_base(tmp_path):
    write(tmp_path / "left.yaml", {"base": "right", "name": "left"})
    write(tmp_path / "right.yaml", {"base": "left", "name": "right"})
    with pytest.raises(HardwareError) as exc:
        load_hardware(tmp_path / "left.yaml")
    assert_one_line(exc, str(tmp_path / "left.yaml"), "'base'", "circular")


def test_efficiency_above_one(tmp_path):
    raw = valid_raw()
    raw["gpu"]["hbm_efficiency"] = 1.2
    path = write(tmp_path / "efficiency.yaml", raw)
    with pytest.raises(HardwareError) as exc:
        load_hardware(path)
    assert_one_line(exc, str(path), "gpu.hbm_efficiency", "plausible range 0.001-1")


@pytest.mark.parametrize("key", ["gpu.foo", "nosuch.thing", "gpu", "base"])
def test_unknown_set_key(key):
    with pytest.raises(HardwareError) as exc:
        load_hardware("a100_pcie4", {key: 1})
    assert_one_line(exc, "a100_pcie4.yaml", f"'{key}'")
