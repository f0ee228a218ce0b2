"""The package's import graph has no cycles, and nothing inside the package imports the front door.

DESIGN: dependencies point down; "where two files need each other, the shared piece moves down".
The graph is read with ``ast`` from every file of ``jaxsparse/``, counting every import statement
wherever it is (inside functions too: a lazy import is still a dependency), so a circle cannot come
back unnoticed. Imports made with ``importlib`` by name (the method registry, the CLI's verbs, the
front door's lazy table) are not statements and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxsparse"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``root`` (a package is its ``__init__``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_names(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """``(target module, name imported from it or None, line)`` for every import of the package in ``path``.

    ``from a.b import c`` targets the submodule ``a.b.c`` when there is one (name None), else
    ``a.b`` with name ``c``; relative imports are resolved against ``module``.
    """
    top = module.split(".")[0]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == top]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != top:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, None, node.lineno) if sub in modules else (base, alias.name, node.lineno))
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (itself excluded)."""
    modules = module_files(root)
    return {
        m: {t for t, _, _ in imported_names(m, p, modules) if t in modules and t != m}
        for m, p in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
    """The checker can fail: a package with a -> b -> c -> a (one import inside a function) and a
    relative import is reported as one cycle, and the acyclic part is not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("from .sub import c\n")
    (pkg / "sub" / "c.py").write_text("def f():\n    from pkg.a import x\n")
    (pkg / "d.py").write_text("import pkg.a\n")
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def test_graph_sees_the_package():
    graph = import_graph()
    assert len(graph) > 40
    # a module-level import, and one inside a function (adapter_io loads the writers lazily)
    assert "jaxsparse.tree" in graph["jaxsparse.delta"]
    assert "jaxsparse.convert.peft_shira" in graph["jaxsparse.adapter_io"]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles inside jaxsparse (move the shared piece down): " + "; ".join(
        " <-> ".join(c) for c in found
    )


@pytest.mark.parametrize("module", sorted(set(module_files()) - {"jaxsparse"}))
def test_nothing_inside_imports_the_front_door(module):
    """``jaxsparse/__init__.py`` sits above everything (it re-exports the public API lazily), so a
    module of the package imports from the module that defines a name, never ``from jaxsparse
    import <name>`` (submodules, ``from jaxsparse import tree``, are fine)."""
    modules = module_files()
    bad = [
        f"line {line}: {'from jaxsparse import ' + name if name else 'import jaxsparse'}"
        for target, name, line in imported_names(module, modules[module], modules)
        if target == "jaxsparse"
    ]
    assert not bad, f"{modules[module]} imports the front door: {bad}"
