"""``cmi verify FILE``: the configured certificate by default, and a plain "this document is
not signed" for a document without a signature."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from cmi_sdk import Adapter, Documents
from cmi_sdk.cli import EXIT_OK, EXIT_USAGE, main
from tests.support import signer, ticket


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    documents = Documents(standards=Adapter().standards, signer=signer())
    (tmp_path / "signed.xml").write_bytes(documents.render_signed(ticket(), standard="cmi-ticket"))
    (tmp_path / "unsigned.xml").write_bytes(documents.render(ticket(), standard="cmi-ticket"))
    (tmp_path / "cert.pem").write_bytes(
        signer().certificate.public_bytes(serialization.Encoding.PEM)
    )
    monkeypatch.chdir(tmp_path)  # no cmi.toml of the project's
    monkeypatch.delenv("CMI_SIGNING_CERT", raising=False)
    monkeypatch.delenv("CMI_SIGNING_KEY", raising=False)
    return tmp_path


def test_verify_uses_the_configured_certificate(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CMI_SIGNING_CERT", str(folder / "cert.pem"))
    assert main(["verify", "signed.xml"]) == EXIT_OK
    assert capsys.readouterr().out == "signed.xml: signature verified\n"


def test_verify_reads_cmi_toml_too(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "cmi.toml").write_text(f'signing_cert = "{folder / "cert.pem"}"\n')
    assert main(["verify", "signed.xml"]) == EXIT_OK
    assert "signature verified" in capsys.readouterr().out


def test_an_unsigned_document_is_said_to_be_not_signed(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", "unsigned.xml", "--cert", "cert.pem"]) != EXIT_OK
    err = capsys.readouterr().err
    assert err == "unsigned.xml: this document is not signed\n"
    assert "XPath" not in err


def test_without_a_certificate_verify_says_how_to_give_one(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", "signed.xml"]) == EXIT_USAGE
    assert "CMI_SIGNING_CERT" in capsys.readouterr().err
