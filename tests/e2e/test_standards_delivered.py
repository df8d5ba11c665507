"""Every document type of every first-party standard that carries transactions, emitted
under a customer's terms and delivered over loopback HTTP to a real ``cmi listen``: the
stored file is valid against its standard's official schema where one exists (UBL 2.4, as
delivered: nothing set aside), is read by independent readers with zero errors (OFX: libofx's
``ofxdump``, ofxtools, ofxparse), and ``cmi verify`` verifies it with the configured
certificate, its signature where the standard keeps one (inside, or beside it for OFX).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from lxml import etree

from cmi_sdk import Transaction, load_model
from cmi_sdk.cli import main
from cmi_sdk.webhooks import generate_secret
from tests.integration.ofx_readers import IN_CI, ofxdump, ofxdump_values, ofxparse, ofxtools
from tests.support import CUSTOMER, ROOT, emitting_adapter, register, signer

pytestmark = pytest.mark.slow

XSDRT = Path(
    os.environ.get("CMI_TEST_UBL_XSDRT")
    or ROOT.parent / "shared" / "standards" / "ubl-2.4" / "xsdrt"
)
CMI = Path(sys.executable).with_name("cmi")

# (standard, document type, example): every first-party type made from transactions.
CASES = [
    ("cmi", "transaction", "ticket.json"),
    ("cmi-ticket", "ticket", "ticket.json"),
    ("ofx", "statement", "bank-transaction.json"),
    ("ofx", "statement-sgml", "bank-transaction.json"),
    ("ubl", "Invoice", "ticket.json"),
]
PAYEE = "Café Zürich, 東京 & <Söhne>"


def transaction(example: str) -> Transaction:
    tx = load_model(Transaction, (ROOT / "examples" / example).read_text())
    data = tx.model_dump()
    data["customer_ref"] = CUSTOMER
    if data["kind"] == "bank_statement_line":
        data["details"] = {**data["details"], "payee": PAYEE}
    return Transaction.model_validate(data)


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path, Path]]:
    """``cmi listen`` in its own process, with the firm's certificate: (url, secret, store,
    certificate)."""
    folder = tmp_path_factory.mktemp("listen")
    cert = folder / "cert.pem"
    cert.write_bytes(signer().certificate.public_bytes(serialization.Encoding.PEM))
    store = folder / "store"
    secret = generate_secret()
    env = {**os.environ, "CMI_DESTINATION_SECRET": secret}
    process = subprocess.Popen(
        [str(CMI), "listen", "--port", "0", "--store", str(store), "--cert", str(cert)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("listening on "), first
        url = first.split()[2]
        yield url, secret, store, cert
    finally:
        process.terminate()
        process.wait(timeout=20)
        if process.stdout is not None:
            process.stdout.close()


def official_schema(name: str) -> etree.XMLSchema:
    if not XSDRT.is_dir():
        reason = f"the OASIS UBL 2.4 schemas are not at {XSDRT}"
        if IN_CI:
            pytest.fail(f"{reason}; CI (CI is set) requires them")
        pytest.skip(reason)
    return etree.XMLSchema(etree.parse(str(XSDRT / "maindoc" / f"UBL-{name}-2.4.xsd")))


@pytest.mark.parametrize(("standard", "document_type", "example"), CASES)
def test_delivered_valid_readable_and_verified(  # noqa: PLR0917  (pytest's parameters)
    standard: str,
    document_type: str,
    example: str,
    listener: tuple[str, str, Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, secret, store, cert = listener
    adapter = emitting_adapter(tmp_path)
    try:
        register(
            adapter,
            destination=url + "inbox",
            secret=secret,
            standard=standard,
            document_type=document_type,
        )
        tx = transaction(example)
        (emission,) = adapter.emit(tx)
        with adapter.delivery_worker() as worker:
            stats = worker.run_once()
        assert stats.delivered == 1, stats
    finally:
        adapter.close()

    extension = "ofx" if standard == "ofx" else "xml"
    stored = store / f"{emission.msg_id}.{extension}"
    data = stored.read_bytes()
    signature = stored.with_name(stored.name + ".sig")
    assert signature.exists() == (standard == "ofx")

    # As delivered, byte for byte, and valid for the SDK itself.
    if standard == "ofx":
        assert data == emission.document  # detached: the document is the rendered bytes
    assert adapter.validate(data).document_type.name == document_type

    if standard == "ubl":
        root = etree.fromstring(data)
        schema = official_schema(document_type)
        assert schema.validate(root), schema.error_log
    if standard == "ofx":
        lines = ofxdump(data, tmp_path)
        assert ofxdump_values(lines, "Name of payee or transaction description") == [PAYEE]
        assert ofxtools(data).statements[0].transactions[0].name == PAYEE
        if document_type == "statement-sgml":  # ofxparse reads OFX 2 in ASCII only
            assert ofxparse(data).account.statement.transactions[0].payee == PAYEE

    # cmi verify, with the configured certificate and the signature where it is.
    monkeypatch.setenv("CMI_SIGNING_CERT", str(cert))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["verify", str(stored)]) == 0
    out = capsys.readouterr().out
    assert "signature verified" in out
    assert ("detached" in out) == (standard == "ofx")
