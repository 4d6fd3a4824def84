"""The voco_lib import graph has no cycle, counting imports inside functions too.

A lazy import inside a function hides a cycle from Python but not from the reader: two modules that need
each other are one concept split in two, or share a piece that belongs below both. So every `import` in
every voco_lib file counts, wherever it sits.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "voco_lib"


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (module- and function-level, relative ones resolved)."""
    files = {_module_name(p, package): p for p in sorted(package.rglob("*.py"))}

    def owner(name: str) -> str | None:  # `voco_lib.data.fetch.fetch_file` -> `voco_lib.data.fetch`
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        parent = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(owner(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = parent.split(".")[: len(parent.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from voco_lib.data import fetch` imports the submodule; `from x import name` the module x
                targets.update(owner(f"{base}.{a.name}") if f"{base}.{a.name}" in files else owner(base)
                               for a in node.names)
        graph[mod] = {t for t in targets if t is not None and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\nfrom pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import thing\n    import pkg.sub.c\n")
    (pkg / "sub" / "c.py").write_text("from . import b\n")
    g = import_graph(pkg)
    assert g == {"pkg": set(), "pkg.sub": set(), "pkg.a": {"pkg.sub.b"}, "pkg.sub.b": {"pkg.a", "pkg.sub.c"},
                 "pkg.sub.c": {"pkg.sub.b"}}
    assert cycles(g) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]


def test_no_import_cycle():
    g = import_graph()
    found = cycles(g)
    report = "\n".join(
        " <-> ".join(comp) + "\n    " + "\n    ".join(f"{m} imports {sorted(g[m] & set(comp))}" for m in comp)
        for comp in found)
    assert not found, f"import cycles in voco_lib (move the shared piece below both modules):\n{report}"
