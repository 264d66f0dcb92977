"""SmolLM2-135M through the accuracy harness: the masked full-sequence forward equals the step-by-step decode
path for every policy, its full-KV pass equals the independent reference, the study's rows follow the
accuracy-table schema and their invariants, the CLI checks its inputs before loading weights, the offline
skew file round-trips into profiler.run, and the fetch pass writes the rows a bundle reads."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from infinigen_sim.spec.accuracy import read_accuracy, to_csv  # noqa: E402
from infinigen_sim.spec.bundle import FETCH_COLUMNS, read_bundle  # noqa: E402
from infinigen_sim.spec.fetch import CHECKPOINT_SOURCE  # noqa: E402
from infinigen_sim.spec.policies import make_policy  # noqa: E402
from profiler import accuracy as accuracy_cli  # noqa: E402
from profiler import collect, run  # noqa: E402
from profiler.bench import fetch as fetch_bench  # noqa: E402
from profiler.runtime.engine import Engine  # noqa: E402
from profiler.runtime.skew import Selection  # noqa: E402
from profiler.studies import accuracy, skew_stats  # noqa: E402
from profiler.studies.calibrate import fit_calibration  # noqa: E402
from profiler.studies.masked import FullAttention, Window, eval_pass, run_prefix  # noqa: E402
from profiler.studies.selectors import HeavyHitterRows, InfiniGenRows, QuantizedRows  # noqa: E402
from profiler.weights import smollm2  # noqa: E402
from profiler.weights.checkpoint import CheckpointError, to_hf_state_dict  # noqa: E402
from profiler.weights.pretrained import load_pretrained, pretrained_loader  # noqa: E402
from profiler.weights.skew_file import load_skew, read_header, save_skew  # noqa: E402
from profiler.weights.texts import PG19_TEXT, SHAKESPEARE_TEXT, load_text_ids  # noqa: E402

MODEL = "smollm2-135m"
try:
    pretrained_loader(MODEL)
except CheckpointError as err:
    pytest.skip(str(err), allow_module_level=True)

from test_smollm2 import reference_logits  # noqa: E402  (the independent float32 Llama)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def smol():
    """(spec, model): loaded once; no policy writes the weights (skewing is kept beside them)."""
    return load_pretrained(MODEL)


@pytest.fixture(scope="module")
def pg19() -> torch.Tensor:
    return load_text_ids(MODEL, PG19_TEXT, 512)  # (1, 512)


@pytest.fixture(scope="module")
def calibration(smol):
    """The offline skew from 128 tokens of Tiny Shakespeare (the study uses 2048)."""
    return fit_calibration(smol[1], load_text_ids(MODEL, SHAKESPEARE_TEXT, 128), 2, text=SHAKESPEARE_TEXT)


def decode(spec, model, policy, window: Window, calibration=None, selection=None):
    """Engine's teacher-forced decode of the window -> (logits (E, vocab), rows fetched (L, E))."""
    P = window.prompt_len
    with Engine(spec, policy, "cpu", torch.float32, model=model) as engine:
        if policy.name.value == "infinigen":
            engine.cache.configure(selection, calibration)
        result = engine.generate(window.ids[:, :P], window.ids.shape[1] - P, forced=window.ids[:, P:],
                                 keep_logits=True)
    return result.logits[1:, 0], torch.tensor([s.fetched for s in result.steps]).T


def test_masked_forward_equals_the_decode_path(smol, pg19, calibration):
    """Every policy, row for row and logit for logit (fp32), on a 40-token prompt and 12 decode steps."""
    spec, model = smol
    window = Window(pg19[:, :53], 40)
    prefix = run_prefix(model, window)
    ideal = eval_pass(model, window, prefix, FullAttention(), keep_trace=True)
    reference, _ = decode(spec, model, make_policy("ideal"), window)
    torch.testing.assert_close(ideal.logits, reference, rtol=1e-4, atol=5e-4)
    infinigen = [(make_policy("infinigen", alpha=4.0), None, Selection()),
                 (make_policy("infinigen", alpha=2.0), calibration, Selection(min_fetch_ratio=0.1)),
                 (make_policy("infinigen", alpha=2.0, max_fetch_ratio=0.5), calibration, Selection("max"))]
    cases = [(p, InfiniGenRows(model, p, sel, cal, prefix), (cal, sel)) for p, cal, sel in infinigen]
    h2o, int4 = make_policy("h2o", heavy_ratio=0.2, recent_ratio=0.1), make_policy("int4")
    cases += [(h2o, HeavyHitterRows(h2o, 40), ()), (int4, QuantizedRows(int4), ())]
    for policy, selector, extra in cases:
        masked = eval_pass(model, window, prefix, selector, start=ideal.trace)
        logits, rows = decode(spec, model, policy, window, *extra)
        torch.testing.assert_close(masked.logits, logits, rtol=1e-4, atol=5e-4, msg=lambda m, p=policy: f"{p}: {m}")
        assert torch.equal(masked.rows, rows), policy
        assert (rows[2:] < window.positions).any() or policy.name.value == "int4"  # something was left out


def test_full_kv_pass_equals_the_independent_reference(smol, pg19):
    spec, model = smol
    window = Window(pg19, 448)
    ideal = eval_pass(model, window, run_prefix(model, window), FullAttention())
    state = to_hf_state_dict(model)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied
    reference = reference_logits(state, spec, pg19[0].tolist())  # (512, vocab)
    torch.testing.assert_close(ideal.logits, reference[448:-1], rtol=1e-4, atol=2e-3)


@pytest.fixture(scope="module")
def study_rows(smol, calibration, pg19):
    spec, model = smol
    config = accuracy.AccuracyConfig(prompt_len=64, eval_tokens=32, alphas=(4.0, math.inf), budgets=(0.1, 1.0),
                                     chunk=16, max_fetch_ratio=0.25)
    window = Window(pg19[:, :97], 64)
    study = accuracy.Study(spec, model, window, {"offline": calibration}, PG19_TEXT.name, config.chunk)
    return accuracy.run_study(study, accuracy.settings(config, window.positions.tolist()))


def test_study_rows_follow_the_schema_and_its_invariants(study_rows, tmp_path):
    rows = {r["setting"]: r for r in study_rows}
    assert list(rows) == ["ideal", "infinigen a=4", "oracle a=4", "infinigen b=0.25", "oracle b=0.25",
                          "infinigen b=0.1", "oracle b=0.1", "infinigen b=1", "oracle b=1", "h2o b=0.1", "h2o b=1",
                          "int4"]
    path = tmp_path / "accuracy.csv"
    path.write_text(to_csv(study_rows))
    assert len(read_accuracy(path)) == len(rows)
    ideal = rows["ideal"]
    for label in ("infinigen b=1", "oracle b=1"):  # every row: full attention
        assert rows[label]["perplexity"] == pytest.approx(ideal["perplexity"], rel=1e-5)
        assert rows[label]["top1_agreement"] == 1.0 and rows[label]["fetched_fraction"] == 1.0
    for budget in ("0.1", "0.25"):  # floor(b x context) rows; the oracle reads as many
        ig, oracle = rows[f"infinigen b={budget}"], rows[f"oracle b={budget}"]
        assert ig["fetched_fraction"] == pytest.approx(float(budget), abs=0.02)
        assert oracle["layer_fetched_fraction"] == ig["layer_fetched_fraction"]
    assert rows["oracle a=4"]["layer_fetched_fraction"] == rows["infinigen a=4"]["layer_fetched_fraction"]
    assert 0 < rows["infinigen a=4"]["fetched_fraction"] <= 0.25 + 1e-9
    assert rows["h2o b=0.1"]["fetched_fraction"] == pytest.approx(0.1, abs=0.03)
    assert rows["int4"]["kv_bytes_ratio"] == pytest.approx(0.28125) and rows["int4"]["fetched_fraction"] == 1.0
    assert len(ideal["chunk_perplexity"]) == 2 and ideal["ppl_increase_pct"] == 0.0
    assert all(0 < r["top1_agreement"] <= 1 for r in study_rows)


def test_h2o_budget_rows_matches_the_mean_share():
    contexts = list(range(100, 200))
    rows = accuracy.h2o_budget_rows(0.25, contexts)
    share = sum(min(c, rows) / c for c in contexts) / len(contexts)
    assert abs(share - 0.25) < 0.5 / 140 + 1e-9


def _no_weights(name):
    raise AssertionError("the weights were loaded before the inputs were checked")


@pytest.mark.parametrize(("flags", "expected"), [
    (["--text", "missing.txt"], "--text missing.txt: no such file"),
    (["--prompt-len", "4000"], "fewer than --prompt-len 4000 + --eval-tokens 1024 + 1"),
    (["--calibration-text", str(PG19_TEXT)], "is the evaluated text"),
    (["--skews", "offline,sideways"], "--skews: unknown 'sideways'"),
    (["--policies", "ideal,oracle"], "oracle needs infinigen"),
])
def test_accuracy_cli_checks_inputs_before_loading_weights(monkeypatch, capsys, flags, expected):
    monkeypatch.setattr(accuracy_cli, "load_pretrained", _no_weights)
    assert accuracy_cli.main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{accuracy_cli.PROG}: error: ") and expected in err[0], err


def test_skew_file_round_trips_into_the_cli_and_the_runtime(smol, calibration, tmp_path, monkeypatch, capsys):
    spec, weights = smol
    path = tmp_path / "skew.safetensors"
    save_skew(path, calibration)
    assert read_header(path, MODEL)["post_rope"] == "true"
    loaded = load_skew(path, MODEL, spec.n_kv_heads, spec.head_dim, spec.n_layers, 2)
    torch.testing.assert_close(loaded.mass[5], calibration.mass[5])
    monkeypatch.setattr(accuracy_cli, "load_pretrained", _no_weights)  # another model's file: refused first
    other = tmp_path / "other.safetensors"
    save_skew(other, type(calibration)(calibration.skew, calibration.mass, {**calibration.meta, "model": "x"}))
    assert accuracy_cli.main(["--skew-file", str(other)]) == 2
    assert "calibrated for x, not smollm2-135m" in capsys.readouterr().err
    monkeypatch.setattr(accuracy_cli, "load_pretrained", lambda name: (spec, weights))
    out, plot = tmp_path / "accuracy.csv", tmp_path / "accuracy.png"
    argv = ["--skew-file", str(path), "--prompt-len", "48", "--eval-tokens", "16", "--policies", "ideal,infinigen",
            "--alphas", "4", "--budgets", "0.2", "--out", str(out), "--plot", str(plot)]
    assert accuracy_cli.main(argv) == 0
    table = read_accuracy(out)
    assert list(table["setting"]) == ["ideal", "infinigen a=4", "infinigen b=0.2"] and plot.stat().st_size > 0
    assert "infinigen b=0.2" in capsys.readouterr().out
    ablation = tmp_path / "ablation.csv"  # --skew-file and unskewed columns: those are fitted on the calibration text
    assert accuracy_cli.main([*argv[:-4], "--skews", "offline,none", "--calibration-tokens", "64",
                              "--out", str(ablation)]) == 0
    assert set(read_accuracy(ablation)["skew"].dropna()) == {"offline", "none"}
    capsys.readouterr()
    monkeypatch.setattr(run, "load_pretrained", lambda name: (spec, weights))
    base = ["--model", MODEL, "--batch-size", "1", "--prompt-len", "32", "--gen-len", "3", "--warmup", "0",
            "--device", "cpu", "--json", "--skew", str(path)]
    assert run.main([*base, "--policy", "infinigen"]) == 0
    assert json.loads(capsys.readouterr().out)["skew"] == path.name
    assert run.main([*base, "--policy", "ideal"]) == 2
    assert "--skew: only the infinigen policy speculates" in capsys.readouterr().err


def test_engine_greedy_names_paris(smol):
    spec, weights = smol
    tokenizer = smollm2.load_tokenizer()
    prompt = torch.tensor([tokenizer.encode("The capital of France is")])
    with Engine(spec, make_policy("ideal"), "cpu", torch.float32, model=weights) as engine:
        tokens = engine.generate(prompt, 3).tokens[0].tolist()
    assert tokenizer.decode(tokens).startswith(" Paris")


def test_skewing_concentrates_the_prompt_queries_and_keeps_attention(smol, pg19):
    _, weights = smol
    stats = skew_stats.measure(weights, pg19[:, :128], 64)
    mean = stats.mean
    assert mean(stats.prompt_energy_after) > mean(stats.prompt_energy_before) + 0.02
    assert all(0 < r <= 1 + 1e-6 for values in stats.recall.values() for r in values)
    full = skew_stats.measure(weights, pg19[:, :96], 48, partial_ratio=1.0, k_ratios=(0.1,))
    for skewed, plain in zip(full.recall["skewed", 0.1], full.recall["all columns", 0.1], strict=True):
        assert skewed == pytest.approx(plain, abs=1e-3)  # an orthogonal A leaves the scores unchanged


def test_fetch_pass_writes_rows_the_bundle_reads(smol, calibration, tmp_path, monkeypatch):
    spec, weights = smol
    monkeypatch.setattr(fetch_bench, "load_pretrained", lambda name: (spec, weights))  # loaded once above
    skew = tmp_path / "skew.safetensors"
    save_skew(skew, calibration)
    out = tmp_path / "bundle"
    argv = ["--device", "cpu", "--quick", "--models", "tiny-opt", "--threads", "1", "--out", str(out),
            "--fetch-model", MODEL, "--fetch-contexts", "32,64", "--fetch-skew", str(skew)]
    assert collect.main(argv) == 0
    bundle = read_bundle(out)
    fetch = bundle.fetch
    assert list(fetch.columns) == FETCH_COLUMNS and len(fetch) == 2 * spec.n_layers
    assert set(fetch.source) == {CHECKPOINT_SOURCE} and set(fetch.model) == {MODEL} and (fetch.samples == 4).all()
    assert bundle.meta["fetch"]["skew"] == skew.name
    speculated = fetch[fetch.layer >= 2]
    assert (speculated.fetched_tokens >= 1).all() and (speculated.fetched_tokens <= speculated.context_len).all()
    full = fetch[fetch.layer < 2]  # never speculated: every cached row, at contexts n - 5 ... n - 2
    assert (full.fetched_tokens == full.context_len - 3.5).all()
    assert collect.main([*argv, "--resume", "--fetch-only"]) == 0  # everything present: nothing added
    assert len(read_bundle(out).fetch) == 2 * spec.n_layers
    assert collect.main([*argv[:-1], str(tmp_path / "none.safetensors"), "--resume"]) == 2
