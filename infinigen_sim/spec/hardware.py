"""Hardware configs: load `infinigen_sim/hw_configs/*.yaml` (with `base:` inheritance), validate, override.

Peak figures come from the YAML exactly as published; the achievable fractions are separate
`*_efficiency` fields whose defaults are documented here (a measured profile replaces them).
Every error is one line naming the file, the dotted key and what was expected.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

HW_DIR = Path(__file__).resolve().parent.parent / "hw_configs"


class HardwareError(ValueError):
    """A hardware config that cannot be used; the message names file and key."""


@dataclass(frozen=True)
class GpuSpec:
    """One GPU."""

    name: str = field(metadata={"help": "marketing name"})
    memory_gib: float = field(metadata={"help": "device memory, GiB"})
    fp16_tflops: float = field(metadata={"help": "dense FP16/BF16 tensor peak, TFLOP/s"})
    hbm_gbps: float = field(metadata={"help": "device memory bandwidth peak, GB/s"})
    compute_efficiency: float = field(default=0.55, metadata={
        "help": "achievable share of fp16_tflops; datasheet rooflines are 1.7-1.9x optimistic"})
    hbm_efficiency: float = field(default=0.8, metadata={
        "help": "achievable share of hbm_gbps for streaming kernels"})
    launch_us: float = field(default=5.0, metadata={
        "help": "fixed cost per kernel (launch + tail), microseconds"})
    reserved_gib: float = field(default=1.0, metadata={
        "help": "device memory not available to tensors (context, allocator slack), GiB"})


@dataclass(frozen=True)
class LinkSpec:
    """The host<->GPU link."""

    name: str = field(metadata={"help": "e.g. PCIe 4.0 x16"})
    h2d_gbps: float = field(metadata={"help": "host-to-device peak per direction, GB/s"})
    d2h_gbps: float = field(metadata={"help": "device-to-host peak per direction, GB/s"})
    latency_us: float = field(metadata={"help": "fixed cost per transfer, microseconds"})
    h2d_efficiency: float = field(default=0.8, metadata={
        "help": "achievable share of h2d_gbps for large pinned copies"})
    d2h_efficiency: float = field(default=0.8, metadata={
        "help": "achievable share of d2h_gbps for large pinned copies"})


@dataclass(frozen=True)
class HostSpec:
    """The host CPU and its memory."""

    name: str = field(metadata={"help": "CPU model"})
    memory_gib: float = field(metadata={"help": "host DRAM, GiB"})
    memory_gbps: float = field(metadata={"help": "DRAM bandwidth peak, GB/s"})
    cores: int = field(metadata={"help": "physical cores"})
    gather_efficiency: float = field(default=0.25, metadata={
        "help": "achievable share of memory_gbps for a row gather into a staging buffer"})
    reserved_gib: float = field(default=8.0, metadata={
        "help": "host memory not available to KV/weights (OS, framework), GiB"})


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
_TOP_KEYS = {"name", "base", "cost_per_hour_usd", *_SECTIONS}


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise HardwareError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise HardwareError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise HardwareError(f"{path}: expected a mapping with keys {sorted(_TOP_KEYS)}")
    return raw


def resolve_path(name_or_path: str | Path) -> Path:
    """A config file from a path, or a bare name looked up in hw_configs/ (`a100_pcie4`)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = HW_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in HW_DIR.glob("*.yaml")))
        raise HardwareError(f"{name_or_path}: no such hardware config (known in {HW_DIR}: {known})")
    return path


def load_raw(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The YAML mapping of `path` with its `base:` chain merged in (base first)."""
    path = path.resolve()
    if path in _seen:
        raise HardwareError(f"{path}: key 'base': circular base chain")
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise HardwareError(f"{path}: key 'base': expected the name of another config, got {base!r}")
    base_path = Path(base) if Path(base).suffix else path.parent / f"{base}.yaml"
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    if not base_path.exists():
        raise HardwareError(f"{path}: key 'base': no file {base_path}")
    return _deep_merge(load_raw(base_path, (*_seen, path)), raw)


def _coerce(where: str, key: str, value: Any, kind: type) -> Any:
    if kind is str:
        if not isinstance(value, str):
            raise HardwareError(f"{where}: key '{key}': expected a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HardwareError(f"{where}: key '{key}': expected a positive number, got {value!r}")
    if kind is int and int(value) != value:
        raise HardwareError(f"{where}: key '{key}': expected a whole number, got {value!r}")
    positive_or_zero = key.endswith(("latency_us", "launch_us", "reserved_gib"))
    if value < 0 or (value == 0 and not positive_or_zero):
        raise HardwareError(f"{where}: key '{key}': expected a positive number, got {value!r}")
    if key.endswith("_efficiency") and value > 1:
        raise HardwareError(f"{where}: key '{key}': expected a fraction in (0, 1], got {value!r}")
    return kind(value)


def _build_section(where: str, section: str, raw: Any) -> Any:
    cls = _SECTIONS[section]
    if not isinstance(raw, dict):
        raise HardwareError(f"{where}: key '{section}': expected a mapping, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise HardwareError(f"{where}: unknown key '{section}.{key}' (expected one of {', '.join(known)})")
    kwargs = {}
    for name, f in known.items():
        key = f"{section}.{name}"
        if name not in raw:
            if f.default is f.default_factory:  # no default: required (both are MISSING)
                raise HardwareError(f"{where}: missing key '{key}' ({f.metadata.get('help', '')})")
            continue
        kind = {"str": str, "int": int, "float": float}[f.type] if isinstance(f.type, str) else f.type
        kwargs[name] = _coerce(where, key, raw[name], kind)
    return cls(**kwargs)


def from_raw(raw: dict, where: str, default_name: str) -> HardwareConfig:
    """Validate a merged mapping into a HardwareConfig."""
    for key in raw:
        if key not in _TOP_KEYS:
            raise HardwareError(f"{where}: unknown key '{key}' (expected one of {', '.join(sorted(_TOP_KEYS))})")
    for section in _SECTIONS:
        if section not in raw:
            raise HardwareError(f"{where}: missing key '{section}'")
    cost = raw.get("cost_per_hour_usd")
    if cost is not None:
        cost = _coerce(where, "cost_per_hour_usd", cost, float)
    name = raw.get("name", default_name)
    return HardwareConfig(
        name=_coerce(where, "name", name, str),
        gpu=_build_section(where, "gpu", raw["gpu"]),
        link=_build_section(where, "link", raw["link"]),
        host=_build_section(where, "host", raw["host"]),
        cost_per_hour_usd=cost,
        source_file=where,
    )


def parse_value(text: str) -> Any:
    """A `--set` value: YAML scalar syntax (numbers, strings, booleans)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(raw: dict, dotted: str, value: Any, where: str) -> dict:
    """A copy of `raw` with `gpu.hbm_gbps`-style key set; unknown keys are errors."""
    parts = dotted.split(".")
    if parts[0] not in _TOP_KEYS - {"base"}:
        raise HardwareError(f"{where}: --set unknown key '{dotted}' (expected one of gpu.*, link.*, host.*, "
                            "name, cost_per_hour_usd)")
    if len(parts) == 2 and parts[0] in _SECTIONS:
        known = {f.name for f in fields(_SECTIONS[parts[0]])}
        if parts[1] not in known:
            raise HardwareError(f"{where}: --set unknown key '{dotted}' (expected one of "
                                f"{', '.join(f'{parts[0]}.{k}' for k in sorted(known))})")
    elif len(parts) != 1 or parts[0] in _SECTIONS:
        raise HardwareError(f"{where}: --set key '{dotted}': expected section.field, e.g. link.h2d_gbps")
    out = copy.deepcopy(raw)
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise HardwareError(f"{where}: key '{part}': expected a mapping, got {node!r}")
    node[parts[-1]] = value
    return out


def load_hardware(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> HardwareConfig:
    """Load, merge bases, apply `overrides` ({dotted key: value}) and validate one config."""
    path = resolve_path(name_or_path)
    raw = load_raw(path)
    for key, value in (overrides or {}).items():
        raw = set_dotted(raw, key, value, str(path))
    return from_raw(raw, str(path), default_name=path.stem)


def all_config_paths() -> list[Path]:
    """Every shipped hardware config (files directly in hw_configs/, not bases in subfolders)."""
    return sorted(HW_DIR.glob("*.yaml"))
