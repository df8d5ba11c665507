"""The ``example-receipt`` standard: a purchase transaction as a short receipt.

Everything a standard plugin provides is here: the mapping from the canonical model to the
template's variables, the parser back, the document type (root element, XSD, template),
the standard, and the hook that registers it.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from lxml import etree

from cmi_sdk import (
    DocumentType,
    MappingError,
    Standard,
    StandardRegistry,
    Transaction,
    hookimpl,
)
from cmi_sdk.mapping import Reader, xml_datetime, xml_decimal

NAMESPACE = "urn:example:receipt:1.0"


def receipt_context(tx: Transaction) -> dict[str, Any]:
    """The model to the template's variables: ready strings, so the template only places
    them (jinja2 escapes every one)."""
    if tx.kind != "purchase":
        raise MappingError(f"a receipt is made from a purchase, not a {tx.kind}")
    return {
        "id": tx.id,
        "issued": xml_datetime(tx.occurred_at),
        "shop": tx.firm,
        "customer": tx.customer_ref,
        "lines": [
            {
                "what": item.description,
                "quantity": xml_decimal(item.quantity),
                "price": xml_decimal(item.unit_price.amount),
                "amount": xml_decimal(item.amount.amount),
            }
            for item in tx.items
        ],
        "currency": tx.total.currency,
        "total": xml_decimal(tx.total.amount),
    }


def receipt_from_xml(root: etree._Element) -> Transaction:
    """The document back to the model: every field the mapping wrote."""
    r = Reader(root, NAMESPACE)
    currency = r.text("currency")

    def money(text: str) -> dict[str, str]:
        return {"amount": text, "currency": currency}

    return Transaction.model_validate(
        {
            "id": r.attr("id"),
            "kind": "purchase",
            "occurred_at": r.attr("issued"),
            "firm": r.attr("shop"),
            "customer_ref": r.attr("customer"),
            "items": [
                {
                    "description": line.text("what"),
                    "quantity": line.text("quantity"),
                    "unit_price": money(line.text("price")),
                    "amount": money(line.text("amount")),
                }
                for line in r.children("line")
            ],
            "total": money(r.text("total")),
        }
    )


_HERE = files(__package__)

RECEIPT = DocumentType(
    name="receipt",
    root=f"{{{NAMESPACE}}}receipt",
    model=Transaction,
    schema=_HERE / "schemas" / "receipt-1.0.xsd",
    template="receipt.xml.j2",
    to_context=receipt_context,
    from_xml=receipt_from_xml,
    description="A purchase receipt: its lines and total.",
)

STANDARD = Standard(
    name="example-receipt",
    version="1.0",
    title="Example purchase receipt",
    templates=_HERE / "templates",
    document_types=(RECEIPT,),
)


@hookimpl
def cmi_register_standards(register: StandardRegistry) -> None:
    """Register the ``example-receipt`` standard."""
    register.add(STANDARD)
