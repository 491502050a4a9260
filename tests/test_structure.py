"""The package's imports run one way: down the layer order the README states, never in a circle.

Every import counts, function-level ones included: a deferred import that runs up the layers is
still a dependency (it only moves the failure to run time).
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "specmemo"


def stated_layers(readme: str) -> list[list[str]]:
    """The README's "Layers, lowest first:" line: groups separated by →, peers by commas."""
    line = next((ln for ln in readme.splitlines() if ln.startswith("Layers, lowest first:")), None)
    assert line is not None, "README.md states no layer order (a line starting 'Layers, lowest first:')"
    groups = line.split(":", 1)[1].strip().rstrip(".").split("→")
    return [[name.strip(" `") for name in group.split(",")] for group in groups]


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path, known: set[str]) -> dict[str, int]:
    """specmemo modules `path` imports (at any depth of its code) -> the first line that does."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in known and name != module_name(path, root):
                found.setdefault(name, node.lineno)
    return found


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    known = set(files)
    return {mod: imports_of(p, root, known) for mod, p in files.items()}


def unit_of(module: str, layers: list[list[str]]) -> tuple[int, str]:
    """(layer index, unit) of a module: the longest stated name it is or lies under."""
    best = None
    for i, group in enumerate(layers):
        for unit in group:
            full = f"specmemo.{unit}" if unit != "specmemo" else unit
            if (module == full or module.startswith(full + ".")) and (best is None or len(full) > len(best[1])):
                best = (i, full)
    assert best is not None, f"{module} lies in no layer the README states"
    return best


def violations(graph: dict[str, dict[str, int]], layers: list[list[str]]) -> list[str]:
    """Imports that run up the layers or across peers of one layer (units stated side by side)."""
    out = []
    for mod, deps in graph.items():
        layer, unit = unit_of(mod, layers)
        for dep, line in deps.items():
            dep_layer, dep_unit = unit_of(dep, layers)
            if dep_layer > layer or (dep_layer == layer and dep_unit != unit):
                out.append(f"{mod}:{line} imports {dep} ({'up' if dep_layer > layer else 'across'} the layers)")
    return sorted(out)


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_imports_run_down_the_layers_the_readme_states():
    layers = stated_layers((ROOT / "README.md").read_text())
    graph = import_graph(PACKAGE)
    assert violations(graph, layers) == []
    assert cycles(graph) == []


def test_the_budget_imports_nothing_of_torch_or_above_it():
    layers = stated_layers((ROOT / "README.md").read_text())
    budget = [p for p in (PACKAGE / "budget").rglob("*.py")]
    for path in budget:
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(torch|transformers)\b", text, re.M), path
    below = {u for group in layers[: next(i for i, g in enumerate(layers) if "budget" in g) + 1] for u in group}
    graph = import_graph(PACKAGE)
    for mod, deps in graph.items():
        if mod.startswith("specmemo.budget"):
            assert all(unit_of(d, layers)[1].removeprefix("specmemo.") in below for d in deps), (mod, deps)


@pytest.mark.parametrize("bad", ["up", "circle"])
def test_the_walker_catches_an_upward_import_and_a_circle(tmp_path, bad):
    """The checks above fail when they should: a copy of the package with one bad import added."""
    import shutil

    copy = tmp_path / "specmemo"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.safetensors"))
    layers = stated_layers((ROOT / "README.md").read_text())
    target = copy / "budget" / "units.py"
    if bad == "up":   # the budget reaching into the models, inside a function as the old code did
        target.write_text(target.read_text() + "\n\ndef _late():\n    from specmemo.models.resolve import resolve\n")
        graph = import_graph(copy)
        assert any(v.startswith("specmemo.budget.units:") and "specmemo.models.resolve" in v
                   for v in violations(graph, layers))
    else:             # two budget modules importing each other: no layer is crossed, still a circle
        target.write_text(target.read_text() + "\n\ndef _late():\n    from specmemo.budget.fit import fit\n")
        graph = import_graph(copy)
        assert violations(graph, layers) == []
        assert any("specmemo.budget.units" in c and "specmemo.budget.fit" in c for c in cycles(graph))


def test_the_readme_figures_are_what_the_bench_results_give():
    """README's figures table and docs/performance.md are generated from bench/results/*.json."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "bench" / "figures.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
