"""Hardware configs: load `infinigen_sim/hw_configs/*.yaml` (with `base:` inheritance), validate, override.

Peak figures come from the YAML exactly as published; the achievable fractions are separate
`*_efficiency` fields whose defaults are documented here (a measured profile replaces them).
Files are read the one strict way (`spec.io.read_yaml`) and validated by `spec.schema`: every number
finite, of the right sign and inside its plausible range (a key listed under `unchecked:` may leave
the range), reserved memory below the total, names non-empty. Every error is one line naming the
file, the dotted key and what was expected.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from infinigen_sim.spec.io import load_with_bases, parse_yaml, read_yaml_mapping, resolve_named
from infinigen_sim.spec.schema import UNCHECKED, build_section, check_value, shown, unchecked_keys

HW_DIR = Path(__file__).resolve().parent.parent / "hw_configs"
FRACTION = (0.001, 1.0)  # an efficiency: a share of a peak


class HardwareError(ValueError):
    """A hardware config that cannot be used; the message names file and key."""


@dataclass(frozen=True)
class GpuSpec:
    """One GPU."""

    name: str = field(metadata={"help": "marketing name"})
    memory_gib: float = field(metadata={"help": "device memory", "unit": "GiB", "range": (0.5, 4096)})
    fp16_tflops: float = field(metadata={"help": "dense FP16/BF16 tensor peak", "unit": "TFLOP/s",
                                         "range": (0.1, 100_000)})
    hbm_gbps: float = field(metadata={"help": "device memory bandwidth peak", "unit": "GB/s", "range": (1, 100_000)})
    compute_efficiency: float = field(default=0.55, metadata={
        "help": "achievable share of fp16_tflops; datasheet rooflines are 1.7-1.9x optimistic", "range": FRACTION})
    hbm_efficiency: float = field(default=0.8, metadata={
        "help": "achievable share of hbm_gbps for streaming kernels", "range": FRACTION})
    launch_us: float = field(default=5.0, metadata={
        "help": "fixed cost per kernel (launch + tail)", "unit": "us", "range": (0, 10_000)})
    reserved_gib: float = field(default=1.0, metadata={
        "help": "device memory not available to tensors (context, allocator slack); below memory_gib",
        "unit": "GiB", "range": (0, 4096)})


@dataclass(frozen=True)
class LinkSpec:
    """The host<->GPU link."""

    name: str = field(metadata={"help": "e.g. PCIe 4.0 x16"})
    h2d_gbps: float = field(metadata={"help": "host-to-device peak per direction", "unit": "GB/s",
                                      "range": (0.1, 10_000)})
    d2h_gbps: float = field(metadata={"help": "device-to-host peak per direction", "unit": "GB/s",
                                      "range": (0.1, 10_000)})
    latency_us: float = field(metadata={"help": "fixed cost per transfer", "unit": "us", "range": (0, 100_000)})
    h2d_efficiency: float = field(default=0.8, metadata={
        "help": "achievable share of h2d_gbps for large pinned copies", "range": FRACTION})
    d2h_efficiency: float = field(default=0.8, metadata={
        "help": "achievable share of d2h_gbps for large pinned copies", "range": FRACTION})


@dataclass(frozen=True)
class HostSpec:
    """The host CPU and its memory."""

    name: str = field(metadata={"help": "CPU model"})
    memory_gib: float = field(metadata={"help": "host DRAM", "unit": "GiB", "range": (1, 65_536)})
    memory_gbps: float = field(metadata={"help": "DRAM bandwidth peak", "unit": "GB/s", "range": (1, 100_000)})
    cores: int = field(metadata={"help": "physical cores", "range": (1, 16_384)})
    gather_efficiency: float = field(default=0.25, metadata={
        "help": "achievable share of memory_gbps for a row gather into a staging buffer", "range": FRACTION})
    reserved_gib: float = field(default=8.0, metadata={
        "help": "host memory not available to KV/weights (OS, framework); below memory_gib", "unit": "GiB",
        "range": (0, 65_536)})
    memcpy_gbps: float = field(default=4.5, metadata={
        "help": "one thread's copy rate of a large host buffer (pageable staging, pin_memory relays); default: "
                "4.2-4.8 GB/s measured on this project's 2-core VM (256 MiB torch copy_); a profile measures "
                "the real host", "unit": "GB/s", "range": (0.1, 1000)})


@dataclass(frozen=True)
class HardwareConfig:
    """A GPU, its host link and its host."""

    name: str
    gpu: GpuSpec
    link: LinkSpec
    host: HostSpec
    cost_per_hour_usd: float | None = None
    source_file: str = field(default="", compare=False)  # provenance, not part of the config's identity

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("source_file")
        return out


_SECTIONS = {"gpu": GpuSpec, "link": LinkSpec, "host": HostSpec}
_TOP_KEYS = {"name", "base", "cost_per_hour_usd", UNCHECKED, *_SECTIONS}
_TOP_FIELDS = {f.name: f for f in fields(HardwareConfig)}


def _read_yaml(path: Path) -> dict:
    return read_yaml_mapping(path, HardwareError, f"a mapping with keys {', '.join(sorted(_TOP_KEYS))}")


def resolve_path(name_or_path: str | Path) -> Path:
    """A config file from a path, or a bare name looked up in hw_configs/ (`a100_pcie4`)."""
    return resolve_named(name_or_path, HW_DIR, HardwareError, "hardware config")


def load_raw(path: Path) -> dict:
    """The YAML mapping of `path` with its `base:` chain merged in (base first)."""
    return load_with_bases(path, _read_yaml, HW_DIR, HardwareError, "hardware config")


def from_raw(raw: dict, where: str, default_name: str) -> HardwareConfig:
    """Validate a merged mapping into a HardwareConfig."""
    for key in raw:
        if key not in _TOP_KEYS:
            raise HardwareError(f"{where}: unknown key {shown(key)} (expected one of {', '.join(sorted(_TOP_KEYS))})")
    for section in _SECTIONS:
        if section not in raw:
            raise HardwareError(f"{where}: missing key '{section}'")
    unchecked = unchecked_keys(where, raw, HardwareError)
    for key in unchecked:
        section, _, name = key.partition(".")
        if section not in _SECTIONS or name not in {f.name for f in fields(_SECTIONS[section])}:
            raise HardwareError(f"{where}: key '{UNCHECKED}': unknown key {shown(key)} (expected section.field, "
                                "e.g. link.h2d_gbps)")
    cost = raw.get("cost_per_hour_usd")
    if cost is not None:
        cost = check_value(where, "cost_per_hour_usd", cost, _COST, float, False, HardwareError)
    name = check_value(where, "name", raw.get("name", default_name), _TOP_FIELDS["name"], str, False, HardwareError)
    sections = {s: build_section(where, s, raw[s], cls, unchecked, HardwareError) for s, cls in _SECTIONS.items()}
    for section in ("gpu", "host"):
        spec = sections[section]
        if spec.reserved_gib >= spec.memory_gib:
            raise HardwareError(f"{where}: key '{section}.reserved_gib': expected less than {section}.memory_gib "
                                f"({spec.memory_gib:g} GiB), got {spec.reserved_gib:g} GiB")
    return HardwareConfig(name=name, **sections, cost_per_hour_usd=cost, source_file=where)


_COST = field(metadata={"help": "on-demand price of one GPU", "unit": "USD/hour", "range": (0, 10_000)})


def parse_value(text: str) -> Any:
    """A `--set` value: YAML scalar syntax (numbers, strings, booleans); text that is no YAML scalar (not
    YAML, or a list or mapping, which cannot be a grid value) stays text."""
    try:
        value = parse_yaml(text, "--set")
    except ValueError:
        return text
    return text if isinstance(value, (list, dict)) else value


def set_dotted(raw: dict, dotted: str, value: Any, where: str) -> dict:
    """A copy of `raw` with `gpu.hbm_gbps`-style key set; unknown keys are errors."""
    parts = dotted.split(".")
    if parts[0] not in _TOP_KEYS - {"base"}:
        raise HardwareError(f"{where}: --set unknown key {shown(dotted)} (expected one of gpu.*, link.*, host.*, "
                            "name, cost_per_hour_usd, unchecked)")
    if len(parts) == 2 and parts[0] in _SECTIONS:
        known = {f.name for f in fields(_SECTIONS[parts[0]])}
        if parts[1] not in known:
            raise HardwareError(f"{where}: --set unknown key {shown(dotted)} (expected one of "
                                f"{', '.join(f'{parts[0]}.{k}' for k in sorted(known))})")
    elif len(parts) != 1 or parts[0] in _SECTIONS:
        raise HardwareError(f"{where}: --set key {shown(dotted)}: expected section.field, e.g. link.h2d_gbps")
    out = copy.deepcopy(raw)
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise HardwareError(f"{where}: key {shown(part)}: expected a mapping, got {shown(node)}")
    node[parts[-1]] = value
    return out


def load_hardware(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> HardwareConfig:
    """Load, merge bases, apply `overrides` ({dotted key: value}) and validate one config."""
    path = resolve_path(name_or_path)
    raw = load_raw(path)
    for key, value in (overrides or {}).items():
        raw = set_dotted(raw, key, value, str(path))
    return from_raw(raw, str(path), default_name=path.stem)


def distinct_configs(names_or_paths: Sequence[str | Path]) -> list[str | Path]:
    """`names_or_paths` with each config file once (a repeat dropped with a note on stderr: it would simulate
    every point twice); HardwareError when two files carry the same `name` (their points would share keys)."""
    files: set[Path] = set()
    names: dict[str, Path] = {}
    out = []
    for item in names_or_paths:
        path = resolve_path(item).resolve()
        if path in files:
            print(f"note: dropped repeated hardware config {shown(str(item))}", file=sys.stderr)
            continue
        name = shown(load_raw(path).get("name", path.stem))
        if name in names:
            raise HardwareError(f"{path}: key 'name': {name} is also the name of {names[name]} (configs swept "
                                "together need distinct names)")
        files.add(path)
        names[name] = path
        out.append(item)
    return out


def all_config_paths() -> list[Path]:
    """Every shipped hardware config (files directly in hw_configs/, not bases in subfolders)."""
    return sorted(HW_DIR.glob("*.yaml"))
