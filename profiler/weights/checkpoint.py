"""Local Hugging Face OPT / Llama checkpoints: config.json + weights, loaded by renaming keys.

The runtime's module names are Llama's HF keys without `model.` (runtime/model.py), so Llama loads by
stripping the prefix and OPT by a handful of renames (fc1 -> mlp.fc1, out_proj -> o_proj, ...).
Weights come from *.safetensors (the `safetensors` package) or from pytorch_model*.bin (torch.load,
weights only). `save_checkpoint` writes the same layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from infinigen_sim.spec.models import Family, ModelSpec
from profiler.runtime.model import Transformer


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message says what and where."""


_RENAMES = {  # HF key -> runtime key, applied in order
    Family.OPT: [
        (r"^(model\.)?decoder\.", ""),
        (r"^final_layer_norm\.", "norm."),
        (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
        (r"\.self_attn_layer_norm\.", ".input_layernorm."),
        (r"^(layers\.\d+)\.final_layer_norm\.", r"\1.post_attention_layernorm."),
        (r"^(layers\.\d+)\.(fc[12])\.", r"\1.mlp.\2."),
    ],
    Family.LLAMA: [(r"^model\.", "")],
}
_INVERSE = {  # runtime key -> HF key
    Family.OPT: [
        (r"^norm\.", "final_layer_norm."),
        (r"\.self_attn\.o_proj\.", ".self_attn.out_proj."),
        (r"\.input_layernorm\.", ".self_attn_layer_norm."),
        (r"\.post_attention_layernorm\.", ".final_layer_norm."),
        (r"\.mlp\.(fc[12])\.", r".\1."),
        (r"^(?!lm_head)", "model.decoder."),
    ],
    Family.LLAMA: [(r"^(?!lm_head)", "model.")],
}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer older Llama checkpoints saved

def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def spec_from_hf_config(config: dict, name: str) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json (model_type opt or llama)."""
    kind = config.get("model_type")
    d, heads = config["hidden_size"], config["num_attention_heads"]
    common = dict(name=name, n_layers=config["num_hidden_layers"], d_model=d, n_heads=heads,
                  vocab_size=config["vocab_size"], max_positions=config["max_position_embeddings"],
                  source=f"checkpoint {name}")
    if kind == "opt":
        if config.get("word_embed_proj_dim", d) != d or not config.get("do_layer_norm_before", True):
            raise CheckpointError(f"{name}: OPT with project_in/out or post-norm (opt-350m) is not supported")
        return ModelSpec(family=Family.OPT, n_kv_heads=heads, d_ffn=config["ffn_dim"],
                         tie_embeddings=config.get("tie_word_embeddings", True), **common)
    if kind == "llama":
        if config.get("rope_scaling") or config.get("attention_bias") or config.get("mlp_bias"):
            raise CheckpointError(f"{name}: rope_scaling / attention or MLP biases are not supported")
        if config.get("head_dim", d // heads) != d // heads:
            raise CheckpointError(f"{name}: head_dim != hidden_size / num_attention_heads is not supported")
        return ModelSpec(family=Family.LLAMA, n_kv_heads=config.get("num_key_value_heads", heads),
                         d_ffn=config["intermediate_size"], rope_theta=config.get("rope_theta", 10000.0),
                         norm_eps=config.get("rms_norm_eps", 1e-6),
                         tie_embeddings=config.get("tie_word_embeddings", False), **common)
    raise CheckpointError(f"{name}: model_type {kind!r} is not supported (opt, llama)")


def hf_config_from_spec(spec: ModelSpec) -> dict:
    common = {"hidden_size": spec.d_model, "num_attention_heads": spec.n_heads, "vocab_size": spec.vocab_size,
              "num_hidden_layers": spec.n_layers, "max_position_embeddings": spec.max_positions,
              "tie_word_embeddings": spec.tie_embeddings}
    if spec.family is Family.OPT:
        return {"model_type": "opt", "architectures": ["OPTForCausalLM"], "ffn_dim": spec.d_ffn,
                "word_embed_proj_dim": spec.d_model, "do_layer_norm_before": True, **common}
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "intermediate_size": spec.d_ffn,
            "num_key_value_heads": spec.n_kv_heads, "rope_theta": spec.rope_theta,
            "rms_norm_eps": spec.norm_eps, "hidden_act": "silu", **common}


def load_state_dict_hf(model: Transformer, state_dict: dict[str, Tensor]) -> Transformer:
    """Copy an HF-named state dict (OPT or Llama keys, e.g. from a GGUF loader) into `model`."""
    family = model.spec.family
    own = model.state_dict()
    renamed = {}
    for key, tensor in state_dict.items():
        new = _rename(key, _RENAMES[family])
        if _IGNORED.search(key) or (new == "lm_head.weight" and model.lm_head is None):
            continue  # tied models reuse embed_tokens
        renamed[new] = tensor
    missing, unexpected = sorted(set(own) - set(renamed)), sorted(set(renamed) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{model.spec.name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, tensor in renamed.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{model.spec.name}: {key} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(own[key].shape)}")
    with torch.no_grad():
        for key, tensor in renamed.items():
            own[key].copy_(tensor)
    return model


def to_hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The model's weights under Hugging Face names (the inverse of load_state_dict_hf)."""
    rules = _INVERSE[model.spec.family]
    return {_rename(key, rules): t for key, t in model.state_dict().items()}


def read_weights(directory: Path) -> dict[str, Tensor]:
    """Every tensor in the directory's *.safetensors, else its pytorch_model*.bin."""
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return {k: t for f in files for k, t in load_file(f).items()}
    files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors or pytorch_model*.bin")
    return {k: t for f in files for k, t in torch.load(f, map_location="cpu", weights_only=True).items()}


def load_checkpoint(directory: str | Path) -> tuple[ModelSpec, Transformer]:
    """(spec, model on CPU) from a local HF checkpoint directory; Engine(model=...) moves and casts it."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json")
    spec = spec_from_hf_config(json.loads(config_path.read_text()), directory.name)
    model = Transformer(spec)
    return spec, load_state_dict_hf(model, read_weights(directory))


def save_checkpoint(model: Transformer, directory: str | Path, fmt: str = "safetensors") -> Path:
    """Write config.json and the weights (model.safetensors or pytorch_model.bin) in HF layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config_from_spec(model.spec), indent=2))
    weights = to_hf_state_dict(model)
    if fmt == "safetensors":
        save_file(weights, directory / "model.safetensors")
    else:
        torch.save(weights, directory / "pytorch_model.bin")
    return directory
