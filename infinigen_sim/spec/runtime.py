"""Runtime descriptions: how an offloading runtime schedules and pays for each layer (`infinigen_sim/runtimes/`).

The speedup a user sees depends on their runtime as much as on the hardware. A description says, for
one runtime's code: where layer i+1's fetch is issued and what it overlaps, whether speculation or the
layer end in host syncs, how the prefill's K/V store overlaps, what the dispatching host thread pays
per eager op and per sync (and how many of each a layer of each policy runs), whether the host KV
cache is pinned or pageable, how the InfiniGen gather is done, per-layer policy overrides the runtime
imposes, and its kernel style (extra passes over K/V, materialised prefill scores, dequantisation
traffic). Files load and validate like hardware configs (`spec.io.read_yaml` + `spec.schema`): one-line
errors naming the file and the dotted key; `base:` inheritance; `unchecked:` for implausible figures.
Every number in a shipped file carries its source in a comment.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from infinigen_sim.spec.io import deep_merge, load_with_bases, read_yaml_mapping, resolve_named
from infinigen_sim.spec.policies import ALL_POLICIES, PolicyConfig, PolicyName
from infinigen_sim.spec.schema import UNCHECKED, build_section, check_value, shown, unchecked_keys

RUNTIME_DIR = Path(__file__).resolve().parent.parent / "runtimes"
DEFAULT_RUNTIME = "infinigen-sim"  # this project's runtime (profiler.runtime), as built


class RuntimeConfigError(ValueError):
    """A runtime description that cannot be used; the message names file and key."""


@dataclass(frozen=True)
class DecodeSchedule:
    """Where each decode layer's K/V fetch is issued, what it overlaps, and where the host waits."""

    fetch_issue: str = field(default="layer_start", metadata={
        "help": "layer_start: layer i issues i+1's fetch as it starts; after_attention: after its attention; "
                "own_layer: each layer fetches its own K/V and waits", "choices": ("layer_start", "after_attention",
                                                                                     "own_layer")})
    fetch_overlap: str = field(default="full", metadata={
        "help": "full: the fetch overlaps everything up to its layer's attention; mlp: it must land before the next "
                "layer starts (a device sync ends each layer); none: it is waited for at once",
        "choices": ("full", "mlp", "none")})
    speculation_sync: str = field(default="none", metadata={
        "help": "none: speculation is queued and the host moves on; host: it ends in a host sync (.item())",
        "choices": ("none", "host")})
    layer_sync: bool = field(default=False, metadata={
        "help": "a device-wide synchronize after every sub-layer: the host dispatches a layer only once the GPU "
                "finished the previous one"})
    sync_fetch_layers: int = field(default=0, metadata={
        "help": "this many first layers load their K/V synchronously right before their own compute",
        "range": (0, 1000)})
    first_fetch: str = field(default="step_start", metadata={
        "help": "step_start: layer 0's fetch is issued after the step's embedding; previous_tail: during the "
                "previous step's last layer", "choices": ("step_start", "previous_tail")})


@dataclass(frozen=True)
class PrefillSchedule:
    """How the prompt's K/V store to host overlaps the prefill's compute."""

    store: str = field(default="overlapped", metadata={
        "help": "overlapped: a layer's store runs beside the next layers (two staging buffers); mlp: beside its "
                "own MLP, then waited for; serialised: waited for before the layer attends",
        "choices": ("overlapped", "mlp", "serialised")})


@dataclass(frozen=True)
class PolicyCounts:
    """A count per policy, e.g. eager ops one decode layer dispatches."""

    ideal: float = field(default=0.0, metadata={"range": (0, 10_000)})
    flexgen: float = field(default=0.0, metadata={"range": (0, 10_000)})
    int4: float = field(default=0.0, metadata={"range": (0, 10_000)})
    h2o: float = field(default=0.0, metadata={"range": (0, 10_000)})
    infinigen: float = field(default=0.0, metadata={"range": (0, 10_000)})

    def of(self, policy: PolicyName | str) -> float:
        return float(getattr(self, str(getattr(policy, "value", policy))))


@dataclass(frozen=True)
class HostOverhead:
    """What the host thread that dispatches the model's ops pays per decode layer."""

    dispatch_us: float = field(default=0.0, metadata={
        "help": "host time per eager op (framework dispatch + kernel launch call)", "unit": "us", "range": (0, 1000)})
    sync_us: float = field(default=0.0, metadata={
        "help": "host time per host<->device sync beyond waiting for the device", "unit": "us", "range": (0, 10_000)})
    ops_per_layer: PolicyCounts = field(default_factory=PolicyCounts, metadata={
        "help": "eager ops the dispatching thread runs per decode layer, per policy (OPT-family layers)"})
    llama_ops_per_layer: PolicyCounts | None = field(default=None, metadata={
        "help": "the same for Llama-family layers (RMSNorm, RoPE), where they differ (null: ops_per_layer)"})
    syncs_per_layer: PolicyCounts = field(default_factory=PolicyCounts, metadata={
        "help": "host<->device syncs of the dispatching thread per decode layer, per policy"})

    def layer_s(self, policy: PolicyName | str, family: str = "opt") -> float:
        """Host seconds of one decode layer of `policy` in a model of `family` (opt | llama)."""
        counts = self.llama_ops_per_layer if family == "llama" and self.llama_ops_per_layer else self.ops_per_layer
        ops, syncs = counts.of(policy), self.syncs_per_layer.of(policy)
        return 1e-6 * (ops * self.dispatch_us + syncs * self.sync_us)


@dataclass(frozen=True)
class HostMemory:
    """Where the host keeps K/V, and how a pageable copy is made."""

    host_kv: str = field(default="pinned", metadata={
        "help": "pinned: page-locked host KV (async DMA); pageable: ordinary host memory",
        "choices": ("pinned", "pageable")})
    pageable_copy: str = field(default="direct", metadata={
        "help": "direct: a synchronous copy from pageable memory (the driver stages it); relay: pin_memory() into "
                "a pinned copy on the host thread first, then an async DMA", "choices": ("direct", "relay")})


@dataclass(frozen=True)
class GatherStyle:
    """How InfiniGen's selected rows are gathered on the host."""

    thread: str = field(default="worker", metadata={
        "help": "worker: on a copy worker beside the dispatching thread; main: on the dispatching thread itself",
        "choices": ("worker", "main")})
    via_temporary: bool = field(default=False, metadata={
        "help": "rows are gathered into a temporary, then copied into the pinned staging buffer"})
    row_ns: float = field(default=0.0, metadata={
        "help": "physics: time per gathered row beyond its bytes (a profile's gather rows replace it)",
        "unit": "ns", "range": (0, 100_000)})


@dataclass(frozen=True)
class PolicyOverrides:
    """Per-layer budgets the runtime's policies impose."""

    h2o_head_layers: int = field(default=0, metadata={
        "help": "H2O: this many first layers keep a budget of their own", "range": (0, 1000)})
    h2o_head_heavy_ratio: float = field(default=0.0, metadata={
        "help": "H2O: heavy-hitter share of the prompt in those layers", "range": (0, 1)})
    h2o_head_recent_ratio: float = field(default=0.0, metadata={
        "help": "H2O: recent-token share of the prompt in those layers", "range": (0, 1)})

    def apply(self, policy: PolicyConfig) -> PolicyConfig:
        if policy.name is not PolicyName.H2O or not self.h2o_head_layers:
            return policy
        return policy.with_overrides(head_layers=self.h2o_head_layers, head_heavy_ratio=self.h2o_head_heavy_ratio,
                                     head_recent_ratio=self.h2o_head_recent_ratio)


@dataclass(frozen=True)
class KernelStyle:
    """What the runtime's kernels move beyond the fused ideal the roofline assumes."""

    decode_kv_passes: float = field(default=0.0, metadata={
        "help": "extra full read+write passes over the attended K/V rows in decode attention (e.g. torch.cat)",
        "range": (0, 100)})
    prefill_attention: str = field(default="fused", metadata={
        "help": "fused: no prompt x prompt scores in memory; materialised: eager scores (b*h*s*s)",
        "choices": ("fused", "materialised")})
    prefill_score_bytes: float = field(default=0.0, metadata={
        "help": "bytes of traffic per materialised prefill score element", "unit": "B", "range": (0, 1000)})
    dequant_bytes_per_element: float | None = field(default=None, metadata={
        "help": "INT4 dequantisation traffic per K/V element (null: the fused minimum, the 4-bit code read and "
                "the value written once)", "unit": "B", "range": (0.5, 1000)})
    quant_bytes_per_element: float | None = field(default=None, metadata={
        "help": "INT4 quantisation traffic per K/V element (null: the fused minimum)", "unit": "B",
        "range": (0.5, 1000)})
    partial_k_copy: bool = field(default=False, metadata={
        "help": "InfiniGen: the whole partial K cache is copied every step (torch.cat)"})


@dataclass(frozen=True)
class RuntimeSpec:
    """One runtime's schedule and costs."""

    name: str
    decode: DecodeSchedule = field(default_factory=DecodeSchedule)
    prefill: PrefillSchedule = field(default_factory=PrefillSchedule)
    host: HostOverhead = field(default_factory=HostOverhead)
    memory: HostMemory = field(default_factory=HostMemory)
    gather: GatherStyle = field(default_factory=GatherStyle)
    policies: PolicyOverrides = field(default_factory=PolicyOverrides)
    kernels: KernelStyle = field(default_factory=KernelStyle)
    by_policy: tuple[tuple[str, RuntimeSpec], ...] = ()  # the description as a policy runs it, where it differs
    source_file: str = field(default="", compare=False)

    def for_policy(self, policy: PolicyName | str) -> RuntimeSpec:
        """The description with `policy`'s overrides (`by_policy:` in the file) merged in."""
        name = str(getattr(policy, "value", policy))
        return next((spec for key, spec in self.by_policy if key == name), self)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: asdict(getattr(self, f.name)) for f in fields(self)
               if f.name not in ("name", "by_policy", "source_file")}
        out = {"name": self.name, **out}
        for key, spec in self.by_policy:
            out.setdefault("by_policy", {})[key] = {k: v for k, v in spec.to_dict().items() if v != out.get(k)}
        return out


_SECTIONS = {"decode": DecodeSchedule, "prefill": PrefillSchedule, "host": HostOverhead, "memory": HostMemory,
             "gather": GatherStyle, "policies": PolicyOverrides, "kernels": KernelStyle}
BY_POLICY = "by_policy"  # top-level key: {policy: {section: {key: value}}} merged over the sections
_TOP_KEYS = {"name", "base", "description", UNCHECKED, BY_POLICY, *_SECTIONS}
_NAME = next(f for f in fields(RuntimeSpec) if f.name == "name")


def resolve_runtime_path(name_or_path: str | Path) -> Path:
    """A description from a path, or a bare name looked up in infinigen_sim/runtimes/ (`infinigen-artifact`)."""
    return resolve_named(name_or_path, RUNTIME_DIR, RuntimeConfigError, "runtime description")


def _read(path: Path) -> dict:
    return read_yaml_mapping(path, RuntimeConfigError, f"a mapping with keys {', '.join(sorted(_TOP_KEYS))}")


def _load_raw(path: Path) -> dict:
    return load_with_bases(path, _read, RUNTIME_DIR, RuntimeConfigError, "runtime description")


def _merge(base: dict, over: Any) -> Any:
    return deep_merge(base, over) if isinstance(over, dict) else over  # a non-mapping: reported by validation


def runtime_from_raw(raw: dict, where: str, default_name: str) -> RuntimeSpec:
    """Validate a merged mapping into a RuntimeSpec."""
    for key in raw:
        if key not in _TOP_KEYS:
            raise RuntimeConfigError(f"{where}: unknown key '{key}' (expected one of {', '.join(sorted(_TOP_KEYS))})")
    unchecked = unchecked_keys(where, raw, RuntimeConfigError)
    if "description" in raw and not isinstance(raw["description"], str):
        raise RuntimeConfigError(f"{where}: key 'description': expected a text, got {shown(raw['description'])}")
    name = check_value(where, "name", raw.get("name", default_name), _NAME, str, False, RuntimeConfigError)
    overrides = raw.get(BY_POLICY, {})
    if not isinstance(overrides, dict):
        raise RuntimeConfigError(f"{where}: key '{BY_POLICY}': expected a mapping of policy to sections, "
                                 f"got {shown(overrides)}")
    base = _sections(where, raw, unchecked)  # first: a section that is no mapping is reported as the file's
    by_policy = []
    for policy, over in overrides.items():
        if policy not in ALL_POLICIES:
            raise RuntimeConfigError(f"{where}: key '{BY_POLICY}.{shown(policy)}': expected one of "
                                     f"{', '.join(ALL_POLICIES)}")
        if not isinstance(over, dict) or not set(over) <= set(_SECTIONS):
            raise RuntimeConfigError(f"{where}: key '{BY_POLICY}.{policy}': expected a mapping of sections "
                                     f"({', '.join(_SECTIONS)}), got {shown(over)}")
        merged = {s: _merge(raw.get(s, {}), over.get(s, {})) for s in _SECTIONS}
        sections = _sections(where, merged, unchecked, f"{BY_POLICY}.{policy}.")
        by_policy.append((policy, RuntimeSpec(name=name, **sections, source_file=where)))
    return RuntimeSpec(name=name, **base, by_policy=tuple(by_policy), source_file=where)


def _sections(where: str, raw: dict, unchecked: frozenset[str], prefix: str = "") -> dict[str, Any]:
    """Every section of `raw` validated (a missing section keeps its defaults)."""
    sections = {}
    for section, cls in _SECTIONS.items():
        value = raw.get(section, {})
        if not isinstance(value, dict):
            raise RuntimeConfigError(f"{where}: key '{prefix}{section}': expected a mapping, got {shown(value)}")
        sections[section] = build_section(where, prefix + section, value, cls, unchecked, RuntimeConfigError)
    return sections


def load_runtime_raw(name_or_path: str | Path) -> dict:
    """One description's mapping with its bases merged in, not yet validated (for derived variants)."""
    return _load_raw(resolve_runtime_path(name_or_path))


def load_runtime(name_or_path: str | Path = DEFAULT_RUNTIME) -> RuntimeSpec:
    """Load, merge bases and validate one runtime description."""
    path = resolve_runtime_path(name_or_path)
    return runtime_from_raw(_load_raw(path), str(path), default_name=path.stem)


def all_runtime_paths() -> list[Path]:
    """Every shipped runtime description."""
    return sorted(RUNTIME_DIR.glob("*.yaml"))

