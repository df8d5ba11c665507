"""Measured figures live on the docs' performance page, not in docstrings or comments.

A figure in a docstring ("on this machine ... 93-142 requests/s") goes stale unnoticed; the
code keeps the reason for a choice, and ``docs/performance.md`` keeps the numbers with the
command that measures them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FIGURE = re.compile(
    r"on this machine|on the development machine"
    r"|\d[\d,.]* ?(?:µs|usec)\b|(?:~|about) ?\d[\d,.]* ?ms\b"
    r"|\d[\d,.]* ?(?:requests|documents|posts)?(?:/s| a second| per second)\b"
    r"|\d(?:\.\d+)? times (?:the|as many|what)",
    re.IGNORECASE,
)


def figures(text: str) -> list[str]:
    """``line: text`` for every line of ``text`` that states a measured figure."""
    return [
        f"{number}: {line.strip()}"
        for number, line in enumerate(text.splitlines(), 1)
        if FIGURE.search(line)
    ]


@pytest.mark.parametrize("folder", ["cmi_sdk", "plugins"])
def test_no_measured_figures_in_the_code(folder: str) -> None:
    found = [
        f"{path.relative_to(ROOT)}:{hit}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for hit in figures(path.read_text(encoding="utf-8"))
    ]
    assert found == []


def test_the_check_recognizes_a_figure() -> None:
    assert figures("On this machine httpx fell to 93-142 requests/s\nkeep-alive: 2,500/s")
    assert figures("no thread switches, and 1.7 times the requests a second")
    assert figures("about 180-220 µs against 25-35 µs")
    assert figures("closed when it is done (the cost, ~0.1 ms, is paid only by async plugins)")
    assert not figures("retries at 5 s, 5 min and 30 min; purged at most once a second")


def test_the_performance_page_is_in_the_nav() -> None:
    assert "performance.md" in (ROOT / "mkdocs.yml").read_text()
    assert "bench/run.py delivery" in (ROOT / "docs" / "performance.md").read_text()
