"""The one door from the runtime and the profiler to CUDA: streams, events, synchronisation, generators.

Every CUDA call of `profiler.runtime`, `profiler.bench` and the profiler's CLIs goes through `CUDA`,
which forwards each attribute to a backend: `torch.cuda` itself, always, in production. The tests swap
the backend for a stand-in that runs the same code on CPU tensors and enforces the rules of CUDA
streams and events (tests/cuda_semantics.py), so a CPU-only CI checks every CUDA branch. Tensor-level
CUDA (device tensors, `pin_memory=True`, `non_blocking` copies, `record_stream`) stays plain torch:
the stand-in sees those through a TorchFunctionMode.

What the backend must offer: Stream, Event, stream, current_stream, synchronize, is_available,
empty_cache, get_device_properties, current_device; `generator` and `empty_host_cache` below are
the two calls torch.cuda spells elsewhere.
"""

from __future__ import annotations

from typing import Any

import torch


class CudaApi:
    """Forwards attribute access to the backend (torch.cuda unless a test installed a stand-in)."""

    def __init__(self, backend: Any = torch.cuda) -> None:
        self.backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["backend"], name)

    def generator(self, device: torch.device, seed: int) -> torch.Generator:
        """A seeded generator on `device`, so random tensors are drawn there (not on the host and copied)."""
        if device.type == "cpu":
            return torch.Generator().manual_seed(seed)
        if self.backend is not torch.cuda:  # a stand-in makes its own
            return self.backend.generator(device, seed)
        return torch.Generator(device=device).manual_seed(seed)

    def empty_host_cache(self) -> None:
        """Hand cached pinned host blocks back to the OS (torch's host allocator keeps them otherwise)."""
        if self.backend is not torch.cuda:
            self.backend.empty_host_cache()
            return
        # torch >= 2.6 spells it torch.accelerator.empty_host_cache, older ones torch._C._host_emptyCache
        release = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) or \
            getattr(torch._C, "_host_emptyCache", None)
        if release is not None:
            release()


CUDA = CudaApi()
