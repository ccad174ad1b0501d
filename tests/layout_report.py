"""What the engine's layout promises, counted from the source: ``python -m tests.layout_report``.

- places that compare a family name (``family == "mmdit"``, ``!= "wan"``): the families are described once, in
  ``engine/backbones/families.py``, and dispatched once, in ``engine/backbones/registry.py``;
- hand-written block loops (a ``for`` over a model's transformer blocks that runs them), per backbone folder and in
  the stream driver;
- import circles between modules (``tests/test_import_graph.py``).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("engine", "server", "export", "benchmarks", "mvgen")
_FAMILY_COMPARE = re.compile(r"""(==|!=)\s*["'](wan|mmdit)["']|["'](wan|mmdit)["']\s*(==|!=)|\bfamily\s*(==|!=)""")
# a block loop: a ``for`` whose body runs a transformer block (the Wan block's attention inputs or its finish, the
# MMDiT's ``_block``); the per-layer K/V comprehensions of a cache run no block and are not counted
_BLOCK_CALLS = {"_block", "self_attention_stream", "finish"}


def family_comparisons() -> list[str]:
    return [f"{path.relative_to(ROOT)}:{n}" for folder in SOURCES for path in sorted((ROOT / folder).rglob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if _FAMILY_COMPARE.search(line.split("#")[0])]


def block_loops() -> dict[str, list[str]]:
    """``{folder: ["file:line", ...]}`` of block loops in each backbone folder and the stream driver."""
    found: dict[str, list[str]] = {}
    for folder in sorted((ROOT / "engine" / "backbones").iterdir()) + [ROOT / "engine" / "streams"]:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.For) and any(
                        isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                        and call.func.attr in _BLOCK_CALLS for stmt in node.body for call in ast.walk(stmt)):
                    found.setdefault(folder.name, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


if __name__ == "__main__":
    from tests.test_import_graph import find_cycle, module_edges

    compares = family_comparisons()
    print(f"family-name comparisons: {len(compares)}" + "".join(f"\n  {where}" for where in compares))
    for folder, where in block_loops().items():
        print(f"block loops in {folder}: {len(where)}" + "".join(f"\n  {w}" for w in where))
    print(f"module import circles: {find_cycle(module_edges()) or 'none'}")
