"""Helpers shared by the runtime tests: seeded prompts and a run beside the full-KV reference."""

from __future__ import annotations

import torch

from infinigen_sim.spec.policies import make_policy
from profiler.runtime.engine import Engine


def prompt_ids(spec, batch=2, length=40, seed=0):
    """Seeded random token ids (B, S)."""
    return torch.randint(0, spec.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_with_reference(spec, policy, prompt, gen_len=8):
    """(policy result, ideal result teacher-forced on the policy's tokens, the policy's cache)."""
    with Engine(spec, policy, "cpu", seed=0) as engine, Engine(spec, make_policy("ideal"), "cpu", seed=0) as ref:
        result = engine.generate(prompt, gen_len, keep_logits=True)
        reference = ref.generate(prompt, gen_len, forced=result.tokens, keep_logits=True)
        return result, reference, engine.cache
