"""A full replay: every layer of the prefill and of every decode step in one environment, and what it measured."""

from __future__ import annotations

from dataclasses import dataclass

from infinigen_sim.sim.machine import Machine, Recorder
from infinigen_sim.sim.processes import generate
from infinigen_sim.sim.scenario import PREFILL, RESOURCES, Scenario


@dataclass(frozen=True)
class SimResult:
    """What one replay measured."""

    prefill_s: float
    decode_s: float
    step_s: float  # the middle decode step
    busy_s: dict[str, float]  # seconds each resource worked on the middle decode step (prefill if none)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def bottleneck(self) -> str:
        """The resource busiest over the middle decode step (the first of RESOURCES on a tie)."""
        return max(RESOURCES, key=lambda resource: self.busy_s[resource])


def simulate_full(sc: Scenario, recorder: Recorder | None = None) -> SimResult:
    """Every layer of the prefill and of every decode step, in one environment."""
    m = Machine(sc, recorder)
    marks: dict[int, float] = {}
    m.env.process(generate(m, marks))
    m.env.run()
    n_steps = sc.n_decode_steps
    if n_steps == 0:
        return SimResult(marks[PREFILL], 0.0, 0.0, m.recorder.busy_s(PREFILL))
    mid = (n_steps - 1) // 2
    step_s = marks[mid] - marks[mid - 1]  # marks[-1] is the prefill's end
    return SimResult(marks[PREFILL], marks[n_steps - 1] - marks[PREFILL], step_s, m.recorder.busy_s(mid))


