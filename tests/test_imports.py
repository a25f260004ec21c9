"""The package's import graph, read from the source with ast (no imports run): the command line is a leaf that only
`__main__` imports, and the CLI, demo and bench share model loading without import circles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "attnlab"
NOT_PACKAGE = {".venv", "tests", "out", "build", "dist", ".git"}


def _module_files() -> dict[str, Path]:
    files = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in NOT_PACKAGE or rel.parts[0].endswith(".egg-info"):
            continue
        parts = [PACKAGE, *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


MODULES = _module_files()


def _imports(name: str, path: Path) -> set[str]:
    """The package modules `name` imports anywhere in its source (lazy imports in functions too)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import attnlab.x.y` of a name inside a module
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE + ".") or target == PACKAGE:
                found.add(target)
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _reachable(start: str) -> set[str]:
    seen, todo = set(), list(GRAPH.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += GRAPH.get(node, ())
    return seen


def test_the_graph_is_read():
    assert "attnlab.cli" in MODULES and "attnlab.demo.runs" in MODULES and "attnlab.toyworld.bench" in MODULES
    assert "attnlab.loading" in GRAPH["attnlab.demo.runs"] and "attnlab.loading" in GRAPH["attnlab.toyworld.bench"]
    assert "attnlab.cli" in GRAPH["attnlab.__main__"]


def test_only_main_imports_the_cli():
    importers = sorted(name for name, targets in GRAPH.items() if "attnlab.cli" in targets)
    assert importers == ["attnlab.__main__"]


@pytest.mark.parametrize("module", ["attnlab.cli", "attnlab.demo", "attnlab.demo.app", "attnlab.demo.runs",
                                    "attnlab.toyworld.bench", "attnlab.loading", "attnlab.arguments",
                                    "attnlab.user_errors", "attnlab.images"])
def test_no_import_circle_through(module):
    assert module in MODULES
    assert module not in _reachable(module), f"{module} imports itself back through {sorted(_reachable(module))}"


@pytest.mark.parametrize("module", ["attnlab.demo.runs", "attnlab.demo.app", "attnlab.toyworld.bench",
                                    "attnlab.loading"])
def test_demo_bench_and_loading_never_reach_the_cli(module):
    assert "attnlab.cli" not in _reachable(module)
