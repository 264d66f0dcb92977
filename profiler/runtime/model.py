"""Decoder-only transformer built from a ModelSpec: OPT and Llama through small part classes.

Module names are the Llama Hugging Face keys without the `model.` prefix (`layers.N.self_attn.
q_proj`, `mlp.gate_proj`, `input_layernorm`, `norm`, `lm_head`), so loading a checkpoint is a
rename (profiler/weights/checkpoint.py). OPT differs only in its parts, chosen by family: LayerNorm,
learned positions with offset 2 (`embed_positions`), a ReLU `fc1`/`fc2` MLP, biases everywhere.

The model holds weights and per-op functions; which K/V rows attention reads is the KV cache's
job (kv_cache.py). Cached K/V rows are token-major (S, B, Hkv, D) as in FlexGen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infinigen_sim.spec.models import Family, ModelSpec
from profiler.runtime.cuda_api import CUDA


class RMSNorm(nn.Module):
    """Llama's norm: x / rms(x) * weight, computed in fp32."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(spec.d_model))
        self.eps = spec.norm_eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def layer_norm(spec: ModelSpec) -> nn.LayerNorm:
    return nn.LayerNorm(spec.d_model, eps=spec.norm_eps)


class LearnedPositions(nn.Module):
    """OPT: a learned table added to the token embedding, indexed by position + 2 (HF's offset)."""

    OFFSET = 2

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(spec.max_positions + self.OFFSET, spec.d_model))

    def embed(self, x: Tensor, input_pos: Tensor) -> Tensor:
        return x + F.embedding(input_pos + self.OFFSET, self.weight)

    def rotate(self, t: Tensor, input_pos: Tensor) -> Tensor:
        return t


class RotaryPositions(nn.Module):
    """Llama: q and k rotated by position (HF's rotate_half layout); nothing added to embeddings."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        cos, sin = self.tables()  # on the meta device when the model is built there (build_model refills them)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def tables(self, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """cos and sin of every position's angles (max_positions, D), computed in float64, kept in fp32."""
        dim = self.spec.head_dim
        inv_freq = 1.0 / self.spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        freqs = torch.outer(torch.arange(self.spec.max_positions, dtype=torch.float64, device=device), inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)  # (max_positions, D)
        return angles.cos().float(), angles.sin().float()

    def embed(self, x: Tensor, input_pos: Tensor) -> Tensor:
        return x

    def rotate(self, t: Tensor, input_pos: Tensor) -> Tensor:
        """t (B, T, H, D) at positions input_pos (T,)."""
        cos, sin = self.cos[input_pos][:, None, :], self.sin[input_pos][:, None, :]  # (T, 1, D)
        half = t.shape[-1] // 2
        rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
        return t * cos + rotated * sin


class SelfAttention(nn.Module):
    """The four attention projections; the attention itself is `prefill_attention`/`decode_attention`."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        d, bias = spec.d_model, spec.has_bias
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(d, spec.n_heads * spec.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, spec.kv_dim, bias=bias)
        self.v_proj = nn.Linear(d, spec.kv_dim, bias=bias)
        self.o_proj = nn.Linear(spec.n_heads * spec.head_dim, d, bias=bias)

    def project(self, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """a (B, T, d) -> q (B, T, H, D), k and v (B, T, Hkv, D)."""
        B, T, _ = a.shape
        q = self.q_proj(a).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(a).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(a).view(B, T, self.n_kv_heads, self.head_dim)
        return q, k, v


class OPTMLP(nn.Module):
    """fc2(relu(fc1(x))), with biases."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(spec.d_model, spec.d_ffn)
        self.fc2 = nn.Linear(spec.d_ffn, spec.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.d_model, spec.d_ffn, bias=False)
        self.up_proj = nn.Linear(spec.d_model, spec.d_ffn, bias=False)
        self.down_proj = nn.Linear(spec.d_ffn, spec.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass(frozen=True)
class FamilyParts:
    """The pieces that make a family: its norm, MLP and position handling."""

    norm: Callable[[ModelSpec], nn.Module]
    mlp: Callable[[ModelSpec], nn.Module]
    positions: Callable[[ModelSpec], nn.Module]


PARTS = {
    Family.OPT: FamilyParts(norm=layer_norm, mlp=OPTMLP, positions=LearnedPositions),
    Family.LLAMA: FamilyParts(norm=RMSNorm, mlp=LlamaMLP, positions=RotaryPositions),
}


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, spec: ModelSpec, parts: FamilyParts) -> None:
        super().__init__()
        self.input_layernorm = parts.norm(spec)
        self.self_attn = SelfAttention(spec)
        self.post_attention_layernorm = parts.norm(spec)
        self.mlp = parts.mlp(spec)

    def ffn(self, x: Tensor) -> Tensor:
        """The post-attention half: norm + MLP (without the residual)."""
        return self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Embedding, decoder layers, final norm and LM head of one ModelSpec."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        parts = PARTS[spec.family]
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.d_model)
        self.embed_positions = parts.positions(spec)
        self.layers = nn.ModuleList(Block(spec, parts) for _ in range(spec.n_layers))
        self.norm = parts.norm(spec)
        self.lm_head = None if spec.tie_embeddings else nn.Linear(spec.d_model, spec.vocab_size, bias=False)

    def embed(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """tokens (B, T) at positions input_pos (T,) -> (B, T, d)."""
        return self.embed_positions.embed(self.embed_tokens(tokens), input_pos)

    def qkv(self, layer: int, a: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Layer `layer`'s projections of its attention input a (B, T, d), RoPE applied for Llama."""
        q, k, v = self.layers[layer].self_attn.project(a)
        rotate = self.embed_positions.rotate
        return rotate(q, input_pos), rotate(k, input_pos), v

    def lm_head_logits(self, h: Tensor) -> Tensor:
        """Normalised hidden states (..., d) -> logits (..., vocab); tied models reuse embed_tokens."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return F.linear(h, head.weight)

    def forward(self, tokens: Tensor) -> Tensor:
        """Full-sequence causal reference without a cache: tokens (B, T) -> logits (B, T, vocab)."""
        input_pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens, input_pos)
        for i, block in enumerate(self.layers):
            q, k, v = self.qkv(i, block.input_layernorm(x), input_pos)
            x = x + block.self_attn.o_proj(prefill_attention(q, k, v))
            x = x + block.ffn(x)
        return self.lm_head_logits(self.norm(x))


def prefill_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention over a prompt: q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H*D)."""
    B, T, H, D = q.shape
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H|Hkv, T, D)
        is_causal=True, enable_gqa=H != k.shape[2],
    )
    return o.transpose(1, 2).reshape(B, T, H * D)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, need_probs: bool = False) -> tuple[Tensor, Tensor | None]:
    """One new token attending to rows: q (B, H, D), k/v (S, B, Hkv, D) token-major -> (B, H*D).

    GQA without expansion: the G = H / Hkv query heads of a KV head are stacked against its rows.
    Returns the probabilities (B, Hkv, G, S) too when asked (H2O accumulates them).
    """
    B, H, D = q.shape
    Hkv = k.shape[2]
    qg = q.view(B, Hkv, H // Hkv, D) * D**-0.5  # (B, Hkv, G, D); scaled first: q.k of a real fp16 checkpoint
    scores = torch.matmul(qg, k.permute(1, 2, 3, 0))  # (B, Hkv, G, S)  can pass 65504 before the 1/sqrt(D)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v.permute(1, 2, 0, 3))  # (B, Hkv, G, D)
    return out.reshape(B, H * D), (probs if need_probs else None)


def prompt_attention_mass(q: Tensor, k: Tensor, max_scores: int = 2**26) -> Tensor:
    """Each prompt token's accumulated causal attention per KV head (H2O's score): (B, Hkv, T) fp32.

    Summed over every query position and over the query heads sharing the KV head; computed in
    chunks of queries so that the score matrix never holds more than `max_scores` elements.
    """
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    chunk = max(1, min(T, max_scores // (B * H * T)))
    kt = k.permute(0, 2, 3, 1).unsqueeze(2)  # (B, Hkv, 1, D, T)
    keys = torch.arange(T, device=q.device)
    mass = torch.zeros(B, Hkv, T, device=q.device, dtype=torch.float32)
    for s0 in range(0, T, chunk):
        s1 = min(T, s0 + chunk)
        qc = q[:, s0:s1].reshape(B, s1 - s0, Hkv, H // Hkv, D).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, c, D)
        scores = torch.matmul(qc * D**-0.5, kt).float()  # (B, Hkv, G, c, T); q scaled first (fp16 range)
        future = keys[None, :] > torch.arange(s0, s1, device=q.device)[:, None]  # (c, T)
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        mass += probs.sum(dim=(2, 3))
    return mass


def init_weights(model: Transformer, gen: torch.Generator) -> Transformer:
    """Seeded random weights that keep activations sane: std 0.02, output projections scaled
    down by sqrt(2 * n_layers) (GPT-2), norms near one, small random biases. Drawn where the
    parameters live: fp32 from a CPU generator on CPU, in the parameters' dtype from a device
    generator elsewhere (no host copy of the weights)."""
    out_std = 0.02 / math.sqrt(2 * model.spec.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            on_cpu = p.device.type == "cpu"
            noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32 if on_cpu else p.dtype)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.02 * noise)
            elif name.endswith(("o_proj.weight", "fc2.weight", "down_proj.weight")):
                p.copy_(out_std * noise)
            else:
                p.copy_(0.02 * noise)
    return model


def build_model(spec: ModelSpec, seed: int = 0, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None) -> Transformer:
    """A model of `spec` with seeded random weights on `device` in `dtype`.

    CPU (the default): fp32 weights from a CPU generator, then cast to `dtype`. Any other device:
    the modules are made on the meta device, allocated on `device` directly in `dtype` and drawn
    there by a device generator, so a 13B model costs neither 52 GB of fp32 host memory nor a
    single-threaded host randn and its copy (its values differ from the CPU ones).
    """
    device = torch.device(device or "cpu")
    if device.type == "cpu":
        model = init_weights(Transformer(spec), torch.Generator().manual_seed(seed))
        return model if dtype is None else model.to(dtype)
    with torch.device("meta"):
        model = Transformer(spec)
    model = model.to(dtype or torch.float32).to_empty(device=device)
    for module in model.modules():
        if isinstance(module, RotaryPositions):  # buffers are not parameters: to_empty left them unset
            cos, sin = module.tables(device)
            module.cos.copy_(cos)
            module.sin.copy_(sin)
    return init_weights(model, CUDA.generator(device, seed))
