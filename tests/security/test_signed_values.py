"""What verifies is what parses.

A signature covers a document's canonical form, which leaves comments out and resolves
character references and CDATA sections. A reader that took an element's first text node
would read ``5`` from ``<price>5<!---->20.00</price>``, while the signature vouches for
``520.00``. Here: values are the whole text of their element, comments and processing
instructions never split them, a leaf holding anything but text is refused, and a receiver
that verified a signature keeps only what the signature covers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree
from pydantic import BaseModel

from cmi_sdk import (
    Adapter,
    CMIError,
    MappingError,
    SignatureVerificationError,
    Transaction,
    XMLInputError,
    load_model,
)
from cmi_sdk.cli import main
from cmi_sdk.mapping import Reader, leaf_text
from cmi_sdk.receiver import CustomerStore, running
from cmi_sdk.signing import verify_document
from cmi_sdk.webhooks import WebhookSigner, generate_secret
from tests.support import ROOT, signer, ticket

ADAPTER = Adapter()
PRICED = ticket(total={"amount": Decimal("520.00"), "currency": "USD"})
SIGNED_TICKET = signer().sign(ADAPTER.render(PRICED, standard="cmi-ticket"))
SPLIT = SIGNED_TICKET.replace(b"<price>520.00</price>", b"<price>5<!---->20.00</price>")


def _signed_statement() -> tuple[BaseModel, bytes]:
    # Signed inside, as earlier releases signed statements (now they are signed detached);
    # OFX has no place for the customer, who reads back as the account.
    tx = load_model(Transaction, (ROOT / "examples" / "bank-transaction.json").read_text())
    signed = signer().sign(ADAPTER.render(tx, standard="ofx"))
    return tx.model_copy(update={"customer_ref": "000000000000"}), signed


DOCUMENTS: dict[str, tuple[BaseModel, bytes]] = {
    "ticket": (PRICED, SIGNED_TICKET),
    "ofx statement": _signed_statement(),
}


def test_the_split_price_is_the_signed_price_or_nothing(tmp_path: Path) -> None:
    assert SPLIT != SIGNED_TICKET
    # The signature's canonical form is unchanged by the comment...
    assert verify_document(SIGNED_TICKET, signer().certificate)
    # ...but a signed document may not carry what its signature does not cover.
    with pytest.raises(SignatureVerificationError, match="comment"):
        verify_document(SPLIT, signer().certificate)
    # Read without a signature check, the price is all of the element's text.
    assert ADAPTER.parse(SPLIT) == PRICED
    path = tmp_path / "split.xml"
    path.write_bytes(SPLIT)
    out = tmp_path / "out.json"
    assert main(["parse", str(path), "--output", str(out)]) == 0
    assert '"amount": "520.00"' in out.read_text()


def test_cmi_parse_with_a_certificate_parses_what_was_verified(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_bytes(signer().certificate.public_bytes(serialization.Encoding.PEM))
    good, split = tmp_path / "good.xml", tmp_path / "split.xml"
    good.write_bytes(SIGNED_TICKET)
    split.write_bytes(SPLIT)
    out = tmp_path / "out.json"
    assert main(["parse", str(good), "--cert", str(cert), "--output", str(out)]) == 0
    assert '"amount": "520.00"' in out.read_text()
    assert main(["parse", str(split), "--cert", str(cert)]) == 1
    assert "comment" in capsys.readouterr().err
    assert main(["verify", str(split), "--cert", str(cert)]) == 1


@pytest.fixture
def customer_store(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    secret = generate_secret()
    inbox = tmp_path / "inbox"
    pem = signer().certificate.public_bytes(serialization.Encoding.PEM)
    with running(CustomerStore(directory=inbox, secrets=[secret], certificate=pem)) as url:
        yield url, secret, inbox


def _deliver(url: str, secret: str, msg_id: str, body: bytes) -> httpx.Response:
    headers = WebhookSigner(secret=secret).headers(msg_id, body)
    headers["content-type"] = "application/xml"
    with httpx.Client(trust_env=False, timeout=10) as client:
        return client.post(url, content=body, headers=headers)


def test_the_receiver_keeps_only_what_was_verified(customer_store: tuple[str, str, Path]) -> None:
    url, secret, inbox = customer_store
    response = _deliver(url, secret, "msg_split", SPLIT)
    assert response.status_code == 422
    assert response.json()["type"] == "urn:cmi:problem:document-signature"
    for uncovered in (
        SIGNED_TICKET.replace(b"</ticket>", b"</ticket><!-- after -->"),
        SIGNED_TICKET.replace(b"</ticket>", b"</ticket><?after it?>"),
        SIGNED_TICKET.replace(b"<price>", b"<?p?><price>"),
        SIGNED_TICKET.replace(b"?>", b"?><!-- before -->", 1),
    ):
        assert _deliver(url, secret, "msg_more", uncovered).status_code == 422
    assert not inbox.exists() or not list(inbox.iterdir())
    assert _deliver(url, secret, "msg_ok", SIGNED_TICKET).status_code == 200
    stored = (inbox / "msg_ok.xml").read_bytes()
    assert ADAPTER.parse(verify_document(stored, signer().certificate)) == PRICED


@pytest.mark.parametrize(
    "leaf",
    [
        "<price>5<!---->20.00</price>",
        "<price>5<?x y?>20.00</price>",
        "<price>5<b>20.00</b></price>",
    ],
)
def test_a_leaf_holding_anything_but_text_is_refused(leaf: str) -> None:
    # Built by lxml's own lossless parser: a tree that never went through the hardened one.
    element = etree.fromstring(leaf.replace("<price>", '<price xmlns="urn:x">'))
    with pytest.raises(MappingError, match="where text belongs"):
        leaf_text(element)
    parent = etree.fromstring(f'<t xmlns="urn:x">{leaf}</t>')
    with pytest.raises(MappingError, match="<price> holds"):
        Reader(parent, "urn:x").text("price")


def test_a_leaf_value_is_all_of_its_text() -> None:
    element = etree.fromstring(b"<price>5<![CDATA[2]]>&#48;.&#x30;0</price>")
    assert leaf_text(element) == "520.00"


# -- the property -------------------------------------------------------------------------

_RUN = re.compile(r"(?<=>)[^<]*(?=<)")


def _text_runs(text: str) -> list[tuple[int, int]]:
    """Where character data may sit: between one tag's end and the next tag's start."""
    return [(m.start(), m.end()) for m in _RUN.finditer(text)]


@st.composite
def disguised(draw: st.DrawFn) -> tuple[str, BaseModel, bytes, bytes]:
    """A signed document, and a copy with comments, processing instructions, CDATA sections
    or character references put in: all things a signature's canonical form does not see,
    or sees through."""
    name = draw(st.sampled_from(sorted(DOCUMENTS)))
    model, signed = DOCUMENTS[name]
    text = signed.decode()
    runs = _text_runs(text)
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement), non-overlapping
    for _ in range(draw(st.integers(1, 4))):
        start, end = draw(st.sampled_from(runs))
        kind = draw(st.sampled_from(["comment", "pi", "cdata", "empty cdata", "reference"]))
        at = draw(st.integers(start, end))
        if kind == "comment":
            edits.append((at, at, f"<!--{draw(st.sampled_from(['', 'x', ' <a> ']))}-->"))
        elif kind == "pi":
            edits.append((at, at, "<?note see <this>?>"))
        elif kind == "empty cdata":
            edits.append((at, at, "<![CDATA[]]>"))
        elif kind == "cdata" and "&" not in text[start:end]:
            stop = draw(st.integers(at, end))
            edits.append((at, stop, f"<![CDATA[{text[at:stop]}]]>"))
        elif kind == "reference" and at < end and "&" not in text[start:end]:
            char = text[at]
            form = draw(st.sampled_from([f"&#{ord(char)};", f"&#x{ord(char):X};"]))
            edits.append((at, at + 1, form))
    edits.sort()
    kept: list[tuple[int, int, str]] = []
    for edit in edits:
        if not kept or (edit[0] >= kept[-1][1] and edit[0] > kept[-1][0]):
            kept.append(edit)
    for start, end, replacement in reversed(kept):
        text = text[:start] + replacement + text[end:]
    return name, model, signed, text.encode()


@given(disguised())
def test_a_disguised_document_verifies_to_the_signed_values_or_not_at_all(
    case: tuple[str, BaseModel, bytes, bytes],
) -> None:
    _name, model, _signed, mutated = case
    try:
        verified = verify_document(mutated, signer().certificate)
    except (SignatureVerificationError, XMLInputError):
        verified = None
    if verified is not None:
        # What verified parses to the signed values, from the verified form and the raw.
        assert _parse(verified) == model
        assert _parse(mutated) == model
    # Without a signature check, the values are still the signed ones, or refused.
    try:
        parsed = _parse(mutated)
    except CMIError:
        return
    assert parsed == model


def _parse(xml: bytes) -> BaseModel:
    return ADAPTER.parse(xml)
