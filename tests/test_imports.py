"""Import graphs: no module of train/ or precompute/ imports one that imports it back; the cache's reader side
never imports the writer side; the trainer never imports `datasets`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The cache format as readers see it: these modules may import each other, never the writer side.
READER_SIDE = {"precompute.npy", "precompute.format", "precompute.reader", "precompute.shard_index",
               "precompute.catalog", "precompute.jsonrecord", "precompute.ustar"}


def imported_modules(path: Path, modules: set[str], package: str) -> set[str]:
    """Modules of the package that `path` imports anywhere (function-local imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (package + ("." + node.module if node.module else "")) if node.level else (node.module or "")
            # `from . import x` / `from train import x` name modules; `from .x import y` names module x
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found - {package}  # the package's own __init__ imports nothing of it


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports (top level or inside functions)."""
    paths = {f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    return {name: imported_modules(path, set(paths), package) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None (depth-first search)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for child in sorted(graph.get(node, ())):
            cycle = visit(child)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_of_train_imports_one_that_imports_it_back():
    graph = import_graph("train")
    assert graph["train.decoder"] and graph["train.loop"]  # the parser sees relative imports
    assert "train.decoder_validation" in graph["train.decoder"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_precompute_has_no_cycle_and_its_reader_side_never_imports_the_writer_side():
    graph = import_graph("precompute")
    assert "precompute.writer" in graph["precompute.main"] and "precompute.format" in graph["precompute.reader"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
    for module in READER_SIDE:
        assert graph[module] <= READER_SIDE, f"{module} imports {sorted(graph[module] - READER_SIDE)}"


@pytest.mark.slow  # a subprocess
def test_the_trainer_does_not_import_datasets():
    """`datasets` (hundreds of ms, and only precompute's inputs need it) stays out of `python -m train`."""
    code = ("import sys, train.loop, train.__main__; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'datasets'))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
