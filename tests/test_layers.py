"""The package's layout: layers that import only downwards, no import cycles, modules of a
readable size. Every import counts: inside functions, and those only for the type checker
(`if TYPE_CHECKING:`); a module that needs another's type without importing it names a
`Protocol` of what it uses (futures.Owner, calls.Executing, child.Supervising)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "slurmexecutor"
#: lowest first: a layer imports only from layers before it (and from itself)
LAYERS = ["leaf", "folder", "schedulers", "core", "worker", "owner", "reports", "api", "apps",
          "testing"]
LEAF = {"slurmexecutor.errors", "slurmexecutor._log"}
MOST_LINES = 420


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def layer(module: str) -> str:
    if module in LEAF:
        return "leaf"
    if module == "slurmexecutor.__main__":
        return "apps"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "api"


def imports(known: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        tree = ast.parse(path.read_text())
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = graph.setdefault(module, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                # `from package import module` runs package/__init__ first, too
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            # importing a.b.c runs a/b/__init__ first: a package that imports (even
            # lazily) a module importing one of its siblings is a circle too
            parents = {".".join(t.split(".")[:k]) for t in targets
                       for k in range(2, len(t.split(".")))}
            edges.update(p for p in parents if not module.startswith(f"{p}."))
            edges.update(t for t in targets if t in known and t != module)
        edges &= set(known)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root, children_of_root in graph.items():
        if root in index:
            continue
        work = [(root, iter(sorted(children_of_root)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
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


def test_no_import_cycles():
    assert cycles(imports(modules())) == []


def test_layers_import_only_downwards():
    upward = sorted(f"{m} -> {t}" for m, targets in imports(modules()).items() for t in targets
                    if LAYERS.index(layer(t)) > LAYERS.index(layer(m)))
    assert upward == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_stay_readable():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MOST_LINES}
    assert long == {}


def test_imports_for_the_type_checker_and_inside_functions_count(tmp_path):
    (tmp_path / "a.py").write_text("from typing import TYPE_CHECKING\n"
                                   "if TYPE_CHECKING:\n    from pkg.b import B\n")
    (tmp_path / "b.py").write_text("def f():\n    from pkg import a\n")
    graph = imports({"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"})
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
