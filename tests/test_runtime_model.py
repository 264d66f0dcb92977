"""Runtime models on CPU: the cached engine equals the full forward and names its ops in the one
vocabulary, GQA equals its MHA expansion, and HF checkpoints written in both formats load back to the
same logits."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from runtime_helpers import prompt_ids

from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.policies import make_policy
from profiler.runtime.engine import Engine
from profiler.runtime.model import Transformer, build_model, decode_attention
from profiler.runtime.skew import Selection, speculation_scores
from profiler.weights.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_dict_hf,
    save_checkpoint,
    to_hf_state_dict,
)

FAMILIES = ["tiny-opt", "tiny-llama-gqa"]

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.mark.parametrize("name", FAMILIES)
def test_ideal_engine_matches_full_forward(name):
    spec = get_model(name)
    with Engine(spec, make_policy("ideal"), "cpu", seed=1) as engine:
        prompt = prompt_ids(spec, length=24)
        result = engine.generate(prompt, 6, keep_logits=True)
        sequence = torch.cat([prompt, result.tokens[:, :-1]], dim=1)
        full = engine.model(sequence)[:, prompt.shape[1] - 1 :]  # (B, gen_len, vocab)
    torch.testing.assert_close(result.logits, full.transpose(0, 1), rtol=1e-4, atol=1e-5)
    assert len(result.steps) == 5 and all(s.wall_s > 0 for s in result.steps)
    # spec.ops names only: the output projection is timed as part of `ffn` (no `o_proj` op any more)
    for record in (result.prefill, *result.steps):
        assert all(set(ops) == {Op.NORM, Op.QKV, Op.ATTENTION, Op.FFN} for ops in record.layer_op_s)
        assert set(record.model_op_s) == {Op.EMBED, Op.NORM, Op.LM_HEAD}


def expand_kv(t, group):
    """(S, B, Hkv, D) -> (S, B, Hkv*G, D), each KV head repeated for its query heads."""
    return t.repeat_interleave(group, dim=2)


def test_gqa_attention_equals_mha_expanded_reference():
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, D, S = 3, 8, 2, 16, 11
    q, k, v = (torch.randn(s, generator=gen, dtype=torch.float64) for s in [(B, H, D), (S, B, Hkv, D), (S, B, Hkv, D)])
    out, probs = decode_attention(q, k, v, need_probs=True)
    k_full, v_full = expand_kv(k, H // Hkv), expand_kv(v, H // Hkv)
    scores = torch.einsum("bhd,sbhd->bhs", q, k_full) / D**0.5
    ref = torch.einsum("bhs,sbhd->bhd", torch.softmax(scores, -1), v_full).reshape(B, H * D)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(probs.reshape(B, H, S), torch.softmax(scores, -1))


def test_gqa_speculation_equals_mha_expanded_max_and_group_mass():
    gen = torch.Generator().manual_seed(1)
    B, Hkv, G, d, n = 2, 2, 4, 5, 9
    q_part = torch.randn(B, Hkv, G, d, generator=gen)
    partial_k = torch.randn(B, Hkv, n, d, generator=gen)
    per_query_head = torch.einsum("bhd,bhnd->bhn", q_part.reshape(B, Hkv * G, d),
                                  partial_k.repeat_interleave(G, dim=1)) / 32**0.5
    expected = per_query_head.view(B, Hkv, G, n).amax(dim=2)
    torch.testing.assert_close(speculation_scores(q_part, partial_k, 32, Selection(rank="max")), expected)
    summed = torch.softmax(per_query_head.view(B, Hkv, G, n), dim=-1).sum(dim=2)  # the default: group mass
    torch.testing.assert_close(speculation_scores(q_part, partial_k, head_dim=32), summed)


def test_gqa_model_equals_mha_expanded_model():
    spec = get_model("tiny-llama-gqa")
    gqa = build_model(spec, seed=3)
    mha = Transformer(dataclasses.replace(spec, n_kv_heads=spec.n_heads))
    G, D = spec.group_size, spec.head_dim
    state = gqa.state_dict()
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):  # (Hkv*D, d) -> (H*D, d)
            w = state[key].view(spec.n_kv_heads, D, -1)
            state[key] = w.repeat_interleave(G, dim=0).reshape(spec.n_heads * D, -1)
    mha.load_state_dict(state)
    tokens = prompt_ids(spec, length=17)
    torch.testing.assert_close(mha(tokens), gqa(tokens), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("name", FAMILIES)
def test_checkpoint_round_trip(tmp_path, name, fmt):
    spec = get_model(name)
    model = build_model(spec, seed=7)
    save_checkpoint(model, tmp_path / "ckpt", fmt)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == spec.family.value
    loaded_spec, loaded = load_checkpoint(tmp_path / "ckpt")
    for field in ("family", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ffn", "vocab_size", "tie_embeddings"):
        assert getattr(loaded_spec, field) == getattr(spec, field)
    for key, tensor in model.state_dict().items():
        assert loaded.state_dict()[key].shape == tensor.shape
    tokens = prompt_ids(spec, length=9)
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


def test_hf_names_are_the_published_ones():
    opt = to_hf_state_dict(build_model(get_model("tiny-opt")))
    assert {"model.decoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.0.fc1.bias",
            "model.decoder.layers.0.self_attn_layer_norm.weight", "model.decoder.layers.0.final_layer_norm.bias",
            "model.decoder.embed_positions.weight", "model.decoder.embed_tokens.weight",
            "model.decoder.final_layer_norm.weight", "model.decoder.layers.0.self_attn.out_proj.weight"} <= set(opt)
    llama = to_hf_state_dict(build_model(get_model("tiny-llama-gqa")))
    assert {"model.layers.0.mlp.gate_proj.weight", "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.0.self_attn.o_proj.weight"} <= set(llama)


def test_load_state_dict_hf_rejects_missing_and_misshapen():
    model = build_model(get_model("tiny-llama-gqa"))
    state = to_hf_state_dict(model)
    state.pop("model.norm.weight")
    with pytest.raises(CheckpointError, match="missing"):
        load_state_dict_hf(model, state)
    state = to_hf_state_dict(model)
    state["model.norm.weight"] = torch.ones(3)
    with pytest.raises(CheckpointError, match="shape"):
        load_state_dict_hf(model, state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_safetensors_checkpoint_loads_its_values(tmp_path, dtype):
    spec = get_model("tiny-llama-gqa")
    model = build_model(spec, seed=5).to(dtype)
    save_checkpoint(model, tmp_path / "half")
    _, loaded = load_checkpoint(tmp_path / "half")  # float32 modules, the half values copied in
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor.float()), key
