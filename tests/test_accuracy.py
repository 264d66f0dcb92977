"""SmolLM2-135M through the runtime: the engine matches the independent reference, the accuracy sweep's
CSV and its invariants, skewing's energy concentration, and the fetch pass's fetch.csv in a bundle."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from infinigen_sim.spec.bundle import FETCH_COLUMNS, read_bundle  # noqa: E402
from infinigen_sim.spec.fetch import CHECKPOINT_SOURCE  # noqa: E402
from infinigen_sim.spec.policies import make_policy  # noqa: E402
from profiler import accuracy as accuracy_cli  # noqa: E402
from profiler import collect, run  # noqa: E402
from profiler.bench import fetch as fetch_bench  # noqa: E402
from profiler.runtime.engine import Engine  # noqa: E402
from profiler.studies import accuracy, skew_stats  # noqa: E402
from profiler.weights import smollm2  # noqa: E402
from profiler.weights.checkpoint import CheckpointError, to_hf_state_dict  # noqa: E402
from profiler.weights.pretrained import load_pretrained, pretrained_loader  # noqa: E402
from profiler.weights.texts import PG19_TEXT, load_text_ids  # noqa: E402

MODEL = "smollm2-135m"
try:
    pretrained_loader(MODEL)
except CheckpointError as err:
    pytest.skip(str(err), allow_module_level=True)

from test_smollm2 import reference_logits  # noqa: E402  (the independent float32 Llama)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def smol():
    """(spec, model): loaded once; no policy writes the weights (skewing is kept beside them), so tests
    share them."""
    return load_pretrained(MODEL)


@pytest.fixture(scope="module")
def pg19() -> torch.Tensor:
    return load_text_ids(MODEL, PG19_TEXT, 512)  # (1, 512)


def sweep(**overrides) -> accuracy.AccuracyConfig:
    return accuracy.AccuracyConfig(**{"max_tokens": 64, "prefix": 16, **overrides})


def test_engine_greedy_names_paris(smol):
    spec, weights = smol
    tokenizer = smollm2.load_tokenizer()
    prompt = torch.tensor([tokenizer.encode("The capital of France is")])
    with Engine(spec, make_policy("ideal"), "cpu", torch.float32, model=weights) as engine:
        tokens = engine.generate(prompt, 3).tokens[0].tolist()
    assert tokenizer.decode(tokens).startswith(" Paris")


def test_engine_ideal_perplexity_equals_reference(smol, pg19):
    spec, weights = smol
    prefix = 448
    with Engine(spec, make_policy("ideal"), "cpu", torch.float32, model=weights) as engine:
        _, logits = accuracy.teacher_forced(engine, pg19, prefix)
    state = to_hf_state_dict(weights)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied
    reference = reference_logits(state, spec, pg19[0].tolist())  # (512, vocab)
    targets = pg19[0, prefix + 1 :]
    ours = math.exp(torch.nn.functional.cross_entropy(logits, targets).item())
    theirs = math.exp(torch.nn.functional.cross_entropy(reference[prefix:-1], targets).item())
    full = math.exp(torch.nn.functional.cross_entropy(reference[:-1], pg19[0, 1:]).item())
    assert ours == pytest.approx(theirs, rel=1e-4)
    torch.testing.assert_close(logits, reference[prefix:-1], rtol=1e-4, atol=2e-3)
    assert 30.0 < full < 60.0  # ~45 on these 512 tokens (tests/test_smollm2.py)


def test_unlimited_infinigen_is_ideal_and_csv_has_the_columns(smol):
    spec, weights = smol
    config = sweep(policies=("ideal", "infinigen"), alphas=(math.inf,), partial_ratios=(1.0,), alpha=math.inf,
                   partial_ratio=1.0, max_fetch_ratio=1.0)
    ids = load_text_ids(MODEL, PG19_TEXT, config.max_tokens)
    rows = accuracy.run_accuracy(config, spec, weights, ids)
    frame = list(csv.DictReader(io.StringIO(accuracy.to_csv(rows))))
    required = {"policy", "alpha", "partial_ratio", "heavy_ratio", "recent_ratio", "perplexity",
                "top1_agreement", "fetched_fraction", "kv_bytes_ratio"}
    assert required <= set(frame[0]) and [r["policy"] for r in frame] == ["ideal", "infinigen"]
    ideal, infinigen = rows
    assert infinigen["top1_agreement"] == 1.0
    assert infinigen["perplexity"] == pytest.approx(ideal["perplexity"], rel=1e-4)
    assert infinigen["fetched_fraction"] == 1.0 and infinigen["tokens"] == config.max_tokens - config.prefix - 1


def test_fetched_fraction_grows_with_alpha_and_h2o_matches_the_budget(smol):
    spec, weights = smol
    config = sweep(alphas=(0.5, 4.0), partial_ratios=(), max_fetch_ratio=1.0)
    ids = load_text_ids(MODEL, PG19_TEXT, config.max_tokens)
    rows = {(r["policy"], r["alpha"]): r for r in accuracy.run_accuracy(config, spec, weights, ids)}
    low, high = rows["infinigen", 0.5], rows["infinigen", 4.0]
    assert 0 < low["fetched_fraction"] < high["fetched_fraction"] < 1
    assert low["top1_agreement"] <= high["top1_agreement"] + 0.05
    h2o = rows["h2o", None]
    assert h2o["fetched_fraction"] == pytest.approx(high["fetched_fraction"], abs=0.03)
    assert h2o["heavy_ratio"] == pytest.approx(h2o["recent_ratio"], abs=1 / config.prefix)
    int4 = rows["int4", None]
    assert int4["fetched_fraction"] == 1.0 and int4["kv_bytes_ratio"] == pytest.approx(0.28125)
    assert int4["top1_agreement"] > 0.5 and rows["ideal", None]["top1_agreement"] == 1.0


def test_accuracy_cli_writes_the_csv_and_fails_in_one_line(smol, tmp_path, monkeypatch, capsys):
    spec, weights = smol
    monkeypatch.setattr(accuracy_cli, "load_pretrained", lambda name: (spec, weights))  # loaded once above
    out = tmp_path / "accuracy.csv"
    argv = ["--max-tokens", "40", "--prefix", "16", "--alphas", "4,inf", "--partial-ratios", "0.3",
            "--policies", "ideal,infinigen", "--out", str(out)]
    assert accuracy_cli.main(argv) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["policy"] for r in rows] == ["ideal", "infinigen", "infinigen"]
    assert [r["alpha"] for r in rows[1:]] == ["4.0", "inf"] and {r["tokens"] for r in rows} == {"23"}
    assert "ppl" in capsys.readouterr().out
    assert accuracy_cli.main([*argv, "--prefix", "39"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{accuracy_cli.PROG}: error: --prefix 39")


def test_h2o_budget_rows_matches_the_mean_share():
    contexts = list(range(100, 200))
    rows = accuracy.h2o_budget_rows(0.25, contexts)
    share = sum(min(c, rows) / c for c in contexts) / len(contexts)
    assert abs(share - 0.25) < 0.5 / 140 + 1e-9


def test_skewing_concentrates_the_prompt_queries_and_keeps_attention(smol, pg19):
    _, weights = smol
    stats = skew_stats.measure(weights, pg19[:, :128], 64)
    mean = stats.mean
    assert mean(stats.prompt_energy_after) > mean(stats.prompt_energy_before) + 0.02
    assert all(0 < r <= 1 + 1e-6 for values in stats.recall.values() for r in values)
    full = skew_stats.measure(weights, pg19[:, :96], 48, partial_ratio=1.0, k_ratios=(0.1,))
    for skewed, plain in zip(full.recall["skewed", 0.1], full.recall["all columns", 0.1], strict=True):
        assert skewed == pytest.approx(plain, abs=1e-3)  # an orthogonal A leaves the scores unchanged


def test_run_cli_uses_the_installed_weights(smol, monkeypatch, capsys):
    spec, weights = smol
    monkeypatch.setattr(run, "load_pretrained", lambda name: (spec, weights))
    argv = ["--model", MODEL, "--policy", "infinigen", "--batch-size", "1", "--prompt-len", "32",
            "--gen-len", "3", "--warmup", "0", "--device", "cpu", "--json"]
    assert run.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == MODEL and out["policy"] == "infinigen"


def test_fetch_pass_writes_rows_the_bundle_reads(smol, tmp_path, monkeypatch):
    spec, weights = smol
    monkeypatch.setattr(fetch_bench, "load_pretrained", lambda name: (spec, weights))  # loaded once above
    out = tmp_path / "bundle"
    argv = ["--device", "cpu", "--quick", "--models", "tiny-opt", "--threads", "1", "--out", str(out),
            "--fetch-model", MODEL, "--fetch-contexts", "32,64"]
    assert collect.main(argv) == 0
    fetch = read_bundle(out).fetch
    assert list(fetch.columns) == FETCH_COLUMNS and len(fetch) == 2 * spec.n_layers
    assert set(fetch.source) == {CHECKPOINT_SOURCE} and set(fetch.model) == {MODEL} and (fetch.samples == 4).all()
    speculated = fetch[fetch.layer >= 2]
    assert (speculated.fetched_tokens >= 1).all() and (speculated.fetched_tokens <= speculated.context_len).all()
    full = fetch[fetch.layer < 2]  # never speculated: every cached row, at contexts n - 5 ... n - 2
    assert (full.fetched_tokens == full.context_len - 3.5).all()
    assert collect.main([*argv, "--resume", "--fetch-only"]) == 0  # everything present: nothing added
    assert len(read_bundle(out).fetch) == 2 * spec.n_layers
