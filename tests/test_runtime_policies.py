"""The baselines in the runtime: flexgen is exact, int4 stays within its quantisation bound, h2o never
exceeds its budget; records carry what the profiler reads, and the engine opens the spans the cost
model's CPU overheads count."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from runtime_helpers import prompt_ids, run_with_reference

from infinigen_sim.cost.overheads import SPANS_PER_OP
from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.ops import COMPUTE_OPS, Op
from infinigen_sim.spec.policies import h2o_budget, make_policy
from profiler.runtime.engine import Engine
from profiler.runtime.h2o import select_heavy_recent
from profiler.runtime.quant import dequantize, quantize

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")



@pytest.mark.parametrize("bits", [4, 2, 8])
@pytest.mark.parametrize("n", [64, 192, 100])
def test_quantisation_error_within_the_bound(bits, n):
    x = torch.randn(5, 3, n, generator=torch.Generator().manual_seed(n)) * 3
    codes, scale, zero = quantize(x, bits=bits, group=64)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == scale.shape[-1] * 64 * bits // 8
    assert scale.dtype == zero.dtype == torch.float16
    back = dequantize(codes, scale, zero, n, bits=bits, group=64)
    pad = scale.shape[-1] * 64 - n
    err = torch.nn.functional.pad((x - back).abs(), (0, pad)).view(*scale.shape, 64)
    x_groups = torch.nn.functional.pad(x.abs(), (0, pad)).view(*scale.shape, 64)
    fp16_slack = 2**-10 * x_groups.amax(-1) + 2**-8 * scale.float()  # rounding of zero and scale
    assert (err.amax(-1) <= scale.float() / 2 + fp16_slack).all()


def test_int4_packs_two_codes_per_byte_and_runs_end_to_end():
    spec = get_model("tiny-opt")
    result, reference, cache = run_with_reference(spec, make_policy("int4"), prompt_ids(spec))
    assert cache.host[0].t[0].dtype == torch.uint8 and cache.host[0].t[0].shape[-1] == spec.kv_dim // 2
    assert (result.logits - reference.logits).abs().max() < 0.2
    assert all(s.fetched == [s.context_len] * spec.n_layers for s in result.steps)
    phases = result.steps[0].layer_op_s[0]
    assert {"quantize", "dequantize", "h2d", "d2h"} <= set(phases)


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama-gqa"])
def test_flexgen_is_exact(name, overlap):
    spec = get_model(name)
    result, reference, _ = run_with_reference(spec, make_policy("flexgen", overlap=overlap), prompt_ids(spec))
    torch.testing.assert_close(result.logits, reference.logits, rtol=0, atol=1e-5)
    assert all(s.fetched == [s.context_len] * spec.n_layers for s in result.steps)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama-gqa"])
def test_h2o_never_exceeds_its_budget(name):
    spec = get_model(name)
    policy = make_policy("h2o", heavy_ratio=0.15, recent_ratio=0.1)
    prompt = prompt_ids(spec, length=40)
    heavy, recent = h2o_budget(policy, 40)
    result, _, cache = run_with_reference(spec, policy, prompt, gen_len=12)
    budget = heavy + recent
    for step in result.steps:
        assert all(rows == min(step.context_len, budget) for rows in step.fetched)
    assert cache.entries == [budget] * spec.n_layers and cache.host_rows == budget
    newest = prompt.shape[1] + 12 - 2  # position of the last token fed
    kept = cache.pos[..., :budget]  # (L, B, Hkv, budget)
    for p in range(newest - recent + 1, newest + 1):  # the recent window is always kept
        assert (kept == p).any(dim=-1).all()


def test_h2o_head_layers_keep_a_budget_of_their_own():
    """The artifact's H2O: layers 0-1 keep half the prompt as heavy hitters and half as recent (all of it),
    the other layers the usual budget; every layer fetches exactly its own budget."""
    spec = get_model("tiny-opt")
    policy = make_policy("h2o", heavy_ratio=0.15, recent_ratio=0.1, head_layers=1, head_heavy_ratio=0.5,
                         head_recent_ratio=0.5)
    result, _, cache = run_with_reference(spec, policy, prompt_ids(spec, length=40), gen_len=6)
    budgets = [sum(h2o_budget(policy, 40, layer)) for layer in range(spec.n_layers)]
    assert budgets[0] == 40 > budgets[1] == sum(h2o_budget(policy, 40))
    for step in result.steps:
        assert step.fetched == [min(step.context_len, b) for b in budgets]
    assert cache.host_rows == 40 and cache.entries[1:] == budgets[1:]


def test_h2o_prefill_keeps_recent_and_heaviest():
    mass = torch.tensor([[[5.0, 0.1, 3.0, 0.2, 4.0, 0.0, 0.0]]])  # (B=1, Hkv=1, T=7)
    keep = select_heavy_recent(mass, heavy=2, recent=2)
    assert sorted(keep[0, 0].tolist()) == [0, 4, 5, 6]


def test_records_have_every_layer_and_fetch_counts():
    spec = get_model("tiny-opt")
    with Engine(spec, make_policy("infinigen"), "cpu") as engine:
        result = engine.generate(prompt_ids(spec, batch=1), 5)
    assert result.prefill.step == -1 and result.prefill.context_len == 40
    assert "skew" in result.prefill.layer_op_s[2] and "skew" not in result.prefill.layer_op_s[0]
    for t, step in enumerate(result.steps):
        assert step.step == t and step.context_len == 40 + t
        assert len(step.layer_op_s) == len(step.fetched) == spec.n_layers
        assert step.op_total_s(Op.ATTENTION) > 0 and step.wall_s >= step.op_total_s("lm_head")


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama-gqa"])
def test_a_decode_step_opens_the_spans_the_cost_model_counts(name):
    """cost.overheads.SPANS_PER_OP: `ffn` is two spans (output projection, MLP), `speculate` two (the
    layer's speculation, its new partial K row); every other compute op one span per call (a layer
    runs two norms)."""
    spec = get_model(name)
    policy = make_policy("infinigen", overlap=False)  # copy-worker spans inline, counted in order
    prompt = prompt_ids(spec, batch=1)
    with Engine(spec, policy, "cpu") as engine, torch.inference_mode():
        engine.setup_caches(1, prompt.shape[1], 2)
        engine.prefill(prompt)
        spans, span = Counter(), engine.timer.span
        engine.timer.span = lambda op, layer, host=False: spans.update([(op, layer)]) or span(op, layer, host)
        engine.decode_one_token(prompt[:, -1:], prompt.shape[1])
    for layer in range(spec.n_layers):
        compute = {op: n for (op, at), n in spans.items() if at == layer and op in COMPUTE_OPS}
        expected = {Op.NORM: 2, Op.QKV: 1, Op.ATTENTION: 1, Op.FFN: SPANS_PER_OP[Op.FFN]}
        if layer >= policy.full_fetch_layers:
            expected |= {Op.SPECULATE: SPANS_PER_OP[Op.SPECULATE], Op.TOPK: 1}
        assert compute == expected, layer
    assert SPANS_PER_OP[Op.FFN] == SPANS_PER_OP[Op.SPECULATE] == 2


@pytest.mark.parametrize("policy", ["ideal", "flexgen", "int4", "h2o", "infinigen", "infinigen-pool"])
def test_reused_buffers_give_what_fresh_ones_give(policy):
    spec = get_model("tiny-llama-gqa")
    config = make_policy("infinigen", pool_ratio=0.6) if policy == "infinigen-pool" else make_policy(policy)
    first, second = prompt_ids(spec, seed=1), prompt_ids(spec, seed=2)
    with Engine(spec, config, "cpu", seed=0) as reused, Engine(spec, config, "cpu", seed=0) as fresh:
        reused.generate(first, 6)
        again = reused.generate(second, 6, keep_logits=True)
        expected = fresh.generate(second, 6, keep_logits=True)
    torch.testing.assert_close(again.logits, expected.logits, rtol=0, atol=1e-5)
    assert [s.fetched for s in again.steps] == [s.fetched for s in expected.steps]
