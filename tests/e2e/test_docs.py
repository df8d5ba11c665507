"""The docs build, list every page, and say what the code does."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cmi_sdk
import cmi_sdk._exceptions
from mkdocs_hooks import MARKER, hookspecs, render_hooks

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def test_hooks_reference_documents_every_hookspec() -> None:
    text = render_hooks()
    assert (DOCS / "hooks.md").read_text().count(MARKER) == 1
    for spec in hookspecs():
        assert f"## `{spec.__name__}`" in text
        for name in inspect.signature(spec).parameters:
            assert f"- `{name}`:" in text


def _tree_in_code() -> str:
    doc = cmi_sdk._exceptions.__doc__ or ""
    start = doc.index("    CMIError")
    block = doc[start : doc.index("\n\n", start)]
    return "\n".join(line[4:] for line in block.splitlines())


def test_errors_page_draws_the_same_tree() -> None:
    assert _tree_in_code() in (DOCS / "errors.md").read_text()


def test_every_exported_error_is_in_the_tree_and_the_docs() -> None:
    tree = _tree_in_code()
    page = (DOCS / "errors.md").read_text()
    errors = [
        name
        for name in cmi_sdk.__all__
        if isinstance(getattr(cmi_sdk, name), type)
        and issubclass(getattr(cmi_sdk, name), cmi_sdk.CMIError)
    ]
    assert "DocumentValidationError" in errors
    for name in errors:
        assert name in tree, f"{name} is missing from the tree"
        assert f"`{name}`" in page, f"{name} is missing from docs/errors.md"


def test_nav_lists_every_page() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    pages = {
        p.relative_to(DOCS).as_posix()
        for p in DOCS.rglob("*.md")
        if "examples" not in p.relative_to(DOCS).parts
    }
    for page in pages:
        assert f": {page}" in config, f"{page} is not in mkdocs.yml's nav"


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_mkdocs_builds_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    hooks_page = (tmp_path / "hooks" / "index.html").read_text()
    assert "cmi_register_standards" in hooks_page


@pytest.mark.timeout(120)
def test_the_emit_guide_example_runs() -> None:
    page = (DOCS / "emit.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "delivered=1" in result.stdout
    assert 'withheld="airline fare_class flight row seat"' in result.stdout


@pytest.mark.timeout(120)
def test_the_connect_guide_example_runs(tmp_path: Path) -> None:
    page = (DOCS / "connect.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("451.89 USD\n<?xml")
