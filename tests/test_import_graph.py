"""The package layering, read from the source: kernels <- engine <- {export, server} <- benchmarks; mvgen on top.

Every import of every module counts, including the ones inside functions (those are how optional or heavy
dependencies are deferred, and a deferred upward import is still a cycle) and ``importlib.import_module``
calls with a constant name.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what each package may import besides itself
ALLOWED = {
    "kernels": set(),
    "engine": {"kernels"},
    "export": {"engine", "kernels"},
    "server": {"engine", "kernels"},
    "benchmarks": {"kernels", "engine", "export", "server"},
    "mvgen": {"kernels", "engine", "export", "server", "benchmarks"},
}
PACKAGES = tuple(ALLOWED)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            if node.module:
                found.append((node.lineno, ".".join(base + [node.module])))
            else:  # ``from . import x``: the names are modules of the package
                found += [(node.lineno, ".".join(base + [alias.name])) for alias in node.names]
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.append((node.lineno, node.args[0].value))
    return found


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
        (isinstance(func, ast.Name) and func.id == "import_module")


def package_edges(packages=PACKAGES) -> dict[tuple[str, str], list[str]]:
    """``{(importer, imported): ["file:line", ...]}`` between distinct project packages."""
    edges: dict[tuple[str, str], list[str]] = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module in imported_modules(path):
                target = module.split(".")[0]
                if target in packages and target != package:
                    edges.setdefault((package, target), []).append(f"{path.relative_to(ROOT)}:{line}")
    return edges


def module_edges(packages=PACKAGES) -> dict[tuple[str, str], list[str]]:
    """``{(importer, imported): ["file:line", ...]}`` between distinct modules of the project (an import of a
    name inside a module counts as an import of that module; a package's ``__init__`` is the package)."""
    modules = {_module_name(p): p for package in packages for p in sorted((ROOT / package).rglob("*.py"))}
    edges: dict[tuple[str, str], list[str]] = {}
    for name, path in modules.items():
        for line, module in imported_modules(path):
            while module and module not in modules:
                module = module.rpartition(".")[0]
            if module and module != name and not name.startswith(module + "."):
                edges.setdefault((name, module), []).append(f"{path.relative_to(ROOT)}:{line}")
    return edges


def find_cycle(edges) -> list[str] | None:
    """One cycle of the package graph as a path ``[a, b, ..., a]``, or None."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    state: dict[str, str] = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, trail + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def layering_violations(edges) -> list[str]:
    return [f"{a} imports {b} ({', '.join(where)})" for (a, b), where in sorted(edges.items())
            if b not in ALLOWED[a]]


def test_every_package_exists_and_is_parsed():
    for package in PACKAGES:
        assert (ROOT / package / "__init__.py").is_file(), package


def test_packages_import_only_downwards():
    assert layering_violations(package_edges()) == []


def test_export_and_server_do_not_import_each_other():
    edges = package_edges()
    assert ("export", "server") not in edges and ("server", "export") not in edges


def test_the_package_graph_has_no_cycle():
    assert find_cycle(package_edges()) is None


def test_no_module_imports_itself_back():
    """No circle between the modules of a package either (deferred imports count: a circle is a circle), e.g.
    ``components -> mmdit_components -> components``. An import of a package's ``__init__`` from inside the
    package does not count (it is where the package starts)."""
    assert find_cycle(module_edges()) is None


def test_the_check_sees_an_upward_import_inside_a_function(tmp_path, monkeypatch):
    """A deferred ``import server`` in an export module is caught, and so is the cycle it would close."""
    fake = tmp_path / "export"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("def f():\n    import server.repository\n    from .ok import x\n")
    server = tmp_path / "server"
    server.mkdir()
    (server / "__init__.py").write_text("from export import bad\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    edges = package_edges(("export", "server"))
    assert edges[("export", "server")] == ["export/bad.py:2"]
    assert layering_violations(edges) == ["export imports server (export/bad.py:2)",
                                          "server imports export (server/__init__.py:1)"]
    assert find_cycle(edges) in (["export", "server", "export"], ["server", "export", "server"])


@pytest.mark.parametrize("source, expected", [
    ("from . import protocol", "server.protocol"),
    ("from .client import x", "server.client"),
    ("from .. import engine", "engine"),
    ("import importlib\nimportlib.import_module('export.cli')", "export.cli"),
])
def test_relative_imports_are_resolved(tmp_path, monkeypatch, source, expected):
    (tmp_path / "server").mkdir()
    path = tmp_path / "server" / "mod.py"
    path.write_text(source + "\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert expected in [module for _, module in imported_modules(path)]
