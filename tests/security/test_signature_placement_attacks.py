"""Signatures in their new places, attacked from outside.

What a signature does not cover must not ride along with what it does: a processing
instruction before the root (an ``xml-stylesheet`` that a browser or viewer follows) is
outside an enveloped signature's canonical form, so a verified document must not carry
one, and the customer's store must not keep one. A signature moved between the places the
SDK accepts verifies only to the very bytes that were signed. The verifier uses only the
configured certificate, whatever ``KeyInfo`` says. A detached signature's reference names a
file, but nothing it names is opened. A delivery gets one detached signature, in one header.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from lxml import etree

from cmi_sdk import (
    Adapter,
    Documents,
    SignatureVerificationError,
    Transaction,
    load_model,
)
from cmi_sdk.cli import main
from cmi_sdk.receiver import CustomerStore, running
from cmi_sdk.signing import (
    DETACHED_SIGNATURE_HEADER,
    DSIG_NAMESPACE,
    DocumentSigner,
    self_signed_certificate,
    verify_detached,
    verify_document,
)
from cmi_sdk.webhooks import WebhookSigner, generate_secret
from tests.security.watch import Watch
from tests.support import ROOT, signer

DS = f"{{{DSIG_NAMESPACE}}}"
ADAPTER = Adapter()


@functools.cache
def documents() -> Documents:
    return Documents(standards=ADAPTER.standards, signer=signer())


def bank_transaction() -> Transaction:
    return load_model(Transaction, (ROOT / "examples" / "bank-transaction.json").read_text())


def cert() -> bytes:
    return signer().certificate.public_bytes(serialization.Encoding.PEM)


@functools.cache
def invoice() -> bytes:
    return documents().render_signed(bank_transaction(), standard="ubl", document_type="Invoice")


@functools.cache
def ticket() -> bytes:
    tx = bank_transaction()
    return documents().render_signed(tx, standard="cmi", document_type="transaction")


def with_prolog(signed: bytes, prolog: bytes) -> bytes:
    """``signed`` with ``prolog`` put between the XML declaration and the root."""
    declaration, rest = signed.split(b"?>", 1)
    return declaration + b"?>" + prolog + rest


STYLESHEET = b'\n<?xml-stylesheet type="text/xsl" href="https://evil.example/steal.xsl"?>'


# -- what the signature does not cover ----------------------------------------------------


@pytest.mark.parametrize("name", ["ubl invoice", "cmi transaction"])
@pytest.mark.parametrize(
    "prolog",
    [
        STYLESHEET,
        b"<?xml-stylesheet href='file:///etc/passwd'?>",
        b"<?anything at all?>",
        b'<?OFX OFXHEADER="200" VERSION="220"?>',  # OFX's header, on a document that is not OFX
    ],
)
def test_a_processing_instruction_before_the_root_is_refused(name: str, prolog: bytes) -> None:
    signed = invoice() if name == "ubl invoice" else ticket()
    assert verify_document(signed, cert())
    with pytest.raises(SignatureVerificationError, match="processing instruction"):
        verify_document(with_prolog(signed, prolog), cert())


def test_the_store_does_not_keep_a_stylesheet_the_signature_does_not_cover(tmp_path: Path) -> None:
    secret = generate_secret()
    store = CustomerStore(directory=tmp_path / "store", secrets=[secret], certificate=cert())
    hostile = with_prolog(invoice(), STYLESHEET)
    with running(store) as url:
        refused = deliver(url, secret, "msg_pi", hostile, {"content-type": "application/xml"})
        assert refused.status_code == 422, refused.text
        assert refused.json()["type"] == "urn:cmi:problem:document-signature"
        assert store.documents() == []
        stored = deliver(url, secret, "msg_ok", invoice(), {"content-type": "application/xml"})
        assert stored.status_code == 200, stored.text
    assert (tmp_path / "store" / "msg_ok.xml").read_bytes() == invoice()


def test_cmi_verify_and_parse_refuse_it_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "cert.pem").write_bytes(cert())
    path = tmp_path / "invoice.xml"
    path.write_bytes(with_prolog(invoice(), STYLESHEET))
    assert main(["verify", str(path), "--cert", str(tmp_path / "cert.pem")]) != 0
    assert main(["parse", str(path), "--cert", str(tmp_path / "cert.pem")]) != 0
    assert capsys.readouterr().err.count("processing instruction") == 2


def test_an_ofx_2_statement_signed_inside_keeps_its_own_header() -> None:
    """Earlier releases signed OFX 2 statements inside: their ``<?OFX?>`` header stays
    readable, and nothing else may join it."""
    statement = signer().sign(ADAPTER.render(bank_transaction(), standard="ofx"))
    assert b"<?OFX " in statement
    assert verify_document(statement, cert())
    with pytest.raises(SignatureVerificationError, match="processing instruction"):
        verify_document(statement.replace(b"<?OFX ", STYLESHEET + b"\n<?OFX ", 1), cert())


# -- moved, rewrapped, or signed by another key -------------------------------------------------


def test_a_ubl_signature_moved_to_the_roots_end_verifies_only_to_what_was_signed() -> None:
    """The enveloped-signature transform removes the signature wherever the SDK accepts
    it, so a moved one vouches for exactly the same bytes, and they parse to the same
    values; anything else that moves with it breaks the digest."""
    root = etree.fromstring(invoice())
    signature = next(root.iter(f"{DS}Signature"))
    parent = signature.getparent()
    assert parent is not None
    parent.remove(signature)
    root.append(signature)
    moved = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
    assert verify_document(moved, cert()) == verify_document(invoice(), cert())
    assert ADAPTER.parse(verify_document(moved, cert())) == ADAPTER.parse(invoice())
    # Its old place left with a trace (the whitespace it sat in) no longer verifies.
    marked = moved.replace(
        b"<sac:SignatureInformation>", b"<sac:SignatureInformation> ", 1
    ).replace(
        b"<sac:SignatureInformation/>", b"<sac:SignatureInformation> </sac:SignatureInformation>"
    )
    with pytest.raises(SignatureVerificationError, match="Digest mismatch"):
        verify_document(marked, cert())


def test_the_signed_root_wrapped_in_another_is_refused() -> None:
    inner = etree.fromstring(invoice())
    outer = etree.Element("{urn:oasis:names:specification:ubl:schema:xsd:Invoice-2}Invoice")
    outer.append(inner)
    with pytest.raises(SignatureVerificationError):
        verify_document(etree.tostring(outer), cert())


def test_keyinfo_naming_another_certificate_is_ignored() -> None:
    """A forger signs with their own key and puts their own certificate in KeyInfo: the
    verifier uses only the configured one."""
    key = ec.generate_private_key(ec.SECP256R1())
    forger = DocumentSigner(key=key, certificate=self_signed_certificate(key, common_name="x"))
    unsigned = ADAPTER.render(bank_transaction(), standard="cmi", document_type="transaction")
    forged = forger.sign(unsigned.replace(b"-5.72", b"-0.72"))
    assert verify_document(forged, forger.certificate)
    with pytest.raises(SignatureVerificationError):
        verify_document(forged, cert())
    xml = ADAPTER.render(bank_transaction(), standard="ofx")
    with pytest.raises(SignatureVerificationError):
        verify_detached(xml, forger.sign_detached(xml), cert())


def signed_elsewhere(root: etree._Element, parent: etree._Element) -> etree._Element:
    """``root`` carrying, inside ``parent``, an element the firm's key signed by ID for some
    other purpose (a key used for more than documents), and that signature at the place the
    SDK accepts: the rest of the document is the forger's."""
    carried = etree.SubElement(parent, "{urn:example:other}Assertion", ID="a1")
    carried.text = "signed for something else"
    canonical = etree.tostring(carried, method="c14n", exclusive=True)
    digest = base64.b64encode(hashlib.sha256(canonical).digest()).decode()
    exc = "http://www.w3.org/2001/10/xml-exc-c14n#"
    signed_info = (
        f'<SignedInfo xmlns="{DSIG_NAMESPACE}">'
        f'<CanonicalizationMethod Algorithm="{exc}"></CanonicalizationMethod>'
        '<SignatureMethod Algorithm="http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256">'
        '</SignatureMethod><Reference URI="#a1"><Transforms>'
        f'<Transform Algorithm="{exc}"></Transform></Transforms>'
        '<DigestMethod Algorithm="http://www.w3.org/2001/04/xmlenc#sha256"></DigestMethod>'
        f"<DigestValue>{digest}</DigestValue></Reference></SignedInfo>"
    )
    return etree.fromstring(signer()._signature(signed_info))


def test_a_signature_over_part_of_the_document_is_refused(tmp_path: Path) -> None:
    """Signature wrapping: a reference to an element by ID vouches for that element only.
    The SDK's signatures cover the whole document (``URI=""``, enveloped): nothing else
    verifies, so a signature the firm's key made elsewhere cannot lend its name to a
    forged invoice."""
    forged = invoice().replace(b">-5.72<", b">-9999.00<")
    root = etree.fromstring(forged)
    old = next(root.iter(f"{DS}Signature"))
    information = old.getparent()
    assert information is not None
    information.remove(old)
    # The carried element sits in a UBL extension of its own (ExtensionContent takes any
    # element, so the forgery stays valid UBL); its signature where UBL keeps one.
    extensions = root[0]
    extension = etree.SubElement(extensions, extensions[0].tag)
    content = etree.SubElement(extension, f"{{{extensions.nsmap['ext']}}}ExtensionContent")
    information.append(signed_elsewhere(root, content))
    wrapped = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
    parsed = ADAPTER.parse(wrapped)
    assert isinstance(parsed, Transaction)
    assert parsed.total.amount == Decimal("-9999.00")
    with pytest.raises(SignatureVerificationError, match="whole document"):
        verify_document(wrapped, cert())
    # At the root's end of the SDK's own vocabulary too.
    unsigned = ADAPTER.render(bank_transaction(), standard="cmi", document_type="transaction")
    root = etree.fromstring(unsigned.replace(b"-5.72", b"-9999.00"))
    root.append(signed_elsewhere(root, root))
    with pytest.raises(SignatureVerificationError, match="whole document"):
        verify_document(etree.tostring(root), cert())
    # The customer's store keeps nothing of it.
    secret = generate_secret()
    store = CustomerStore(directory=tmp_path / "store", secrets=[secret], certificate=cert())
    with running(store) as url:
        refused = deliver(url, secret, "msg_w", wrapped, {"content-type": "application/xml"})
        assert refused.status_code == 422, refused.text
    assert store.documents() == []


# -- a detached reference opens nothing ---------------------------------------------------------


def firm_resigned(signature: bytes, uri: str) -> bytes:
    """The firm's detached signature with its reference renamed, signed again by the firm's
    key: the strongest thing a detached reference could be (no attacker can make it)."""
    root = etree.fromstring(signature)
    reference = root.find(f"{DS}SignedInfo/{DS}Reference")
    assert reference is not None
    reference.set("URI", uri)
    signed_info = root.find(f"{DS}SignedInfo")
    assert signed_info is not None
    canonical = etree.tostring(signed_info, method="c14n", exclusive=True)
    value = root.find(f"{DS}SignatureValue")
    assert value is not None
    value.text = base64.b64encode(signer()._signature_value(canonical)).decode()
    return etree.tostring(root)


@pytest.mark.skipif(sys.platform != "linux", reason="FIFOs and inotify")
@pytest.mark.timeout(120, method="thread")
def test_a_detached_reference_naming_a_fifo_beside_it_opens_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    xml = ADAPTER.render(bank_transaction(), standard="ofx")
    signature = documents().detached_signature(xml, standard="ofx", name="msg_1.ofx")
    assert signature is not None
    fifo, existing = tmp_path / "pipe", tmp_path / "other.ofx"
    os.mkfifo(fifo)
    existing.write_bytes(xml.replace(b"-5.72", b"-0.72"))
    (tmp_path / "cert.pem").write_bytes(cert())
    document = tmp_path / "msg_1.ofx"
    document.write_bytes(xml)
    monkeypatch.chdir(tmp_path)
    with Watch(fifo, existing).active() as watch:
        for name in ("pipe", "other.ofx"):
            renamed = firm_resigned(signature, name)
            # The reference's name is only a name: the digest is of the bytes given.
            assert verify_detached(xml, renamed, cert()) == xml
            with pytest.raises(SignatureVerificationError, match="Digest mismatch"):
                verify_detached(existing.read_bytes(), renamed, cert())
            (tmp_path / "msg_1.ofx.sig").write_bytes(renamed)
            assert main(["verify", "msg_1.ofx", "--cert", "cert.pem"]) == 0
            assert main(["parse", "msg_1.ofx", "--cert", "cert.pem"]) == 0
        capsys.readouterr()
    assert watch.opened == [] or watch.opened == [str(existing)] * len(watch.opened)
    # The test itself read ``existing`` (inotify sees that): the FIFO nobody may open.
    assert str(fifo) not in watch.opened


# -- one signature, in one header ---------------------------------------------------------------


def deliver(
    url: str, secret: str, msg_id: str, body: bytes, headers: dict[str, str] | list[tuple[str, str]]
) -> httpx.Response:
    webhook = list(WebhookSigner(secret=secret).headers(msg_id, body, timestamp=None).items())
    extra = list(headers.items()) if isinstance(headers, dict) else headers
    with httpx.Client(trust_env=False, timeout=10) as client:
        return client.post(url + "inbox", content=body, headers=webhook + extra)


def test_two_signature_headers_or_one_for_other_bytes_store_nothing(tmp_path: Path) -> None:
    secret = generate_secret()
    xml = ADAPTER.render(bank_transaction(), standard="ofx")
    good = documents().detached_signature(xml, standard="ofx", name="msg_1.ofx")
    other_xml = xml.replace(b"-5.72", b"-0.72")
    other = documents().detached_signature(other_xml, standard="ofx", name="msg_1.ofx")
    assert good is not None
    assert other is not None
    ofx = ("content-type", "application/x-ofx")
    b64 = base64.b64encode
    store = CustomerStore(directory=tmp_path / "store", secrets=[secret], certificate=cert())
    with running(store) as url:
        for headers in (
            [ofx, (DETACHED_SIGNATURE_HEADER, b64(good).decode())] * 2,
            [
                ofx,
                (DETACHED_SIGNATURE_HEADER, b64(other).decode()),
                (DETACHED_SIGNATURE_HEADER, b64(good).decode()),
            ],
            [ofx, (DETACHED_SIGNATURE_HEADER, b64(other).decode())],
            [ofx, (DETACHED_SIGNATURE_HEADER, b64(b" " * 8 + good).decode()[:-4])],
            [ofx, (DETACHED_SIGNATURE_HEADER, b64(b"<x/>" * 4000).decode())],
        ):
            refused = deliver(url, secret, "msg_1", xml, headers)
            assert refused.status_code == 422, (headers[1][1][:20], refused.text)
            assert store.documents() == []
        ok = deliver(
            url, secret, "msg_1", xml, [ofx, (DETACHED_SIGNATURE_HEADER, b64(good).decode())]
        )
        assert ok.status_code == 200, ok.text
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        "msg_1.json",
        "msg_1.ofx",
        "msg_1.ofx.sig",
    ]


@pytest.mark.parametrize(
    "msg_id", ["../outside", "..", "a/../../b", "x\\..\\y", "NUL", "id\n", "%2e%2e%2fx"]
)
def test_a_signature_file_is_never_written_outside_the_store(tmp_path: Path, msg_id: str) -> None:
    """The ``.ofx.sig`` beside a statement is named by the delivery's id, as the statement
    is: an id that could leave the folder is refused before anything is written."""
    secret = generate_secret()
    xml = ADAPTER.render(bank_transaction(), standard="ofx")
    signature = documents().detached_signature(xml, standard="ofx", name="x.ofx")
    assert signature is not None
    folder = tmp_path / "deep" / "store"
    store = CustomerStore(directory=folder, secrets=[secret])
    headers = {
        "content-type": "application/x-ofx",
        DETACHED_SIGNATURE_HEADER: base64.b64encode(signature).decode(),
    }
    with running(store) as url:
        # Signed by hand: the SDK's own signer refuses such ids before sending.
        timestamp = str(int(time.time()))
        key = base64.b64decode(secret.removeprefix("whsec_"))
        mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + xml, hashlib.sha256)
        webhook = {
            "webhook-id": msg_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode(),
        }
        with httpx.Client(trust_env=False, timeout=10) as client:
            try:
                refused = client.post(url, content=xml, headers={**webhook, **headers})
            except httpx.LocalProtocolError:
                return  # not even sendable
        # Refused by the webhook check (an id with '.') or as a file name.
        assert refused.status_code in (400, 401), refused.text
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == []
