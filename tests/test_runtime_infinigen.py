"""InfiniGen in the runtime: skewing is exact and never writes the model, an unlimited budget is full
attention, fetch counts follow spec.policies.infinigen_fetch_count, and the bounded host pool keeps
K, V and partial K aligned."""

from __future__ import annotations

import math

import pytest
import torch
from runtime_helpers import prompt_ids, run_with_reference

from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.policies import infinigen_cap, infinigen_fetch_count, make_policy
from profiler.runtime.engine import Engine
from profiler.runtime.infinigen import HostPool
from profiler.runtime.model import build_model, prefill_attention
from profiler.runtime.skew import (
    FoldedSkew,
    RotarySkew,
    Selection,
    apply_skew,
    count_above,
    skew_matrices,
    speculation_scores,
)

MAX = Selection(rank="max")

FAMILIES = ["tiny-opt", "tiny-llama-gqa"]

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_skew_folding_leaves_every_layer_attention_unchanged():
    """OPT's FoldedSkew: A (orthogonal) preserves every score, the cached K is the plain K, the partial
    W_Q beside the model gives exactly the kept columns of the skewed query, and the skewed query's
    energy sits in its first columns; the model's weights are never written."""
    spec = get_model("tiny-opt")
    model = build_model(spec, seed=2).double()
    weights = {key: t.clone() for key, t in model.state_dict().items()}
    tokens = prompt_ids(spec, length=33)
    pos = torch.arange(tokens.shape[1])
    skew, every_column = FoldedSkew(model, n_cols=20), FoldedSkew(model, n_cols=spec.head_dim)
    B, T, H, Hkv, D = tokens.shape[0], tokens.shape[1], spec.n_heads, spec.n_kv_heads, spec.head_dim
    with torch.no_grad():
        x = model.embed(tokens, pos)
        for layer, block in enumerate(model.layers):
            a = block.input_layernorm(x)
            q, k, v = model.qkv(layer, a, pos)
            k_cached, partial_k = skew.prepare(layer, q, k)
            assert k_cached is k  # the cache keeps plain K
            A = skew_matrices(q, Hkv)
            q_s, k_s = apply_skew(q, A), apply_skew(k, A)  # (B, T, H|Hkv, D)
            grouped = "btjgd,bsjd->bjgts"
            scores = torch.einsum(grouped, q.view(B, T, Hkv, -1, D), k)
            torch.testing.assert_close(torch.einsum(grouped, q_s.view(B, T, Hkv, -1, D), k_s), scores)
            _, all_k = every_column.prepare(layer, q, k)  # every column: speculation is exact
            exact = speculation_scores(every_column.query(layer, a[:, -1:], pos[-1:]), all_k.transpose(1, 2), D, MAX)
            torch.testing.assert_close(exact, scores[..., -1, :].amax(dim=2) * D**-0.5)
            kept = skew.query(layer, a, pos).view(B, T, H, -1)  # the partial W_Q on every position
            torch.testing.assert_close(kept, apply_skew(q, skew.skew_cols[layer]))
            torch.testing.assert_close(partial_k, apply_skew(k, skew.skew_cols[layer]))
            energy = q_s.pow(2).sum(dim=(0, 1))  # (H, D): skewed columns sorted by singular value
            assert (energy[:, 0] >= energy[:, -1]).all()
            x = x + block.self_attn.o_proj(prefill_attention(q, k, v))
            x = x + block.ffn(x)
    for key, t in model.state_dict().items():
        assert torch.equal(t, weights[key]), key


@pytest.mark.parametrize("name", FAMILIES)
def test_infinigen_engine_leaves_the_model_bit_identical(name):
    spec = get_model(name)
    model = build_model(spec, seed=3)
    before = {key: t.clone() for key, t in model.state_dict().items()}
    with Engine(spec, make_policy("infinigen", pool_ratio=0.8), "cpu", model=model) as engine:
        engine.generate(prompt_ids(spec), 4)
        engine.generate(prompt_ids(spec, seed=1), 4)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, t in before.items():
        assert after[key].dtype == t.dtype and torch.equal(after[key], t), key


def test_rotary_skew_with_all_columns_reproduces_the_scores():
    spec = get_model("tiny-llama-gqa")
    model = build_model(spec, seed=4).double()
    tokens = prompt_ids(spec, length=21)
    pos = torch.arange(tokens.shape[1])
    skew = RotarySkew(model, n_cols=spec.head_dim)
    with torch.no_grad():
        a = model.layers[0].input_layernorm(model.embed(tokens, pos))
        q, k, _ = model.qkv(0, a, pos)
        _, partial_k = skew.prepare(0, q, k)  # (B, T, Hkv, D)
        new_pos = pos[-1:]
        spec_q = skew.query(0, a[:, -1:], new_pos)  # (B, Hkv, G, D)
        scores = speculation_scores(spec_q, partial_k.transpose(1, 2), spec.head_dim, MAX)
        q_last = q[:, -1].view(2, spec.n_kv_heads, spec.group_size, spec.head_dim)
        true = torch.einsum("bjgd,btjd->bjgt", q_last, k) / spec.head_dim**0.5
    torch.testing.assert_close(scores, true.amax(dim=2))
    A = skew_matrices(q, spec.n_kv_heads)
    torch.testing.assert_close(A.transpose(1, 2) @ A, torch.eye(spec.head_dim).double().expand_as(A))
    B, T, H, D = q.shape
    grouped = "btjgd,bsjd->bjgts"
    skewed = torch.einsum(grouped, apply_skew(q, A).view(B, T, spec.n_kv_heads, -1, D), apply_skew(k, A))
    torch.testing.assert_close(skewed, torch.einsum(grouped, q.view(B, T, spec.n_kv_heads, -1, D), k))


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("name", FAMILIES)
def test_unlimited_budget_equals_full_attention(name, overlap):
    spec = get_model(name)
    policy = make_policy("infinigen", alpha=math.inf, max_fetch_ratio=1.0, overlap=overlap)
    result, reference, _ = run_with_reference(spec, policy, prompt_ids(spec))
    assert (result.logits.argmax(-1) == reference.logits.argmax(-1)).all()
    torch.testing.assert_close(result.logits, reference.logits, rtol=0, atol=1e-4)
    for step in result.steps:
        assert step.fetched == [step.context_len] * spec.n_layers


@pytest.mark.parametrize("name", FAMILIES)
def test_fetch_counts_respect_the_cap_and_full_layers(name):
    spec = get_model(name)
    policy = make_policy("infinigen", alpha=1.0, max_fetch_ratio=0.25)
    result, _, _ = run_with_reference(spec, policy, prompt_ids(spec, length=64), gen_len=10)
    for step in result.steps:
        n = step.context_len
        assert step.fetched[: policy.full_fetch_layers] == [n] * policy.full_fetch_layers
        for rows in step.fetched[policy.full_fetch_layers :]:
            assert 1 <= rows <= infinigen_cap(policy, n)
        assert {"speculate", "topk", "gather", "h2d"} <= set(step.layer_op_s[policy.full_fetch_layers])


def test_fetch_count_is_the_policy_rule_on_the_speculated_count():
    scores = torch.tensor([[[9.0, 8.5, 1.0, 0.0, 7.0, -3.0]], [[2.0, 2.0, 2.0, 2.0, 2.0, 2.0]]])  # (B=2, Hkv=1, 6)
    logits = scores[:, :, None, :]  # (B, Hkv, G=1, n)
    selected = count_above(logits, alpha=2.5, selection=MAX).item()  # rows above max - 2.5: 3 and 6 -> mean 4.5
    assert selected == 4.5 == count_above(logits, alpha=2.5).item()  # one query head: both rules agree
    policy = make_policy("infinigen", max_fetch_ratio=0.5)
    assert infinigen_fetch_count(policy, 5, 6, selected) == 3  # capped at floor(0.5 * 6)
    assert infinigen_fetch_count(policy, 0, 6, selected) == 6  # a full-fetch layer


def test_pool_counters_increment_evict_min_and_halve():
    pool = HostPool(n_layers=1, batch=1, n_kv_heads=2, capacity=4)
    pool.fill(0, torch.tensor([[[0, 1, 2, 3], [0, 1, 2, 3]]]))
    pool.touch(0, torch.tensor([[[0, 2], [1, 3]]]))
    pool.touch(0, torch.tensor([[[0], [1]]]))
    assert pool.count[0].tolist() == [[[2, 0, 1, 0], [0, 2, 0, 1]]]
    slots = pool.place(0, entries=4, new_pos=4)  # least used, ties to the oldest token
    assert slots.tolist() == [[1, 0]]
    assert pool.pos[0].tolist() == [[[0, 4, 2, 3], [4, 1, 2, 3]]]
    assert pool.count[0].tolist() == [[[2, 0, 1, 0], [0, 2, 0, 1]]]
    assert pool.place(0, entries=4, new_pos=5).tolist() == [[3, 2]]  # slot 1 / 0 now hold the newest
    pool.count[0, 0, 0] = torch.tensor([HostPool.SATURATION - 1, 10, 7, 3], dtype=torch.int32)
    pool.touch(0, torch.tensor([[[0], [0]]]))
    assert pool.count[0, 0, 0].tolist() == [127, 5, 3, 1]  # saturated at 255: the lane halves
    assert pool.count[0, 0, 1].tolist() == [1, 2, 0, 1]  # the other lane untouched by halving
    assert pool.place(0, entries=2, new_pos=6).tolist() == [[2, 2]]  # not full: the next free slot


def test_bounded_pool_keeps_k_v_and_partial_k_aligned():
    spec = get_model("tiny-llama-gqa")
    policy = make_policy("infinigen", pool_ratio=0.5, alpha=1.0)
    prompt = prompt_ids(spec, length=48)
    with Engine(spec, policy, "cpu", seed=0) as engine:
        result = engine.generate(prompt, 12)
        cache, model = engine.cache, engine.model
    capacity = math.ceil(0.5 * 60)
    assert cache.host_rows == capacity and cache.entries == [capacity] * spec.n_layers
    fed = torch.cat([prompt, result.tokens[:, :-1]], dim=1)  # the tokens whose K/V were cached
    pos = torch.arange(fed.shape[1])
    with torch.no_grad():
        _, k_ref, v_ref = model.qkv(0, model.layers[0].input_layernorm(model.embed(fed, pos)), pos)
    held = cache.pool.pos[0]  # (B, Hkv, capacity) token position per slot
    assert (held >= 0).all() and (held.sort(-1).values.diff(dim=-1) > 0).all()  # distinct tokens
    assert (held == fed.shape[1] - 1).any(dim=-1).all()  # every lane holds the newest token
    lanes = torch.arange(spec.n_kv_heads)
    for b in range(prompt.shape[0]):
        for slot in range(capacity):
            p = held[b, :, slot]
            torch.testing.assert_close(cache.host[0].t[0][slot, b], k_ref[b, p, lanes])
            torch.testing.assert_close(cache.host[0].t[1][slot, b], v_ref[b, p, lanes])
    for layer in cache.speculated:  # the partial K cache follows the pool slot for slot
        host_k = cache.host[layer].t[0].permute(1, 0, 2, 3)  # (B, capacity, Hkv, D)
        expected = apply_skew(host_k, cache.skew.skew_cols[layer]).transpose(1, 2)
        torch.testing.assert_close(cache.partial_k_cache[layer], expected)
    assert all(s.fetched[i] <= capacity for s in result.steps for i in range(spec.n_layers))


def test_sum_rule_counts_per_query_head_and_floors_the_count():
    """The default rule: per query head the rows above its own max - alpha, averaged over every query head
    (here 1 and 3 -> 2); rows ranked by the group's summed softmax; the floor lifts a count to its share."""
    logits = torch.tensor([[[[5.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, -9.0]]]])  # (B=1, Hkv=1, G=2, n=4)
    assert count_above(logits, alpha=2.0).item() == 2.0
    assert count_above(logits, alpha=2.0, selection=MAX).item() == 1.0  # the max rule: only row 0 is near 5
    floored = Selection(min_fetch_ratio=0.75)
    assert count_above(logits, alpha=2.0, selection=floored).item() == 3.0
    valid = torch.tensor([[True, True, False, False], [True, True, True, True]])  # two queries, causal rows
    two = logits[:, :, :, None].expand(1, 1, 2, 2, 4).masked_fill(~valid, float("-inf"))  # rows not cached: -inf
    per_query = floored.count(two, 2.0, valid.sum(-1))  # (Q=2,)
    assert per_query.tolist() == [1.5, 3.0]  # floors 0.75 * 2 and 0.75 * 4 (the counts are 1.5 and 2)
    ranked = Selection().scores(logits)[0, 0]
    assert ranked.argmax().item() == 0 and ranked[3] < ranked[1]
    with pytest.raises(ValueError, match="rank"):
        Selection(rank="mean")


@pytest.mark.parametrize("rank", ["sum", "max"])
def test_selection_scores_leave_uncached_rows_out_of_the_ranking(rank: str) -> None:
    """With `valid`, rows not cached score -inf and take no share of the summed softmax: the cached rows
    score exactly as if only they existed (a future row's large logit once shrank the others unevenly)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 3, 4, 6, generator=gen)  # (B, Hkv, G, Q, n)
    valid = torch.arange(4)[:, None] + 2 > torch.arange(6)[None, :]  # query q sees rows < q + 2
    logits[..., 5] = 50.0  # a row no query has cached
    selection = Selection(rank=rank)
    got = selection.scores(logits, valid)
    assert torch.isinf(got[..., ~valid]).all() and (got[..., ~valid] < 0).all()
    for q in range(4):
        n = q + 2
        alone = selection.scores(logits[..., q:q + 1, :n])[..., 0, :]
        torch.testing.assert_close(got[..., q, :n], alone)
