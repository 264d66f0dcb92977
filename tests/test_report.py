"""Reports: every section and image from a tiny sweep, the uncertainty section, elasticities, errors."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinigen_sim import report
from infinigen_sim.analysis.report import SECTIONS, build, write_report
from infinigen_sim.analysis.sensitivity import PARAMETERS, PointError, bandwidth_sweep, elasticities, point_from_params
from infinigen_sim.spec.hardware import load_hardware
from infinigen_sim.sweep.__main__ import main as sweep_main
from infinigen_sim.sweep.grid import SweepGrid

PNG = b"\x89PNG\r\n\x1a\n"
SMALL_SWEEP = ["a100_pcie4", "--models", "small-opt", "--batch-sizes", "1,4", "--prompt-lens", "256,1024",
               "--gen-lens", "8"]
POINT = {"model": "small-opt", "policy": "infinigen", "batch_size": 4, "prompt_len": 1024, "gen_len": 8}


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    assert sweep_main([*SMALL_SWEEP, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def built(results_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert write_report(results_dir, out) == out / "report.html"
    return out


def test_report_has_every_section_in_order(built):
    markdown = (built / "report.md").read_text()
    assert re.findall(r"^## (.+)$", markdown, flags=re.M) == list(SECTIONS)
    html = (built / "report.html").read_text()
    assert re.findall(r"<h2>(.+?)</h2>", html) == list(SECTIONS)


def test_every_referenced_image_exists_and_is_a_png(built):
    markdown = (built / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(images) >= 5
    for relative in images:
        assert not Path(relative).is_absolute()
        assert (built / relative).read_bytes().startswith(PNG), relative
    html = (built / "report.html").read_text()
    inlined = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert len(inlined) == len(images) and "src='images/" not in html  # self-contained
    assert all(base64.b64decode(data).startswith(PNG) for data in inlined)


def test_uncertainty_says_where_the_numbers_come_from(built):
    section = (built / "report.md").read_text().split("## Uncertainty")[1]
    assert "physics defaults" in section and "validate" in section


def test_elasticities_are_never_negative_and_link_matters_when_link_bound():
    flexgen = elasticities("a100_pcie4", {**POINT, "policy": "flexgen"})
    assert set(flexgen) == set(PARAMETERS)
    assert all(value >= -1e-9 for value in flexgen.values())  # more of any peak is never slower
    assert flexgen["link.h2d_gbps"] == max(flexgen.values()) > 0.1


def test_elasticities_of_a_point_that_does_not_fit_is_an_error():
    with pytest.raises(PointError, match="does not fit"):
        elasticities("l4_pcie4", {**POINT, "model": "opt-13b", "policy": "ideal", "batch_size": 64,
                                  "prompt_len": 32768})
    with pytest.raises(PointError, match="unknown key"):
        elasticities("a100_pcie4", {**POINT, "batch": 4})


def test_infinigen_gains_less_from_a_faster_link():
    point = point_from_params(load_hardware("a100_pcie4"), POINT)
    sweep = bandwidth_sweep(point, ["flexgen", "infinigen"], (8, 64, 512))
    ours = sweep[sweep["policy"] == "infinigen"]["speedup_vs_flexgen"].to_numpy()
    assert (ours[:-1] >= ours[1:]).all() and ours[0] > 1


def test_report_from_hardware_configs_runs_a_compact_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "COMPACT_GRID", SweepGrid(batch_sizes=(1, 4), prompt_lens=(256,), gen_lens=(8,)))
    assert report.main(["a100_pcie4", "--model", "small-opt", "--out", str(tmp_path),
                        "--point", "policy=flexgen,batch_size=1"]) == 0
    assert len(pd.read_csv(tmp_path / "results.csv")) == 10 and (tmp_path / "report.html").exists()
    assert "policy=flexgen, batch_size=1" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(("args", "expected"), [
    (["EMPTY"], "no results.csv"),
    (["HEADER_ONLY"], "no rows"),
    (["RESULTS", "--model", "opt-14b"], "--model: unknown model 'opt-14b'"),
    (["RESULTS", "--model", "opt-13b"], "--model opt-13b: not in the results (have small-opt)"),
    (["RESULTS", "--point", "batch_size=3"], "--point batch_size=3: not in the results (have 1, 4)"),
    (["RESULTS", "--point", "colour=blue"], "--point: unknown key 'colour'"),
    (["RESULTS", "--point", "batch_size"], "--point 'batch_size': expected KEY=VALUE"),
    (["RESULTS", "--bogus"], "unrecognized arguments: --bogus"),
    (["RESULTS", "a100_pcie4"], "give one results folder, or hardware configs"),
    (["no_such_gpu"], "no_such_gpu: no such hardware config"),
    (["a100_pcie4", "--model", "small-opt", "--point", "batch_size=3"], "--point batch_size=3: not in the results"),
])
def test_bad_input_is_one_line_and_exit_2(results_dir, tmp_path, capsys, args, expected):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "HEADER_ONLY").mkdir()
    (tmp_path / "HEADER_ONLY" / "results.csv").write_text("hw,model,policy\n")
    paths = {"EMPTY": tmp_path / "EMPTY", "HEADER_ONLY": tmp_path / "HEADER_ONLY", "RESULTS": results_dir}
    try:
        code = report.main([*(str(paths.get(a, a)) for a in args), "--out", str(tmp_path / "out")])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_command_line_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "infinigen_sim.report", str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@settings(max_examples=15, deadline=None)
@given(policy=st.sampled_from(["flexgen", "int4", "h2o", "infinigen"]), batch=st.sampled_from([1, 2, 8]),
       prompt=st.integers(256, 4096), hw=st.sampled_from(["a100_pcie4", "rtx4090_pcie4", "gh200_c2c"]))
def test_more_of_any_peak_is_never_slower(policy, batch, prompt, hw):
    values = elasticities(hw, {**POINT, "policy": policy, "batch_size": batch, "prompt_len": prompt})
    assert all(value >= -1e-6 for value in values.values()), values
