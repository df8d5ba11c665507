"""The example plugin's tests, with the fixtures cmi-sdk's pytest plugin provides."""

from __future__ import annotations

import importlib.metadata

import pytest

from cmi_sdk import MappingError, Transaction, load_model
import cmi_standard_example.plugin as receipt

PURCHASE = load_model(
    Transaction,
    {
        "id": "R-1001",
        "kind": "purchase",
        "occurred_at": "2026-11-24T10:15:00Z",
        "firm": "shop.example",
        "customer_ref": "cust-7f3a9c",
        "items": [
            {
                "description": "Coffee & croissant <to go>",
                "quantity": "2",
                "unit_price": {"amount": "3.40", "currency": "EUR"},
                "amount": {"amount": "6.80", "currency": "EUR"},
            }
        ],
        "total": {"amount": "6.80", "currency": "EUR"},
    },
)


def test_the_entry_point_is_installed():
    names = {ep.name for ep in importlib.metadata.entry_points(group="cmi_sdk")}
    assert "example-receipt" in names


def test_round_trip(cmi_adapter, cmi_round_trip):
    adapter = cmi_adapter(receipt)
    xml = cmi_round_trip(adapter, PURCHASE, standard="example-receipt")
    assert b"Coffee &amp; croissant &lt;to go&gt;" in xml


def test_schema_validity(cmi_adapter, cmi_schema_valid):
    adapter = cmi_adapter(receipt)
    xml = adapter.render(PURCHASE, standard="example-receipt")
    assert cmi_schema_valid(adapter, xml).document_type.name == "receipt"
    with pytest.raises(AssertionError, match="not a valid example-receipt receipt"):
        cmi_schema_valid(adapter, xml.replace(b"<currency>EUR", b"<currency>euro"))


def test_only_purchases_make_receipts(cmi_adapter):
    ticket = PURCHASE.model_dump()
    ticket.update(
        kind="flight",
        items=(),
        details={
            "origin": "ATL", "destination": "CDG", "date": "2026-07-01", "airline": "Delta",
            "flight": "2231", "fare_class": "B", "ticket_number": "12524057",
        },
    )
    with pytest.raises(MappingError, match="made from a purchase"):
        cmi_adapter(receipt).render(Transaction.model_validate(ticket), standard="example-receipt")
