"""Fast mode: a point's replay from a few cut layers and a few replayed steps, within 0.5% of a full replay.

Two facts make a point cheap. (a) Layers with the same work reach a steady period after a few:
replay KEEP_LAYERS of each run of identical layers and add the cut ones back at the period measured
between the last kept ones (checked steady, else more are kept). (b) Within one regime (which
resource bounds which segment) a decode step's time is affine in (context, fetched rows): fit it on
a few replayed steps, sum it over all steps, and halve the range where the fit misses any sample.
"""

from __future__ import annotations

import math

import numpy as np

from infinigen_sim.sim.machine import Machine, StepState
from infinigen_sim.sim.processes import decode_step, prefill
from infinigen_sim.sim.replay import SimResult
from infinigen_sim.sim.scenario import PREFILL, RESOURCES, Scenario
from infinigen_sim.spec.policies import LayerWork, fetch_tokens, layer_work

KEEP_LAYERS = 8  # >= 5: the steady check compares two pairs of layer periods before the run's last
STEADY_RTOL = 1e-9  # two consecutive two-layer periods this close count as steady
FIT_RTOL = 1e-4  # largest miss of the step-time fit on its samples, relative to the step time
EXACT_STEPS = 6  # ranges with fewer steps are replayed step by step


def _layer_bounds(sc: Scenario) -> list[tuple[int, int]]:
    """(first layer, layers) of each range whose layers do the same work at every step."""
    n_layers = sc.model.n_layers
    firsts = {0, sc.policy.full_fetch_layers, *(group[0] for group in sc.fetch_model.groups)}
    bounds = sorted(b for b in firsts if 0 <= b < n_layers) + [n_layers]
    return [(lo, hi - lo) for lo, hi in zip(bounds, bounds[1:], strict=False)]


def layer_runs(sc: Scenario, context_len: int) -> list[tuple[LayerWork, int]]:
    """The layers of one decode step as (work, consecutive layers with it)."""
    runs: list[tuple[LayerWork, int]] = []
    for first, count in _layer_bounds(sc):
        work = layer_work(sc.policy, sc.model, first, sc.batch, context_len, sc.prompt_len, sc.fetch_model,
                          sc.dtype_bytes)
        if runs and runs[-1][0] == work:
            runs[-1] = (work, runs[-1][1] + count)
        else:
            runs.append((work, count))
    return runs


def _cut(counts: list[int], keep: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Layers kept per run (an even number cut, so a two-layer cycle keeps its phase), and
    (index of the run's last kept layer, layers cut) for each cut run."""
    kept = [count if count <= keep else keep + (count - keep) % 2 for count in counts]
    ends = [sum(kept[:i + 1]) - 1 for i in range(len(kept))]
    return kept, [(end, count - k) for end, count, k in zip(ends, counts, kept, strict=True) if count > k]


def _two_layer_period(starts: list[float], last: int) -> float | None:
    """Time two layers take before the run's last kept layer, if the two before that took as long."""
    recent, earlier = starts[last] - starts[last - 2], starts[last - 2] - starts[last - 4]
    return recent if abs(recent - earlier) <= STEADY_RTOL * max(abs(recent), 1e-12) else None


def _replay_cut(counts: list[int], replay) -> tuple[float, dict[str, float]]:
    """Replay runs of `counts` identical layers cut to a few each; add the cut layers back.

    `replay(kept)` runs the cut model and returns (end_s, machine, step id). Steady state may be a
    two-layer cycle (InfiniGen's gather and the compute stream alternate), so layers are cut in pairs.
    """
    keep = KEEP_LAYERS
    while True:
        kept, cuts = _cut(counts, keep)
        end_s, m, step = replay(kept)
        periods = [_two_layer_period(m.layer_start_s, last) for last, _ in cuts]
        if None not in periods:
            break
        keep *= 2
    busy = m.recorder.busy_s(step)
    for (last, dropped), period in zip(cuts, periods, strict=True):
        end_s += dropped // 2 * period
        for resource in RESOURCES:
            pair = (m.recorder.busy.get((step, layer, resource), 0.0) for layer in (last - 2, last - 1))
            busy[resource] += dropped // 2 * sum(pair)
    return end_s, busy


def _fast_step(sc: Scenario, context_len: int, last: bool) -> tuple[float, dict[str, float]]:
    """Time and resource busy seconds of one decode step, replayed alone; when the step's first fetch is
    issued during the previous step's tail, replayed between the step before it and (unless it is the
    `last` step, which like the runtime issues nothing for a step that never comes) the step after it."""
    runs = layer_runs(sc, context_len)
    after_previous = sc.runtime.decode.first_fetch == "previous_tail"

    def replay(kept: list[int]) -> tuple[float, Machine, int]:
        m = Machine(sc)
        layers = [work for (work, _), k in zip(runs, kept, strict=True) for _ in range(k)]
        st = StepState(1 if after_previous else 0, layers, context_len, None)
        if not after_previous:
            m.env.process(decode_step(m, st))
            m.env.run()
            return st.end_s, m, 0
        before = StepState(0, layers, context_len - 1, None)
        after = None if last else StepState(2, layers, context_len + 1, None)
        m.env.process(_steps(m, [before, st] + ([after] if after else [])))
        m.env.run()
        m.layer_start_s = m.layer_start_s[len(layers):2 * len(layers)]  # the steady check reads the measured step
        return st.end_s - before.end_s, m, 1

    return _replay_cut([count for _, count in runs], replay)


def _steps(m: Machine, states: list[StepState]):
    """Decode steps back to back, each issuing the next one's layer-0 fetch during its tail."""
    for st, nxt in zip(states, [*states[1:], None], strict=True):
        yield from decode_step(m, st, nxt)


def _fast_prefill(sc: Scenario) -> tuple[float, dict[str, float]]:
    def replay(kept: list[int]) -> tuple[float, Machine, int]:
        m = Machine(sc)
        m.env.process(prefill(m, kept[0]))
        m.env.run()
        return m.env.now, m, PREFILL

    return _replay_cut([sc.model.n_layers], replay)


def _fetched_rows(sc: Scenario, context_len: int) -> int:
    """Rows per sequence fetched over all layers of one step (the second fit variable)."""
    return sum(count * fetch_tokens(sc.policy, first, context_len, sc.prompt_len, sc.fetch_model)
               for first, count in _layer_bounds(sc))


def _sum_steps(step_s, contexts: list[int], fetched: list[int], lo: int, hi: int) -> float:
    """Sum of step_s(s) for lo <= s <= hi from a fit t = a + b*context + c*fetched (see above)."""
    if hi - lo < EXACT_STEPS:
        return math.fsum(step_s(s) for s in range(lo, hi + 1))
    mid = (lo + hi) // 2
    slope = (fetched[hi] - fetched[lo]) / (hi - lo)
    bent = max(range(lo, hi + 1), key=lambda s: abs(fetched[s] - fetched[lo] - slope * (s - lo)))
    picks = {lo, mid, hi, bent}
    picks.add((lo + mid) // 2 if len(picks) < 4 else (mid + hi) // 2)
    span_c = contexts[hi] - contexts[lo]
    span_f = max(fetched[lo:hi + 1]) - min(fetched[lo:hi + 1]) or 1
    features = np.array([[1.0, (contexts[s] - contexts[lo]) / span_c, (fetched[s] - fetched[lo]) / span_f]
                         for s in range(lo, hi + 1)])
    rows = sorted(picks)
    times = np.array([step_s(s) for s in rows])
    coef = np.linalg.lstsq(features[[s - lo for s in rows]], times, rcond=None)[0]
    miss = np.abs(features[[s - lo for s in rows]] @ coef - times).max()
    if miss <= FIT_RTOL * times.max():
        return float(features.sum(axis=0) @ coef)
    return _sum_steps(step_s, contexts, fetched, lo, mid) + _sum_steps(step_s, contexts, fetched, mid + 1, hi)


def simulate_fast(sc: Scenario) -> SimResult:
    """Prefill and decode from a few cut layers and a few replayed steps (see above)."""
    prefill_s, prefill_busy = _fast_prefill(sc)
    n_steps = sc.n_decode_steps
    if n_steps == 0:
        return SimResult(prefill_s, 0.0, 0.0, prefill_busy)
    contexts = [sc.prompt_len + step for step in range(n_steps)]
    fetched = [_fetched_rows(sc, context) for context in contexts]
    replayed: dict[int, tuple[float, dict[str, float]]] = {}
    # With previous_tail the last step issues no fetch for a next one, so it is replayed on its own.
    tail_differs = sc.runtime.decode.first_fetch == "previous_tail" and n_steps > 1

    def step_s(step: int) -> float:
        if step not in replayed:
            replayed[step] = _fast_step(sc, contexts[step], step == n_steps - 1)
        return replayed[step][0]

    if tail_differs:
        decode_s = _sum_steps(step_s, contexts, fetched, 0, n_steps - 2) + step_s(n_steps - 1)
    else:
        decode_s = _sum_steps(step_s, contexts, fetched, 0, n_steps - 1)
    mid = (n_steps - 1) // 2
    step_s(mid)
    return SimResult(prefill_s, decode_s, replayed[mid][0], replayed[mid][1])


