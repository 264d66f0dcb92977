"""The SimPy replay of the layer-wise compute / gather / prefetch pipeline of one GPU, its link and its host.

  scenario.py   the point to replay (Scenario) and where copies run (Placement)
  pricing.py    each op's seconds at the point, from its cost model
  machine.py    the environment, its four resources and the recorder
  processes.py  prefill, decode steps and layers, copies (the SimPy processes)
  replay.py     a full replay (every event) and its SimResult
  fast.py       fast mode: a few layers and steps, extrapolated (within 0.5% of full)
  trace.py      timelines and Chrome traces
"""

from __future__ import annotations

from infinigen_sim.sim.fast import simulate_fast
from infinigen_sim.sim.replay import SimResult, simulate_full
from infinigen_sim.sim.scenario import Scenario

MODES = ("fast", "full")


def simulate(sc: Scenario, mode: str = "fast") -> SimResult:
    """Replay `sc` event by event (`full`) or accelerated (`fast`, within 0.5% of full)."""
    if mode == "full":
        return simulate_full(sc)
    if mode == "fast":
        return simulate_fast(sc)
    raise ValueError(f"unknown mode '{mode}'; expected one of {', '.join(MODES)}")
