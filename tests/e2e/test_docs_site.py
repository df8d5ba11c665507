"""The built docs make no request to any outside host (code is highlighted at build time
by Pygments; no CDN), and carry an API reference generated from the docstrings."""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The attributes through which a page makes the browser fetch something by itself.
_FETCHED = {
    "script": ("src",),
    "link": ("href",),
    "img": ("src", "srcset"),
    "iframe": ("src",),
    "source": ("src", "srcset"),
    "video": ("src", "poster"),
    "audio": ("src",),
    "embed": ("src",),
    "object": ("data",),
}
_OUTSIDE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)
_CSS_URL = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"])((?:[a-z]+:)?//[^'")\s]+)""", re.I)


class _Fetches(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in _FETCHED.get(tag, ()) and value and _OUTSIDE.match(value.strip()):
                self.found.append(f"<{tag} {name}={value}>")
            if name == "style" and value:
                self.found += _CSS_URL.findall(value)


def outside_references(site: Path) -> list[str]:
    """Every reference in ``site`` that makes a browser fetch from another host."""
    found: list[str] = []
    for path in sorted(site.rglob("*")):
        if path.suffix == ".html":
            parser = _Fetches()
            parser.feed(path.read_text(encoding="utf-8"))
            found += [f"{path.relative_to(site)}: {ref}" for ref in parser.found]
            found += [
                f"{path.relative_to(site)}: {ref}"
                for ref in _CSS_URL.findall(path.read_text(encoding="utf-8"))
            ]
        elif path.suffix == ".css":
            found += [
                f"{path.relative_to(site)}: {ref}"
                for ref in _CSS_URL.findall(path.read_text(encoding="utf-8"))
            ]
    return found


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=180,
    )
    return out


@pytest.mark.slow
def test_the_site_references_no_outside_host(site: Path) -> None:
    assert outside_references(site) == []


@pytest.mark.slow
def test_code_is_highlighted_at_build_time(site: Path) -> None:
    page = (site / "connect" / "index.html").read_text(encoding="utf-8")
    assert 'class="highlight"' in page
    assert '<span class="k">class</span>' in page  # a Python keyword, marked by Pygments
    css = (site / "css" / "pygments.css").read_text(encoding="utf-8")
    assert ".highlight .k " in css
    assert "css/pygments.css" in page


@pytest.mark.slow
def test_the_api_reference_is_generated_from_the_docstrings(site: Path) -> None:
    page = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("cmi_sdk.Adapter", "cmi_sdk.config.Settings", "cmi_sdk.client.CMIClient"):
        assert f'id="{name}"' in page, name
    # A docstring's own words, rendered.
    assert "A lifespan for the firm" in page


def test_the_check_catches_a_cdn(tmp_path: Path) -> None:
    (tmp_path / "page.html").write_text(
        '<html><head><script src="https://cdn.example/x.js"></script>'
        '<link rel="stylesheet" href="//cdn.example/x.css"></head>'
        '<body><a href="https://pluggy.readthedocs.io">a link is no request</a>'
        '<img src="img/local.png"></body></html>'
    )
    (tmp_path / "x.css").write_text("@import 'https://fonts.example/f.css'; a{}")
    assert len(outside_references(tmp_path)) == 3
