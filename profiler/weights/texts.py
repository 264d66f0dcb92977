"""The evaluation texts shipped in the package (profiler/weights/data/) as a pretrained model's token ids.

PG19_TEXT: the opening of PG-19's first book (~2.2K SmolLM2 tokens), what the accuracy study and the
skewing statistics read by default. SHAKESPEARE_TEXT: Tiny Shakespeare (~340K tokens), long enough
for the fetch pass's 8K-token windows. Sources and licences: data/README.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

from profiler.weights.pretrained import pretrained_loader

DATA = Path(__file__).resolve().parent / "data"
PG19_TEXT = DATA / "pg19_firstbook.txt"
SHAKESPEARE_TEXT = DATA / "tinyshakespeare.txt"


def load_text_ids(model: str, path: str | Path, max_tokens: int | None = None) -> torch.Tensor:
    """(1, n) token ids of a text under a pretrained model's tokenizer, the first max_tokens of them."""
    tokenizer = pretrained_loader(model).load_tokenizer()
    ids = tokenizer.encode(Path(path).read_text(encoding="utf-8"))
    return torch.tensor([ids[:max_tokens] if max_tokens else ids], dtype=torch.int64)
