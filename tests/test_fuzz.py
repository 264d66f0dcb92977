"""Property-based fuzzing (hypothesis) of every kind of input: config YAML, profile bundles, CLI flags, checkpoints.

The property, whatever the mutation: the input is used (a valid run, exit 0; plan may say 1, "target not
met") or refused with exit status 2 and one line of at most ERROR_CHARS naming the file or flag; never a
traceback (an exception escaping `main` fails the example); never exit 0 on a bundle damaged in a way
its reader can see (a torn or cut table, a missing grid row or column, a duplicate, a cell that is not of
its column's type, an unfinished meta); the output folder unchanged on failure; the input never written.

The CLIs run in-process (`main(argv)`, stderr captured) for speed; tests/test_bad_input.py checks the
same messages from a subprocess. Examples are derandomized (the same ones every run) and bounded per
input kind by EXAMPLES; FUZZ_SCALE=10 multiplies them for a longer local search, FUZZ_RANDOM=1 draws new
ones each run. Config YAML kinds (hardware configs, runtime descriptions) are the `YamlKind`s in YAML_KINDS.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from bundle_helpers import grid_bundle
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from infinigen_sim import plan, report, validate
from infinigen_sim.spec.bundle import STEP_COLUMNS, BundleError, read_bundle
from infinigen_sim.spec.cli import ERROR_CHARS
from infinigen_sim.spec.hardware import HW_DIR, HardwareConfig, HardwareError, load_hardware
from infinigen_sim.spec.runtime import RUNTIME_DIR, RuntimeConfigError, RuntimeSpec, load_runtime
from infinigen_sim.sweep import __main__ as sweep

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
EXAMPLES = {"yaml bytes": 250, "yaml structure": 250, "yaml via sweep": 30, "bundle": 250, "bundle via sweep": 30,
            "bundle via validate": 10, "sweep flags": 60, "plan flags": 15, "report flags": 30, "validate flags": 10,
            "collect flags": 60, "run flags": 60, "run flags real": 15, "checkpoint": 120, "checkpoint via run": 10}


def fuzz(kind: str) -> settings:
    return settings(max_examples=max(1, int(EXAMPLES[kind] * SCALE)), deadline=None, database=None,
                    derandomize=not os.environ.get("FUZZ_RANDOM"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- the harness ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    code: int
    err: str


def call(main: Callable[[list[str]], int], argv: list[str]) -> Outcome:
    """main(argv) in-process with stdout and stderr captured; argparse's SystemExit is its exit status."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
    return Outcome(code, err.getvalue())


def check(outcome: Outcome, prog: str, allowed: tuple[int, ...] = (0, 2), names: tuple[str, ...] = ()) -> None:
    """The exit status is allowed; on 2, one error line (notes aside) of at most ERROR_CHARS naming one of `names`."""
    assert outcome.code in allowed, (outcome.code, outcome.err[-2000:])
    if outcome.code != 2:
        return
    lines = outcome.err.strip().splitlines()
    errors = [line for line in lines if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1 and all(line.startswith("note:") for line in lines if line not in errors), lines
    assert len(errors[0]) <= ERROR_CHARS, errors[0]
    assert not names or any(name in errors[0] for name in names), (names, errors[0])


def named(argv: list[str]) -> tuple[str, ...]:
    """What an error about `argv` may name: a flag, or a file or value given (not a bare number)."""
    return tuple(a for a in argv if len(a) > 1 and not re.fullmatch(r"[-+0-9.,e ]*", a))


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under `path` with its bytes (None: no such path)."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def kind_of(message: str) -> str:
    """A message without its figures and names, for hypothesis' statistics (--hypothesis-show-statistics)."""
    return re.split(r"[('0-9]", message.lstrip(": "), maxsplit=1)[0].strip()


def one_line_naming(message: str, path: Path) -> None:
    assert "\n" not in message and len(message) <= ERROR_CHARS + len(str(path)), message
    assert str(path) in message, (str(path), message)


WEIRD = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1e-300, 1e300, 1e-3, 0.5, "", " ", "1e3", "nan", "inf", "\u00b2", "0x10", "1_000",
                     "a" * 400, [], {}]),
    st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3), st.floats(0.001, 5000), st.integers(1, 1000),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
YAML_TOKENS = st.sampled_from([b"&a ", b"*a", b": ", b"\t", b"- ", b"[", b"{", b"}", b"!!python/object:os.system ",
                               b"\xef\xbb\xbf", b"\n  ", b"---\n", b"%YAML 1.1\n", b"? ", b"#", b"'", b'"', b"\x00",
                               b"\xff\xfe", b"\r\n", b"\n" * 3, b"<<: ", b"!!binary "])


@st.composite
def byte_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    """One byte-level change: cut, insert (random or YAML-significant bytes), overwrite, delete, or garbage."""
    how = draw(st.sampled_from(("cut", "insert", "token", "overwrite", "delete", "garbage")))
    i = draw(st.integers(0, len(data)))
    if how == "cut":
        return data[:i]
    if how == "insert":
        return data[:i] + draw(st.binary(min_size=1, max_size=16)) + data[i:]
    if how == "token":
        return data[:i] + draw(YAML_TOKENS) + data[i:]
    if how == "overwrite":
        chunk = draw(st.binary(min_size=1, max_size=8))
        return data[:i] + chunk + data[i + len(chunk):]
    if how == "delete":
        return data[:i] + data[draw(st.integers(i, min(len(data), i + 64))):]
    return draw(st.binary(max_size=256))


def key_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested mapping (sections and leaves)."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            out += [(*prefix, key), *key_paths(value, (*prefix, key))]
    return out


def yaml_dump(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


@st.composite
def structure_mutation(draw: st.DrawFn, raw: dict, dump: Callable[[Any], str] = yaml_dump) -> bytes:
    """One to three structural changes of a valid mapping: a key set to a weird value, deleted, added, nested
    deep, duplicated (as text: YAML mappings cannot hold one), or the whole document replaced."""
    doc = copy.deepcopy(raw)
    duplicate = None
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(("set", "delete", "add", "nest", "duplicate", "replace")))
        paths = key_paths(doc) if isinstance(doc, dict) else []
        if how == "replace" or not paths:
            doc = draw(WEIRD)
            continue
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if how == "set":
            parent[path[-1]] = draw(WEIRD)
        elif how == "delete":
            del parent[path[-1]]
        elif how == "add":
            parent[draw(st.text(min_size=1, max_size=8))] = draw(WEIRD)
        elif how == "nest":
            value: Any = draw(WEIRD)
            for _ in range(draw(st.integers(1, 40))):
                value = [value] if draw(st.booleans()) else {"x": value}
            parent[path[-1]] = value
        else:
            duplicate = path[-1]
    text = dump(doc)
    if duplicate is not None:  # the first line holding the key, again right after itself
        lines = text.splitlines(keepends=True)
        at = next((i for i, line in enumerate(lines) if line.lstrip().lstrip('"').startswith(f"{duplicate}")), None)
        if at is not None:
            lines.insert(at + 1, lines[at])
        text = "".join(lines)
    return text.encode("utf-8", errors="surrogatepass")


# ---- config YAML ---------------------------------------------------------------------------------
SWEEP, PLAN, REPORT, VALIDATE = sweep.PROG, plan.PROG, report.PROG, validate.PROG
ONE_POINT = ["--models", "opt-13b", "--policies", "flexgen,infinigen", "--batch-sizes", "8", "--prompt-lens", "512",
             "--gen-lens", "128"]


def check_hardware(config: HardwareConfig) -> None:
    """What a loaded hardware config always holds: finite positive figures, reserved below total, names."""
    for section in (config.gpu, config.link, config.host):
        for key, value in vars(section).items():
            assert isinstance(value, str) and value.strip() or math.isfinite(value) and value >= 0, (key, value)
    assert config.gpu.reserved_gib < config.gpu.memory_gib and config.host.reserved_gib < config.host.memory_gib
    assert config.name.strip()


def check_runtime(spec: Any, where: str = "runtime") -> None:
    """What a loaded runtime description always holds: every figure finite and non-negative, every choice
    a string, a name; recursively through its sections and its per-policy descriptions (by_policy)."""
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if dataclasses.is_dataclass(value):
            check_runtime(value, f"{where}.{f.name}")
        elif f.name == "by_policy":
            for policy, sub in value:
                assert isinstance(policy, str) and isinstance(sub, RuntimeSpec), (where, policy)
                check_runtime(sub, f"{where}.by_policy.{policy}")
        elif value is not None and not isinstance(value, bool | str):
            assert math.isfinite(value) and value >= 0, (where, f.name, value)
    if isinstance(spec, RuntimeSpec):
        assert spec.name.strip()


@dataclass(frozen=True)
class YamlKind:
    """A kind of config file: a valid example, its loader and error, what a loaded one always holds, and
    the argv of a CLI run that reads it (file, output folder) -> (main, argv, prog)."""

    name: str
    valid: bytes
    load: Callable[[Path], Any]
    error: type[Exception]
    holds: Callable[[Any], None]
    cli: Callable[[Path, Path], tuple[Callable, list[str], str]]


YAML_KINDS = [
    YamlKind("hardware", (HW_DIR / "a100_pcie4.yaml").read_bytes(), load_hardware, HardwareError, check_hardware,
             lambda path, out: (sweep.main, [str(path), *ONE_POINT, "--out", str(out)], SWEEP)),
    # the artifact's description: a `base:` chain, nested sections, per-policy overrides
    YamlKind("runtime", (RUNTIME_DIR / "infinigen-artifact.yaml").read_bytes(), load_runtime, RuntimeConfigError,
             check_runtime, lambda path, out: (sweep.main, ["a100_pcie4", *ONE_POINT, "--runtime", str(path),
                                                            "--out", str(out)], SWEEP)),
]


def load_or_refuse(kind: YamlKind, data: bytes) -> bool:
    """Load `data` as a `kind` file: True if used (and it holds what it must), False if refused in one line."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{kind.name}.yaml"
        path.write_bytes(data)
        try:
            kind.holds(kind.load(path))
        except kind.error as exc:
            one_line_naming(str(exc), path)
            event(f"refused: {kind_of(str(exc).removeprefix(str(path)))}")
            return False
        event("used")
        assert path.read_bytes() == data
        return True


@pytest.mark.parametrize("kind", YAML_KINDS, ids=lambda k: k.name)
@fuzz("yaml bytes")
@given(data=st.data())
def test_yaml_bytes(kind: YamlKind, data: st.DataObject) -> None:
    load_or_refuse(kind, data.draw(byte_mutation(kind.valid)))


@pytest.mark.parametrize("kind", YAML_KINDS, ids=lambda k: k.name)
@fuzz("yaml structure")
@given(data=st.data())
def test_yaml_structure(kind: YamlKind, data: st.DataObject) -> None:
    load_or_refuse(kind, data.draw(structure_mutation(yaml.safe_load(kind.valid))))


@pytest.mark.parametrize("kind", YAML_KINDS, ids=lambda k: k.name)
@fuzz("yaml via sweep")
@given(data=st.data())
def test_yaml_through_the_cli(kind: YamlKind, data: st.DataObject) -> None:
    mutation = byte_mutation(kind.valid) if data.draw(st.booleans()) else structure_mutation(yaml.safe_load(kind.valid))
    content = data.draw(mutation)
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / f"{kind.name}.yaml", Path(tmp) / "out"
        path.write_bytes(content)
        main, argv, prog = kind.cli(path, out)
        outcome = call(main, argv)
        check(outcome, prog, names=(str(path),))
        assert (outcome.code == 0) == out.exists() and path.read_bytes() == content


# ---- profile bundles -----------------------------------------------------------------------------
TABLES = ("kernels.csv", "transfers.csv", "steps.csv")
BAD_CELLS = {"int": ["x", "", "nan", "inf", "-1", "2.5", "1e30", "\u00b2", "0x10"],
             "float": ["x", "", "nan", "inf", "-inf", "-1", "1e400", "--1", "1,5"],
             "text": [""], "choice": ["", "bogus", "OK"], "bool": ["", "maybe", "2", "yes"]}
KINDS = {"op": "text", "model": "text", "dtype": "text", "batch_size": "int", "n_tokens": "int", "kv_len": "int",
         "median_us": "float", "p10_us": "float", "p90_us": "float", "repeats": "int", "status": "choice",
         "direction": "choice", "memory": "choice", "layout": "text", "concurrent": "bool", "nbytes": "int",
         "row_bytes": "int", "rows": "int", "gbps": "float", "run_id": "text", "policy": "choice",
         "prompt_len": "int", "gen_len": "int", "alpha": "float", "overlap": "bool", "phase": "choice", "step": "int",
         "layer": "int", "seconds": "float", "context_len": "int", "fetched_tokens": "int"}
OPTIONAL_EMPTY = {"gbps", "layer", "step", "alpha"}  # cells an empty or other bad value may be fine for


def steps_rows() -> list[dict]:
    """Two complete runs (prefill and decode walls) of the grid bundle's tiny-opt, for validate."""
    rows = []
    for policy in ("flexgen", "infinigen"):
        run = {"run_id": f"tiny-opt/{policy}", "model": "tiny-opt", "policy": policy, "batch_size": 1,
               "prompt_len": 128, "gen_len": 3, "alpha": 4.0, "overlap": True, "layer": -1, "op": "wall",
               "context_len": 128, "fetched_tokens": 0}
        rows += [{**run, "phase": "prefill", "step": 0, "seconds": 0.02}]
        rows += [{**run, "phase": "decode", "step": i, "seconds": 0.004} for i in range(2)]
    return rows


@cache
def bundle_files() -> dict[str, bytes]:
    """The files of a finished bundle whose meta records its grid, with two runs in steps.csv."""
    with tempfile.TemporaryDirectory() as tmp:
        path = grid_bundle(Path(tmp) / "bundle")
        pd.DataFrame(steps_rows(), columns=STEP_COLUMNS).to_csv(path / "steps.csv", index=False)
        read_bundle(path)
        return {p.name: p.read_bytes() for p in path.iterdir()}


class Damage:
    """A folder's files with one damage, and whether its reader must refuse it; shown by what was done (not a
    dataclass: hypothesis would print every byte of the files)."""

    def __init__(self, files: dict[str, bytes], must_refuse: bool, what: str) -> None:
        self.files, self.must_refuse, self.what = files, must_refuse, what

    def __repr__(self) -> str:
        return f"Damage({self.what!r}, must_refuse={self.must_refuse})"


def _checked(table: str, line: bytes) -> bool:
    """Whether a data line is a row of the grid meta.yaml records (its loss must be seen)."""
    return table == "kernels.csv" or (table == "transfers.csv" and b",pinned,contiguous," in line)


@st.composite
def bundle_damage(draw: st.DrawFn) -> Damage:
    """One damage of `bundle_files()`: a table cut, rows deleted or doubled, a column deleted, a cell set to a bad
    (must refuse) or any value, meta.yaml changed or unfinished, or a file's bytes mutated."""
    damage = _damage(draw, dict(bundle_files()))
    return Damage(*damage)


def _damage(draw: st.DrawFn, files: dict[str, bytes]) -> tuple[dict[str, bytes], bool, str]:
    how = draw(st.sampled_from(("cut", "rows", "duplicate", "column", "bad cell", "any cell", "meta", "unfinished",
                                "bytes")))
    table = draw(st.sampled_from(TABLES))
    lines = files[table].splitlines(keepends=True)
    if how == "cut":
        at = draw(st.integers(0, len(files[table]) - 1))
        kept = files[table] = files[table][:at]
        torn = bool(kept) and not kept.endswith(b"\n")  # a kill mid-line
        lost = lines[kept.count(b"\n"):]  # the lines not kept whole
        return files, not kept or torn or any(_checked(table, line) for line in lost), f"{table} cut at byte {at}"
    if how in ("rows", "duplicate"):
        picked = sorted(set(draw(st.lists(st.integers(1, len(lines) - 1), min_size=1, max_size=3))))
        if how == "duplicate":
            files[table] = b"".join(lines + [lines[picked[0]]])
            return files, True, f"{table} line {picked[0] + 1} twice"
        files[table] = b"".join(line for i, line in enumerate(lines) if i not in picked)
        return files, any(_checked(table, lines[i]) for i in picked), f"{table} lines {picked} deleted"
    frame = pd.read_csv(io.BytesIO(files[table]), dtype=str, keep_default_na=False)
    column = draw(st.sampled_from(list(frame.columns)))
    if how == "column":
        files[table] = frame.drop(columns=[column]).to_csv(index=False, lineterminator="\n").encode()
        return files, True, f"{table} column {column} deleted"
    if how in ("bad cell", "any cell"):
        row = draw(st.integers(0, len(frame) - 1))
        bad = how == "bad cell" and column not in OPTIONAL_EMPTY
        value = draw(st.sampled_from(BAD_CELLS[KINDS[column]]) if bad else st.one_of(
            st.sampled_from(BAD_CELLS[KINDS[column]]), st.text(max_size=8).map(lambda t: t.replace("\x00", "")),
            st.floats().map(repr), st.integers(-5, 10**6).map(str)))
        frame.loc[row, column] = value
        files[table] = frame.to_csv(index=False, lineterminator="\n").encode()
        return files, bad, f"{table} line {row + 2} column {column} = {value!r}"
    if how in ("meta", "unfinished"):
        meta = yaml.safe_load(files["meta.yaml"])
        if how == "unfinished":
            del meta["completed_utc"]
        else:
            path = draw(st.sampled_from(key_paths(meta)))
            parent = meta
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = draw(WEIRD)
        files["meta.yaml"] = yaml.safe_dump(meta, allow_unicode=True).encode("utf-8", errors="surrogatepass")
        return files, how == "unfinished", f"meta {how}"
    name = draw(st.sampled_from(sorted(files)))
    files[name] = draw(byte_mutation(files[name]))
    return files, False, f"{name} bytes"


def write_files(path: Path, files: dict[str, bytes]) -> None:
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)


@fuzz("bundle")
@given(data=st.data())
def test_bundle(data: st.DataObject) -> None:
    damage = data.draw(bundle_damage())
    files, must_refuse, what = damage.files, damage.must_refuse, damage.what
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bundle"
        write_files(path, files)
        try:
            read_bundle(path)
            used, message = True, ""
        except BundleError as exc:
            one_line_naming(str(exc), path)
            used, message = False, kind_of(str(exc).split(str(path), 1)[1].lstrip("/").split(":", 1)[-1])
        assert not (used and must_refuse), f"a damaged bundle was read: {what}"
        assert snapshot(path) == files
        event(f"{what.split()[0]} {'must refuse' if must_refuse else 'free'}: {'used' if used else message}")


@fuzz("bundle via sweep")
@given(data=st.data())
def test_bundle_through_sweep(data: st.DataObject) -> None:
    damage = data.draw(bundle_damage())
    files, must_refuse, what = damage.files, damage.must_refuse, damage.what
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "bundle", Path(tmp) / "out"
        write_files(path, files)
        outcome = call(sweep.main, ["a100_pcie4", *ONE_POINT, "--profile", str(path), "--out", str(out)])
        check(outcome, SWEEP, allowed=(2,) if must_refuse else (0, 2), names=(str(path),))
        assert (outcome.code == 0) == out.exists() and snapshot(path) == files, what


@fuzz("bundle via validate")
@given(data=st.data())
def test_bundle_through_validate(data: st.DataObject) -> None:
    damage = data.draw(bundle_damage())
    files, must_refuse, what = damage.files, damage.must_refuse, damage.what
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "bundle", Path(tmp) / "checked"
        write_files(path, files)
        outcome = call(validate.main, [str(path), "--out", str(out)])
        check(outcome, VALIDATE, allowed=(2,) if must_refuse else (0, 2), names=(str(path),))
        assert (outcome.code == 0) == out.exists() and snapshot(path) == files, what
        if outcome.code == 0:
            assert "nan" not in (out / "validation.md").read_text().rsplit("median_abs_error_pct", 1)[1]


# ---- command-line flags --------------------------------------------------------------------------
COUNTS = st.one_of(st.sampled_from(["1", "8", "64", "0", "-1", "\u00b2", "1e3", "2.5", "", "x", "8,8", "1,,2",
                                    str(10**9), str(2**63), " 4 ", "nan"]),
                   st.lists(st.integers(1, 64), min_size=1, max_size=3).map(lambda v: ",".join(map(str, v))))
NUMBERS = st.sampled_from(["1", "10", "0", "-1", "nan", "inf", "1e300", "x", "", "1e-300", "\u00b2"])
LENGTHS = st.sampled_from(["128", "512", "0", "-3", "1e3", "x", "", "128,128", str(10**9), "2048,512"])


@st.composite
def unwritable_or_fresh(draw: st.DrawFn, tmp: Path, name: str) -> str:
    """An output path: fresh in `tmp`, under /proc, an existing file, or a file's child."""
    (tmp / "a_file").write_text("x")
    return draw(st.sampled_from([str(tmp / name), "/proc/x", str(tmp / "a_file"), str(tmp / "a_file" / name)]))


def flags(draw: st.DrawFn, options: dict[str, st.SearchStrategy]) -> list[str]:
    """A few of `options`' flags (a flag mapped to None is a switch), each with a drawn value."""
    argv = []
    for flag in draw(st.lists(st.sampled_from(sorted(options)), max_size=4, unique=True)):
        argv += [flag] if options[flag] is None else [flag, draw(options[flag])]
    return argv


def outputs_unchanged(before: dict[Path, Any]) -> None:
    for path, snap in before.items():
        assert snapshot(path) == snap, path


SWEEP_FLAGS = {"--models": st.sampled_from(["opt-13b", "tiny-opt", "opt-13b,opt-13b", "gpt-5", "", "llama-3-8b"]),
               "--policies": st.sampled_from(["flexgen", "infinigen,flexgen", "flexgen,flexgen", "lru", "", "h2o"]),
               "--batch-sizes": COUNTS, "--prompt-lens": LENGTHS, "--gen-lens": LENGTHS,
               "--set": st.sampled_from(["link.h2d_gbps=16,32", "gpu.memory_gib=1e300", "policy.alpha=4", "bogus=1",
                                         "link.h2d_gbps=", "=3", "link.h2d_gbps=nan", "host.cores=2.5",
                                         "policy.max_fetch_ratio=0", "gpu.name=", "link.h2d_gbps=x",
                                         "link.h2d_gbps=1e-300", "unchecked=[link.h2d_gbps]"]),
               "--jobs": st.sampled_from(["1", "0", "-1", "x", "1e3"]), "--mode": st.sampled_from(["fast", "bogus"]),
               "--resume": None, "--profile": st.sampled_from(["/nonexistent", "BUNDLE", "a100_pcie4"])}


@fuzz("sweep flags")
@given(data=st.data())
def test_sweep_flags(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        out = data.draw(unwritable_or_fresh(tmp, "out"))
        hw = data.draw(st.lists(st.sampled_from(["a100_pcie4", "h100_pcie5", "nonexistent", "x.yaml", str(tmp)]),
                                min_size=1, max_size=2))
        argv = [*hw, "--models", "opt-13b", "--batch-sizes", "8", "--prompt-lens", "512", "--gen-lens", "16",
                *flags(data.draw, SWEEP_FLAGS), "--out", out]
        if "BUNDLE" in argv:
            write_files(tmp / "bundle", bundle_files())
            argv[argv.index("BUNDLE")] = str(tmp / "bundle")
        if data.draw(st.booleans()):
            argv += ["--trace", data.draw(unwritable_or_fresh(tmp, "trace.json"))]
        before = {Path(out): snapshot(Path(out)), tmp / "a_file": snapshot(tmp / "a_file")}
        outcome = call(sweep.main, argv)
        check(outcome, SWEEP, names=named(argv))
        if outcome.code == 0:
            frame = pd.read_csv(Path(out) / "results.csv")
            assert not frame["key"].duplicated().any() and len(frame)
        else:
            outputs_unchanged(before)


PLAN_FLAGS = {"--max-ms-per-token": NUMBERS, "--policies": SWEEP_FLAGS["--policies"], "--batch-sizes": COUNTS,
              "--jobs": st.sampled_from(["1", "0", "-1", "x"])}


@fuzz("plan flags")
@given(data=st.data())
def test_plan_flags(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        out = data.draw(unwritable_or_fresh(tmp, "plan.csv"))
        argv = ["--model", data.draw(st.sampled_from(["opt-13b", "tiny-opt", "gpt-5", ""])),
                "--prompt-len", data.draw(LENGTHS), "--gen-len", data.draw(st.sampled_from(["128", "1", "2", "x"])),
                "--target-tokens-per-s", data.draw(NUMBERS), "--batch-sizes", "1,8",
                *flags(data.draw, PLAN_FLAGS), "--out", out, data.draw(st.sampled_from(["a100_pcie4", "nope"]))]
        before = {Path(out): snapshot(Path(out)), tmp / "a_file": snapshot(tmp / "a_file")}
        outcome = call(plan.main, argv)
        check(outcome, PLAN, allowed=(0, 1, 2), names=named(argv))
        if outcome.code == 0:
            assert Path(out).is_file()
        else:
            outputs_unchanged(before)


@cache
def results_dir() -> Path:
    """A small sweep's output folder (results.csv, config.yaml), for report."""
    path = Path(tempfile.mkdtemp(prefix="fuzz-results-"))
    assert call(sweep.main, ["a100_pcie4", *ONE_POINT, "--out", str(path)]).code == 0
    return path


REPORT_DEFECTS = {  # each makes a report run fail before any section is built
    "--point": st.sampled_from(["batch_size", "colour=blue", "batch_size=3", "=", ",=x", "hw=nope",
                                "policy=lru", "batch_size=8,batch_size=x", "prompt_len=\u00b2"]),
    "--model": st.sampled_from(["gpt-5", "llama-3-8b", "opt"]),
    "--out": st.sampled_from(["/proc/x", "A_FILE"]),
    "input": st.sampled_from(["/nonexistent", "nope", "RESULTS RESULTS", "RESULTS a100_pcie4", "A_FILE"]),
}


@fuzz("report flags")
@given(data=st.data())
def test_report_defects(data: st.DataObject) -> None:
    """report with at least one defect among its flags: exit 2, nothing written (valid runs: test_report.py)."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        results = tmp / "results"
        shutil.copytree(results_dir(), results)
        (tmp / "a_file").write_text("x")
        defects = data.draw(st.lists(st.sampled_from(sorted(REPORT_DEFECTS)), min_size=1, max_size=3, unique=True))
        given_ = {key: data.draw(REPORT_DEFECTS[key]) for key in defects}
        argv = given_.pop("input", "RESULTS").split()
        for flag, value in given_.items():
            argv += [flag, value]
        if "--out" not in given_:
            argv += ["--out", str(tmp / "report")]
        argv = [str(results) if a == "RESULTS" else str(tmp / "a_file") if a == "A_FILE" else a for a in argv]
        before = {results: snapshot(results), tmp / "report": None, tmp / "a_file": snapshot(tmp / "a_file")}
        outcome = call(report.main, argv)
        check(outcome, REPORT, allowed=(2,), names=named(argv))
        outputs_unchanged(before)


@fuzz("validate flags")
@given(data=st.data())
def test_validate_flags(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        write_files(tmp / "bundle", bundle_files())
        bundle = data.draw(st.sampled_from([str(tmp / "bundle"), "/nonexistent", str(tmp / "bundle" / "meta.yaml")]))
        out = data.draw(st.one_of(unwritable_or_fresh(tmp, "checked"), st.just(str(tmp / "bundle" / "inside"))))
        argv = [bundle, "--out", out]
        if data.draw(st.booleans()):
            argv += ["--hw", data.draw(st.sampled_from(["a100_pcie4", "nope", str(tmp / "a_file"), "h100_pcie5"]))]
        before = {tmp / "bundle": snapshot(tmp / "bundle"), Path(out): snapshot(Path(out)),
                  tmp / "a_file": snapshot(tmp / "a_file")}
        outcome = call(validate.main, argv)
        check(outcome, VALIDATE, names=named(argv))
        if outcome.code == 0:
            assert (Path(out) / "validation.csv").is_file()
            before.pop(Path(out))
        outputs_unchanged(before)


# ---- the profiler's cheap paths: flags refused before any work -----------------------------------
class Reached(Exception):
    """Raised where the work would begin: the flags were all accepted."""


def reached(*args: Any, **kwargs: Any) -> None:
    raise Reached


COLLECT_FLAGS = {"--device": st.sampled_from(["cpu", "cuda", "tpu"]),
                 "--models": st.sampled_from(["tiny-opt", "tiny-opt,tiny-opt", "gpt-5", "", "tiny-opt,small-opt"]),
                 "--policies": SWEEP_FLAGS["--policies"], "--quick": None, "--resume": None,
                 "--repeats": st.sampled_from(["5", "3", "x", "1e3", "-1", "10"]),
                 "--warmup": st.sampled_from(["1", "0", "x"]), "--seed": st.sampled_from(["0", "x", "-3"]),
                 "--threads": st.sampled_from(["1", "0", "x"]),
                 "--fetch-model": st.sampled_from(["smollm2-135m", "gpt-5"]), "--fetch-only": None,
                 "--fetch-alphas": st.sampled_from(["4", "inf", "-1", "x", "4,4"]),
                 "--fetch-contexts": st.sampled_from(["512,1024", "100000", "3", "x", ""]),
                 "--fetch-text": st.sampled_from(["/nonexistent.txt", "README.md"])}


@fuzz("collect flags")
@given(data=st.data())
def test_collect_flags(data: st.DataObject) -> None:
    pytest.importorskip("torch")
    from profiler import collect

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        write_files(tmp / "bundle", bundle_files())
        out = data.draw(st.one_of(unwritable_or_fresh(tmp, "collected"), st.just(str(tmp / "bundle"))))
        argv = [*flags(data.draw, COLLECT_FLAGS), "--out", out]
        before = {Path(out): snapshot(Path(out)), tmp / "a_file": snapshot(tmp / "a_file")}
        with _patched(collect, "collect", reached):
            try:
                outcome = call(collect.main, argv)
            except Reached:
                outcome = Outcome(0, "")
        check(outcome, collect.PROG, names=named(argv))
        outputs_unchanged(before)


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


RUN_FLAGS = {"--model": st.sampled_from(["tiny-opt", "tiny-llama-gqa", "gpt-5", "", "smollm2-135m"]),
             "--policy": st.sampled_from(["flexgen", "infinigen", "h2o", "int4", "ideal", "lru"]),
             "--batch-size": st.sampled_from(["1", "2", "0", "x", "\u00b2"]),
             "--prompt-len": st.sampled_from(["8", "48", "0", "x", "100000", "4090"]),
             "--gen-len": st.sampled_from(["2", "4", "0", "1", "x"]),
             "--device": st.sampled_from(["cpu", "cuda", "tpu"]), "--dtype": st.sampled_from(["float32", "int8"]),
             "--checkpoint": st.sampled_from(["/nonexistent", "CHECKPOINT", "README.md"]),
             "--threads": st.sampled_from(["1", "0"]), "--warmup": st.sampled_from(["0", "-1", "x"]),
             "--alpha": NUMBERS, "--partial-ratio": NUMBERS, "--max-fetch-ratio": NUMBERS,
             "--full-fetch-layers": st.sampled_from(["0", "2", "-1", "100"]),
             "--heavy-ratio": NUMBERS, "--recent-ratio": NUMBERS,
             "--quant-bits": st.sampled_from(["4", "8", "3", "0", "x"]),
             "--quant-group": st.sampled_from(["64", "7", "0", "100000"]),
             "--pool-ratio": NUMBERS, "--random-weights": None, "--check": None, "--json": None, "--no-overlap": None}


@fuzz("run flags")
@given(data=st.data())
def test_run_flags(data: st.DataObject) -> None:
    pytest.importorskip("torch")
    from profiler import run

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        argv = ["--warmup", "0", "--prompt-len", "8", "--gen-len", "2", *flags(data.draw, RUN_FLAGS)]
        argv = [str(checkpoint_files(tmp)) if a == "CHECKPOINT" else a for a in argv]
        trace = data.draw(st.one_of(st.none(), unwritable_or_fresh(tmp, "trace.json")))
        argv += ["--trace", trace] if trace else []
        with _patched(run, "build_engine", reached):
            try:
                outcome = call(run.main, argv)
            except Reached:
                outcome = Outcome(0, "")
        check(outcome, run.PROG, names=(*named(argv), *(f.name for f in dataclasses.fields(run.PolicyConfig))))
        assert not trace or outcome.code != 2 or snapshot(Path(trace)) in (None, {"": b"x"})


# ---- checkpoints ---------------------------------------------------------------------------------
def tiny_spec(family: str) -> Any:
    from infinigen_sim.spec.models import Family, ModelSpec

    return ModelSpec(name="fz", family=Family(family), n_layers=1, d_model=16, n_heads=2,
                     n_kv_heads=1 if family == "llama" else 2, d_ffn=32, vocab_size=64, max_positions=64,
                     tie_embeddings=family == "opt")


@cache
def checkpoint_bytes(family: str = "opt", fmt: str = "safetensors") -> dict[str, bytes]:
    """config.json and the weights of a one-layer 16-wide model, as files."""
    from profiler.runtime.model import build_model
    from profiler.weights.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(build_model(tiny_spec(family), seed=3), Path(tmp) / "ckpt", fmt)
        return {p.name: p.read_bytes() for p in path.iterdir()}


def checkpoint_files(tmp: Path, files: dict[str, bytes] | None = None) -> Path:
    path = tmp / "ckpt"
    write_files(path, files or checkpoint_bytes())
    return path


@st.composite
def checkpoint_damage(draw: st.DrawFn) -> Damage:
    """config.json changed (its structure or bytes), the weights' bytes changed, or files removed or added."""
    family, fmt = draw(st.sampled_from(["opt", "llama"])), draw(st.sampled_from(["safetensors", "bin"]))
    files = dict(checkpoint_bytes(family, fmt))
    weights = next(name for name in files if name != "config.json")
    how = draw(st.sampled_from(("config", "config bytes", "weights bytes", "weights length", "files")))
    if how == "config":
        config = json.loads(files["config.json"])
        files["config.json"] = draw(structure_mutation(config, dump=lambda doc: json.dumps(doc, indent=1)))
    elif how == "config bytes":
        files["config.json"] = draw(byte_mutation(files["config.json"]))
    elif how == "weights bytes":
        data = files[weights]
        at, chunk = draw(st.integers(0, len(data) - 1)), draw(st.binary(min_size=1, max_size=8))
        files[weights] = (data[:at] + chunk + data[at + len(chunk):])[: len(data)]
    elif how == "weights length":  # a cut or an insertion: a safetensors file no longer covers its header's sizes
        size = len(files[weights])
        files[weights] = draw(byte_mutation(files[weights]).filter(lambda d: len(d) != size))
    else:
        drop = draw(st.sampled_from(sorted(files)))
        del files[drop]
        if draw(st.booleans()):
            files["model-2.safetensors" if fmt == "safetensors" else "pytorch_model-2.bin"] = \
                checkpoint_bytes(family, fmt)[weights]
    must = (how == "weights length" and fmt == "safetensors") or (how == "files" and len(files) < 2)
    return Damage(files, must, f"{family} {fmt}: {how}")


@fuzz("checkpoint")
@given(damage=checkpoint_damage())
def test_checkpoint(damage: Damage) -> None:
    pytest.importorskip("torch")
    import torch

    from profiler.weights.checkpoint import CheckpointError, load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint_files(Path(tmp), damage.files)
        try:
            _, model = load_checkpoint(path)
        except CheckpointError as exc:
            one_line_naming(str(exc), path)
            event(f"{damage.what.split(':')[1]}: {kind_of(str(exc).split(str(path), 1)[1].lstrip('/'))[:50]}")
            return
        event(f"{damage.what.split(':')[1]}: used")
        assert not damage.must_refuse, damage.what
        assert all(bool(torch.isfinite(t).all()) for t in model.state_dict().values())


@fuzz("checkpoint via run")
@given(damage=checkpoint_damage())
def test_checkpoint_through_run(damage: Damage) -> None:
    pytest.importorskip("torch")
    from profiler import run

    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint_files(Path(tmp), damage.files)
        outcome = call(run.main, ["--checkpoint", str(path), "--prompt-len", "8", "--gen-len", "2", "--warmup", "0",
                                  "--device", "cpu", "--json"])
        check(outcome, run.PROG, allowed=(2,) if damage.must_refuse else (0, 2), names=(str(path),))
        assert snapshot(path) == damage.files


POLICY_FLAGS = {key: RUN_FLAGS[key] for key in ("--policy", "--alpha", "--partial-ratio", "--max-fetch-ratio",
                                                "--full-fetch-layers", "--heavy-ratio", "--recent-ratio",
                                                "--quant-bits", "--quant-group", "--pool-ratio", "--no-overlap",
                                                "--check", "--dtype")}


@fuzz("run flags real")
@given(data=st.data())
def test_run_flags_on_the_engine(data: st.DataObject) -> None:
    """The policy flags through a real (tiny) generation: what only the engine could reject is refused before."""
    pytest.importorskip("torch")
    from profiler import run

    argv = ["--model", data.draw(st.sampled_from(["tiny-opt", "tiny-llama-gqa"])), "--batch-size", "1",
            "--prompt-len", data.draw(st.sampled_from(["8", "40"])), "--gen-len", "3", "--warmup", "0",
            "--device", "cpu", "--threads", "1", "--json", *flags(data.draw, POLICY_FLAGS)]
    outcome = call(run.main, argv)
    check(outcome, run.PROG, names=(*named(argv), *(f.name for f in dataclasses.fields(run.PolicyConfig))))


# ---- from a shell: no traceback ------------------------------------------------------------------
def test_damaged_inputs_from_a_shell_end_in_one_line(tmp_path):
    """A few damaged inputs through real subprocesses: whatever the in-process harness might hide (an exception
    printed by the interpreter itself, a warning on stderr), the shell sees exit 2 and one line."""
    import subprocess
    import sys

    hw = tmp_path / "card.yaml"
    hw.write_bytes(YAML_KINDS[0].valid.replace(b"h2d_gbps: 31.5", b"h2d_gbps: [31.5") + b"\xff")
    bundle = tmp_path / "bundle"
    write_files(bundle, {**bundle_files(), "kernels.csv": bundle_files()["kernels.csv"][:-40]})
    runs = [["infinigen_sim.sweep", str(hw), "--out", str(tmp_path / "a")],
            ["infinigen_sim.sweep", "a100_pcie4", *ONE_POINT, "--profile", str(bundle), "--out", str(tmp_path / "b")],
            ["infinigen_sim.plan", "--model", "opt-13b", "--prompt-len", "512", "--gen-len", "128",
             "--target-tokens-per-s", "nan", "a100_pcie4"]]
    root = Path(__file__).resolve().parent.parent
    for argv in runs:
        done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=root, timeout=120)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert not any((tmp_path / name).exists() for name in ("a", "b"))
