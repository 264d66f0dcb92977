"""`python -m profiler.run`: every policy end to end with --json, --help with defaults and units, and
one-line errors with exit 2. Runs name --device cpu (fp32), so the 1e-4 logit tolerance holds on a GPU box too."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save

from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.policies import ALL_POLICIES
from profiler.run import PROG, main
from profiler.runtime.model import build_model
from profiler.weights.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--prompt-len", "48", "--gen-len", "4", "--warmup", "0", "--device", "cpu"]  # fp32: on a GPU box too


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_intra_op_thread
    return subprocess.run([sys.executable, "-m", "profiler.run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_every_policy_runs_with_json(policy):
    done = cli("--model", "tiny-llama-gqa", "--policy", policy, "--check", "--json", *SMALL)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for key in ("policy", "model", "prefill_s", "decode_s", "tokens_per_s", "fetched_fraction",
                "top1_agreement", "max_abs_logit_diff"):
        assert key in out
    assert out["policy"] == policy and out["model"] == "tiny-llama-gqa"
    assert out["tokens_per_s"] > 0 and 0.0 <= out["top1_agreement"] <= 1.0
    assert "device: cpu" in done.stderr


def test_unlimited_infinigen_agrees_fully_through_the_cli(capsys):
    assert main(["--model", "tiny-opt", "--alpha", "inf", "--max-fetch-ratio", "1", "--check", "--json", *SMALL]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top1_agreement"] == 1.0 and out["max_abs_logit_diff"] < 1e-4
    assert out["fetched_fraction"] == 1.0 and out["alpha"] == "inf"


def test_text_output_and_trace(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert main(["--policy", "flexgen", "--no-overlap", "--trace", str(trace), *SMALL]) == 0
    text = capsys.readouterr().out
    assert "tokens_per_s:" in text and "overlap: False" in text
    assert "traceEvents" in json.loads(trace.read_text())


@pytest.mark.parametrize("args, message", [
    (["--model", "gpt-5"], "unknown model"),
    (["--policy", "lru"], "unknown policy"),
    (["--alpha", "-1"], "argument --alpha: expected a number >= 0"),
    (["--max-fetch-ratio", "0"], "bad max_fetch_ratio"),
    (["--batch-size", "0"], "argument --batch-size: expected a whole number >= 1, got '0'"),
    (["--prompt-len", "5000"], "exceeds"),
    (["--gen-len", "x"], "argument --gen-len: expected a whole number"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--checkpoint", "/nonexistent"], "no config.json"),
    (["--trace", "/proc/trace.json"], "--trace /proc/trace.json: cannot write in /proc"),
])
def test_errors_exit_2_with_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith(f"{PROG}: error:")


def test_help_shows_defaults_and_units(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--prompt-len PROMPT_LEN prompt length [tokens] (default: 256)",
                     "[sequences] (default: 2)", "--alpha ALPHA InfiniGen: fetch tokens scoring above max - alpha "
                     "(inf: every token) (default: 4.0)", "--overlap, --no-overlap", "(default: infinigen)"):
        assert expected in text


def test_error_in_a_subprocess_has_no_traceback():
    done = cli("--policy", "nope")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


# ---- bad checkpoints and lengths: one line naming the file, before any weight is read ----------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(build_model(get_model("tiny-opt"), seed=1), tmp_path_factory.mktemp("ckpt") / "tiny")


def damaged(tmp_path: Path, source: Path, files: dict[str, bytes | None]) -> Path:
    """A copy of checkpoint `source` with `files` replaced (None: removed)."""
    out = tmp_path / "damaged"
    shutil.copytree(source, out)
    for name, data in files.items():
        (out / name).unlink(missing_ok=True)
        if data is not None:
            (out / name).write_bytes(data)
    return out


def _bin(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(("files", "needles"), [
    ({"config.json": b"{}"}, ("config.json: key 'model_type': expected opt or llama",)),
    ({"config.json": b"[1, 2]"}, ("config.json: expected a JSON object",)),
    ({"config.json": b"\x00\xff garbage"}, ("config.json: not UTF-8",)),
    ({"config.json": b'{"model_type": "opt", '}, ("config.json: not JSON",)),
    ({"config.json": b'{"model_type": "opt", "model_type": "llama"}'}, ("duplicate key 'model_type'",)),
    ({"config.json": b'{"model_type": "opt", "hidden_size": "64"}'}, ("key 'hidden_size': expected a whole number",)),
    ({"model.safetensors": b"garbage" * 10}, ("model.safetensors: not a readable safetensors file",)),
    ({"model.safetensors": "half"}, ("model.safetensors: not a readable safetensors file",)),
    ({"model.safetensors": None, "pytorch_model.bin": b"garbage" * 10}, ("pytorch_model.bin: not a readable weights",)),
    ({"model.safetensors": None, "pytorch_model.bin": "half"}, ("pytorch_model.bin: not a readable weights",)),
    ({"model.safetensors": None, "pytorch_model.bin": b"x"}, ("pytorch_model.bin: not a readable",)),
    ({"model.safetensors": None}, ("no *.safetensors or pytorch_model*.bin",)),
    ({"model.safetensors": "drop"}, ("model.safetensors: tensors do not match config.json's opt model: missing",)),
    ({"model.safetensors": "reshape"}, ("tensor 'model.decoder.final_layer_norm.weight' has shape (3,), expected",)),
    ({"model.safetensors": "int"}, ("is I64, expected a floating-point dtype",)),
    ({"model.safetensors": None, "pytorch_model.bin": "nan"}, ("holds NaN or infinite values",)),
    ({"model.safetensors": None, "pytorch_model.bin": [1, 2]}, ("expected a mapping of tensor names",)),
])
def test_a_damaged_checkpoint_is_one_line(tmp_path, checkpoint, files, needles, capsys, monkeypatch):
    state = load_file(checkpoint / "model.safetensors")
    variants = {"half": None, "drop": {k: t for k, t in state.items() if "final_layer_norm.weight" not in k},
                "reshape": {**state, "model.decoder.final_layer_norm.weight": torch.ones(3)},
                "int": {**state, "model.decoder.final_layer_norm.weight": torch.ones(256, dtype=torch.int64)},
                "nan": {**state, "model.decoder.final_layer_norm.weight": torch.full((256,), math.nan)}}
    data = {}
    for name, value in files.items():
        if value == "half":
            whole = (checkpoint / "model.safetensors").read_bytes()
            value = whole[: len(whole) // 2] if name.endswith(".safetensors") else _bin(state)[:1000]
        elif isinstance(value, str):
            value = save(variants[value]) if name.endswith(".safetensors") else _bin(variants[value])
        elif isinstance(value, list):
            value = _bin(value)
        data[name] = value
    path = damaged(tmp_path, checkpoint, data)
    monkeypatch.setattr("profiler.run.Engine", None)  # a damaged checkpoint never gets as far as an engine
    assert main(["--checkpoint", str(path), *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and len(err[0]) <= 300 and "Traceback" not in err[0], err
    assert str(path) in err[0] or str(path.name) in err[0], err
    for needle in needles:
        assert needle in err[0], (needle, err[0])


def test_a_too_long_prompt_is_refused_before_weights_load(checkpoint, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("weights loaded before the lengths were checked")

    monkeypatch.setattr("profiler.run.load_pretrained", never)
    monkeypatch.setattr("profiler.run.load_checkpoint", never)
    assert main(["--model", "smollm2-135m", "--prompt-len", "100000"]) == 2
    assert "--prompt-len 100000 + --gen-len 16 = 100016 tokens exceeds smollm2-135m's max_positions 8192" in \
        capsys.readouterr().err
    assert main(["--checkpoint", str(checkpoint), "--prompt-len", "4090", "--gen-len", "16"]) == 2
    assert "exceeds tiny's max_positions 4096" in capsys.readouterr().err


def test_an_unwritable_trace_is_refused_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr("profiler.run.build_engine", None)
    assert main(["--trace", "/proc/x/trace.json", *SMALL]) == 2
    assert "--trace /proc/x/trace.json: cannot write" in capsys.readouterr().err
