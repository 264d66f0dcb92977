"""The offline skew calibration on disk: one safetensors file per checkpoint (and calibration text).

Tensors, per speculated layer i: `layers.i.skew` (Hkv, D, D) float32, A with columns by descending
singular value (the identity when unskewed), and `layers.i.column_mass` (Hkv, D) float64, the sum
|Q~| + |K~| over the calibration tokens that picks the partial columns at any partial ratio. The
safetensors metadata (all strings) names the format and its version, the model, the family, the shape
(n_kv_heads, head_dim, layers), whether it is skewed, whether Q and K were taken after RoPE, and the
calibration text and token count. `read_header` reads only the metadata, so a command can check the
file against its --model before loading any weights; every problem is one CheckpointError line naming
the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from infinigen_sim.spec.io import write_bytes_atomic
from profiler.runtime.skew import SkewCalibration
from profiler.weights.checkpoint import CheckpointError

FORMAT = "infinigen-skew"
VERSION = "1"
REQUIRED = ("format", "version", "model", "family", "n_kv_heads", "head_dim", "layers", "skewed", "post_rope",
            "text", "tokens")


def save_skew(path: str | Path, calibration: SkewCalibration) -> None:
    """Write the calibration atomically (a temporary file beside it, renamed over)."""
    path = Path(path)
    missing = [k for k in REQUIRED if k not in {"format", "version", "layers"} and k not in calibration.meta]
    if missing:
        raise ValueError(f"skew calibration meta lacks {', '.join(missing)}")
    layers = sorted(calibration.skew)
    tensors = {}
    for layer in layers:
        tensors[f"layers.{layer}.skew"] = calibration.skew[layer].float().contiguous()
        tensors[f"layers.{layer}.column_mass"] = calibration.mass[layer].double().contiguous()
    meta = {**{k: str(v) for k, v in calibration.meta.items()}, "format": FORMAT, "version": VERSION,
            "layers": json.dumps(layers)}
    write_bytes_atomic(path, save(tensors, metadata=meta))


def read_header(path: str | Path, model: str | None = None) -> dict[str, str]:
    """The file's metadata, checked (format, version, every key, and `model` when given)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such skew calibration file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a safetensors skew calibration ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: metadata key 'format': expected '{FORMAT}', got {meta.get('format')!r}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: metadata key 'version': expected '{VERSION}', got {meta.get('version')!r} "
                              "(recalibrate with python -m profiler.accuracy --calibrate)")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata key '{missing[0]}' missing")
    if model is not None and meta["model"] != model:
        raise CheckpointError(f"{path}: metadata key 'model': calibrated for {meta['model']}, not {model}")
    return meta


def load_skew(path: str | Path, model: str, n_kv_heads: int, head_dim: int, n_layers: int,
              first_layer: int) -> SkewCalibration:
    """The calibration of `model`, every layer first_layer..n_layers-1 present with its shape."""
    path = Path(path)
    meta = read_header(path, model)
    expected = {"n_kv_heads": str(n_kv_heads), "head_dim": str(head_dim)}
    for key, value in expected.items():
        if meta[key] != value:
            raise CheckpointError(f"{path}: metadata key '{key}': expected {value}, got {meta[key]}")
    skew, mass = {}, {}
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        for layer in range(first_layer, n_layers):
            for name, shape, out in (("skew", (n_kv_heads, head_dim, head_dim), skew),
                                     ("column_mass", (n_kv_heads, head_dim), mass)):
                key = f"layers.{layer}.{name}"
                if key not in keys:
                    raise CheckpointError(f"{path}: tensor '{key}' missing (layers {first_layer}-{n_layers - 1} "
                                          "are speculated)")
                tensor = handle.get_tensor(key)
                if tuple(tensor.shape) != shape or not torch.isfinite(tensor).all():
                    raise CheckpointError(f"{path}: tensor '{key}': expected finite {shape}, got "
                                          f"{tuple(tensor.shape)}")
                out[layer] = tensor.double()
    return SkewCalibration(skew, mass, {k: v for k, v in meta.items() if k not in ("format", "version", "layers")})
