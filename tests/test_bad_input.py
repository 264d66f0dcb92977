"""Bad input never ends in a traceback, and a damaged bundle never changes a number silently.

Every case a new user met (issue 15's list): one line on stderr naming the file (or flag) and the key,
exit status 2, and the output folder unchanged. The property-based mutations of the same inputs are in
tests/test_fuzz.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from bundle_helpers import GRID_META, grid_bundle, kernel_rows, transfer_rows, write_bundle

from infinigen_sim.spec.bundle import FETCH_COLUMNS, BundleError, read_bundle
from infinigen_sim.spec.grids import MetaGrid, kernel_keys
from infinigen_sim.spec.hardware import HW_DIR, HardwareError, load_hardware

ROOT = Path(__file__).resolve().parent.parent
A100 = (HW_DIR / "a100_pcie4.yaml").read_text()


def cli(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def one_line_exit_2(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert len(result.stderr) <= 320, len(result.stderr)
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


# ---- hardware YAML -------------------------------------------------------------------------------
@pytest.mark.parametrize(("content", "needles"), [
    (b"\x00\xff\xfe garbage \x89PNG", ("not UTF-8",)),
    (("# r\xe9sum\xe9 of the card\n" + A100).encode("latin-1"), ("not UTF-8", "offset 3")),
    (("gpu: " + "[" * 3000 + "]" * 3000 + "\n").encode(), ("nested more than",)),
    ((b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
      b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"), ("aliases",)),
    ((A100 + "\nname: again\n").encode(), ("duplicate key 'name'",)),
    (A100.replace("h2d_gbps: 31.5", "h2d_gbps: 1e-300").encode(), ("link.h2d_gbps", "plausible range 0.1-10000 GB/s")),
    (A100.replace("h2d_gbps: 31.5", "h2d_gbps: 1e300").encode(), ("link.h2d_gbps", "plausible range")),
    (A100.replace("memory_gib: 80", "memory_gib: 1e300").encode(), ("gpu.memory_gib", "plausible range")),
    (A100.replace("memory_gib: 80", "memory_gib: 80\n  reserved_gib: 100").encode(),
     ("gpu.reserved_gib", "expected less than gpu.memory_gib (80 GiB)")),
    (A100.replace("name: a100_pcie4", 'name: ""').encode(), ("key 'name'", "non-empty")),
    (A100.replace("name: PCIe 4.0 x16", "name: 3").encode(), ("key 'link.name'",)),
])
def test_bad_hardware_yaml_is_one_line(tmp_path, content, needles):
    path = tmp_path / "card.yaml"
    path.write_bytes(content)
    with pytest.raises(HardwareError) as exc:
        load_hardware(path)
    message = str(exc.value)
    assert "\n" not in message and len(message) <= 300 + len(str(path)) and str(path) in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    one_line_exit_2(cli("infinigen_sim.sweep", str(path), "--models", "opt-13b", "--out", str(tmp_path / "out")),
                    str(path))
    assert not (tmp_path / "out").exists()


def test_an_implausible_figure_is_used_when_the_file_says_so(tmp_path):
    path = tmp_path / "fast.yaml"
    path.write_text(A100.replace("h2d_gbps: 31.5", "h2d_gbps: 20000") + "unchecked: [link.h2d_gbps]\n")
    assert load_hardware(path).link.h2d_gbps == 20000
    path.write_text(A100 + "unchecked: [link.speed]\n")
    with pytest.raises(HardwareError, match="key 'unchecked': unknown key 'link.speed'"):
        load_hardware(path)


# ---- sweep flags ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "needles"), [
    (["--batch-sizes", "\u00b2"], ("--batch-sizes", "whole numbers >= 1")),
    (["--prompt-lens", "1e3"], ("--prompt-lens",)),
    (["--gen-lens", "-4"], ("--gen-lens",)),
    (["--out", "/proc/x"], ("--out /proc/x", "cannot write")),
    (["--trace", "/proc/x/t.json"], ("--trace",)),
])
def test_bad_sweep_flags_are_one_line(tmp_path, args, needles):
    one_line_exit_2(cli("infinigen_sim.sweep", "a100_pcie4", "--models", "opt-13b", *args), *needles)


@pytest.mark.parametrize("flag,value", [("--batch-sizes", "8,8"), ("--models", "opt-13b,opt-13b"),
                                        ("--policies", "flexgen,flexgen,infinigen")])
def test_repeated_grid_values_are_dropped_with_a_note(tmp_path, flag, value):
    result = cli("infinigen_sim.sweep", "a100_pcie4", "--models", "opt-13b", "--batch-sizes", "8",
                 "--prompt-lens", "512", flag, value, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(tmp_path / "results.csv")
    assert not frame["key"].duplicated().any()
    assert flag != "--policies" or "note" in result.stderr or len(frame) == 2


# ---- damaged bundles -----------------------------------------------------------------------------
@pytest.fixture
def bundle(tmp_path) -> Path:
    return write_bundle(tmp_path / "bundle", kernel_rows(lambda *key: 1e-3), transfer_rows(3e-3))


def damage(path: Path, table: str, how) -> None:
    frame = pd.read_csv(path / table, dtype=str, keep_default_na=False)
    how(frame).to_csv(path / table, index=False)


def set_cell(column: str, value: str, row: int = 3):
    def how(frame: pd.DataFrame) -> pd.DataFrame:
        frame.loc[row, column] = value
        return frame
    return how


@pytest.mark.parametrize(("table", "column", "value", "needles"), [
    ("kernels.csv", "median_us", "fast", ("kernels.csv: line 5, column 'median_us'", "got 'fast'")),
    ("kernels.csv", "median_us", "-3", ("column 'median_us'", ">= 0")),
    ("kernels.csv", "median_us", "", ("column 'median_us'",)),
    ("kernels.csv", "median_us", "inf", ("column 'median_us'",)),
    ("kernels.csv", "batch_size", "two", ("column 'batch_size'", "whole number")),
    ("kernels.csv", "batch_size", "2.5", ("column 'batch_size'",)),
    ("kernels.csv", "status", "fine", ("column 'status'", "one of ok, oom")),
    ("transfers.csv", "nbytes", "lots", ("transfers.csv: line 5, column 'nbytes'",)),
    ("transfers.csv", "concurrent", "maybe", ("column 'concurrent'", "True or False")),
])
def test_a_bad_cell_names_file_line_and_column(bundle, table, column, value, needles):
    damage(bundle, table, set_cell(column, value))
    with pytest.raises(BundleError) as exc:
        read_bundle(bundle)
    for needle in needles:
        assert needle in str(exc.value), (needle, str(exc.value))
    one_line_exit_2(cli("infinigen_sim.sweep", "a100_pcie4", "--models", "opt-13b", "--profile", str(bundle),
                        "--out", str(bundle.parent / "out")), "--profile", table)
    assert not (bundle.parent / "out").exists()


def test_a_torn_last_line_is_an_error(bundle):
    data = (bundle / "kernels.csv").read_bytes()
    (bundle / "kernels.csv").write_bytes(data[: data.rfind(b",")])  # cut mid-line, as a kill does
    with pytest.raises(BundleError, match="kernels.csv: line .* is cut short"):
        read_bundle(bundle)


def test_an_unfinished_collection_is_not_used(bundle):
    meta = yaml.safe_load((bundle / "meta.yaml").read_text())
    del meta["completed_utc"]
    (bundle / "meta.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(BundleError, match="did not finish"):
        read_bundle(bundle)


def test_a_bad_steps_cell_stops_validate_and_writes_nothing(tmp_path, bundle):
    steps = [{"run_id": "r", "model": "tiny-opt", "policy": "flexgen", "batch_size": 1, "prompt_len": 8,
              "gen_len": "three" if i == 1 else 3, "alpha": 4.0, "overlap": True, "phase": "decode", "step": i,
              "layer": -1, "op": "wall", "seconds": 0.01, "context_len": 8, "fetched_tokens": 0} for i in range(2)]
    write_bundle(bundle, kernel_rows(lambda *key: 1e-3), transfer_rows(3e-3), steps=steps)
    before = sorted(p.name for p in bundle.iterdir())
    one_line_exit_2(cli("infinigen_sim.validate", str(bundle)), "steps.csv: line 3, column 'gen_len'")
    assert sorted(p.name for p in bundle.iterdir()) == before
    assert not bundle.with_name("bundle-validation").exists()


# ---- a bundle missing a row of its grid ----------------------------------------------------------
@pytest.fixture
def gridded(tmp_path) -> Path:
    return grid_bundle(tmp_path / "gridded")


def test_a_gridded_bundle_reads_back(gridded):
    bundle = read_bundle(gridded)
    grid = MetaGrid(**GRID_META["kernels"]["grid"])
    assert len(bundle.kernels) == len(set(kernel_keys(["tiny-opt"], "float16", grid))) > 0


@pytest.mark.parametrize(("table", "needles"), [
    ("kernels.csv", ("kernels.csv: no row for op=", "meta.yaml's kernels.grid", "--resume")),
    ("transfers.csv", ("transfers.csv: no row for direction=", "meta.yaml's transfers.sizes_bytes")),
])
def test_a_table_cut_at_a_line_boundary_is_refused(gridded, table, needles):
    lines = (gridded / table).read_bytes().splitlines(keepends=True)
    cut = [line for line in lines if b",pinned,contiguous," in line or table == "kernels.csv"]
    (gridded / table).write_bytes(b"".join(lines[: lines.index(cut[-1])]))  # whole lines, the last ones gone
    with pytest.raises(BundleError) as exc:
        read_bundle(gridded)
    for needle in needles:
        assert needle in str(exc.value), (needle, str(exc.value))
    one_line_exit_2(cli("infinigen_sim.sweep", "a100_pcie4", "--models", "opt-13b", "--profile", str(gridded),
                        "--out", str(gridded.parent / "out")), table, "no row for")
    assert not (gridded.parent / "out").exists()


def test_a_missing_fetch_row_is_refused(gridded):
    rows = [{"model": "tiny-opt", "source": "checkpoint", "alpha": 4, "layer": layer, "context_len": n,
             "fetched_tokens": 10.0, "samples": 2} for n in (512, 1024) for layer in range(4)]
    pd.DataFrame(rows[:-1], columns=FETCH_COLUMNS).to_csv(gridded / "fetch.csv", index=False)
    meta = yaml.safe_load((gridded / "meta.yaml").read_text())
    meta["fetch"] = {"model": "tiny-opt", "source": "checkpoint", "alphas": [4.0], "contexts": [512, 1024]}
    (gridded / "meta.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(BundleError, match=r"fetch.csv: no row for model=tiny-opt, source=checkpoint, alpha=4, "
                                          r"layer=3, context_len=1024 of meta.yaml's fetch"):
        read_bundle(gridded)
    pd.DataFrame(rows, columns=FETCH_COLUMNS).to_csv(gridded / "fetch.csv", index=False)
    assert len(read_bundle(gridded).fetch) == len(rows)


@pytest.mark.parametrize(("key", "value", "needles"), [
    ("batches", [1, "eight"], ("key 'kernels.grid.batches'", "a list of 1-64 whole numbers >= 1")),
    ("batches", list(range(1, 100)), ("key 'kernels.grid.batches'",)),
    ("max_prefill_tokens", -1, ("key 'kernels.grid.max_prefill_tokens'",)),
])
def test_a_damaged_grid_in_meta_is_one_line(gridded, key, value, needles):
    meta = yaml.safe_load((gridded / "meta.yaml").read_text())
    meta["kernels"]["grid"][key] = value
    (gridded / "meta.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(BundleError) as exc:
        read_bundle(gridded)
    for needle in needles:
        assert needle in str(exc.value) and "meta.yaml" in str(exc.value), (needle, str(exc.value))


@pytest.mark.parametrize(("column", "value", "needles"), [
    ("median_us", "0", ("line 5, column 'median_us': expected > 0 on a measured ('ok') row",)),
    ("median_us", "1e9", ("line 5, expected p10_us <= median_us <= p90_us",)),
    ("batch_size", "1e30", ("line 5, column 'batch_size'", "whole number")),
])
def test_an_inconsistent_measured_row_is_refused(gridded, column, value, needles):
    damage(gridded, "kernels.csv", set_cell(column, value))
    with pytest.raises(BundleError) as exc:
        read_bundle(gridded)
    for needle in needles:
        assert needle in str(exc.value), (needle, str(exc.value))


def test_a_row_with_fewer_fields_is_refused(gridded):
    lines = (gridded / "kernels.csv").read_text().splitlines(keepends=True)
    lines[3] = ",".join(lines[3].split(",")[:5]) + "\n"
    (gridded / "kernels.csv").write_text("".join(lines))
    with pytest.raises(BundleError, match="kernels.csv: line 4, column 'kv_len': expected a whole number >= 0, got ''"):
        read_bundle(gridded)


# ---- found by tests/test_fuzz.py -----------------------------------------------------------------
def test_a_cell_with_a_line_break_is_quoted_on_one_line(gridded):
    damage(gridded, "kernels.csv", set_cell("op", "\n", row=0))
    with pytest.raises(BundleError, match=r"line 2, column 'op': expected a non-empty text, got '\\n'$"):
        read_bundle(gridded)


def test_an_unknown_key_with_a_line_break_is_quoted_on_one_line(tmp_path):
    path = tmp_path / "card.yaml"
    path.write_text(A100 + "? '\n\n  '\n: null\n")
    with pytest.raises(HardwareError, match=r"unknown key '\\n' \(expected one of") as exc:
        load_hardware(path)
    assert "\n" not in str(exc.value)


def test_a_repeated_hardware_config_is_dropped_and_two_of_one_name_refused(tmp_path):
    result = cli("infinigen_sim.sweep", "a100_pcie4", "a100_pcie4", "--models", "opt-13b", "--batch-sizes", "8",
                 "--prompt-lens", "512", "--out", str(tmp_path / "once"))
    assert result.returncode == 0 and "note: dropped repeated hardware config 'a100_pcie4'" in result.stderr
    assert not pd.read_csv(tmp_path / "once" / "results.csv")["key"].duplicated().any()
    (tmp_path / "copy.yaml").write_text(A100)
    one_line_exit_2(cli("infinigen_sim.sweep", "a100_pcie4", str(tmp_path / "copy.yaml"), "--models", "opt-13b",
                        "--out", str(tmp_path / "twice")), "key 'name': 'a100_pcie4' is also the name of")
    assert not (tmp_path / "twice").exists()


def test_a_list_given_to_set_is_text_not_a_crash(tmp_path):
    one_line_exit_2(cli("infinigen_sim.sweep", "a100_pcie4", "--models", "opt-13b", "--set", "unchecked=[x]",
                        "--out", str(tmp_path / "out")), "key 'unchecked': expected a list of dotted keys")


def test_validate_never_writes_inside_the_bundle(bundle):
    before = sorted(p.name for p in bundle.iterdir())
    one_line_exit_2(cli("infinigen_sim.validate", str(bundle), "--out", str(bundle / "checked")),
                    "inside the bundle", "never written to")
    assert sorted(p.name for p in bundle.iterdir()) == before


# ---- exit status, the same in every command ------------------------------------------------------
def _mains():
    from infinigen_sim import plan, report, validate
    from infinigen_sim.sweep import __main__ as sweep
    from profiler import accuracy, collect, run, skew_stats

    return {"sweep": sweep.main, "plan": plan.main, "report": report.main, "validate": validate.main,
            "collect": collect.main, "run": run.main, "accuracy": accuracy.main, "skew_stats": skew_stats.main}


@pytest.mark.parametrize("name", ["sweep", "plan", "report", "validate", "collect", "run", "accuracy", "skew_stats"])
def test_every_command_exits_0_on_help_and_2_on_a_bad_flag(name, capsys):
    main = _mains()[name]

    def status(argv):
        try:
            return main(argv)
        except SystemExit as exc:  # argparse, for the commands that let it exit
            return exc.code

    assert status(["--help"]) == 0 and "usage:" in capsys.readouterr().out
    assert status(["--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python ") and ": error: " in err[0], err


def test_an_int4_group_whose_codes_do_not_fill_bytes_is_refused_before_the_engine(capsys):
    from infinigen_sim.spec.policies import PolicyError, make_policy
    from profiler.run import main

    with pytest.raises(PolicyError, match="bad quant_group=7"):
        make_policy("int4", quant_group=7)
    assert make_policy("int4", quant_bits=2, quant_group=4).quant_group == 4
    assert main(["--policy", "int4", "--quant-group", "7", "--prompt-len", "8", "--gen-len", "2"]) == 2
    assert "bad quant_group=7" in capsys.readouterr().err


def test_a_collected_bundle_whose_meta_lost_its_grid_is_refused(gridded):
    meta = yaml.safe_load((gridded / "meta.yaml").read_text())
    meta["tool"], meta["repeats"] = "profiler.collect", {"timed": 3, "warmup": 1}
    (gridded / "meta.yaml").write_text(yaml.safe_dump(meta))
    assert len(read_bundle(gridded).kernels)
    del meta["kernels"]["grid"]
    (gridded / "meta.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(BundleError, match="key 'kernels.grid' missing: every profiler.collect bundle records"):
        read_bundle(gridded)
    del meta["repeats"]  # a --fetch-only bundle: no timing grid to record
    (gridded / "meta.yaml").write_text(yaml.safe_dump(meta))
    assert len(read_bundle(gridded).kernels)


def test_a_fetch_only_bundle_is_named_as_such_not_as_a_missing_fact():
    """profiles/smollm2-135m-fetch-*: fetch.csv alone; as a profile it is refused with what to do instead."""
    fetch_only = sorted(Path(__file__).resolve().parents[1].glob("profiles/smollm2-135m-fetch-*"))[-1]
    with pytest.raises(BundleError, match="a --fetch-only bundle .* profiler.collect --fetch-only --resume"):
        read_bundle(fetch_only)
