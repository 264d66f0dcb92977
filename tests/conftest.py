"""Shared fixtures for the simulator tests: a stub cost model and a one-step replay helper."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from infinigen_sim.sim.machine import Machine, Recorder, StepState
from infinigen_sim.sim.processes import decode_step, prefill
from infinigen_sim.sim.scenario import Scenario
from infinigen_sim.spec.hardware import HardwareConfig, load_hardware
from infinigen_sim.spec.models import ModelSpec, get_model
from infinigen_sim.spec.policies import layer_work, make_policy


@dataclass(frozen=True)
class StubCosts:
    """Fixed seconds per op and per copy whatever the sizes; 0 where not given (copies of 0 bytes: 0)."""

    ops: Mapping[str, float] = field(default_factory=dict)
    h2d: float = 0.0
    d2h: float = 0.0
    gather: float = 0.0

    def compute_s(self, op: str, model: ModelSpec, batch: int, n_tokens: int, kv_len: int,
                  *, partial_ratio: float = 1.0) -> float:
        return self.ops.get(op, 0.0)

    def h2d_s(self, nbytes: float, gathered: bool) -> float:
        return self.h2d if nbytes > 0 else 0.0

    def d2h_s(self, nbytes: float) -> float:
        return self.d2h if nbytes > 0 else 0.0

    def gather_s(self, nbytes: float, rows: int) -> float:
        return self.gather if nbytes > 0 else 0.0

    def measured_ops(self) -> frozenset:
        return frozenset()

    def span_s(self, op: str) -> float:
        return 0.0

    def handoff_s(self, nbytes: float) -> float:
        return 0.0

    def job_s(self) -> float:
        return 0.0

    def describe(self) -> dict[str, Any]:
        return {"kind": "stub"}


def stub_scenario(costs: StubCosts, policy: str = "flexgen", n_layers: int = 1, **params: Any) -> Scenario:
    """A tiny-opt variant with `n_layers` layers, batch 1, prompt 16, 2 generated tokens."""
    model = replace(get_model("tiny-opt"), n_layers=n_layers)
    return Scenario(costs, model, make_policy(policy, **params), batch=1, prompt_len=16, gen_len=2)


def replay_step(sc: Scenario, context_len: int = 16) -> tuple[list[tuple[str, float]], float]:
    """Replay one decode step; the (event, time) log without zero-length ops, and the step's end."""
    recorder = Recorder(keep_ops=True)
    m = Machine(sc, recorder)
    layers = [layer_work(sc.policy, sc.model, layer, sc.batch, context_len, sc.prompt_len, sc.fetch_model)
              for layer in range(sc.model.n_layers)]
    st = StepState(0, layers, context_len, None)
    m.env.process(decode_step(m, st))
    m.env.run()
    recorder.ops = [op for op in recorder.ops if op.end_s > op.start_s]
    return recorder.log(), st.end_s


def replay_prefill(sc: Scenario) -> tuple[list[tuple[str, float]], float]:
    """Replay the prefill; the (event, time) log without zero-length ops, and its end."""
    recorder = Recorder(keep_ops=True)
    m = Machine(sc, recorder)
    m.env.process(prefill(m, sc.model.n_layers))
    m.env.run()
    recorder.ops = [op for op in recorder.ops if op.end_s > op.start_s]
    return recorder.log(), m.env.now


@pytest.fixture(scope="session")
def a100() -> HardwareConfig:
    return load_hardware("a100_pcie4")


@pytest.fixture
def one_intra_op_thread():
    """Tiny ops under a loaded 2-core box: OpenMP barriers dominate; one thread keeps tests fast."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
