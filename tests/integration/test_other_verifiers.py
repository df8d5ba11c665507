"""A receiver verifies the SDK's signatures with the tools the docs show: an OFX
statement's detached signature with the signxml example in docs/verify.md, run as written,
and with xmlsec1; enveloped signatures (the root's end, UBL's extension) with xmlsec1.
xmlsec1 runs where it is installed (Debian: xmlsec1)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from cmi_sdk import Adapter, Documents, Transaction, load_model
from tests.integration.ofx_readers import need_program
from tests.support import ROOT, signer

VERIFY_DOC = ROOT / "docs" / "verify.md"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding msg_0123.ofx, its .sig and delta-cert.pem, as the docs name them."""
    documents = Documents(standards=Adapter().standards, signer=signer())
    tx = load_model(Transaction, (ROOT / "examples" / "bank-transaction.json").read_text())
    statement = documents.render_signed(tx, standard="ofx", document_type="statement-sgml")
    signature = documents.detached_signature(statement, standard="ofx", name="msg_0123.ofx")
    assert signature is not None
    (tmp_path / "msg_0123.ofx").write_bytes(statement)
    (tmp_path / "msg_0123.ofx.sig").write_bytes(signature)
    (tmp_path / "delta-cert.pem").write_bytes(
        signer().certificate.public_bytes(serialization.Encoding.PEM)
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def signxml_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", VERIFY_DOC.read_text(), flags=re.DOTALL)
    (example,) = [b for b in blocks if "uri_resolver" in b]
    return example


def test_the_docs_signxml_example_verifies_and_refuses_a_changed_byte(store: Path) -> None:
    exec(signxml_example(), {})  # noqa: S102  (the project's own docs)
    (store / "msg_0123.ofx").write_bytes((store / "msg_0123.ofx").read_bytes() + b"\n")
    from signxml.exceptions import InvalidDigest

    with pytest.raises(InvalidDigest):
        exec(signxml_example(), {})  # noqa: S102


def need_xmlsec1() -> str:
    """The path of ``xmlsec1``, or skip (fail in CI, which installs it)."""
    return need_program("xmlsec1", "xmlsec1")


@pytest.mark.parametrize(
    ("standard", "document_type", "example"),
    [
        ("cmi", "transaction", "ticket.json"),
        ("cmi-ticket", "ticket", "ticket.json"),
        ("ubl", "Invoice", "ticket.json"),
        ("ubl", "Quotation", "offer.json"),
    ],
)
def test_xmlsec1_verifies_enveloped_signatures(
    store: Path, standard: str, document_type: str, example: str
) -> None:
    xmlsec1 = need_xmlsec1()
    documents = Documents(standards=Adapter().standards, signer=signer())
    _std, doc_type = documents.standards.resolve(standard, document_type)
    model = load_model(doc_type.model, (ROOT / "examples" / example).read_text())
    (store / "signed.xml").write_bytes(
        documents.render_signed(model, standard=standard, document_type=document_type)
    )
    command = [xmlsec1, "--verify", "--enabled-reference-uris", "empty"]
    command += ["--pubkey-cert-pem", "delta-cert.pem", "signed.xml"]
    done = subprocess.run(command, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()[-500:]


def test_xmlsec1_verifies_as_the_docs_say(store: Path) -> None:
    xmlsec1 = need_xmlsec1()
    command = [
        xmlsec1,
        "--verify",
        "--enabled-reference-uris",
        "remote",
        "--pubkey-cert-pem",
        "delta-cert.pem",
        "msg_0123.ofx.sig",
    ]
    assert " ".join(command[1:]) in VERIFY_DOC.read_text()
    done = subprocess.run(command, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()[-500:]
    (store / "msg_0123.ofx").write_bytes((store / "msg_0123.ofx").read_bytes() + b"\n")
    done = subprocess.run(command, capture_output=True, timeout=60, check=False)
    assert done.returncode != 0
