"""The evaluation texts beside the repository (../shared/data, never copied in) as a model's token ids."""

from __future__ import annotations

from pathlib import Path

import torch

from profiler.runtime.checkpoint import pretrained_loader

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PG19_TEXT = SHARED_DATA / "pg19_firstbook.txt"  # ~2.3K SmolLM2 tokens of 1840s prose
SHAKESPEARE_TEXT = SHARED_DATA / "tinyshakespeare.txt"  # ~340K tokens: windows up to 8K


def load_text_ids(model: str, path: str | Path, max_tokens: int | None = None) -> torch.Tensor:
    """(1, n) token ids of a text under a pretrained model's tokenizer, the first max_tokens of them."""
    tokenizer = pretrained_loader(model).load_tokenizer()
    ids = tokenizer.encode(Path(path).read_text(encoding="utf-8"))
    return torch.tensor([ids[:max_tokens] if max_tokens else ids], dtype=torch.int64)
