"""The accuracy table contract (infinigen_sim.spec.accuracy): rows round-trip, damaged tables are refused in one
line naming file, line and column, the planner finds the newest table of a model, and a row's measured
per-layer fractions become the FetchModel the simulator replays."""

from __future__ import annotations

import math

import pytest

from infinigen_sim.spec.accuracy import (
    COLUMNS,
    SCHEMA_VERSION,
    AccuracyError,
    find_table,
    measured_fetch_model,
    read_accuracy,
    to_csv,
)
from infinigen_sim.spec.policies import fetch_tokens, make_policy


def table_rows(model: str = "smollm2-135m") -> list[dict]:
    """A small table: ideal, InfiniGen at two settings, H2O, INT4 (made-up values, the schema's shapes)."""
    common = {"model": model, "text": "pg19_firstbook.txt", "prompt_len": 1024, "eval_tokens": 1024,
              "chunk_perplexity": [40.0, 41.0], "seconds": 1.0}
    layers = [1.0, 1.0] + [0.1] * 28

    def row(setting, policy, ppl, fetched, **extra):
        return {**common, "setting": setting, "policy": policy, "perplexity": ppl,
                "ppl_increase_pct": 100 * (ppl / 40 - 1),
                "fetched_fraction": fetched, "kv_bytes_ratio": fetched, "top1_agreement": 0.9, "full_layers": 0,
                "layer_fetched_fraction": layers, **extra}

    return [
        row("ideal", "ideal", 40.0, 1.0, full_layers=30, layer_fetched_fraction=[1.0] * 30),
        row("infinigen b=0.05", "infinigen", 44.0, 0.05, alpha=math.inf, budget=0.05, max_fetch_ratio=0.05,
            partial_ratio=0.3, skew="offline", rank="sum", min_fetch_ratio=0.0, full_layers=2),
        row("infinigen b=0.1", "infinigen", 41.0, 0.1, alpha=math.inf, budget=0.1, max_fetch_ratio=0.1,
            partial_ratio=0.3, skew="offline", rank="sum", min_fetch_ratio=0.0, full_layers=2),
        row("infinigen a=4", "infinigen", 41.5, 0.08, alpha=4.0, max_fetch_ratio=0.2, partial_ratio=0.3,
            skew="offline", rank="sum", min_fetch_ratio=0.0, full_layers=2),
        row("oracle b=0.05", "oracle", 40.5, 0.05, alpha=math.inf, budget=0.05, max_fetch_ratio=0.05, rank="sum",
            count_of="infinigen b=0.05", full_layers=2),
        row("h2o b=0.1", "h2o", 43.0, 0.1, budget=0.1, heavy_ratio=0.07, recent_ratio=0.07),
        row("h2o b=0.2", "h2o", 41.9, 0.2, budget=0.2, heavy_ratio=0.14, recent_ratio=0.14),
        row("int4", "int4", 41.2, 1.0, kv_bytes_ratio=0.28),
    ]


def test_rows_round_trip_with_every_column(tmp_path):
    path = tmp_path / "accuracy.csv"
    path.write_text(to_csv(table_rows()))
    table = read_accuracy(path)
    assert list(table.columns) == list(COLUMNS) and (table["schema_version"] == SCHEMA_VERSION).all()
    ig = table[table["setting"] == "infinigen b=0.1"].iloc[0]
    assert math.isinf(ig["alpha"]) and ig["budget"] == 0.1 and ig["skew"] == "offline"
    assert ig["layer_fetched_fraction"] == tuple([1.0, 1.0] + [0.1] * 28)
    assert table[table["policy"] == "h2o"]["alpha"].isna().all()  # does not apply: empty


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda text: text.replace(",oracle,", ",magic,", 1), "column 'policy': expected one of"),
    (lambda text: text.replace("pg19_firstbook.txt,1024,1024,0.1,", "pg19_firstbook.txt,1024,1024,x,", 1),
     "column 'fetched_fraction': expected a number"),
    (lambda text: text.replace("\n1,", "\n2,", 1), "column 'schema_version': expected 1"),
    (lambda text: text.replace("ideal,ideal", "ideal2,infinigen", 1), "no ideal row"),
    (lambda text: text.replace("infinigen b=0.05", "infinigen b=0.1", 1), "appears twice"),
    (lambda text: text.replace("schema_version,", "version,", 1), "missing column 'schema_version'"),
])
def test_damaged_tables_are_one_line_errors(tmp_path, edit, expected):
    path = tmp_path / "accuracy.csv"
    path.write_text(edit(to_csv(table_rows())))
    with pytest.raises(AccuracyError) as info:
        read_accuracy(path)
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message, message


def test_find_table_takes_the_newest_folder_holding_the_model(tmp_path):
    for folder, model in (("smollm2-135m-accuracy-2026-01-01", "smollm2-135m"),
                          ("smollm2-135m-accuracy-2026-02-01", "smollm2-135m"), ("other-2026-03-01", "tiny-opt")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "accuracy.csv").write_text(to_csv(table_rows(model)))
    assert find_table("smollm2-135m", tmp_path).parent.name == "smollm2-135m-accuracy-2026-02-01"
    assert find_table("tiny-opt", tmp_path).parent.name == "other-2026-03-01"
    assert find_table("opt-13b", tmp_path) is None


def test_measured_fetch_model_reads_each_layers_fraction_of_the_context():
    fractions = [1.0, 1.0, 0.2, 0.05]
    model = measured_fetch_model(fractions, "test")
    policy = make_policy("infinigen", alpha=math.inf, max_fetch_ratio=0.2)
    assert [model.tokens(1000, layer) for layer in range(4)] == pytest.approx([1000, 1000, 200, 50])
    assert [fetch_tokens(policy, layer, 1000, 1000, model) for layer in range(4)] == [1000, 1000, 200, 50]
