"""The package's structure rules, checked over every module's imports (lazy ones included):

- no import cycles;
- nothing on the training path (ops, scenes, guidance, data, system, stage, recipe,
  checkpoints, dreambooth) reaches the evaluation package, prior training or the test helpers, even
  through a module in between.
"""

from __future__ import annotations

import ast
from pathlib import Path

import magic3d

PACKAGE_DIR = Path(magic3d.__file__).resolve().parent
TRAINING_PATH = ("magic3d.ops", "magic3d.scenes", "magic3d.guidance", "magic3d.data", "magic3d.system",
                 "magic3d.stage", "magic3d.recipe", "magic3d.checkpoints", "magic3d.dreambooth")
OFF_LIMITS = ("magic3d.eval", "magic3d.priors", "magic3d.testing")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """magic3d modules that importing ``path`` runs (parent packages' __init__ included)."""
    found: set[str] = set()
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            while target:
                # A module's own parent packages are already being initialised when it runs:
                # an edge to them is no cycle (a package __init__ re-exporting its modules).
                if target in modules and target != this and not this.startswith(target + "."):
                    found.add(target)
                target = target.rpartition(".")[0]
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the cycles are the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [c for c in components if len(c) > 1]


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module importing ``start`` runs, mapped to the module that imports it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        node = todo.pop()
        for nxt in graph.get(node, ()):
            if nxt not in seen and nxt != start:
                seen[nxt] = node
                todo.append(nxt)
    return seen


def test_the_graph_sees_lazy_imports() -> None:
    graph = import_graph()
    assert "magic3d.interrupt" in graph["magic3d.stage"], "stage imports interrupt only inside a function"
    assert len(graph) > 40


def test_no_import_cycles() -> None:
    assert strongly_connected(import_graph()) == []


def test_a_cycle_would_be_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_training_path_never_imports_eval_priors_or_test_helpers() -> None:
    graph = import_graph()
    problems = []
    for module in sorted(graph):
        if not within(module, TRAINING_PATH):
            continue
        via = reachable(graph, module)
        for target, importer in sorted(via.items()):
            if within(target, OFF_LIMITS):
                problems.append(f"{module} -> ... -> {importer} -> {target}")
    assert problems == []
