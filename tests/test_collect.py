"""profiler.collect: a quick CPU bundle reads back, resumes without loss or duplicates, flags fail in one line."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from infinigen_sim.spec.bundle import (
    KERNEL_COLUMNS,
    KERNEL_KEY,
    SCHEMA_VERSION,
    STEP_COLUMNS,
    STEP_KEY,
    TRANSFER_COLUMNS,
    TRANSFER_KEY,
    BundleError,
    done_keys,
    read_bundle,
)
from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.ops import Op, ops_in_pass
from infinigen_sim.spec.policies import ALL_POLICIES
from infinigen_sim.spec.runtime import load_runtime
from profiler import collect
from profiler.bench import collection, host, kernels, steps
from profiler.bench.kernel_passes import cache_pass, decode_pass, prefill_pass
from profiler.bench.kernels import GRIDS, KERNEL_OPS, KernelBench, kernel_points, kernel_tasks
from profiler.bench.steps import WALL_OP
from profiler.bench.transfer_grid import TransferPoint, TransferSweep, make_sweep, transfer_points
from profiler.bench.transfers import TransferBench
from profiler.runtime.model import build_model

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--device", "cpu", "--quick", "--models", "tiny-opt"]


def expected_keys(argv: list[str]) -> tuple[set, set]:
    """Every (transfer, kernel) key the plan for `argv` measures."""
    plan = collect.resolve(collect.parse_args(argv))
    sweep = make_sweep(plan.device, list(plan.models), plan.quick)
    transfers = {key for point in transfer_points(sweep) for key in point.keys()}
    kernel_keys = {p.key() for p in kernel_points(list(plan.models), "float32", GRIDS[("cpu", True)])}
    return transfers, kernel_keys


def bundle_keys(path: Path) -> tuple[set, set, set]:
    return (done_keys(path / "transfers.csv", TRANSFER_KEY), done_keys(path / "kernels.csv", KERNEL_KEY),
            done_keys(path / "steps.csv", STEP_KEY))


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "profiler.collect", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "quick"
    assert collect.main([*QUICK, "--out", str(out)]) == 0
    return out


def test_quick_bundle_reads_back(quick_bundle: Path) -> None:
    bundle = read_bundle(quick_bundle)
    assert list(bundle.kernels.columns) == KERNEL_COLUMNS
    assert list(bundle.transfers.columns) == TRANSFER_COLUMNS
    is_handoff = bundle.transfers.layout.str.startswith("handoff.")
    handoff, copies = bundle.transfers[is_handoff], bundle.transfers[~is_handoff]  # a cost, not a copy: may be < 0
    for frame in (bundle.kernels, copies, handoff):
        assert (frame.status == "ok").all()
        assert (frame.repeats >= 5).all()
        assert (frame.p10_us <= frame.median_us).all() and (frame.median_us <= frame.p90_us).all()
    assert (bundle.kernels.p10_us > 0).all() and (copies.p10_us > 0).all()
    assert (copies.gbps > 0).all() and handoff.gbps.isna().all()
    assert set(handoff.layout) == {f"handoff.{p}" for p in ("flexgen", "int4", "h2o", "infinigen")}
    assert (handoff.groupby("layout").rows.nunique() >= 3).all() and (handoff.nbytes > 0).all()
    # every op the simulator prices from the runtime, incl. InfiniGen's skew and H2O's score, and the span,
    # all by their spec.ops names (schema 2: `ffn` is W_O + MLP, no `o_proj` rows)
    assert set(bundle.kernels.op) == {op.value for op in KERNEL_OPS}
    assert {"skew", "score", "span", "attention", "dequantize", "speculate", "topk", "ffn"} <= set(bundle.kernels.op)
    assert set(bundle.steps.op) - {WALL_OP} <= {op.value for op in Op} and "o_proj" not in set(bundle.steps.op)
    assert bundle_keys(quick_bundle)[:2] == expected_keys([*QUICK, "--out", "x"])
    assert list(bundle.steps.columns) == STEP_COLUMNS
    walls = bundle.steps[bundle.steps.op == "wall"]
    assert set(walls.policy) == set(ALL_POLICIES) and (walls.seconds > 0).all()
    assert set(bundle.steps.phase) == {"prefill", "decode"}
    flexgen = bundle.steps[(bundle.steps.policy == "flexgen") & (bundle.steps.phase == "decode")
                           & (bundle.steps.layer >= 0)]
    assert (flexgen.fetched_tokens == flexgen.context_len).all()  # flexgen fetches every cached row
    meta = bundle.meta
    assert meta["schema_version"] == SCHEMA_VERSION == 2 and meta["device"]["type"] == "cpu"
    assert meta["transfers"]["memory"] == ["pageable"] and meta["transfers"]["pinned"].startswith("not measured")
    assert meta["repeats"] == {"timed": 5, "warmup": 1, "summary": "median, p10, p90"}
    assert meta["settings"]["threads"] == 1  # the CPU default: one intra-op thread
    assert meta["kernels"]["last_level_cache_bytes"] > 0 and meta["kernels"]["layers_cycled"]["tiny-opt"] >= 1
    assert meta["steps"]["source"].startswith("profiler.runtime") and "completed_utc" in meta
    assert meta["steps"]["grid"]["repeats"] >= 3 and meta["steps"]["grid"]["gen_len"] > 4
    gathered = bundle.transfers[bundle.transfers.layout.str.startswith("gathered")]
    assert set(gathered.layout) == {"gathered", "gathered.gather", "gathered.copy", "gathered_batch",
                                    "gathered_batch.gather", "gathered_batch.copy"}
    assert (gathered.rows * gathered.row_bytes == gathered.nbytes).all()
    assert {10240, 1024} <= set(gathered.row_bytes)  # opt-13b fp16 row and tiny-opt's fp32 row
    assert {256, 1024, 8192} <= set(gathered[gathered.layout == "gathered.gather"].row_bytes)  # by row size
    h2h = bundle.transfers[bundle.transfers.direction == "h2h"]
    assert set(h2h.layout) == {"contiguous"} and set(h2h.memory) == {"pageable"} and (h2h.gbps > 0).all()
    h2d = bundle.transfers[(bundle.transfers.direction == "h2d") & (bundle.transfers.layout == "contiguous")]
    assert set(h2h.nbytes) == set(h2d.nbytes)  # the same octave sizes as the link copies
    host = bundle.host.set_index("op")
    assert set(host.index) == {"dispatch", "sync"} and (host.device == "cpu").all()
    assert (host.median_us > 0).all() and (host.p10_us <= host.median_us).all() and (host.repeats >= 5).all()
    assert meta["runtime"] == "infinigen-sim" and load_runtime(meta["runtime"]).name == "infinigen-sim"
    printed = collection.format_summary(collect.resolve(collect.parse_args([*QUICK, "--out", str(quick_bundle)])))
    assert "h2d pageable contiguous peak" in printed and "% of ceiling" in printed
    assert "h2h pageable host memcpy peak" in printed
    assert "gathered 1024x10240 B" in printed and "attention  b4" in printed and "copy-worker handoff" in printed
    assert "tiny-opt/infinigen/b2/p128/g12" in printed and "tok/s" in printed
    op_lines = {line.split()[1]: line for line in printed.splitlines() if line.startswith("  tiny-opt     ")}
    assert "GB/s" in op_lines["attention"] and "GB/s" in op_lines["ffn"] and "GB/s" not in op_lines["span"]


def test_other_schema_version_is_a_clear_error(quick_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "old"
    shutil.copytree(quick_bundle, copy)
    meta = yaml.safe_load((copy / "meta.yaml").read_text())
    (copy / "meta.yaml").write_text(yaml.safe_dump({**meta, "schema_version": 0}))
    with pytest.raises(BundleError, match=r"meta\.yaml: key 'schema_version': expected 2, got 0"):
        read_bundle(copy)
    result = run_cli(*QUICK, "--out", str(copy), "--resume")
    assert result.returncode == 2 and "schema_version" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def tear_last_row(path: Path, drop_rows: int = 0) -> set:
    """Drop `drop_rows` complete rows and cut the new last row in half, as a kill mid-write would."""
    lines = path.read_text().splitlines(keepends=True)
    lines = lines[: len(lines) - drop_rows]
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    return set(lines[1:-1])  # the complete rows that must survive


def test_resume_after_kill_loses_and_duplicates_nothing(quick_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "profiler.collect", *QUICK, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    transfers = out / "transfers.csv"
    deadline = time.monotonic() + 50
    while time.monotonic() < deadline and proc.poll() is None:
        if transfers.exists() and transfers.read_text().count("\n") >= 60:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "kernels.csv").exists(), "killed too late: the transfer sweep had finished"
    survivors = tear_last_row(transfers)
    assert collect.main([*QUICK, "--out", str(out), "--resume"]) == 0
    read_bundle(out)  # raises on a duplicate key
    assert bundle_keys(out) == bundle_keys(quick_bundle)
    assert survivors <= set(transfers.read_text().splitlines(keepends=True))
    assert "resumed_utc" in yaml.safe_load((out / "meta.yaml").read_text())


def test_resume_completes_torn_kernel_and_step_tables(quick_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "torn"
    shutil.copytree(quick_bundle, out)
    survivors = {name: tear_last_row(out / name, drop_rows=10) for name in ("kernels.csv", "steps.csv")}
    before = (out / "transfers.csv").read_text()
    assert collect.main([*QUICK, "--out", str(out), "--resume"]) == 0
    read_bundle(out)
    assert bundle_keys(out) == bundle_keys(quick_bundle)
    for name, rows in survivors.items():
        assert rows <= set((out / name).read_text().splitlines(keepends=True))
    assert (out / "transfers.csv").read_text() == before  # nothing re-measured there


def test_non_empty_out_needs_resume(quick_bundle: Path, capsys) -> None:
    assert collect.main([*QUICK, "--out", str(quick_bundle)]) == 2
    err = capsys.readouterr().err
    assert "not empty; pass --resume" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--models", "opt-14b"], "unknown model 'opt-14b'"),
    (["--policies", "lru"], "unknown policy 'lru'"),
    (["--repeats", "3"], "argument --repeats: expected a whole number >= 5, got '3'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--threads", "0"], "argument --threads: expected a whole number >= 1, got '0'"),
    (["--fetch-only"], "--fetch-only needs --fetch-model"),
])
def test_bad_values_fail_in_one_line(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert collect.main(["--device", "cpu", *argv, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_bad_flag_from_the_shell_is_one_line() -> None:
    result = run_cli("--device", "cpu", "--bogus")
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_meta_without_nvml(monkeypatch) -> None:
    import pynvml

    def missing() -> None:
        raise pynvml.NVMLError_LibraryNotFound(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", missing)
    meta = host.collect_meta(torch.device("cpu"), {})
    assert meta["gpu"]["nvml"] == "unavailable (NVMLError_LibraryNotFound)"
    assert all(meta["gpu"][key] == "unavailable (NVMLError_LibraryNotFound)" for key in host.NVML_FIELDS)
    assert meta["host"]["logical_cores"] >= 1 and meta["device"]["name"].startswith("cpu: ")
    yaml.safe_dump(meta)  # plain types only
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not even installed
    assert host.gpu_facts()["pcie_gen_max"].startswith("unavailable (")


def test_meta_with_nvml_reads_every_field(monkeypatch) -> None:
    """A stand-in NVML: every field read; one unsupported query says so instead of raising."""
    class NotSupported(Exception):
        pass

    def unsupported(*_: object) -> None:
        raise NotSupported

    fake = types.SimpleNamespace(
        NVML_CLOCK_SM=0, NVML_CLOCK_MEM=1, nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}", nvmlDeviceGetHandleByUUID=unsupported,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 PCIe", nvmlSystemGetDriverVersion=lambda: "550.54",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=80 * 2**30),
        nvmlSystemGetCudaDriverVersion=lambda: 12040, nvmlDeviceGetCurrPcieLinkGeneration=lambda h: 5,
        nvmlDeviceGetMaxPcieLinkGeneration=lambda h: 5, nvmlDeviceGetCurrPcieLinkWidth=lambda h: 16,
        nvmlDeviceGetMaxPcieLinkWidth=lambda h: 16, nvmlDeviceGetClockInfo=lambda h, c: 1755,
        nvmlDeviceGetMaxClockInfo=unsupported)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    facts = host.gpu_facts()
    assert facts["nvml"] == "ok" and facts["name"] == "NVIDIA H100 PCIe" and facts["memory_gib"] == 80
    assert facts["pcie_gen_current"] == 5 and facts["pcie_width_max"] == 16
    assert facts["sm_clock_max_mhz"] == "unavailable (NotSupported)"


def test_oom_is_recorded_and_the_sweep_goes_on(monkeypatch) -> None:
    grid = GRIDS[("cpu", True)]
    bench = KernelBench(torch.device("cpu"), {"tiny-opt": get_model("tiny-opt")}, grid, repeats=5, warmup=1, seed=0)
    task = next(t for t in kernel_tasks([get_model("tiny-opt")], "float32", grid) if t.kernel_pass == "cache")
    real_build = bench.build

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory")

    def attention_ooms(t):
        def broken(b):
            p = b.build()
            return replace(p, entries=[replace(e, call=oom) if e.op == "attention" else e for e in p.entries])
        return [replace(b, build=lambda b=b: broken(b)) for b in real_build(t)]

    monkeypatch.setattr(bench, "build", attention_ooms)
    status = {row["op"]: row["status"] for row in bench.measure(task)}
    assert status.pop("attention") == "oom" and set(status.values()) == {"ok"}
    # a pass that cannot even be built loses its own ops only
    monkeypatch.setattr(bench, "build", lambda t: [replace(b, build=oom) if Op.SCORE in b.ops else b
                                                   for b in real_build(t)])
    status = {row["op"]: row["status"] for row in bench.measure(task)}
    assert status.pop("score") == "oom" and set(status.values()) == {"ok"}
    monkeypatch.setattr(bench, "build", lambda t: [replace(b, build=oom) for b in real_build(t)])
    assert {row["status"] for row in bench.measure(task)} == {"oom"}
    def bug():
        raise ValueError("a bug")

    monkeypatch.setattr(bench, "build", lambda t: [replace(b, build=bug) for b in real_build(t)])
    with pytest.raises(ValueError):
        bench.measure(task)


def test_decode_ops_cycle_every_layer_of_the_model() -> None:
    """Token ops run on every layer of a full copy of a small model, each sample one (pass, layer)."""
    grid = GRIDS[("cpu", True)]
    bench = KernelBench(torch.device("cpu"), {"tiny-opt": get_model("tiny-opt")}, grid, repeats=5, warmup=1, seed=0)
    assert bench.layers(get_model("tiny-opt")) == get_model("tiny-opt").n_layers  # 12 MiB of weights < 4 x LLC
    assert kernels.cold_layers(40, 600 << 20, 32 << 20) == 2 and kernels.cold_layers(8, 1 << 20, 32 << 20) == 8
    task = next(t for t in kernel_tasks([get_model("tiny-opt")], "float32", grid) if t.kernel_pass == "decode")
    rows = {row["op"]: row for row in bench.measure(task)}
    assert rows["ffn"]["repeats"] == 5 * 4 and rows["norm"]["repeats"] == 5 * (2 * 4 + 1)
    assert rows["embed"]["repeats"] == 5 and rows["span"]["repeats"] == 5 * 4


@pytest.mark.parametrize("pattern", ["gathered", "gathered_batch"])
def test_gather_copies_distinct_rows_of_each_sequence(pattern: str) -> None:
    """The staging buffer holds the chosen pool rows (batch-strided: equally many from each sequence)."""
    sweep = TransferSweep(max_bytes=1 << 20, memories=("pageable",), row_bytes=(1024,))
    bench = TransferBench(torch.device("cpu"), sweep, repeats=5, warmup=1, generator=torch.Generator().manual_seed(0))
    pool, staging = bench._buffers("pageable")
    table = pool.view(torch.float32).view(-1, 256)
    table[:, 0] = torch.arange(table.shape[0], dtype=torch.float32)  # each row carries its number
    point = TransferPoint("h2d", "pageable", pattern, False, 64 * 1024, 1024)
    gather, copy = bench._stages(point)
    gather()
    copy()
    chosen = staging[: point.nbytes].view(torch.float32).view(64, 256)[:, 0].long()
    assert len(set(chosen.tolist())) == 64 and torch.equal(bench._dev[: point.nbytes], staging[: point.nbytes])
    if pattern == "gathered_batch":
        seq_rows = table.shape[0] // 8
        assert torch.bincount(chosen // seq_rows, minlength=8).tolist() == [8] * 8
    row = bench.measure(point)
    assert [r["layout"] for r in row] == [pattern, f"{pattern}.gather", f"{pattern}.copy"]
    bench.close()



def test_each_pass_times_the_ops_spec_ops_gives_it() -> None:
    """The kernel passes and the kernels.csv points agree with spec.ops: one `ffn` entry per layer for the
    output projection and the MLP together, no `o_proj`."""
    model = build_model(get_model("tiny-opt"))
    with torch.inference_mode():
        passes = {"decode": [decode_pass(model, 2, 16, 0)],
                  "cache": [b.build() for b in cache_pass(model, 2, 2, 16, 0)],
                  "prefill": [prefill_pass(model, 2, 16, 0)]}
        assert [set(b.ops) for b in cache_pass(model, 2, 2, 16, 0)] == [
            {op for entry in p.entries for op in entry.ops} for p in passes["cache"]]
    for name, built in passes.items():
        timed = {op for p in built for entry in p.entries for op in entry.ops}
        assert timed == set(ops_in_pass(name)), name
    decode = passes["decode"][0].entries
    assert [e.layer for e in decode if e.op == Op.FFN] == list(range(len(model.layers)))
    grid = GRIDS[("cpu", True)]
    by_pass = {t.kernel_pass: {p.op for p in t.points} for t in kernel_tasks([get_model("tiny-opt")], "float32", grid)}
    assert by_pass == {name: set(ops_in_pass(name)) for name in passes}
    dequantize = next(p for t in kernel_tasks([get_model("tiny-opt")], "float32", grid) if t.kernel_pass == "cache"
                      for p in t.points if p.op == Op.DEQUANTIZE)
    assert (dequantize.n_tokens, dequantize.kv_len) == (grid.kv_lens[0], 0)  # the fetched rows converted


def test_help_shows_every_default_and_unit(capsys) -> None:
    assert collect.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--out DIR bundle folder to write (default: profile_bundle)" in text
    assert "[calls]" in text and "[tokens]" in text and "(default: ideal,flexgen,int4,h2o,infinigen)" in text


@pytest.mark.parametrize("argv, message", [
    (["--out", "/proc/x"], "--out /proc/x: cannot write in /proc"),
    (["--out", "/proc/x", "--quick"], "--out /proc/x: cannot write in /proc"),
    (["--fetch-model", "smollm2-135m", "--fetch-only", "--fetch-contexts", "100000"],
     "--fetch-contexts: 100000 exceeds smollm2-135m's max_positions 8192"),
    (["--fetch-model", "smollm2-135m", "--fetch-text", "/nonexistent.txt"], "--fetch-text /nonexistent.txt: no such"),
    (["--fetch-alphas", "-1", "--fetch-model", "smollm2-135m"], "argument --fetch-alphas: expected a comma list"),
])
def test_bad_input_stops_before_any_work(argv: list[str], message: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(collect, "collect", None)  # reaching the collection would be a TypeError, not exit 2
    out = [] if "--out" in argv else ["--out", str(tmp_path / "b")]
    assert collect.main(["--device", "cpu", *argv, *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "b").exists()


def test_cpu_op_sweep_is_dealt_over_the_rounds_of_the_runs(tmp_path: Path, monkeypatch) -> None:
    """On CPU a model's kernel passes run in shares right before each round of its end-to-end runs (a
    drifting shared box: the ops and the runs sample the same spells), every timed pass accounted for."""
    plan = replace(collect.resolve(collect.parse_args([*QUICK, "--out", str(tmp_path / "b")])), repeats=3)
    plan = replace(plan, kernel_grid=kernels.KernelGrid((2,), (16,), (16,), 64), policies=("ideal", "flexgen"),
                   step_grid=steps.StepGrid((2,), (16,), 3, 2))
    plan.out.mkdir()
    events: list[str] = []
    run_round, generate = kernels.KernelRounds.run_round, steps.Engine.generate
    passes: list[int] = []

    def spy_round(self, r, on_task=lambda task: None):
        events.append(f"ops{r}")
        passes.append(self.passes(r))
        return run_round(self, r, on_task)

    def spy_generate(self, *args, **kw):
        events.append("run")
        return generate(self, *args, **kw)

    monkeypatch.setattr(kernels.KernelRounds, "run_round", spy_round)
    monkeypatch.setattr(steps.Engine, "generate", spy_generate)
    with collection.tqdm(disable=True) as bar:
        collection.run_model(plan, bar)
    assert events == ["run", "run", "ops0", "run", "run", "ops1", "run", "run"]  # warm-ups, then rounds
    assert passes == [2, 1]  # 3 timed passes dealt over 2 rounds
    rows = pd.read_csv(plan.out / "kernels.csv")
    expected = {p.key() for p in kernel_points(list(plan.models), "float32", plan.kernel_grid)}
    assert done_keys(plan.out / "kernels.csv", KERNEL_KEY) == expected
    n_layers = KernelBench(plan.device, {"tiny-opt": get_model("tiny-opt")}, plan.kernel_grid, 3, 1, 0).layers(
        get_model("tiny-opt"))
    attention = rows[(rows.op == "attention") & (rows.n_tokens == 1)]
    assert set(attention.repeats) == {3 * n_layers}  # every round's passes in the one row
