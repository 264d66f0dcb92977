"""The architecture as the tree shows it: floors that import only downward, no import cycle, files under
400 lines, the profiler on the shared floor only, and a non-editable wheel that finds its shipped YAML."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("infinigen_sim", "profiler")
MAX_LINES = 400
# (module prefix, floor): the longest matching prefix decides; a module imports only its floor or below
FLOORS = [
    ("infinigen_sim.spec", 0), ("infinigen_sim.cost", 1), ("infinigen_sim.sim", 2), ("infinigen_sim.sweep", 3),
    ("infinigen_sim.analysis", 4), ("infinigen_sim.plan", 5), ("infinigen_sim.report", 5),
    ("infinigen_sim.validate", 5), ("infinigen_sim.sweep.__main__", 5),
    ("profiler.runtime", 1), ("profiler.weights", 2), ("profiler.bench", 3), ("profiler.studies", 3),
    ("profiler.collect", 4), ("profiler.run", 4), ("profiler.accuracy", 4), ("profiler.skew_stats", 4),
]
SHARED = "infinigen_sim.spec"  # all the profiler may take from the model world


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path) -> set[str]:
    """Every project module `name` imports (at the top or inside functions), as a module name."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    known = modules()
    return {m for m in found if m in known and m != name}


def floor(name: str) -> int | None:
    matches = [(len(prefix), level) for prefix, level in FLOORS if name == prefix or name.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


def test_no_file_is_over_400_lines():
    lines = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in modules().values()}
    long = {path: n for path, n in lines.items() if n > MAX_LINES}
    assert not long, long


def test_every_module_sits_on_a_floor():
    assert [name for name in modules() if floor(name) is None and name not in PACKAGES] == []


def test_imports_only_go_down():
    upward = []
    for name, path in modules().items():
        mine = floor(name)
        for target in imports_of(name, path):
            same_world = target.split(".")[0] == name.split(".")[0]
            theirs = floor(target)
            if same_world and mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{name} (floor {mine}) imports {target} (floor {theirs})")
    assert not upward, "\n".join(upward)


def test_the_profiler_takes_only_the_shared_floor():
    reached = {f"{name} imports {target}" for name, path in modules().items() if name.startswith("profiler")
               for target in imports_of(name, path)
               if target.startswith("infinigen_sim") and not (target == SHARED or target.startswith(SHARED + "."))
               and target != "infinigen_sim"}
    assert not reached, reached


def test_there_is_no_import_cycle():
    graph = {name: imports_of(name, path) for name, path in modules().items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle.extend(stack[stack.index(target):] + [target] if target in stack else [node, target])
                return True
            if target not in state and visit(target, [*stack, target]):
                return True
        state[node] = 2
        return False

    for name in sorted(graph):
        if name not in state and visit(name, [name]):
            break
    assert not cycle, " -> ".join(cycle)


def test_the_simulator_imports_neither_torch_nor_nvml():
    """A planner box needs no GPU stack: `pip install infinigen-sim` without the profiler extra runs sweeps."""
    heavy = {f"{name} imports {target}" for name, path in modules().items() if name.startswith("infinigen_sim")
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, (ast.Import, ast.ImportFrom))
             for target in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
             if target.split(".")[0] in ("torch", "pynvml", "scipy")}
    assert not heavy, heavy


def test_a_non_editable_wheel_runs_the_main_job_from_another_folder(tmp_path):
    """pip install of the built wheel (not editable) finds the shipped hardware configs and runtime
    descriptions by name and writes
    the same results.csv as this checkout. The wheel's dependencies come from this test's interpreter
    (PYTHONPATH), so nothing is downloaded; the package itself must come from the wheel."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, timeout=240)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    target = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            check=True, capture_output=True, text=True).stdout.strip()
    wheel = next(wheels.glob("infinigen_sim-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, str(wheel)],
                   check=True, capture_output=True, timeout=240)
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import infinigen_sim; print(infinigen_sim.__file__)"], cwd=elsewhere,
                           env=env, check=True, capture_output=True, text=True).stdout
    assert where.startswith(target), where
    for out, cwd in ((elsewhere / "out", elsewhere), (tmp_path / "here", ROOT)):
        runner = python if cwd == elsewhere else Path(sys.executable)
        result = subprocess.run([str(runner), "-m", "infinigen_sim.sweep", "a100_pcie4", "--models", "opt-13b",
                                 "--runtime", "infinigen-sim,infinigen-artifact", "--out", str(out)], cwd=cwd,
                                env=env if cwd == elsewhere else None,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    assert (elsewhere / "out" / "results.csv").read_bytes() == (tmp_path / "here" / "results.csv").read_bytes()


def test_the_texts_ship_with_the_package():
    """The studies' texts are inside the repository (and the wheel): nothing reads ../shared."""
    from profiler.bench import fetch
    from profiler.weights.texts import PG19_TEXT, SHAKESPEARE_TEXT

    for text in (PG19_TEXT, SHAKESPEARE_TEXT):
        assert text.is_file() and text.is_relative_to(ROOT / "profiler") and text.stat().st_size > 10_000
    assert fetch.DEFAULT_TEXT == SHAKESPEARE_TEXT
    assert not [p for p in modules().values() if "shared/" in p.read_text()]
