"""The runtime's own timeline (PhaseTimer with trace on): every span on the simulator's tracks, steps in
order, the compute thread's spans never overlapping, copy-worker spans on their own track."""

from __future__ import annotations

import pytest
import torch

from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.policies import make_policy
from infinigen_sim.spec.trace import PREFILL_STEP, TRACKS, chrome_trace, read_trace, trace_json
from profiler.runtime.engine import Engine


@pytest.mark.parametrize("policy", ["flexgen", "infinigen"])
def test_a_traced_generation_lays_every_span_on_a_track(policy, one_intra_op_thread):
    with Engine(get_model("tiny-opt"), make_policy(policy), "cpu", trace=True) as engine:
        prompt = torch.randint(0, engine.spec.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
        result = engine.generate(prompt, 4)
        timeline = engine.timer.timeline
    assert {e.track for e in timeline} <= set(TRACKS) and {e.name for e in timeline} <= {op.value for op in Op}
    assert [s for s in dict.fromkeys(e.step for e in timeline)] == [PREFILL_STEP, 0, 1, 2]
    compute = sorted((e for e in timeline if e.track == "gpu"), key=lambda e: e.start_us)
    for before, after in zip(compute, compute[1:], strict=False):
        assert before.start_us + before.dur_us <= after.start_us + 1e-3  # one thread: spans in sequence
    worker = [e for e in timeline if e.track == "host_cpu"]
    assert worker and {e.name for e in worker} <= {"h2d", "gather", "commit"}  # the copy worker's jobs
    for step, record in enumerate(result.steps):
        spans = [e for e in timeline if e.step == step]
        wall_us = 1e6 * record.wall_s
        assert max(e.start_us + e.dur_us for e in spans) - min(e.start_us for e in spans) <= wall_us * 1.01
    events, meta = read_trace(trace_json(chrome_trace(timeline, metadata={"k": 1})), "here")
    assert len(events) == len(timeline) and meta == {"k": 1}


def test_an_untraced_engine_keeps_no_timeline(one_intra_op_thread):
    with Engine(get_model("tiny-opt"), make_policy("flexgen"), "cpu") as engine:
        engine.generate(torch.zeros(1, 16, dtype=torch.long), 3)
        assert engine.timer.timeline == []
