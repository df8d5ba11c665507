"""What verifies is what parses, for the signatures' new places.

A UBL invoice carries its signature in UBL's extension; an OFX 1 statement carries none,
its signature travels beside it over its exact bytes. Each is disguised here in ways its
reader sees through (comments, processing instructions, CDATA, character references, the
signature moved, namespaces added; for SGML: tag case, end tags, line ends, references, the
header's character set, a byte-order mark, a DOS end-of-file mark): either the signature
refuses the disguise, or what verified reads back as exactly the signed values.
"""

from __future__ import annotations

import contextlib
import functools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree
from pydantic import BaseModel

from cmi_sdk import (
    Adapter,
    CMIError,
    Documents,
    SignatureVerificationError,
    Transaction,
    XMLInputError,
    load_model,
)
from cmi_sdk.signing import DSIG_NAMESPACE, verify_detached, verify_document
from tests.support import ROOT, signer

ADAPTER = Adapter()
CERT = signer().certificate


@functools.cache
def documents() -> Documents:
    return Documents(standards=ADAPTER.standards, signer=signer())


def bank_transaction() -> Transaction:
    return load_model(Transaction, (ROOT / "examples" / "bank-transaction.json").read_text())


@functools.cache
def invoice() -> bytes:
    return documents().render_signed(bank_transaction(), standard="ubl", document_type="Invoice")


@functools.cache
def sgml_statement() -> tuple[bytes, bytes]:
    tx = bank_transaction()
    sgml = documents().render_signed(tx, standard="ofx", document_type="statement-sgml")
    signature = documents().detached_signature(
        sgml, standard="ofx", document_type="statement-sgml", name="msg_1.ofx"
    )
    assert signature is not None
    return sgml, signature


# OFX has no place for the customer's reference: it reads back as the account.
OFX_MODEL = bank_transaction().model_copy(update={"customer_ref": "000000000000"})

_RUN = re.compile(r"(?<=>)[^<]*(?=<)")
_CBC_TAG = re.compile(r"<cbc:[A-Za-z]+")


def _moved_signature(text: str) -> str:
    root = etree.fromstring(text.encode())
    found = list(root.iter(f"{{{DSIG_NAMESPACE}}}Signature"))
    if len(found) != 1:
        return text
    parent = found[0].getparent()
    assert parent is not None
    parent.remove(found[0])
    root.append(found[0])
    return etree.tostring(root, encoding="unicode")


def _whole(xml: bytes) -> bytes:
    """The whole document but its signature, comments and what precedes the root kept."""
    tree = etree.fromstring(xml, etree.XMLParser(resolve_entities=False)).getroottree()
    for signature in list(tree.getroot().iter(f"{{{DSIG_NAMESPACE}}}Signature")):
        parent = signature.getparent()
        assert parent is not None
        parent.remove(signature)
    return etree.tostring(tree, method="c14n", exclusive=True, with_comments=True)


@st.composite
def disguised_invoices(draw: st.DrawFn) -> bytes:
    """The signed invoice with one to four disguises its reader sees through."""
    text = invoice().decode().split("?>", 1)[1]
    for _ in range(draw(st.integers(1, 4))):
        runs = [(m.start(), m.end()) for m in _RUN.finditer(text)]
        start, end = draw(st.sampled_from(runs))
        at = draw(st.integers(start, end))
        kind = draw(
            st.sampled_from(
                ["comment", "pi", "cdata", "reference", "namespace", "move", "prolog", "copy"]
            )
        )
        if kind == "comment":
            text = text[:at] + "<!---->" + text[at:]
        elif kind == "pi":
            text = text[:at] + "<?note x?>" + text[at:]
        elif kind == "cdata" and "&" not in text[start:end]:
            stop = draw(st.integers(at, end))
            text = text[:at] + f"<![CDATA[{text[at:stop]}]]>" + text[stop:]
        elif kind == "reference" and at < end and text[at] not in "&<>":
            text = text[:at] + f"&#{ord(text[at])};" + text[at + 1 :]
        elif kind == "namespace":
            # An unused declaration: exclusive canonicalization leaves it out.
            tag = _CBC_TAG.search(text, at)
            if tag is not None:
                text = text[: tag.end()] + ' xmlns:x="urn:evil"' + text[tag.end() :]
        elif kind == "move":
            text = _moved_signature(text)
        elif kind == "prolog":
            text = '<?xml-stylesheet href="https://evil.example/x.xsl"?>' + text
        elif kind == "copy":
            # A second copy of the signature (a wrapping attack's first step).
            sig = re.search(r"<Signature\b.*?</Signature>", text, re.DOTALL)
            if sig is not None:
                text = text[:at] + sig.group() + text[at:]
    return text.encode()


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(disguised_invoices())
def test_a_disguised_ubl_invoice_verifies_to_the_signed_values_or_not_at_all(
    mutated: bytes,
) -> None:
    try:
        verified = verify_document(mutated, CERT)
    except (SignatureVerificationError, XMLInputError):
        verified = None
    if verified is not None:
        assert verified == verify_document(invoice(), CERT)
        assert ADAPTER.parse(verified) == bank_transaction()
        # And the whole document, as any reader of the stored bytes sees it (comments and
        # processing instructions outside the root included), is what was signed.
        assert _whole(mutated) == _whole(invoice())
    # Read without a signature check, the values are the signed ones, or refused.
    try:
        parsed: BaseModel | None = ADAPTER.parse(mutated)
    except CMIError:
        parsed = None
    assert parsed is None or parsed == bank_transaction()


# -- OFX 1, signed detached ---------------------------------------------------------------------


def _sgml_disguises(sgml: bytes) -> list[bytes]:
    """Changes an OFX 1 reader reads as the same statement, or nearly."""
    return [
        sgml.replace(b"<TRNAMT>", b"<trnamt>"),
        sgml.replace(b"<NAME>", b"<name>"),
        sgml.replace(b"\n<MEMO>", b"</NAME>\n<MEMO>"),
        sgml.replace(b"\n", b"\r\n"),
        sgml.replace(b"SERVICES", b"&#83;ERVICES", 1),
        sgml.replace(b"AT&amp;T", b"AT&T", 1),
        sgml.replace(b" SERVICES", b"&nbsp;SERVICES", 1),
        sgml.replace(b"CHARSET:NONE", b"CHARSET:1252"),
        sgml.replace(b"ENCODING:UTF-8", b"ENCODING:USASCII"),
        b"\xef\xbb\xbf" + sgml,
        sgml + b"\x1a",
        sgml + b"\r\n",
        sgml.replace(b"<TRNAMT>-5.72", b"<TRNAMT>-5.720"),
        sgml.replace(b"<TRNAMT>-5.72", b"<TRNAMT> -5.72"),
        sgml.replace(b"<TRNAMT>-5.72", b"<TRNAMT>-0.72"),
    ]


def test_the_sgml_reader_sees_through_the_disguises() -> None:
    """The disguises are real: the reader reads most of them as the signed statement,
    so it is the signature, not the reader, that tells them apart."""
    sgml, _ = sgml_statement()
    same = 0
    for disguised in _sgml_disguises(sgml):
        assert disguised != sgml
        with contextlib.suppress(CMIError):
            same += ADAPTER.parse(disguised) == OFX_MODEL
    assert same >= 8


@pytest.mark.parametrize("index", range(15))
def test_a_disguised_sgml_statement_fails_its_detached_signature(index: int) -> None:
    sgml, signature = sgml_statement()
    assert ADAPTER.parse(verify_detached(sgml, signature, CERT)) == OFX_MODEL
    with pytest.raises(SignatureVerificationError, match="Digest mismatch"):
        verify_detached(_sgml_disguises(sgml)[index], signature, CERT)


def _other_line() -> Transaction:
    data = bank_transaction().model_dump(mode="json")
    data["total"]["amount"] = "-99.00"
    data["details"].update(payee="SOMEONE ELSE", memo=None)
    return Transaction.model_validate(data)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_any_sgml_that_verifies_reads_as_the_signed_statement(data: st.DataObject) -> None:
    """Bytes spliced from the signed statement and a second signed statement (another
    amount, payee and memo): whatever verifies against the first's signature parses to the
    first's values."""
    sgml, signature = sgml_statement()
    other = documents().render_signed(
        _other_line(),
        standard="ofx",
        document_type="statement-sgml",
    )
    cut = data.draw(st.integers(0, min(len(sgml), len(other))))
    spliced = data.draw(st.sampled_from([sgml[:cut] + other[cut:], other[:cut] + sgml[cut:]]))
    try:
        verified = verify_detached(spliced, signature, CERT)
    except SignatureVerificationError:
        return
    assert verified == sgml
    assert ADAPTER.parse(verified) == OFX_MODEL
