"""The accuracy table: what `profiler.accuracy` writes and `infinigen_sim.plan --max-ppl-increase` reads.

One CSV (`accuracy.csv`), one row per evaluated setting of one model on one text window, schema
version 1 (`schema_version` on every row). `COLUMNS` gives each column's kind and meaning; a cell that
does not apply to its row's policy is empty. Lists (per layer, per chunk) are ';'-joined numbers.
The reader is strict: a missing column, a bad cell, another schema version, a duplicate setting or a
table without its full-KV (`ideal`) row is one AccuracyError line naming the file, the line and the
column. `measured_fetch_model` turns a row's per-layer fetched fractions into the FetchModel the
simulator replays (count = fraction x context per layer: exact for fixed budgets, and an upper bound
at longer contexts for alpha settings, whose selected share falls with the context).

Where the planner finds a table: an explicit path, else `find_table` looks for `*/accuracy.csv` under
the repository's `profiles/` folder holding rows of the model (the newest folder name wins).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from infinigen_sim.spec.fetch import FetchModel

SCHEMA_VERSION = 1
ACCURACY_FILE = "accuracy.csv"
POLICIES = ("ideal", "infinigen", "oracle", "h2o", "int4")
PROFILES = Path(__file__).resolve().parents[2] / "profiles"  # the repository's measured results


@dataclass(frozen=True)
class Col:
    """One column: kind (str | int | float | list), meaning, and what it may hold."""

    kind: str
    meaning: str
    optional: bool = False  # empty where it does not apply to the row's policy
    allow_inf: bool = False
    minimum: float | None = None
    choices: tuple[str, ...] = ()


COLUMNS: dict[str, Col] = {
    "schema_version": Col("int", f"version of this schema ({SCHEMA_VERSION})"),
    "model": Col("str", "zoo model name (infinigen_sim.spec.models)"),
    "setting": Col("str", "unique label of the row's setting"),
    "policy": Col("str", "ideal (full KV), infinigen, oracle (true-score top rows), h2o, int4", choices=POLICIES),
    "alpha": Col("float", "InfiniGen/oracle: threshold max - alpha in logit units (inf: no threshold, the cap "
                          "or budget decides)", optional=True, allow_inf=True, minimum=0),
    "budget": Col("float", "fixed fetched fraction: InfiniGen/oracle floor(budget x context) rows per step; "
                           "H2O a fixed row budget whose mean share of the evaluated contexts is this",
                  optional=True, minimum=0),
    "max_fetch_ratio": Col("float", "InfiniGen: per-layer cap, share of the context", optional=True, minimum=0),
    "partial_ratio": Col("float", "InfiniGen: share of head_dim columns speculation uses", optional=True, minimum=0),
    "skew": Col("str", "InfiniGen: offline (fitted once on a calibration text), prompt (fitted on each prompt) "
                       "or none (unskewed columns)", optional=True, choices=("offline", "prompt", "none")),
    "rank": Col("str", "InfiniGen/oracle: a KV head's rows ranked by the group's summed softmax (sum) or max "
                       "logit (max)", optional=True, choices=("sum", "max")),
    "min_fetch_ratio": Col("float", "InfiniGen: count floor, share of the context", optional=True, minimum=0),
    "count_of": Col("str", "oracle: the setting whose per-(layer, step) row counts it uses", optional=True),
    "heavy_ratio": Col("float", "H2O: heavy rows, share of the prompt (the runtime's parameter)", optional=True,
                       minimum=0),
    "recent_ratio": Col("float", "H2O: recent rows, share of the prompt", optional=True, minimum=0),
    "full_layers": Col("int", "first layers reading every row at full precision (InfiniGen's full_fetch_layers; "
                              "H2O/INT4 0 = sparse in every layer, as the runtime)", minimum=0),
    "text": Col("str", "evaluation text (file name)"),
    "prompt_len": Col("int", "tokens prefilled at full attention", minimum=1),
    "eval_tokens": Col("int", "positions predicted after the prompt, teacher-forced", minimum=1),
    "fetched_fraction": Col("float", "rows read / cached rows, mean over steps and layers >= 2", minimum=0),
    "kv_bytes_ratio": Col("float", "K/V bytes read per step over all layers / full precision, every row", minimum=0),
    "perplexity": Col("float", "exp(mean cross-entropy) over the evaluated positions", minimum=0),
    "ppl_increase_pct": Col("float", "100 x (perplexity / the ideal row's - 1)"),
    "top1_agreement": Col("float", "share of positions whose argmax equals full KV's", minimum=0),
    "chunk_perplexity": Col("list", "perplexity per chunk of evaluated positions (256 by default)"),
    "layer_fetched_fraction": Col("list", "per layer: rows read / cached rows, mean over steps"),
    "seconds": Col("float", "wall time of the setting's pass", minimum=0),
}


class AccuracyError(ValueError):
    """An accuracy table that cannot be used; the message names the file, line and column."""


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ";".join(f"{float(v):.6g}" for v in value)
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.6g}"
    return str(value)


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The table's text: every column in order, schema_version filled in."""
    unknown = sorted({k for r in rows for k in r} - set(COLUMNS))
    if unknown:
        raise ValueError(f"accuracy rows have columns outside the schema: {', '.join(unknown)}")
    frame = pd.DataFrame([{c: _format({**r, "schema_version": SCHEMA_VERSION}.get(c)) for c in COLUMNS}
                          for r in rows], columns=list(COLUMNS))
    return frame.to_csv(index=False)


def _parse(path: Path, line: int, name: str, col: Col, text: str) -> Any:
    def bad(expected: str) -> AccuracyError:
        return AccuracyError(f"{path}: line {line}, column '{name}': expected {expected}, got '{text[:40]}'")

    if text == "":
        if col.optional:
            return None
        raise bad("a value")
    if col.kind == "str":
        if col.choices and text not in col.choices:
            raise bad(f"one of {', '.join(col.choices)}")
        return text
    if col.kind == "list":
        try:
            values = tuple(float(v) for v in text.split(";"))
        except ValueError:
            raise bad("';'-joined numbers") from None
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise bad("';'-joined finite numbers >= 0")
        return values
    try:
        value = float(text)
    except ValueError:
        raise bad("a number") from None
    if math.isnan(value) or (math.isinf(value) and not col.allow_inf) or (
            col.minimum is not None and value < col.minimum):
        raise bad("a finite number" + (f" >= {col.minimum:g}" if col.minimum is not None else ""))
    if col.kind == "int":
        if not value.is_integer():
            raise bad("a whole number")
        return int(value)
    return value


def read_accuracy(path: str | Path) -> pd.DataFrame:
    """The table, every cell parsed; AccuracyError (one line) on anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise AccuracyError(f"{path}: no such accuracy table (write one with python -m profiler.accuracy --out)")
    try:
        frame = pd.read_csv(io.StringIO(path.read_text(encoding="utf-8")), dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise AccuracyError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise AccuracyError(f"{path}: missing column '{missing[0]}' (schema version {SCHEMA_VERSION}: "
                            f"{', '.join(COLUMNS)})")
    if frame.empty:
        raise AccuracyError(f"{path}: no rows")
    records = []
    for index, raw in enumerate(frame.to_dict("records")):
        line = index + 2
        version = str(raw["schema_version"]).strip()
        if version != str(SCHEMA_VERSION):
            raise AccuracyError(f"{path}: line {line}, column 'schema_version': expected {SCHEMA_VERSION}, got "
                                f"'{version}' (rewrite it with this version of profiler.accuracy)")
        records.append({c: _parse(path, line, c, col, str(raw[c]).strip()) for c, col in COLUMNS.items()})
    table = pd.DataFrame(records, columns=list(COLUMNS))
    duplicated = table.duplicated(subset=["model", "setting"])
    if duplicated.any():
        first = int(duplicated.to_numpy().argmax())
        raise AccuracyError(f"{path}: line {first + 2}, column 'setting': '{table['setting'].iloc[first]}' "
                            "appears twice")
    for model, rows in table.groupby("model"):
        if not (rows["policy"] == "ideal").any():
            raise AccuracyError(f"{path}: column 'policy': no ideal row for {model} (the full-KV reference)")
    return table


def find_table(model: str, root: Path = PROFILES) -> Path | None:
    """The newest `root/*/accuracy.csv` holding rows of `model` (folder names sort by date), else None."""
    if not root.is_dir():
        return None
    for path in sorted(root.glob(f"*/{ACCURACY_FILE}"), key=lambda p: p.parent.name, reverse=True):
        try:
            models = pd.read_csv(path, usecols=["model"], dtype=str)["model"]
        except (ValueError, OSError, pd.errors.ParserError):
            continue  # not this schema: read_accuracy would say why if it were asked for explicitly
        if (models == model).any():
            return path
    return None


def measured_fetch_model(layer_fractions: Sequence[float], source: str) -> FetchModel:
    """A FetchModel of one group per layer, count = fraction x context (a = fraction, b = 1)."""
    groups = tuple((layer, float(f), 1.0) for layer, f in enumerate(layer_fractions))
    return FetchModel(a=groups[0][1], b=1.0, source=source, groups=groups)
