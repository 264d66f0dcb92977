"""Offline skew calibration, the paper artifact's way: A and the partial columns fitted once per checkpoint.

One full-attention forward over the first `tokens` tokens of a calibration text (2048 by default, as
the artifact's gen_*_skewing_matrix scripts do; a text other than the evaluation text) records every
layer's q and k as attention sees them, post-RoPE for Llama (the skew is applied inside speculation,
after RoPE: skew.RotarySkew). Per speculated layer and KV head, the group's query heads are pooled: A =
the right singular vectors of their stacked queries (skew.skew_matrices) and the column masses sum
|Q A| + |K A| over the tokens (skew.column_mass; the runtime keeps the top partial_ratio of them). With
skewed=False A is the identity and the masses are those of the plain Q and K: the skew ablation.
`python -m profiler.accuracy --calibrate FILE` writes the result (profiler.weights.skew_file), which
`profiler.run --skew FILE`, `profiler.collect --fetch-skew FILE` and `profiler.accuracy --skew-file FILE`
reuse.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from infinigen_sim.spec.models import Family
from profiler.runtime.model import Transformer
from profiler.runtime.skew import SkewCalibration, apply_skew, column_mass, skew_matrices
from profiler.studies.skew_stats import layer_inputs

DEFAULT_TOKENS = 2048


@torch.inference_mode()
def fit_calibration(model: Transformer, ids: Tensor, first_layer: int, skewed: bool = True,
                    text: str | Path = "", model_name: str | None = None) -> SkewCalibration:
    """The calibration of `model` from ids (1, T): layers first_layer..L-1."""
    spec = model.spec
    skew, mass = {}, {}
    eye = torch.eye(spec.head_dim, dtype=torch.float64).expand(spec.n_kv_heads, -1, -1)
    for layer, _, q, k in layer_inputs(model, ids):
        if layer < first_layer:
            continue
        A = skew_matrices(q, spec.n_kv_heads) if skewed else eye.clone()  # (Hkv, D, D) float64
        skew[layer] = A
        mass[layer] = column_mass(apply_skew(q.double(), A), apply_skew(k.double(), A))
    meta = {"model": model_name or spec.name, "family": spec.family.value, "n_kv_heads": str(spec.n_kv_heads),
            "head_dim": str(spec.head_dim), "skewed": str(skewed).lower(),
            "post_rope": str(spec.family is Family.LLAMA).lower(), "text": Path(text).name,
            "tokens": str(ids.shape[1])}
    return SkewCalibration(skew, mass, meta)
