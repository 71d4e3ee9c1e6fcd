"""The architecture's rules, checked on the source: the core never imports a plugin, no import cycle,
every hook tested.

Imports are read with `ast`, not by importing: a rule broken inside a function body or under
`if TYPE_CHECKING:` is found too. The core loads its built-in plugins by name (`app.plugins`'
DEFAULT_PLUGINS, through importlib), like any third-party plugin; that string is not an import.

One import name: app/ is the package `ondemand` (the core) and plugins/ is `ondemand.plugins` (the
built-in plugins), as pyproject.toml's package-dir maps them.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from ondemand import hookspecs
from tests.support import ROOT

PACKAGE = "ondemand"
PLUGINS = "ondemand.plugins"
FOLDERS = {"app": PACKAGE, "plugins": PLUGINS}  # folder -> the package it is
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def module_name(path: Path) -> str:
    folder, *parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([FOLDERS[folder], *parts])


def modules() -> dict[str, Path]:
    """Every module of app/ and plugins/, by dotted name (a package by its own name: `ondemand.web`)."""
    return {module_name(path): path for folder in FOLDERS for path in sorted((ROOT / folder).rglob("*.py"))}


def is_plugin(name: str) -> bool:
    return name == PLUGINS or name.startswith(PLUGINS + ".")


MODULES = modules()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def import_nodes(tree: ast.AST, *, into_functions: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements of `tree`; without `into_functions`, only those run when the module is
    imported (module and class bodies, any `if`/`try` there, `if TYPE_CHECKING:` included)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(child for child in ast.iter_child_nodes(node)
                     if into_functions or not isinstance(child, _SCOPES))


def imported_modules(importer: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The modules an import statement in module `importer` binds names from, as Python resolves them.

    `import a.b` and `from a.b import c` use module a.b; `from a import b` uses the submodule a.b when
    there is one, else the name b of a/__init__. (Importing a.b also runs a/__init__ first; that
    implied edge is left out, or every package's __init__ would sit in a cycle with its own modules.)
    """
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        package = importer if is_package(importer) else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = ".".join(part for part in (package, node.module) if part)
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        yield submodule if submodule in MODULES else base


def graph(*, into_functions: bool) -> dict[str, set[str]]:
    """Module -> the modules of app/ and plugins/ it imports."""
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = set()
        for node in import_nodes(tree, into_functions=into_functions):
            for target in imported_modules(name, node):
                # `import app.web.api` names a module; `from app.web import x` may name a package.
                while target and target not in MODULES:
                    target = target.rpartition(".")[0]
                if target and target.split(".")[0] == PACKAGE:
                    targets.add(target)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component (Tarjan), each a path from a module back to it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges[node]:
                components.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [shortest_cycle(sorted(component)[0], component, edges) for component in components]


def shortest_cycle(start: str, component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """Breadth-first from `start` back to it, inside its component."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(edges[node] & component):
            if target == start:
                return [*paths[node], start]
            if target not in paths:
                paths[target] = [*paths[node], target]
                queue.append(target)
    raise AssertionError(f"{start} is in no cycle")  # unreachable for a component Tarjan found


def test_the_core_never_imports_a_plugin() -> None:
    edges = graph(into_functions=True)
    offenders = sorted(f"{importer} imports {target}" for importer, targets in edges.items()
                       if not is_plugin(importer) for target in targets if is_plugin(target))
    assert not offenders, "the core must not depend on a built-in plugin (one can be disabled): " + "; ".join(offenders)


def test_nothing_imports_the_folders_by_their_own_names() -> None:
    """`app` and `plugins` are the user's names: with the checkout on sys.path they would import a second
    copy of our modules, so no module, test or benchmark imports them."""
    offenders = []
    for path in sorted([*ROOT.glob("*.py"), *(p for d in ("app", "plugins", "tests", "bench")
                                              for p in (ROOT / d).rglob("*.py") if "build" not in p.parts)]):
        for node in import_nodes(ast.parse(path.read_text(encoding="utf-8")), into_functions=True):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if not getattr(node, "level", 0) and any(n.split(".")[0] in FOLDERS for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
        if path.name != "test_architecture.py":  # code run by `python -c` in a subprocess, inside a string
            text = path.read_text(encoding="utf-8")
            offenders += [f"{path.relative_to(ROOT)}: {m.group(0)!r} in a string"
                          for m in re.finditer(r"(?m)(?:^|[\"'])\s*(?:from|import) (?:app|plugins)\b", text)]
    assert not offenders, offenders


def test_no_import_cycle_among_app_and_plugins() -> None:
    found = cycles(graph(into_functions=False))
    assert not found, "import cycles (module-level and TYPE_CHECKING imports): " + "; ".join(
        " -> ".join(cycle) for cycle in found)


def test_every_hook_has_a_test_named_after_it() -> None:
    """Datasette's rule: each hook of app/hookspecs.py has a `test_hook_<hook name>...` test somewhere."""
    hooks = sorted(name for name in dir(hookspecs) if name.startswith("ondemand_"))
    assert len(hooks) >= 10, hooks
    tests = {node.name for path in (ROOT / "tests").rglob("test_*.py")
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_hook_")}
    untested = [hook for hook in hooks
                if not any(test == f"test_hook_{hook}" or test.startswith(f"test_hook_{hook}_") for test in tests)]
    assert not untested, f"hooks without a test_hook_<name> test: {untested}"


# The checks above must be able to fail: each helper on a small graph with a known answer.


def test_cycle_finder_reports_the_cycle_as_a_path() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(edges) == [["a", "b", "c", "a"], ["e", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(
    ("importer", "source", "expected"),
    [
        ("ondemand.runtime", "from ondemand import config", ["ondemand.config"]),  # a submodule
        ("ondemand.runtime", "from ondemand import hookimpl", ["ondemand"]),  # a name of its __init__
        ("ondemand.web.api", "from . import auth", ["ondemand.web.auth"]),
        ("ondemand.web.api", "from .. import errors", ["ondemand.errors"]),
        ("ondemand.web", "from .routes import x", ["ondemand.web.routes"]),  # relative to the package itself
        ("ondemand.runtime", "import ondemand.plugins.storage_redis", ["ondemand.plugins.storage_redis"]),
    ],
)
def test_imports_resolve_as_python_would(importer: str, source: str, expected: list[str]) -> None:
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.Import | ast.ImportFrom)
    assert list(imported_modules(importer, node)) == expected


def test_imports_in_functions_count_only_for_the_plugin_rule() -> None:
    tree = ast.parse("import a\nif TYPE_CHECKING:\n    import b\nclass C:\n    import c\n"
                     "def f():\n    import d\n")
    def names(into: bool) -> set[str]:
        return {alias.name for node in import_nodes(tree, into_functions=into) for alias in node.names}

    assert names(False) == {"a", "b", "c"}
    assert names(True) == {"a", "b", "c", "d"}
