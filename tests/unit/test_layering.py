"""The stores know rows and models, not flows.

Everything under ``cmi_sdk/outbox/`` may depend on the models, the exception tree and a few
leaf utilities, and on nothing that emits, offers, delivers or serves: a store that imports a
flow ties every change of that flow to both stores, and brings back the import cycles. The
rule is checked on the source with :mod:`ast`, so imports made only for type checking or
inside a function count too, and it follows imports transitively: an allowed module that
starts importing a flow breaks it as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import cmi_sdk
from cmi_sdk import _models

PACKAGE = Path(cmi_sdk.__file__).parent

# What a store may import from the SDK, besides its own package (cmi_sdk.outbox and below).
ALLOWED = frozenset(
    {
        "cmi_sdk._currencies",
        "cmi_sdk._exceptions",
        "cmi_sdk._files",
        "cmi_sdk._models",
        "cmi_sdk._secrets",
    }
)


def _module_file(module: str) -> Path | None:
    """The source file of an SDK module, or None for a name that is not a module."""
    relative = Path(*module.split(".")[1:])
    for candidate in (PACKAGE / relative.with_suffix(".py"), PACKAGE / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sdk_imports(source: str, module: str, *, is_package: bool) -> list[tuple[int, str]]:
    """Every SDK module ``source`` imports, with its line: at the top, under
    ``TYPE_CHECKING``, inside functions, absolute or relative."""
    found: list[tuple[int, str]] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from cmi_sdk.outbox import sqlite` imports a module; `from cmi_sdk import
            # Adapter` imports the package itself.
            names = [
                f"{base}.{alias.name}" if _module_file(f"{base}.{alias.name}") else base
                for alias in node.names
            ]
        else:
            continue
        found.extend(
            (node.lineno, name)
            for name in dict.fromkeys(names)
            if name == "cmi_sdk" or name.startswith("cmi_sdk.")
        )
    return found


def _allowed(module: str) -> bool:
    return module in ALLOWED or module == "cmi_sdk.outbox" or module.startswith("cmi_sdk.outbox.")


def violations() -> list[str]:
    """``file:line imports module`` for every forbidden import the stores reach."""
    seen: set[Path] = set()
    todo = sorted((PACKAGE / "outbox").rglob("*.py"))
    problems: list[str] = []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        module = _module_name(path)
        source = path.read_text(encoding="utf-8")
        for line, name in sdk_imports(source, module, is_package=path.name == "__init__.py"):
            if not _allowed(name):
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
                continue
            target = _module_file(name)
            if target is not None and target not in seen:
                todo.append(target)
    return sorted(problems)


def test_the_stores_depend_on_models_not_flows() -> None:
    assert violations() == []


def test_the_check_sees_every_kind_of_import() -> None:
    source = """
from typing import TYPE_CHECKING
from cmi_sdk._models import SharingTerms
from cmi_sdk.outbox import _intermediaries
if TYPE_CHECKING:
    from cmi_sdk._emit import Emitter
def later():
    import cmi_sdk._offers
    from ... import _delivery
    from ..._adapter import Adapter
    from cmi_sdk import Adapter
"""
    found = sdk_imports(source, "cmi_sdk.outbox.fake.store", is_package=False)
    forbidden = sorted({name for _, name in found if not _allowed(name)})
    assert forbidden == [
        "cmi_sdk",
        "cmi_sdk._adapter",
        "cmi_sdk._delivery",
        "cmi_sdk._emit",
        "cmi_sdk._offers",
    ]
    assert {"cmi_sdk._models", "cmi_sdk.outbox._intermediaries"} <= {name for _, name in found}


def test_the_terms_and_consent_models_live_with_the_models() -> None:
    for name in ("ConsentRecord", "Link", "Purpose", "SharingTerms", "TermsProposal"):
        assert name in _models.__all__
    assert _module_file("cmi_sdk._terms") is None
