"""Local Hugging Face OPT / Llama checkpoints: config.json + weights, loaded by renaming keys.

The runtime's module names are Llama's HF keys without `model.` (runtime/model.py), so Llama loads by
stripping the prefix and OPT by a handful of renames (fc1 -> mlp.fc1, out_proj -> o_proj, ...).
Weights come from *.safetensors (the `safetensors` package) or from pytorch_model*.bin (torch.load,
weights only). `save_checkpoint` writes the same layout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from infinigen_sim.spec.cli import one_line
from infinigen_sim.spec.models import Family, ModelSpec
from profiler.runtime.model import Transformer


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message says what and where."""


_RENAMES = {  # HF key -> runtime key, applied in order
    Family.OPT: [
        (r"^(model\.)?decoder\.", ""),
        (r"^final_layer_norm\.", "norm."),
        (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
        (r"\.self_attn_layer_norm\.", ".input_layernorm."),
        (r"^(layers\.\d+)\.final_layer_norm\.", r"\1.post_attention_layernorm."),
        (r"^(layers\.\d+)\.(fc[12])\.", r"\1.mlp.\2."),
    ],
    Family.LLAMA: [(r"^model\.", "")],
}
_INVERSE = {  # runtime key -> HF key
    Family.OPT: [
        (r"^norm\.", "final_layer_norm."),
        (r"\.self_attn\.o_proj\.", ".self_attn.out_proj."),
        (r"\.input_layernorm\.", ".self_attn_layer_norm."),
        (r"\.post_attention_layernorm\.", ".final_layer_norm."),
        (r"\.mlp\.(fc[12])\.", r".\1."),
        (r"^(?!lm_head)", "model.decoder."),
    ],
    Family.LLAMA: [(r"^(?!lm_head)", "model.")],
}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer older Llama checkpoints saved

def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


# ---- config.json --------------------------------------------------------------------------------
MAX_CONFIG_BYTES = 1 << 20  # a config.json; anything larger is not one
_SHAPE_FIELDS = {  # config.json key -> plausible range (whole numbers): the largest published models fit
    "hidden_size": (1, 1 << 16), "num_attention_heads": (1, 1024), "num_hidden_layers": (1, 1024),
    "vocab_size": (1, 1 << 22), "max_position_embeddings": (1, 1 << 24), "ffn_dim": (1, 1 << 20),
    "intermediate_size": (1, 1 << 20), "num_key_value_heads": (1, 1024), "head_dim": (1, 1 << 12),
    "word_embed_proj_dim": (1, 1 << 16),
}
_NUMBER_FIELDS = {"rope_theta": (1.0, 1e12), "rms_norm_eps": (1e-12, 0.1)}
_BOOL_FIELDS = ("tie_word_embeddings", "do_layer_norm_before", "attention_bias", "mlp_bias")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicate = next((k for k in keys if keys.count(k) > 1), None)
    if duplicate is not None:
        raise ValueError(f"duplicate key '{duplicate}'")
    return dict(pairs)


def read_config(directory: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder as a JSON object: UTF-8, at most MAX_CONFIG_BYTES, no duplicate keys."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (a Hugging Face checkpoint folder has one)")
    data = path.read_bytes()
    if len(data) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: {len(data)} bytes, larger than a config.json can be ({MAX_CONFIG_BYTES})")
    try:
        config = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text (byte offset {exc.start})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not JSON (nested too deep)") from None
    except ValueError as exc:  # json.JSONDecodeError is one
        raise CheckpointError(f"{path}: not JSON ({one_line(exc, 120)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object with model_type, hidden_size, ..., got "
                              f"{one_line(repr(config), 60)}")
    return config


def _field(config: dict, key: str, where: Path, default: Any = None) -> Any:
    """config[key] checked against its kind and plausible range; CheckpointError naming file and key."""
    if key not in config:
        if default is None:
            raise CheckpointError(f"{where}: missing key '{key}'")
        return default
    value = config[key]
    if key in _BOOL_FIELDS:
        ok, expected = isinstance(value, bool), "true or false"
    elif key in _SHAPE_FIELDS:
        low, high = _SHAPE_FIELDS[key]
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        expected = f"a whole number in {low}-{high}"
    else:
        low, high = _NUMBER_FIELDS[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
        expected = f"a number in {low:g}-{high:g}"
    if not ok:
        raise CheckpointError(f"{where}: key '{key}': expected {expected}, got {one_line(repr(value), 60)}")
    return value


def spec_from_hf_config(config: dict, name: str, where: Path | None = None) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json (model_type opt or llama); CheckpointError names the key."""
    where = where or Path(name) / "config.json"
    kind = config.get("model_type")
    if kind not in ("opt", "llama"):
        raise CheckpointError(f"{where}: key 'model_type': expected opt or llama, got {one_line(repr(kind), 60)}")
    d, heads = _field(config, "hidden_size", where), _field(config, "num_attention_heads", where)
    if d % heads:
        raise CheckpointError(f"{where}: key 'hidden_size': {d} is not a multiple of num_attention_heads {heads}")
    common = dict(name=name, n_layers=_field(config, "num_hidden_layers", where), d_model=d, n_heads=heads,
                  vocab_size=_field(config, "vocab_size", where),
                  max_positions=_field(config, "max_position_embeddings", where), source=f"checkpoint {name}")
    if kind == "opt":
        if _field(config, "word_embed_proj_dim", where, d) != d or not _field(config, "do_layer_norm_before", where,
                                                                               True):
            raise CheckpointError(f"{where}: OPT with project_in/out or post-norm (opt-350m) is not supported")
        return ModelSpec(family=Family.OPT, n_kv_heads=heads, d_ffn=_field(config, "ffn_dim", where),
                         tie_embeddings=_field(config, "tie_word_embeddings", where, True), **common)
    if config.get("rope_scaling") or _field(config, "attention_bias", where, False) or \
            _field(config, "mlp_bias", where, False):
        raise CheckpointError(f"{where}: rope_scaling / attention or MLP biases are not supported")
    if _field(config, "head_dim", where, d // heads) != d // heads or (d // heads) % 2:
        raise CheckpointError(f"{where}: key 'head_dim': expected an even hidden_size / num_attention_heads")
    kv_heads = _field(config, "num_key_value_heads", where, heads)
    if heads % kv_heads:
        raise CheckpointError(f"{where}: key 'num_key_value_heads': {kv_heads} does not divide "
                              f"num_attention_heads {heads}")
    return ModelSpec(family=Family.LLAMA, n_kv_heads=kv_heads, d_ffn=_field(config, "intermediate_size", where),
                     rope_theta=float(_field(config, "rope_theta", where, 10000.0)),
                     norm_eps=float(_field(config, "rms_norm_eps", where, 1e-6)),
                     tie_embeddings=_field(config, "tie_word_embeddings", where, False), **common)


def read_checkpoint_spec(directory: str | Path) -> ModelSpec:
    """The ModelSpec of a checkpoint folder from its config.json alone (no weights read)."""
    directory = Path(directory)
    return spec_from_hf_config(read_config(directory), directory.name, directory / "config.json")


def hf_config_from_spec(spec: ModelSpec) -> dict:
    common = {"hidden_size": spec.d_model, "num_attention_heads": spec.n_heads, "vocab_size": spec.vocab_size,
              "num_hidden_layers": spec.n_layers, "max_position_embeddings": spec.max_positions,
              "tie_word_embeddings": spec.tie_embeddings}
    if spec.family is Family.OPT:
        return {"model_type": "opt", "architectures": ["OPTForCausalLM"], "ffn_dim": spec.d_ffn,
                "word_embed_proj_dim": spec.d_model, "do_layer_norm_before": True, **common}
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "intermediate_size": spec.d_ffn,
            "num_key_value_heads": spec.n_kv_heads, "rope_theta": spec.rope_theta,
            "rms_norm_eps": spec.norm_eps, "hidden_act": "silu", **common}


# ---- weights ------------------------------------------------------------------------------------
def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Runtime key -> shape of every weight of `spec`, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(spec)
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


def _runtime_names(keys: Iterable[str], spec: ModelSpec) -> dict[str, str]:
    """{runtime key: HF key} of the keys the model takes (buffers and a tied model's lm_head left out)."""
    out = {}
    for key in keys:
        new = _rename(key, _RENAMES[spec.family])
        if _IGNORED.search(key) or (new == "lm_head.weight" and spec.tie_embeddings):
            continue  # tied models reuse embed_tokens
        out[new] = key
    return out


def check_tensors(spec: ModelSpec, found: dict[str, tuple[tuple[int, ...], str]], where: object) -> dict[str, str]:
    """{runtime key: HF key}; CheckpointError naming `where` unless the HF-named `found` tensors ({key: (shape,
    dtype)}) are exactly the model's, each of its shape and a floating-point dtype."""
    own, names = expected_shapes(spec), _runtime_names(found, spec)
    missing, unexpected = sorted(set(own) - set(names)), sorted(set(names) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{where}: tensors do not match config.json's {spec.family.value} model: missing "
                              f"{missing[:2]}{'...' if len(missing) > 2 else ''}, unexpected {unexpected[:2]}")
    for key, hf_key in names.items():
        shape, dtype = found[hf_key]
        if shape != own[key]:
            raise CheckpointError(f"{where}: tensor '{hf_key}' has shape {shape}, expected {own[key]}")
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{where}: tensor '{hf_key}' is {dtype}, expected a floating-point dtype")
    return names


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "torch.float16", "torch.bfloat16", "torch.float32", "torch.float64"}


def load_state_dict_hf(model: Transformer, state_dict: dict[str, Tensor], where: object = None) -> Transformer:
    """Copy an HF-named state dict (OPT or Llama keys, e.g. from a GGUF loader) into `model`; CheckpointError
    (naming `where`, default the model) on missing, unexpected, misshapen or non-finite tensors."""
    where = where or model.spec.name
    found = {k: (tuple(t.shape), str(t.dtype)) for k, t in state_dict.items()}
    names = check_tensors(model.spec, found, where)
    own = model.state_dict()
    with torch.no_grad():
        for key, hf_key in names.items():
            tensor = state_dict[hf_key]
            if not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"{where}: tensor '{hf_key}' holds NaN or infinite values")
            own[key].copy_(tensor)
    return model


def to_hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The model's weights under Hugging Face names (the inverse of load_state_dict_hf)."""
    rules = _INVERSE[model.spec.family]
    return {_rename(key, rules): t for key, t in model.state_dict().items()}


def weight_files(directory: Path) -> list[Path]:
    """The folder's *.safetensors, else its pytorch_model*.bin."""
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors or pytorch_model*.bin")
    return files


def safetensors_headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{HF key: (shape, dtype)} from the files' headers alone; CheckpointError naming a damaged file."""
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
                    if key in found:
                        raise CheckpointError(f"{path}: tensor '{key}' is also in another file")
                    piece = handle.get_slice(key)
                    found[key] = (tuple(piece.get_shape()), piece.get_dtype())
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(exc, 100)})") from None
    return found


def read_tensors(files: list[Path]) -> dict[str, Tensor]:
    """Every tensor of the files (safetensors, or torch.load weights only); CheckpointError naming a damaged one."""
    state: dict[str, Tensor] = {}
    for path in files:
        try:
            part = load_file(path) if path.suffix == ".safetensors" else \
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged file raises whatever the unpickler or zip reader meets
            raise CheckpointError(f"{path}: not a readable weights file ({_why(exc)})") from None
        if not isinstance(part, dict) or not all(isinstance(k, str) and isinstance(t, Tensor) for k, t in part.items()):
            raise CheckpointError(f"{path}: expected a mapping of tensor names to tensors, got {type(part).__name__}")
        if set(part) & set(state):
            raise CheckpointError(f"{path}: tensor '{sorted(set(part) & set(state))[0]}' is also in another file")
        state.update(part)
    return state


def _why(exc: Exception) -> str:
    """The informative part of a loader's error (torch.load wraps its unpickler's in a page of advice)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return f"{type(exc).__name__}: {one_line(text, 100)}"


def load_checkpoint(directory: str | Path) -> tuple[ModelSpec, Transformer]:
    """(spec, model on CPU) from a local HF checkpoint directory; Engine(model=...) moves and casts it.

    config.json is read and checked first, then the tensor names, shapes and dtypes (for safetensors from
    the headers, before any tensor is read), and only then is a model built and filled."""
    directory = Path(directory)
    spec = read_checkpoint_spec(directory)
    files = weight_files(directory)
    where = files[0] if len(files) == 1 else directory
    if files[0].suffix == ".safetensors":
        check_tensors(spec, safetensors_headers(files), where)
    return spec, load_state_dict_hf(Transformer(spec), read_tensors(files), where)


def save_checkpoint(model: Transformer, directory: str | Path, fmt: str = "safetensors") -> Path:
    """Write config.json and the weights (model.safetensors or pytorch_model.bin) in HF layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config_from_spec(model.spec), indent=2))
    weights = to_hf_state_dict(model)
    if fmt == "safetensors":
        save_file(weights, directory / "model.safetensors")
    else:
        torch.save(weights, directory / "pytorch_model.bin")
    return directory
