"""The engine: one model and one KV policy; prefill, decode steps and their per-op records.

One function per phase as in gpt-fast's generate.py: `prefill`, `decode_one_token` (over
`decode_layer`), `generate`. The decode step follows the schedule in infinigen_sim.spec.policies:
embed, then per layer norm -> (the cache issues the next layer's fetch, speculating it for
InfiniGen) -> QKV -> write-back of the new K/V row -> wait for this layer's rows -> attention ->
output projection -> norm -> MLP; then final norm and LM head. Spans are `spec.ops.Op`s; the output
projection and the MLP are both `Op.FFN`, the op the cost model prices as W_O + MLP. Greedy
decoding, or teacher forcing on given tokens. The engine never writes the model's parameters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from infinigen_sim.spec.models import ModelSpec
from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.policies import PolicyConfig, PolicyName
from profiler.runtime.cuda_api import CUDA
from profiler.runtime.h2o import HeavyHitterCache
from profiler.runtime.infinigen import InfiniGenCache
from profiler.runtime.kv_cache import DeviceCache, KVCache, OffloadedCache, Runtime
from profiler.runtime.model import Transformer, build_model, prefill_attention
from profiler.runtime.quant import QuantizedCache
from profiler.runtime.timing import MODEL_LAYER, PhaseTimer, StepRecord
from profiler.runtime.transfer import Copier

CACHES: dict[PolicyName, type[KVCache]] = {
    PolicyName.IDEAL: DeviceCache,
    PolicyName.FLEXGEN: OffloadedCache,
    PolicyName.INT4: QuantizedCache,
    PolicyName.H2O: HeavyHitterCache,
    PolicyName.INFINIGEN: InfiniGenCache,
}


RUNTIME_DESCRIPTION = "infinigen-sim"  # the description of this runtime: infinigen_sim/runtimes/infinigen-sim.yaml


def default_device() -> torch.device:
    return torch.device("cuda" if CUDA.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


@dataclass
class GenerationResult:
    """Tokens generated (or forced), with the prefill record and one record per decode step."""

    tokens: Tensor  # (B, gen_len)
    prefill: StepRecord
    steps: list[StepRecord]
    logits: Tensor | None = None  # (gen_len, B, vocab) when asked for: logits that chose each token

    @property
    def prefill_s(self) -> float:
        return self.prefill.wall_s

    @property
    def decode_s(self) -> float:
        return sum(s.wall_s for s in self.steps)

    def fetched_fraction(self, first_layer: int = 0) -> float:
        """Rows fetched / cached rows, the mean over decode steps and layers >= first_layer (0 without steps)."""
        ratios = [s.fetched[i] / s.context_len for s in self.steps for i in range(first_layer, len(s.fetched))]
        return sum(ratios) / len(ratios) if ratios else 0.0


class Engine:
    """A model and a KV policy on one device; caches are allocated per generation."""

    def __init__(self, spec: ModelSpec, policy: PolicyConfig, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, seed: int = 0, model: Transformer | None = None,
                 trace: bool = False) -> None:
        self.spec, self.policy = spec, policy
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or default_dtype(self.device)
        built = build_model(spec, seed, self.device, self.dtype) if model is None else model.to(self.device, self.dtype)
        self.model = built.eval()
        self.timer = PhaseTimer(self.device.type == "cuda", trace)
        self.copier = Copier(self.device, policy.overlap and policy.offloaded, self.timer)
        rt = Runtime(spec, policy, self.model, self.device, self.dtype, self.copier, self.timer)
        self.cache = CACHES[policy.name](rt)
        self._cache_shape: tuple[int, int, int] | None = None

    def check_lengths(self, prompt_len: int, gen_len: int) -> None:
        total = prompt_len + gen_len
        if total > self.spec.max_positions:
            raise ValueError(f"prompt_len + gen_len = {total} exceeds {self.spec.name}'s "
                             f"max_positions {self.spec.max_positions}")

    def setup_caches(self, batch: int, prompt_len: int, gen_len: int) -> None:
        """KV buffers for a generation (apart from model construction), reused while the shape holds."""
        self.check_lengths(prompt_len, gen_len)
        shape = (batch, prompt_len + gen_len, prompt_len)
        if shape != self._cache_shape:
            self.cache.release()  # free the old buffers first: the caching allocators hand them back
            self.cache.allocate(*shape)
            self._cache_shape = shape
        self.cache.reset()

    @torch.inference_mode()
    def generate(self, prompt_ids: Tensor, gen_len: int, forced: Tensor | None = None,
                 keep_logits: bool = False) -> GenerationResult:
        """Prefill prompt_ids (B, S) and decode gen_len tokens (gen_len - 1 decode steps).

        With `forced` (B, gen_len) the engine feeds those tokens instead of its own argmax
        (teacher forcing), so two policies can be compared on the same sequence.
        """
        if gen_len < 1:
            raise ValueError(f"gen_len must be >= 1, got {gen_len}")
        prompt_ids = prompt_ids.to(self.device)
        B, S = prompt_ids.shape
        self.setup_caches(B, S, gen_len)
        logits, prefill = self._timed(-1, S, lambda: self.prefill(prompt_ids))
        kept = [logits] if keep_logits else []
        token = self._next(logits, forced, 0)
        tokens, steps = [token], []
        for t in range(gen_len - 1):
            pos = S + t
            logits, record = self._timed(t, pos, lambda p=pos, tok=token: self.decode_one_token(tok, p))
            steps.append(record)
            kept += [logits] if keep_logits else []
            token = self._next(logits, forced, t + 1)
            tokens.append(token)
        return GenerationResult(torch.cat(tokens, dim=1), prefill, steps,
                                torch.stack(kept) if keep_logits else None)

    def _next(self, logits: Tensor, forced: Tensor | None, t: int) -> Tensor:
        if forced is not None:
            return forced[:, t : t + 1].to(self.device)
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1) greedy

    def _timed(self, step: int, context_len: int, fn: Callable[[], tuple[Tensor, list[int]]]
               ) -> tuple[Tensor, StepRecord]:
        self.timer.begin_step(-1 if step < 0 else step)
        t0 = time.perf_counter()
        logits, fetched = fn()
        if self.device.type == "cuda":
            CUDA.synchronize(self.device)  # once per step: the wall time and the events are read now
        wall = time.perf_counter() - t0
        per_layer, model = self.timer.collect(self.spec.n_layers)
        return logits, StepRecord(step, context_len, wall, per_layer, model, fetched)

    def prefill(self, prompt_ids: Tensor) -> tuple[Tensor, list[int]]:
        """The prompt through every layer, its K/V into the cache -> last position's logits (B, vocab)."""
        input_pos = torch.arange(prompt_ids.shape[1], device=self.device)
        with self.timer.span(Op.EMBED, MODEL_LAYER):
            x = self.model.embed(prompt_ids, input_pos)
        for layer in range(self.spec.n_layers):
            x = self.prefill_layer(layer, x, input_pos)
        self.copier.drain()
        return self._logits(x[:, -1]), [0] * self.spec.n_layers

    def prefill_layer(self, layer: int, x: Tensor, input_pos: Tensor) -> Tensor:
        block = self.model.layers[layer]
        with self.timer.span(Op.NORM, layer):
            a = block.input_layernorm(x)
        with self.timer.span(Op.QKV, layer):
            q, k, v = self.model.qkv(layer, a, input_pos)  # (B, T, H|Hkv, D)
        self.cache.store_prompt(layer, q, k, v)
        with self.timer.span(Op.ATTENTION, layer):
            o = prefill_attention(q, k, v)
        return self._finish_layer(layer, x, o)

    def decode_one_token(self, token: Tensor, pos: int) -> tuple[Tensor, list[int]]:
        """One new token (B, 1) at position `pos` (= tokens cached) -> logits (B, vocab), rows fetched."""
        input_pos = torch.tensor([pos], device=self.device)
        with self.timer.span(Op.EMBED, MODEL_LAYER):
            x = self.model.embed(token, input_pos)
        self.cache.begin_step(pos)
        for layer in range(self.spec.n_layers):
            x = self.decode_layer(layer, x, input_pos)
        logits = self._logits(x[:, -1])
        return logits, self.cache.end_step()

    def decode_layer(self, layer: int, x: Tensor, input_pos: Tensor) -> Tensor:
        block = self.model.layers[layer]
        with self.timer.span(Op.NORM, layer):
            a = block.input_layernorm(x)
        self.cache.before_layer(layer, a, input_pos)
        with self.timer.span(Op.QKV, layer):
            q, k, v = self.model.qkv(layer, a, input_pos)  # (B, 1, H|Hkv, D)
        self.cache.write_back(layer, k, v)
        o = self.cache.attend(layer, q, k, v)
        return self._finish_layer(layer, x, o)

    def _finish_layer(self, layer: int, x: Tensor, o: Tensor) -> Tensor:
        """After attention: output projection and MLP, both timed as `Op.FFN` (two spans, one op)."""
        block = self.model.layers[layer]
        with self.timer.span(Op.FFN, layer):
            x = x + block.self_attn.o_proj(o)
        with self.timer.span(Op.NORM, layer):
            h = block.post_attention_layernorm(x)
        with self.timer.span(Op.FFN, layer):
            return x + block.mlp(h)

    def _logits(self, h: Tensor) -> Tensor:
        with self.timer.span(Op.NORM, MODEL_LAYER):
            h = self.model.norm(h)
        with self.timer.span(Op.LM_HEAD, MODEL_LAYER):
            return self.model.lm_head_logits(h).float()

    def close(self) -> None:
        self.copier.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
