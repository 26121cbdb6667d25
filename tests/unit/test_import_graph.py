"""stalroute's modules import each other without a cycle (issue 12: a composition root).

The graph is read from the source with :mod:`ast`: an edge for every ``stalroute`` import a
module makes, at module level (``if TYPE_CHECKING:`` blocks included) or inside a function.
``from stalroute.pkg import name`` points at the submodule ``stalroute.pkg.name`` when there
is one, else at ``stalroute.pkg``. Imports by name at run time (``importlib``) are edges too:
:data:`DYNAMIC_IMPORTS` says what each module that makes them may import, and a module that
makes them without an entry fails the test.

No import hides inside a function: not one of a ``stalroute`` module (that could only dodge a
cycle), and of anything else only what :data:`LAZY_IMPORTS` lists, each with its reason.

Run as a script to print the graph: ``python -m tests.unit.test_import_graph``.
"""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Callable
from pathlib import Path

from stalroute.config.stores import STORE_KINDS

PACKAGE = Path(__file__).resolve().parents[2] / "stalroute"


def store_modules() -> set[str]:
    """The modules of the store builders ``STORE_KINDS`` names as ``"module:function"``."""
    return {kind.builder.partition(":")[0] for kind in STORE_KINDS.values()}


#: The modules that import others by name at run time, and what they may import that way.
DYNAMIC_IMPORTS: dict[str, Callable[[], set[str]]] = {
    # build_store() imports the builder of the configured store kind, so a database driver
    # loads only where its store is configured.
    "stalroute.mapping.factory": store_modules,
}

#: The only imports allowed inside a function: ``(module, what it imports)`` → why.
LAZY_IMPORTS: dict[tuple[str, str], str] = {
    ("stalroute.cli", "twisted.internet.reactor"):
        "importing it installs the default reactor: only the commands that run the reactor "
        "do (`check` without --skip-files), never `stalroute ctl` or `check --skip-files`",
    ("stalroute.worker", "twisted.internet.reactor"):
        "importing it installs the default reactor: only a worker process's main() does, not "
        "whoever imports WorkerService (the supervisor, the tests on a memory reactor)",
    ("stalroute.logs", "twisted.internet.reactor"):
        "the reactor twistd installed, once SIGUSR1 asks for a rotation; at import time it "
        "would install the default reactor before twistd installs the one it was asked for",
}


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


def imports_of(name: str, path: Path, *,
               lazy: bool | None = None) -> list[tuple[ast.stmt, list[tuple[str, str]]]]:
    """Each import statement of module ``name`` (all of them, or only those inside functions,
    ``lazy=True``, or outside them, ``lazy=False``) with what it imports, as ``(module, its
    name)`` pairs: ``from a import b`` is ``("a", "b")``, ``import a.b`` is ``("a.b", "")``.
    Relative imports are resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    hidden = in_functions(tree)
    found: list[tuple[ast.stmt, list[tuple[str, str]]]] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if lazy is not None and lazy != (node in hidden):
            continue
        if isinstance(node, ast.Import):
            found.append((node, [(alias.name, "") for alias in node.names]))
            continue
        base = node.module or ""
        if node.level:  # relative: from the package, one level up per extra dot
            anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        found.append((node, [(base, alias.name) for alias in node.names]))
    return found


def imported_modules(name: str, path: Path, known: set[str], *,
                     lazy: bool | None = None) -> set[str]:
    """The stalroute modules ``name`` imports: all of them, or only those imported inside
    functions (``lazy=True``) or outside them (``lazy=False``)."""
    targets: set[str] = set()
    for _node, names in imports_of(name, path, lazy=lazy):
        for base, item in names:
            submodule = f"{base}.{item}"
            targets.add(submodule if item and submodule in known else base)
    return {target for target in targets if target in known and target != name}


def dynamic_importers(path: Path) -> bool:
    """Whether the module calls ``importlib.import_module`` or ``__import__``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__"):
                return True
    return False


def import_graph(*, lazy: bool | None = None, dynamic: bool = True) -> dict[str, set[str]]:
    """Module → the stalroute modules it imports (with ``dynamic``: by name at run time too,
    as :data:`DYNAMIC_IMPORTS` says)."""
    found = modules()
    known = set(found)
    graph = {name: imported_modules(name, path, known, lazy=lazy)
             for name, path in found.items()}
    if dynamic and lazy is not False:
        for name, targets in DYNAMIC_IMPORTS.items():
            graph[name] |= targets()
    return graph


def lazy_imports() -> list[tuple[str, str, int]]:
    """Every import inside a function of ``stalroute/``: ``(module, what, line)``."""
    found = []
    for name, path in modules().items():
        for node, names in imports_of(name, path, lazy=True):
            found += [(name, f"{base}.{item}" if item else base, node.lineno)
                      for base, item in names]
    return found


def test_stalroute_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "stalroute.runtime" in graph["stalroute.session"]  # the reader works
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        cycle = " -> ".join(exc.args[1])
        raise AssertionError(f"import cycle: {cycle}") from None


def test_imports_by_name_are_edges_of_the_graph() -> None:
    """The store modules ``STORE_KINDS`` names are edges of ``mapping.factory``, so a store
    module importing the factory back would be a cycle; and every module that imports by
    name is known here."""
    graph = import_graph()
    assert {"stalroute.mapping.file", "stalroute.mapping.sql",
            "stalroute.mapping.redis"} <= store_modules() <= graph["stalroute.mapping.factory"]
    assert store_modules() <= set(modules())  # each names a module that exists
    importers = {name for name, path in modules().items() if dynamic_importers(path)}
    assert importers == set(DYNAMIC_IMPORTS)


def test_no_import_hides_inside_a_function() -> None:
    found = lazy_imports()
    problems = [f"{module}:{line} imports {what} inside a function" +
                ("" if what.startswith("stalroute") else " (not in LAZY_IMPORTS)")
                for module, what, line in found
                if what == "stalroute" or what.startswith("stalroute.")
                or (module, what) not in LAZY_IMPORTS]
    assert not problems, "\n".join(problems)
    unused = set(LAZY_IMPORTS) - {(module, what) for module, what, _line in found}
    assert not unused, f"LAZY_IMPORTS lists imports that are gone: {sorted(unused)}"


def test_the_reader_sees_relative_conditional_and_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "from . import sibling\n"
                      "from .. import top\n"
                      "if TYPE_CHECKING:\n"
                      "    from stalroute.pkg import thing\n"
                      "def later():\n"
                      "    import stalroute.hidden\n"
                      "    from twisted.internet import reactor\n"
                      "    return importlib.import_module('stalroute.top')\n")
    known = {"stalroute.pkg", "stalroute.pkg.sibling", "stalroute.top", "stalroute.hidden"}
    assert imported_modules("stalroute.pkg.mod", source, known, lazy=False) == {
        "stalroute.pkg.sibling", "stalroute.top", "stalroute.pkg"}
    assert imported_modules("stalroute.pkg.mod", source, known, lazy=True) == {
        "stalroute.hidden"}
    lazy = [names for _node, names in imports_of("stalroute.pkg.mod", source, lazy=True)]
    assert lazy == [[("stalroute.hidden", "")], [("twisted.internet", "reactor")]]
    assert dynamic_importers(source)


def main() -> None:
    graph, static = import_graph(), import_graph(dynamic=False)
    order = list(graphlib.TopologicalSorter(graph).static_order())
    edges = sum(len(targets) for targets in graph.values())
    dynamic = edges - sum(len(targets) for targets in static.values())
    print(f"{len(graph)} modules, {edges} edges ({dynamic} of them imports by name at run "
          "time, marked *), acyclic; dependencies first:")
    for name in order:
        targets = sorted(f"{target.removeprefix('stalroute.')}"
                         f"{'*' * (target not in static[name])}" for target in graph[name])
        print(f"  {name.removeprefix('stalroute.') or 'stalroute'}: {', '.join(targets) or '-'}")
    print("imports inside functions:")
    for module, what, line in lazy_imports():
        print(f"  {module}:{line} {what}: {LAZY_IMPORTS.get((module, what), 'NOT ALLOWED')}")


if __name__ == "__main__":
    main()
