"""The package's module boundaries: no import cycles between the command line, the demo,
the adapter and its endpoint, and every command module imports on its own.

Imports inside functions count: a function-level import back is still a cycle, only a
deferred one. Imports under ``if TYPE_CHECKING:`` do not, since they never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "cmi_sdk"


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> set[str]:
    """Every module an ``import`` statement anywhere in ``tree`` names, at any depth, apart
    from those under ``if TYPE_CHECKING:``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # ``from cmi_sdk import demo`` imports the submodule demo.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module name to the ``cmi_sdk`` modules it imports at run time."""
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = _runtime_imports(ast.parse(path.read_text(encoding="utf-8")))
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def _group(graph: dict[str, set[str]], prefix: str) -> set[str]:
    return {m for m in graph if m == prefix or m.startswith(prefix + ".")}


def _imports(graph: dict[str, set[str]], sources: set[str], targets: set[str]) -> list[str]:
    return sorted(f"{s} -> {t}" for s in sources for t in graph[s] & targets)


@pytest.mark.parametrize(
    ("one", "other"),
    [("cmi_sdk.cli", "cmi_sdk.demo"), ("cmi_sdk._adapter", "cmi_sdk.asgi")],
)
def test_no_import_cycle_between(one: str, other: str) -> None:
    graph = import_graph()
    ones, others = _group(graph, one), _group(graph, other)
    assert ones, one
    assert others, other
    forth, back = _imports(graph, ones, others), _imports(graph, others, ones)
    assert not (forth and back), f"{one} and {other} import each other: {forth} and {back}"


def test_the_checker_sees_function_level_imports(tmp_path: Path) -> None:
    # The rule would pass vacuously if imports inside functions were missed.
    package = tmp_path / "cmi_sdk"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from cmi_sdk import b\n")
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import cmi_sdk.c\n"
        "import cmi_sdk.a\n"
    )
    (package / "c.py").write_text("")
    graph = import_graph(package)
    assert graph["cmi_sdk.a"] == {"cmi_sdk", "cmi_sdk.b"}
    assert graph["cmi_sdk.b"] == {"cmi_sdk.a"}


COMMAND_MODULES = sorted(
    m for m in (_module_name(p) for p in (PACKAGE / "cli").glob("*.py")) if "__main__" not in m
)


@pytest.mark.parametrize("module", COMMAND_MODULES)
@pytest.mark.slow
def test_each_command_module_imports_on_its_own(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
