"""The executors (infinigen_sim.sweep.executors): local Ray writes the same CSV as the local pool; without ray
the error says how to install it; a worker running other code is refused."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from infinigen_sim.sweep import executors as backends
from infinigen_sim.sweep.__main__ import main
from infinigen_sim.sweep.executors import InlineExecutor, PoolExecutor, chunk_size, chunked

ARGS = ["a100_pcie4", "--models", "small-opt,small-llama-gqa", "--batch-sizes", "1,4", "--prompt-lens", "256,512",
        "--gen-lens", "8"]  # 40 points
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="ray is not installed (pip install 'infinigen-sim[dist]'; CI installs it)")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("executor", [InlineExecutor, lambda: PoolExecutor(2)], ids=["inline", "pool"])
def test_every_chunk_comes_back_once_with_its_index(executor):
    items = list(range(-50, 50))
    chunks = chunked(items, chunk_size(len(items), 2, largest=8))
    assert len(chunks) == 13 and max(map(len, chunks)) == 8
    with executor() as ex:
        got = dict(ex.map_chunks(abs, chunks))
    assert [x for index in sorted(got) for x in got[index]] == [abs(x) for x in items]


@needs_ray
def test_local_ray_writes_the_same_csv_as_the_local_pool(tmp_path):
    assert main([*ARGS, "--jobs", "2", "--out", str(tmp_path / "pool")]) == 0
    assert main([*ARGS, "--ray", "--jobs", "2", "--out", str(tmp_path / "ray")]) == 0  # ray.init(num_cpus=2)
    pool, ray = ((tmp_path / name / "results.csv").read_bytes() for name in ("pool", "ray"))
    assert pool == ray and pool.count(b"\n") == 41


@needs_ray
def test_a_worker_with_other_code_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(backends, "code_fingerprint", lambda: "0.0.0+other")  # the driver's; workers hash theirs
    assert main([*ARGS, "--ray", "--jobs", "2", "--out", str(tmp_path)]) == 2
    assert "install the same version on every node" in _one_line_error(capsys)
    assert not (tmp_path / "results.csv").exists()


@needs_ray
def test_an_unreachable_cluster_is_one_line_and_exit_2(tmp_path, capsys):
    assert main([*ARGS, "--ray", "127.0.0.1:1", "--out", str(tmp_path / "out")]) == 2
    assert "--ray 127.0.0.1:1: cannot reach" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_without_ray_the_error_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert main([*ARGS, "--ray", "--out", str(tmp_path / "out")]) == 2
    assert "pip install 'infinigen-sim[dist]'" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()
