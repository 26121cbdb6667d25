"""stalroute's modules import each other without a cycle (issue 12: a composition root).

The graph is read from the source with :mod:`ast`: an edge for every ``stalroute`` import a
module makes, at module level (``if TYPE_CHECKING:`` blocks included) or inside a function, so
that no lazy import can hide a cycle. ``from stalroute.pkg import name`` points at the
submodule ``stalroute.pkg.name`` when there is one, else at ``stalroute.pkg``.

Run as a script to print the graph: ``python -m tests.unit.test_import_graph``.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "stalroute"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def in_functions(tree: ast.Module) -> set[ast.stmt]:
    """The import statements inside function bodies."""
    return {node for function in ast.walk(tree)
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(function) if isinstance(node, (ast.Import, ast.ImportFrom))}


def imported_modules(name: str, path: Path, known: set[str], *,
                     lazy: bool | None = None) -> set[str]:
    """The stalroute modules ``name`` imports: all of them, or only those imported inside
    functions (``lazy=True``) or outside them (``lazy=False``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    hidden = in_functions(tree)
    targets: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if lazy is not None and lazy != (node in hidden):
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: from the package, one level up per extra dot
            anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            targets.add(submodule if submodule in known else base)
    return {target for target in targets if target in known and target != name}


def import_graph(*, lazy: bool | None = None) -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imported_modules(name, path, known, lazy=lazy) for name, path in found.items()}


def test_stalroute_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "stalroute.runtime" in graph["stalroute.session"]  # the reader works
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        cycle = " -> ".join(exc.args[1])
        raise AssertionError(f"import cycle: {cycle}") from None


def test_the_reader_sees_relative_conditional_and_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "from . import sibling\n"
                      "from .. import top\n"
                      "if TYPE_CHECKING:\n"
                      "    from stalroute.pkg import thing\n"
                      "def later():\n"
                      "    import stalroute.hidden\n")
    known = {"stalroute.pkg", "stalroute.pkg.sibling", "stalroute.top", "stalroute.hidden"}
    assert imported_modules("stalroute.pkg.mod", source, known, lazy=False) == {
        "stalroute.pkg.sibling", "stalroute.top", "stalroute.pkg"}
    assert imported_modules("stalroute.pkg.mod", source, known, lazy=True) == {
        "stalroute.hidden"}


def main() -> None:
    graph, lazy = import_graph(), import_graph(lazy=True)
    order = list(graphlib.TopologicalSorter(graph).static_order())
    edges = sum(len(targets) for targets in graph.values())
    print(f"{len(graph)} modules, {edges} edges ({sum(map(len, lazy.values()))} of them lazy, "
          "marked *), acyclic; dependencies first:")
    for name in order:
        targets = sorted(f"{target.removeprefix('stalroute.')}{'*' * (target in lazy[name])}"
                         for target in graph[name])
        print(f"  {name.removeprefix('stalroute.') or 'stalroute'}: {', '.join(targets) or '-'}")


if __name__ == "__main__":
    main()
