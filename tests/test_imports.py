"""Imports flow one way (orchestrator -> hisf, data_shards; hisf -> data_shards) with no circle anywhere.

A static read of every module's import statements, those inside functions included (a lazy import is still
a dependency): no cycle among the project's modules, hisf and data_shards never import orchestrator,
data_shards never imports hisf, and neither imports Ray, MLflow or Optuna (the orchestrator's business).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import ROOT

PACKAGES = ("hisf", "data_shards", "orchestrator")
# package -> packages (ours or third-party, by top-level name) it must never import
FORBIDDEN = {
    "hisf": ("orchestrator", "ray", "mlflow", "optuna"),
    "data_shards": ("orchestrator", "hisf", "ray", "mlflow", "optuna"),
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the three packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported_names(module: str, path: Path, modules) -> set[str]:
    """Every dotted name an import statement of the module names (absolute; relative ones resolved);
    `from pkg import sub` names the submodule pkg.sub when there is one, else pkg itself."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                names.add(sub if sub in modules else target)
    return names


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between our modules, every imported name per module)."""
    files = module_files()
    edges, raw = {}, {}
    for module, path in files.items():
        names = imported_names(module, path, files)
        raw[module] = names
        targets = set()
        for name in names:
            # the deepest of our modules the name points at (`a.b.func` -> a.b); parents are not edges
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in files:
                    if candidate != module:
                        targets.add(candidate)
                    break
        edges[module] = targets
    return edges, raw


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_walk_sees_every_package_and_lazy_imports():
    edges, raw = graph()
    assert {m.split(".")[0] for m in edges} == set(PACKAGES)
    assert len(edges) > 40
    # a function-level import counts: the CLI dispatches to the data and train commands lazily
    assert {"data_shards.cli", "hisf.train"} <= edges["orchestrator.cli"]
    # relative imports are resolved (orchestrator/report uses them)
    assert "orchestrator.report.build" in edges["orchestrator.report"]


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    edges, _ = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_flow_one_way():
    _, raw = graph()
    bad = []
    for module, names in sorted(raw.items()):
        banned = FORBIDDEN.get(module.split(".")[0], ())
        for name in sorted(names):
            if name.split(".")[0] in banned:
                bad.append(f"{module} imports {name}")
    assert not bad, "\n".join(bad)
