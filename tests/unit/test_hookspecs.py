"""Every hook is prefixed, documented in place, and exercised by a test."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from mkdocs_hooks import hookspecs

TESTS = Path(__file__).resolve().parents[1]
SPECS = hookspecs()
NAMES = [f.__name__ for f in SPECS]


def test_there_are_hookspecs() -> None:
    assert "cmi_register_standards" in NAMES


@pytest.mark.parametrize("spec", SPECS, ids=NAMES)
def test_hook_names_carry_the_prefix(spec: object) -> None:
    assert spec.__name__.startswith("cmi_")  # type: ignore[attr-defined]


@pytest.mark.parametrize("spec", SPECS, ids=NAMES)
def test_every_parameter_is_documented(spec: object) -> None:
    doc = inspect.getdoc(spec) or ""
    assert doc, "a hookspec needs a docstring"
    for name in inspect.signature(spec).parameters:  # type: ignore[arg-type]
        assert f":param {name}:" in doc, f"{name} is not documented"


@pytest.mark.parametrize("name", NAMES)
def test_every_hook_has_a_test(name: str) -> None:
    own = {Path(__file__).name, "test_docs.py"}
    users = [
        path.name
        # The fakes count: a hook a shared fake implements runs in the tests that use it.
        for path in TESTS.rglob("*.py")
        if path.name not in own and re.search(rf"\b{name}\b", path.read_text(encoding="utf-8"))
    ]
    assert users, f"no test exercises {name}"
