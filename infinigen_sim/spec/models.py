"""Model zoo: decoder shapes from the published configs, and what they cost per layer.

The single source of layer shapes for both worlds: the simulator derives bytes and FLOPs from
these specs, and the runtime (`profiler.runtime`) builds its modules from them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from enum import Enum


class Family(str, Enum):
    """Architecture family: decides norms, positions, FFN shape and biases."""

    OPT = "opt"  # LayerNorm, learned positions (offset 2), ReLU FFN, biases everywhere
    LLAMA = "llama"  # RMSNorm, RoPE, SwiGLU FFN, no biases, optional GQA


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of one decoder-only transformer (Hugging Face config names in comments)."""

    name: str
    family: Family
    n_layers: int  # num_hidden_layers
    d_model: int  # hidden_size
    n_heads: int  # num_attention_heads
    n_kv_heads: int  # num_key_value_heads (== n_heads without GQA)
    d_ffn: int  # ffn_dim (OPT) / intermediate_size (Llama)
    vocab_size: int
    max_positions: int  # max_position_embeddings
    rope_theta: float = 10000.0  # Llama only
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # lm_head shares the token embedding
    source: str = ""  # where the shapes come from

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"{self.name}: d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.name}: n_heads {self.n_heads} not divisible by n_kv_heads")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of one layer's K (or V) row: n_kv_heads * head_dim."""
        return self.n_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def has_bias(self) -> bool:
        return self.family is Family.OPT

    # ---- parameters -------------------------------------------------------------------------
    @property
    def attn_params(self) -> int:
        """W_Q, W_K, W_V, W_O (+ biases for OPT) of one layer."""
        d, kv = self.d_model, self.kv_dim
        weights = d * d + 2 * d * kv + d * d
        biases = (d + 2 * kv + d) if self.has_bias else 0
        return weights + biases

    @property
    def ffn_params(self) -> int:
        d, f = self.d_model, self.d_ffn
        if self.family is Family.OPT:
            return 2 * d * f + f + d  # fc1, fc2 with biases
        return 3 * d * f  # gate, up, down

    @property
    def norm_params(self) -> int:
        per_norm = 2 * self.d_model if self.family is Family.OPT else self.d_model
        return 2 * per_norm

    @property
    def layer_params(self) -> int:
        return self.attn_params + self.ffn_params + self.norm_params

    @property
    def layer_matmul_params(self) -> int:
        """Weights that take part in a matmul per token (no biases, no norms)."""
        d, kv = self.d_model, self.kv_dim
        ffn = 2 * d * self.d_ffn if self.family is Family.OPT else 3 * d * self.d_ffn
        return 2 * d * d + 2 * d * kv + ffn

    @property
    def embedding_params(self) -> int:
        pos = self.max_positions * self.d_model if self.family is Family.OPT else 0
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return self.vocab_size * self.d_model + pos + head

    @property
    def total_params(self) -> int:
        return self.n_layers * self.layer_params + self.embedding_params + self.norm_params // 2

    # ---- bytes ------------------------------------------------------------------------------
    def layer_weight_bytes(self, dtype_bytes: int = 2) -> int:
        return self.layer_params * dtype_bytes

    def embedding_bytes(self, dtype_bytes: int = 2) -> int:
        return self.embedding_params * dtype_bytes

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        return self.total_params * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of one token in one layer."""
        return 2 * self.kv_dim * dtype_bytes

    # ---- FLOPs (multiply-add = 2) ------------------------------------------------------------
    def layer_decode_flops(self, context_len: int) -> int:
        """One new token through one layer attending to `context_len` cached tokens (+ itself)."""
        attend = context_len + 1
        return 2 * self.layer_matmul_params + 4 * self.n_heads * self.head_dim * attend

    def layer_prefill_flops(self, prompt_len: int) -> int:
        """`prompt_len` tokens through one layer with a causal mask."""
        causal_pairs = prompt_len * (prompt_len + 1) // 2
        return 2 * self.layer_matmul_params * prompt_len + 4 * self.n_heads * self.head_dim * causal_pairs

    def lm_head_flops(self, n_tokens: int = 1) -> int:
        return 2 * self.vocab_size * self.d_model * n_tokens


def _opt(name: str, layers: int, d: int, heads: int, ffn: int) -> ModelSpec:
    return ModelSpec(
        name=name, family=Family.OPT, n_layers=layers, d_model=d, n_heads=heads, n_kv_heads=heads,
        d_ffn=ffn, vocab_size=50272, max_positions=2048,
        source=f"https://huggingface.co/facebook/{name}/blob/main/config.json",
    )


def _llama(name: str, layers: int, d: int, heads: int, kv_heads: int, ffn: int, vocab: int,
           max_pos: int, theta: float, source: str, eps: float = 1e-5, tie: bool = False) -> ModelSpec:
    return ModelSpec(
        name=name, family=Family.LLAMA, n_layers=layers, d_model=d, n_heads=heads, n_kv_heads=kv_heads,
        d_ffn=ffn, vocab_size=vocab, max_positions=max_pos, rope_theta=theta, norm_eps=eps,
        tie_embeddings=tie, source=source,
    )


_HF = "https://huggingface.co"
MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        _opt("opt-1.3b", 24, 2048, 32, 8192),
        _opt("opt-6.7b", 32, 4096, 32, 16384),
        _opt("opt-13b", 40, 5120, 40, 20480),
        _opt("opt-30b", 48, 7168, 56, 28672),
        _opt("opt-66b", 64, 9216, 72, 36864),
        _llama("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, 4096, 1e4, f"{_HF}/meta-llama/Llama-2-7b-hf"),
        _llama("llama-2-13b", 40, 5120, 40, 40, 13824, 32000, 4096, 1e4, f"{_HF}/meta-llama/Llama-2-13b-hf"),
        _llama("llama-2-70b", 80, 8192, 64, 8, 28672, 32000, 4096, 1e4, f"{_HF}/meta-llama/Llama-2-70b-hf"),
        _llama("llama-3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, 5e5,
               f"{_HF}/meta-llama/Meta-Llama-3-8B", eps=1e-5),
        _llama("llama-3-70b", 80, 8192, 64, 8, 28672, 128256, 8192, 5e5,
               f"{_HF}/meta-llama/Meta-Llama-3-70B", eps=1e-5),
        _llama("mistral-7b", 32, 4096, 32, 8, 14336, 32000, 32768, 1e4,
               f"{_HF}/mistralai/Mistral-7B-v0.1"),
        _llama("smollm2-135m", 30, 576, 9, 3, 1536, 49152, 8192, 1e5,
               f"{_HF}/HuggingFaceTB/SmolLM2-135M-Instruct", tie=True),
        # Tiny presets for tests and CPU runs (seeded random weights; not published models).
        ModelSpec("tiny-opt", Family.OPT, n_layers=4, d_model=256, n_heads=4, n_kv_heads=4, d_ffn=1024,
                  vocab_size=512, max_positions=4096, source="test preset"),
        ModelSpec("tiny-llama-gqa", Family.LLAMA, n_layers=4, d_model=256, n_heads=8, n_kv_heads=2,
                  d_ffn=688, vocab_size=512, max_positions=8192, tie_embeddings=False,
                  source="test preset"),
        ModelSpec("small-opt", Family.OPT, n_layers=8, d_model=512, n_heads=8, n_kv_heads=8, d_ffn=2048,
                  vocab_size=2048, max_positions=8192, source="CPU validation preset"),
        ModelSpec("small-llama-gqa", Family.LLAMA, n_layers=8, d_model=512, n_heads=8, n_kv_heads=2,
                  d_ffn=1376, vocab_size=2048, max_positions=8192, tie_embeddings=False,
                  source="CPU validation preset"),
    ]
}


class UnknownModelError(KeyError):
    """A model name that is not in the zoo."""

    def __str__(self) -> str:
        return str(self.args[0])


def get_model(name: str) -> ModelSpec:
    """The spec called `name` (case-insensitive); a one-line error with close matches otherwise."""
    key = name.strip().lower()
    if key in MODELS:
        return MODELS[key]
    close = difflib.get_close_matches(key, MODELS, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UnknownModelError(f"unknown model '{name}'{hint}; known: {', '.join(MODELS)}")
