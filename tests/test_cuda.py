"""On a CUDA card (skipped without one): every policy x {tiny-opt, tiny-llama-gqa} x overlap on/off and the
InfiniGen pool in fp16 against full KV (InfiniGen with alpha=inf and the cap at 1 equals it within fp16
tolerance; the lossy policies' top-1 agrees with the same policy in fp32 on the CPU), their host pool,
staging and write-back buffers pinned, and a tiny transfer and kernel bench with status ok and GB/s > 0.

The checks live in tests/cuda_checks.py, which tests/test_cuda_semantics.py also runs in CI on the CPU
stand-in for CUDA. Meant to finish in well under 90 s on an H100/H200; no card has run it yet, so that is
an estimate: 26 cases of at most 3 generations of 8 tokens of a 4-layer model, each step ~4 x 100 torch
calls at <= 25 us (profiler.bench.budget.HOST_OP_S), ~0.1 s a generation: ~10 s, plus CUDA's start-up.
"""

from __future__ import annotations

import pytest
import torch
from cuda_checks import check_benches, check_policy, policy_cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")


@pytest.mark.parametrize("model, policy, overlap", policy_cases())
def test_every_policy_in_fp16_on_the_card(model, policy, overlap):
    result = check_policy("cuda", model, policy, overlap)
    assert result.tokens.is_cuda and result.logits.dtype == torch.float32  # the engine returns fp32 logits


def test_tiny_transfer_and_kernel_benches():
    copies, kernels = check_benches(torch.device("cuda"))
    assert {r["memory"] for r in copies} == {"pinned"} and {r["op"] for r in kernels} >= {"attention", "speculate"}
