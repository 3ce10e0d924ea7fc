"""The house's shape, checked: no import cycle inside the package, and no module grows past 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.paths import REPO

PACKAGE = "local_ai_server"
MAX_LINES = 400
# Modules allowed past MAX_LINES, each with why. An entry that is no longer too long fails the test, so
# the list only shrinks.
EXEMPT: dict[str, str] = {}
SIZED = [*sorted((REPO / PACKAGE).rglob("*.py")), *sorted((REPO / "bench").glob("*.py")),
         *sorted((REPO / "scripts").glob("*.py")), REPO / "model_setup.py"]


def module_name(path: Path) -> str:
    """local_ai_server/voice/call.py -> local_ai_server.voice.call (a package's __init__ is the package)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def module_imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules `path` imports when it loads (top level; `if TYPE_CHECKING:` blocks excluded).

    Imports inside functions run later and are the accepted way to break a cycle, so they do not count.
    """
    name = module_name(path)
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()

    def resolve(target: str) -> None:
        # `from a.b import c`: c is a module or a name in a.b; either way a.b (and its parents) load.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    body = [n for n in ast.parse(path.read_text(), str(path)).body if not _type_checking_only(n)]
    for node in body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                mod = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                mod = node.module or ""
            if mod.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                full = f"{mod}.{alias.name}"
                resolve(full if full in modules else mod)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_graph() -> dict[str, set[str]]:
    files = sorted((REPO / PACKAGE).rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): module_imports(f, modules) for f in files}


def test_the_cycle_finder_finds_a_cycle_and_ignores_a_chain() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_imports_are_resolved_to_the_package_modules() -> None:
    graph = package_graph()
    assert "local_ai_server.voice.turn" in graph["local_ai_server.voice.call"]
    assert "local_ai_server.protocol.build" in graph["local_ai_server.protocol"]  # a package's relative import
    assert "local_ai_server.fronts.ava_reports" in graph["local_ai_server.fronts.ava"]  # `from . import x`
    assert "local_ai_server.config" in graph["local_ai_server.hub"]


def test_no_import_cycle_in_the_package() -> None:
    found = cycles(package_graph())
    assert found == [], "import cycles (break them or move the import into the function that needs it): " + \
        "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("path", SIZED, ids=lambda p: str(p.relative_to(REPO)))
def test_module_size(path: Path) -> None:
    rel = str(path.relative_to(REPO))
    lines = len(path.read_text().splitlines())
    if rel in EXEMPT:
        assert lines > MAX_LINES, f"{rel} is {lines} lines now: remove it from EXEMPT"
    else:
        assert lines <= MAX_LINES, f"{rel} is {lines} lines (> {MAX_LINES}): split it by what it does"
