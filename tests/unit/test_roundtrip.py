"""Model -> XML -> model is the identity, for every document type the SDK ships."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from cmi_sdk import Adapter, RenderError, Transaction, load_model
from tests import strategies as s
from tests.strategies import ofx_transactions

CASES: dict[tuple[str, str], st.SearchStrategy[Any]] = {
    ("cmi-ticket", "ticket"): s.tickets(),
    ("cmi", "transaction"): s.transactions(),
    ("cmi", "request"): s.requests(),
    ("cmi", "offer"): s.offers(),
    ("cmi", "acceptance"): s.acceptances(),
    ("cmi", "consent"): s.consents(),
    ("cmi", "offers"): s.offer_sets(),
    ("ofx", "statement"): ofx_transactions(),
    # OFX 1 readers strip a data element's text: a value of only whitespace is refused.
    ("ofx", "statement-sgml"): ofx_transactions().filter(
        lambda tx: all(
            v is None or v.strip() for v in (tx.details.payee, tx.details.memo, tx.details.fitid)
        )
    ),
    ("ubl", "RequestForQuotation"): s.requests(),
    ("ubl", "Quotation"): s.offers(),
    ("ubl", "Order"): s.acceptances(),
    ("ubl", "Invoice"): s.transactions(),
}

ADAPTER = Adapter()


def test_every_document_type_has_a_round_trip_case() -> None:
    shipped = {(std.name, d.name) for std in ADAPTER.standards for d in std.document_types}
    assert shipped == set(CASES)


def _round_trip(model: BaseModel, standard: str, doc_type: str) -> None:
    xml = ADAPTER.render(model, standard=standard, document_type=doc_type)
    if standard == "ofx":
        # OFX has no place for the customer's reference: it reads back as the account.
        model = model.model_copy(update={"customer_ref": "000000000000"})
    back = ADAPTER.parse(xml)
    assert back == model
    # and from the named standard too, not only from the root element
    assert ADAPTER.parse(xml, standard=standard, document_type=doc_type) == model


@pytest.mark.parametrize(("standard", "doc_type"), list(CASES), ids=[f"{a}/{b}" for a, b in CASES])
@pytest.mark.slow
def test_round_trip_is_identity(standard: str, doc_type: str) -> None:
    @given(CASES[standard, doc_type])
    def check(model: BaseModel) -> None:
        _round_trip(model, standard, doc_type)

    check()


@pytest.mark.parametrize(
    ("standard", "doc_type", "example", "model"),
    [
        ("cmi-ticket", "ticket", "ticket.json", Transaction),
        ("cmi", "transaction", "ticket.json", Transaction),
        ("ofx", "statement", "bank-transaction.json", Transaction),
        ("ofx", "statement-sgml", "bank-transaction.json", Transaction),
        ("cmi", "transaction", "bank-transaction.json", Transaction),
    ],
)
def test_examples_round_trip(
    examples_dir: Any, standard: str, doc_type: str, example: str, model: type[BaseModel]
) -> None:
    _round_trip(load_model(model, (examples_dir / example).read_text()), standard, doc_type)


def test_markup_in_text_is_escaped_and_kept(examples_dir: Any) -> None:
    tx = load_model(Transaction, (examples_dir / "ticket.json").read_text())
    assert tx.details is not None
    tricky = "A&T <Air> \"quoted\" 'single' ]]> \r\n\t end "
    tx = tx.model_copy(update={"details": tx.details.model_copy(update={"airline": tricky})})
    xml = ADAPTER.render(tx, standard="cmi-ticket")
    assert b"<Air>" not in xml
    assert b"&#13;" in xml  # a bare CR would come back as LF
    assert ADAPTER.parse(xml) == tx


@pytest.mark.parametrize("char", ["\x00", "\x0b", "\x1f", "\ufffe", "\uffff", "\ud800"])
def test_characters_xml_cannot_carry_are_refused(examples_dir: Any, char: str) -> None:
    tx = load_model(Transaction, (examples_dir / "ticket.json").read_text())
    assert tx.details is not None
    bad = tx.model_copy(
        update={"details": tx.details.model_copy(update={"airline": f"Del{char}ta"})}
    )
    with pytest.raises(RenderError, match=r"U\+[0-9A-F]{4} in airline") as info:
        ADAPTER.render(bad, standard="cmi-ticket")
    assert info.value.field == "airline"
    assert info.value.character == char


@pytest.mark.parametrize("currency", s.CURRENCIES)
def test_every_currency_at_its_extremes(examples_dir: Any, currency: str) -> None:
    from decimal import Decimal

    from cmi_sdk import Money
    from cmi_sdk._currencies import MINOR_UNITS

    tx = load_model(Transaction, (examples_dir / "ticket.json").read_text())
    digits = MINOR_UNITS[currency]
    for amount in (
        Decimal(0),
        Decimal(1).scaleb(-digits),
        Decimal(10**18 - 1) + 1 - Decimal(1).scaleb(-digits),
    ):
        priced = tx.model_copy(update={"total": Money(amount=amount, currency=currency)})
        _round_trip(priced, "cmi-ticket", "ticket")
        _round_trip(priced, "cmi", "transaction")
