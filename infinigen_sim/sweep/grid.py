"""A sweep's points: the grid of axes, `--set` values that add axes, and one frozen `Point` per configuration.

A point is a frozen, picklable `Point` keyed by its parameters (`Point.key`), so any executor (this
process, a process pool, Ray) can run it and a resumed sweep can tell which rows it already has.
"""

from __future__ import annotations

import itertools
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from infinigen_sim.cost.physics import DEFAULT as DEFAULT_SPEC  # the default runtime, loaded once
from infinigen_sim.spec.cli import InputError
from infinigen_sim.spec.fetch import FetchModel
from infinigen_sim.spec.hardware import HardwareConfig, distinct_configs, load_hardware, parse_value
from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.policies import ALL_POLICIES, PolicyConfig, PolicyError, make_policy
from infinigen_sim.spec.runtime import DEFAULT_RUNTIME, RuntimeSpec, load_runtime

POLICY_PREFIX = "policy."


@dataclass(frozen=True)
class SweepGrid:
    """The axes of a sweep; the defaults are the grid run when no option is given."""

    models: tuple[str, ...] = field(default=("opt-6.7b", "opt-13b", "llama-2-7b", "llama-3-8b"),
                                    metadata={"help": "model names from the zoo (infinigen_sim.spec.models)",
                                              "what": "model"})
    policies: tuple[str, ...] = field(default=ALL_POLICIES, metadata={"help": "KV policies", "what": "policy"})
    batch_sizes: tuple[int, ...] = field(default=(1, 4, 16, 64), metadata={
        "help": "sequences decoded together", "unit": "sequences", "minimum": 1, "what": "batch size"})
    prompt_lens: tuple[int, ...] = field(default=(512, 2048, 8192, 32768), metadata={
        "help": "prompt length", "unit": "tokens", "minimum": 1, "what": "prompt length"})
    gen_lens: tuple[int, ...] = field(default=(128,), metadata={
        "help": "tokens generated per sequence", "unit": "tokens", "minimum": 1, "what": "generated length"})
    runtime: tuple[str, ...] = field(default=(DEFAULT_RUNTIME,), metadata={
        "help": "runtime descriptions: names in infinigen_sim/runtimes/ (infinigen-sim: this project's runtime; "
                "infinigen-artifact: the paper's) or YAML paths", "what": "runtime", "metavar": "NAME|PATH,..."})


@dataclass(frozen=True)
class Point:
    """One configuration to simulate; `key` identifies it by its parameters."""

    hw: HardwareConfig  # with --set overrides applied
    model: str
    policy: PolicyConfig  # with policy.* overrides applied
    batch_size: int
    prompt_len: int  # tokens
    gen_len: int  # tokens
    settings: tuple[tuple[str, Any], ...] = ()  # the --set values, (dotted key, value)
    mode: str = "fast"
    profile: str | None = None  # profile bundle folder: costs from its measurements (a path keeps Point picklable)
    runtime: RuntimeSpec = DEFAULT_SPEC  # how the runtime schedules and pays for each layer
    fetch_model: FetchModel | None = None  # InfiniGen's fetch counts when given (plan: an accuracy row's), else
    # the profile's fit or the paper default

    @property
    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hw": self.hw.name, "runtime": self.runtime.name}
        out.update(self.settings)
        out.update(model=self.model, policy=self.policy.name.value, batch_size=self.batch_size,
                   prompt_len=self.prompt_len, gen_len=self.gen_len)
        return out

    @property
    def key(self) -> str:
        return "|".join(f"{name}={value}" for name, value in self.params.items())


def expand_points(hw_configs: Sequence[str | Path], grid: SweepGrid,
                  settings: dict[str, tuple[Any, ...]] | None = None, mode: str = "fast",
                  profile: str | None = None) -> list[Point]:
    """Every point of the grid; each --set key with several values is one more axis."""
    settings = settings or {}
    for name in grid.models:
        get_model(name)
    runtimes = [load_runtime(name) for name in grid.runtime]
    hw_keys = [k for k in settings if not k.startswith(POLICY_PREFIX)]
    policy_keys = [k for k in settings if k.startswith(POLICY_PREFIX)]
    points = []
    for path in distinct_configs(hw_configs):  # each file once; two files of one name are an error
        for hw_values in itertools.product(*(settings[k] for k in hw_keys)):
            hw = load_hardware(path, dict(zip(hw_keys, hw_values, strict=True)))
            for policy_values in itertools.product(*(settings[k] for k in policy_keys)):
                chosen = tuple(zip(hw_keys + policy_keys, hw_values + policy_values, strict=True))
                params = {k[len(POLICY_PREFIX):]: v for k, v in zip(policy_keys, policy_values, strict=True)}
                policies = [_policy(name, params) for name in grid.policies]
                points += [Point(hw, model, policy, batch, prompt, gen, chosen, mode, profile, runtime)
                           for runtime in runtimes for model in grid.models for prompt in grid.prompt_lens
                           for batch in grid.batch_sizes for gen in grid.gen_lens for policy in policies]
    return points


def _policy(name: str, params: dict[str, Any]) -> PolicyConfig:
    try:
        return make_policy(name, **params)
    except PolicyError as exc:
        keys = ", ".join(f"--set {POLICY_PREFIX}{k}" for k in params) or "--policies"
        raise PolicyError(f"{keys}: {exc}") from None


# ---- --set KEY=V1,V2 -----------------------------------------------------------------------------
_POLICY_TYPES = {f.name: typing.get_type_hints(PolicyConfig)[f.name] for f in fields(PolicyConfig) if f.name != "name"}


def parse_settings(items: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """--set KEY=V1[,V2...] -> {key: values}; policy.* values are checked against PolicyConfig's field types."""
    settings: dict[str, tuple[Any, ...]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in text.split(",")]
        if not sep or not key or not all(values):
            raise InputError(f"--set '{item}': expected KEY=VALUE[,VALUE...], e.g. link.h2d_gbps=16,32")
        if key in settings:
            raise InputError(f"--set {key}: given twice; give one comma list instead")
        parsed = [_setting_value(key, parse_value(v)) for v in values]
        settings[key] = tuple(dict.fromkeys(parsed))
        if len(settings[key]) < len(parsed):
            print(f"note: --set {key}: dropped repeated values from '{text}'", file=sys.stderr)
    return settings


def _setting_value(key: str, value: Any) -> Any:
    if not key.startswith(POLICY_PREFIX):
        return value  # hardware keys are checked by the loader, which names file and key
    name = key[len(POLICY_PREFIX):]
    if name not in _POLICY_TYPES:
        raise InputError(f"--set {key}: unknown policy parameter (expected one of "
                         f"{', '.join(POLICY_PREFIX + k for k in _POLICY_TYPES)})")
    kind = _POLICY_TYPES[name]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool:
        ok, label = isinstance(value, bool), "true or false"
    elif kind is int:
        ok, label = number and float(value).is_integer(), "whole number"
    else:  # float, or float | None
        nullable = kind is not float
        ok, label = number or (nullable and value is None), "number" + (" or null" if nullable else "")
    if not ok:
        raise InputError(f"--set {key}: expected a {label}, got {value!r}")
    if kind is int:
        return int(value)
    return float(value) if number and kind is not bool else value
