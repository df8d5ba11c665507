"""Signatures where each standard keeps them, attacked.

A detached signature (OFX) covers the exact bytes delivered: one byte changed, added or
removed anywhere fails it, and so does a signature that digests anything but those bytes
(a transform, a reference to something else, two references). An enveloped signature is
found only where the SDK puts one (the root's last child, UBL's signature extension), once;
everything it covers (the UBL extension and cac:Signature included) is bound by it. A
document with no signature is "not signed", not a verifier's riddle.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from cmi_sdk import (
    Adapter,
    DocumentNotSignedError,
    Documents,
    SignatureVerificationError,
    Transaction,
    XMLInputError,
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
from tests.support import ROOT, signer

DS = f"{{{DSIG_NAMESPACE}}}"


@functools.cache
def documents() -> Documents:
    return Documents(standards=Adapter().standards, signer=signer())


def bank_transaction() -> Transaction:
    return load_model(Transaction, (ROOT / "examples" / "bank-transaction.json").read_text())


def cert() -> bytes:
    return signer().certificate.public_bytes(serialization.Encoding.PEM)


@functools.cache
def statement() -> tuple[bytes, bytes]:
    """An OFX statement and its detached signature."""
    xml = documents().render_signed(bank_transaction(), standard="ofx")
    signature = documents().detached_signature(xml, standard="ofx", name="msg_1.ofx")
    assert signature is not None
    return xml, signature


def resign(signature: bytes, change: str) -> bytes:
    """A detached signature whose SignedInfo is changed by ``change`` and signed again by
    the firm's own key: what an attacker holding no key cannot make, but which shows the
    verifier refuses the shape itself."""
    root = etree.fromstring(signature)
    signed_info = root.find(f"{DS}SignedInfo")
    assert signed_info is not None
    reference = signed_info.find(f"{DS}Reference")
    assert reference is not None
    if change == "transform":
        transforms = etree.Element(f"{DS}Transforms")
        etree.SubElement(transforms, f"{DS}Transform").set(
            "Algorithm", "http://www.w3.org/2001/10/xml-exc-c14n#"
        )
        reference.insert(0, transforms)
    elif change == "two references":
        signed_info.append(etree.fromstring(etree.tostring(reference)))
    else:
        reference.set("URI", change)
    canonical = etree.tostring(signed_info, method="c14n", exclusive=True)
    key = signer().key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    value = signer()._signature_value(canonical)
    signature_value = root.find(f"{DS}SignatureValue")
    assert signature_value is not None
    signature_value.text = base64.b64encode(value).decode()
    return etree.tostring(root)


# -- detached: the exact bytes --------------------------------------------------------------


def test_a_detached_signature_verifies_the_exact_bytes() -> None:
    xml, signature = statement()
    assert verify_detached(xml, signature, cert()) == xml


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_change_to_the_bytes_fails_a_detached_signature(data: st.DataObject) -> None:
    xml, signature = statement()
    position = data.draw(st.integers(0, len(xml)))
    how = data.draw(st.sampled_from(["flip", "insert", "delete"]))
    if how == "flip" and position < len(xml):
        changed = xml[:position] + bytes([xml[position] ^ 0x01]) + xml[position + 1 :]
    elif how == "delete" and position < len(xml):
        changed = xml[:position] + xml[position + 1 :]
    else:
        changed = (
            xml[:position] + data.draw(st.sampled_from([b" ", b"\n", b"\r", b"0"])) + xml[position:]
        )
    with pytest.raises(SignatureVerificationError, match="Digest mismatch"):
        verify_detached(changed, signature, cert())


@pytest.mark.parametrize(
    "change",
    ["transform", "two references", "", "#document", "http://evil.example/x.ofx", "../x.ofx"],
)
def test_a_detached_signature_digests_the_bytes_and_nothing_else(change: str) -> None:
    xml, signature = statement()
    with pytest.raises(SignatureVerificationError, match="detached signature"):
        verify_detached(xml, resign(signature, change), cert())


def test_a_detached_signature_by_another_key_fails() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    other = DocumentSigner(key=key, certificate=self_signed_certificate(key, common_name="x"))
    xml, _ = statement()
    forged = other.sign_detached(xml, name="msg_1.ofx")
    with pytest.raises(SignatureVerificationError):
        verify_detached(xml, forged, cert())


def test_a_detached_signature_passes_the_hardened_parser() -> None:
    xml, signature = statement()
    hostile = (
        b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>' + signature.split(b"?>", 1)[1]
    )
    with pytest.raises(XMLInputError):
        verify_detached(xml, hostile, cert())
    with pytest.raises(SignatureVerificationError, match="Signature element"):
        verify_detached(xml, xml, cert())


def test_a_detached_type_is_never_signed_inside() -> None:
    """OFX readers refuse an enveloped signature: the statement goes out as rendered."""
    std = documents().standards.get("ofx")
    for doc_type in std.document_types:
        xml = documents().render_signed(
            bank_transaction(), standard="ofx", document_type=doc_type.name
        )
        assert xml == documents().render(
            bank_transaction(), standard="ofx", document_type=doc_type.name
        )
        assert b"Signature" not in xml


# -- enveloped: found where the SDK puts it, once ------------------------------------------------


def test_an_unsigned_document_is_not_signed() -> None:
    xml = documents().render(bank_transaction(), standard="cmi", document_type="transaction")
    with pytest.raises(DocumentNotSignedError, match="this document is not signed"):
        verify_document(xml, cert())


def test_a_signature_anywhere_else_is_refused() -> None:
    signed = documents().render_signed(
        bank_transaction(), standard="cmi", document_type="transaction"
    )
    root = etree.fromstring(signed)
    signature = root[-1]
    root.remove(signature)
    root[0].append(signature)  # moved inside the first child
    with pytest.raises(SignatureVerificationError, match="neither the root's last child"):
        verify_document(etree.tostring(root), cert())


def test_a_second_signature_is_refused() -> None:
    signed = documents().render_signed(
        bank_transaction(), standard="cmi", document_type="transaction"
    )
    root = etree.fromstring(signed)
    root.insert(0, etree.fromstring(etree.tostring(root[-1])))
    with pytest.raises(SignatureVerificationError, match="2 signatures"):
        verify_document(etree.tostring(root), cert())


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (
            b'<cbc:PayableAmount currencyID="USD">-5.72',
            b'<cbc:PayableAmount currencyID="USD">-0.72',
        ),
        (
            b"urn:oasis:names:specification:ubl:signature:Invoice</cbc:ID>",
            b"urn:oasis:names:specification:ubl:signature:Other</cbc:ID>",
        ),
        (
            b"<ext:ExtensionURI>urn:oasis:names:specification:ubl:dsig:enveloped",
            b"<ext:ExtensionURI>urn:x",
        ),
        (
            b"<cbc:ID>urn:oasis:names:specification:ubl:signature:1</cbc:ID>",
            b"<cbc:ID>urn:x:2</cbc:ID>",
        ),
    ],
)
def test_a_ubl_signature_binds_the_document_its_extension_and_cac_signature(
    old: bytes, new: bytes
) -> None:
    signed = documents().render_signed(bank_transaction(), standard="ubl", document_type="Invoice")
    assert verify_document(signed, cert())
    assert old in signed
    with pytest.raises(SignatureVerificationError, match="Digest mismatch"):
        verify_document(signed.replace(old, new, 1), cert())


# -- the customer's store and cmi verify ------------------------------------------------------


def deliver(url: str, secret: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    webhook = WebhookSigner(secret=secret).headers("msg_1", body, timestamp=None)
    return httpx.post(url + "inbox", content=body, headers={**webhook, **headers}, timeout=10)


def test_the_store_refuses_a_statement_whose_bytes_changed(tmp_path: Path) -> None:
    secret = generate_secret()
    xml, signature = statement()
    header = {
        "content-type": "application/x-ofx",
        DETACHED_SIGNATURE_HEADER: base64.b64encode(signature).decode(),
    }
    store = CustomerStore(directory=tmp_path / "store", secrets=[secret], certificate=cert())
    with running(store) as url:
        changed = xml.replace(b"-5.72", b"-5.73")
        refused = deliver(url, secret, changed, header)
        assert refused.status_code == 422
        assert refused.json()["type"] == "urn:cmi:problem:document-signature"
        unsigned = deliver(url, secret, xml, {"content-type": "application/x-ofx"})
        assert unsigned.status_code == 422
        assert "not signed" in unsigned.json()["detail"]
        not_base64 = deliver(url, secret, xml, {**header, DETACHED_SIGNATURE_HEADER: "@@"})
        assert not_base64.status_code == 422
        assert store.documents() == []
        stored = deliver(url, secret, xml, header)
        assert stored.status_code == 200, stored.text
    assert (tmp_path / "store" / "msg_1.ofx").read_bytes() == xml
    assert (tmp_path / "store" / "msg_1.ofx.sig").read_bytes() == signature


def test_cmi_verify_finds_the_signature_beside_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    xml, signature = statement()
    (tmp_path / "cert.pem").write_bytes(cert())
    document = tmp_path / "msg_1.ofx"
    document.write_bytes(xml)
    (tmp_path / "msg_1.ofx.sig").write_bytes(signature)
    monkeypatch.setenv("CMI_SIGNING_CERT", str(tmp_path / "cert.pem"))
    monkeypatch.chdir(tmp_path)
    assert main(["verify", str(document)]) == 0
    assert "signature verified (detached" in capsys.readouterr().out
    document.write_bytes(xml + b"\n")
    assert main(["verify", str(document)]) != 0
    assert "does not verify" in capsys.readouterr().err
    (tmp_path / "msg_1.ofx.sig").unlink()
    moved = tmp_path / "elsewhere.sig"
    moved.write_bytes(signature)
    document.write_bytes(xml)
    assert main(["verify", str(document), "--signature", str(moved)]) == 0
    assert main(["verify", str(document)]) != 0
    assert "this document is not signed" in capsys.readouterr().err
