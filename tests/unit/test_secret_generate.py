"""``cmi secret generate`` (and ``cmi secrets generate``) make a Standard Webhooks secret,
and no page a newcomer copies from shows a secret that looks real."""

from __future__ import annotations

import base64
import re
import stat
from pathlib import Path

import pytest

from cmi_sdk.cli import EXIT_INVALID, EXIT_OK, main

ROOT = Path(__file__).resolve().parents[2]

#: The Standard Webhooks specification's published example secret, without its prefix.
SPEC_EXAMPLE = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

#: What a secret or a secrets key looks like once it is long enough to be one.
_REAL_LOOKING = re.compile(r"(whsec_|cmisk_)[A-Za-z0-9+/=_-]{12,}")


@pytest.mark.parametrize("group", ["secret", "secrets"])
def test_generate_prints_a_fresh_secret(group: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([group, "generate"]) == EXIT_OK
    first = capsys.readouterr().out.strip()
    assert main([group, "generate"]) == EXIT_OK
    second = capsys.readouterr().out.strip()
    assert first != second
    assert first.startswith("whsec_")
    assert len(base64.b64decode(first.removeprefix("whsec_"))) >= 24


def test_generate_writes_a_file_only_its_owner_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "relay.secret"
    assert main(["secret", "generate", "--out", str(path)]) == EXIT_OK
    assert capsys.readouterr().out == ""  # the secret never passes through the terminal
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("whsec_")
    # Never overwritten: a second run would lose the secret already given out.
    assert main(["secret", "generate", "--out", str(path)]) == EXIT_INVALID
    assert "exists" in capsys.readouterr().err


def _pages() -> list[Path]:
    pages = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("examples/*")]
    return [p for p in pages if p.is_file()]


def test_no_page_shows_a_real_looking_secret() -> None:
    for page in _pages():
        text = page.read_text(encoding="utf-8")
        assert SPEC_EXAMPLE not in text, page
        assert _REAL_LOOKING.search(text) is None, (page, _REAL_LOOKING.search(text))


def test_the_docs_say_how_to_make_a_secret() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "cmi secrets generate --out" in readme
