"""The README's commands and example stay true."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.DOTALL)


def test_readme_gives_the_two_commands() -> None:
    shell = "\n".join(_blocks("sh"))
    assert "pip install -e . && cmi demo" in shell
    assert "pytest" in shell


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^pytest$", ci, flags=re.MULTILINE)
    # The default run leaves the slow tests out; CI runs them too.
    assert re.search(r"^pytest -m slow$", ci, flags=re.MULTILINE)
    assert "pip install -q -e '.[dev]'" in ci


def test_readme_python_example_runs() -> None:
    (code,) = _blocks("python")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "<ticketnumber>12524057</ticketnumber>" in result.stdout


def test_readme_main_job_runs() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cmi_sdk.cli",
            "render",
            "--standard",
            "cmi-ticket",
            "examples/ticket.json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "<price>451.89</price>" in result.stdout


@pytest.mark.timeout(120)
def test_readme_main_command_closes_the_loop(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cmi_sdk.cli", "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "1. the customer, signed in at the firm, links the intermediary" in out
    assert "2. the intermediary registers the customer's terms" in out
    assert out.count("(the answer is signed by the firm: verified)") == 2
    assert "at 9.45 % APR" in out  # the lender's tier B offer
    assert "booked as DL-" in out
    assert "XML-DSig signature verifies against" in out
    assert "<ticketnumber>" in out
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def _table_paths(section: str) -> list[str]:
    """The paths in the first column of the table under ``## section``."""
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", body, flags=re.MULTILINE)


def test_the_layout_names_what_is_there() -> None:
    paths = _table_paths("Layout") + _table_paths("Tests")
    assert paths
    for path in paths:
        assert (ROOT / path).exists(), f"the README names {path}, which is not there"


def test_every_test_folder_is_in_the_tests_section() -> None:
    named = set(_table_paths("Tests"))
    folders = {
        f"{p.parent.relative_to(ROOT).as_posix()}/" for p in (ROOT / "tests").glob("*/test_*.py")
    }
    assert folders <= named, f"test folders the README does not name: {folders - named}"
    assert not list((ROOT / "tests").glob("test_*.py")), "every test module lives in a folder"


def _imports(tree: ast.AST) -> list[str]:
    """The modules a module imports; a relative import as ``.``."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.append("." if node.level else node.module or "")
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_no_test_module_imports_another() -> None:
    # What tests share lives in modules that hold no tests (tests/support.py, tests/fakes.py,
    # tests/strategies.py, a folder's conftest.py or helpers): changing one test module
    # must not break another.
    wrong = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / "tests").rglob("*.py")
        for name in _imports(ast.parse(path.read_text(encoding="utf-8")))
        if name == "."
        or (name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_"))
    ]
    assert not wrong, wrong
