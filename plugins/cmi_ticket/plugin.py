"""The ``cmi-ticket`` standard plugin: a flight transaction as the seed deck's ticket."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from lxml import etree

from cmi_sdk import (
    DocumentType,
    FlightDetails,
    MappingError,
    Standard,
    StandardRegistry,
    Transaction,
    hookimpl,
)
from cmi_sdk.mapping import Reader, xml_date, xml_datetime, xml_decimal

NAMESPACE = "urn:cmi:ticket:1.0"


def ticket_context(tx: Transaction) -> dict[str, Any]:
    """Map a flight transaction to the ticket template's variables."""
    details = tx.details
    if not isinstance(details, FlightDetails):
        raise MappingError(f"a ticket is made from a flight transaction, not a {tx.kind}")
    if tx.items:
        raise MappingError(
            "a ticket carries one fare, not line items; use the cmi transaction document"
            " for an itemized transaction"
        )
    if tx.total.amount < 0:
        raise MappingError("a ticket's price cannot be negative")
    return {
        "id": tx.id,
        "issued": xml_datetime(tx.occurred_at),
        "firm": tx.firm,
        "customer": tx.customer_ref,
        "ticketnumber": details.ticket_number,
        "origin": details.origin,
        "destination": details.destination,
        "date": xml_date(details.date),
        "airline": details.airline,
        "flight": details.flight,
        "row": None if details.row is None else str(details.row),
        "seat": details.seat,
        "fare_class": details.fare_class,
        "currency": tx.total.currency,
        "price": xml_decimal(tx.total.amount),
    }


def ticket_from_xml(root: etree._Element) -> Transaction:
    """Read a ticket document back into a flight transaction."""
    r = Reader(root, NAMESPACE)
    row = r.optional("row")
    return Transaction.model_validate(
        {
            "id": r.attr("id"),
            "kind": "flight",
            "occurred_at": r.attr("issued"),
            "firm": r.attr("firm"),
            "customer_ref": r.attr("customer"),
            "total": {"amount": r.text("price"), "currency": r.text("currency")},
            "details": {
                "ticket_number": r.text("ticketnumber"),
                "origin": r.text("origin"),
                "destination": r.text("destination"),
                "date": r.text("date"),
                "airline": r.text("airline"),
                "flight": r.text("flight"),
                "row": None if row is None else int(row),
                "seat": r.optional("seat"),
                "fare_class": r.text("class"),
            },
        }
    )


_HERE = files(__package__)

TICKET = DocumentType(
    name="ticket",
    root=f"{{{NAMESPACE}}}ticket",
    model=Transaction,
    schema=_HERE / "schemas" / "ticket-1.0.xsd",
    template="ticket.xml.j2",
    to_context=ticket_context,
    from_xml=ticket_from_xml,
    description="An airline ticket: a flight transaction, as in the CMI seed deck.",
    kinds=("flight",),
    fields={
        "origin": ("d:origin",),
        "destination": ("d:destination",),
        "date": ("d:date",),
        "airline": ("d:airline",),
        "flight": ("d:flight",),
        "row": ("d:row",),
        "seat": ("d:seat",),
        "fare_class": ("d:class",),
        "total": ("d:currency", "d:price"),
    },
    kept=("id", "occurred_at", "firm", "customer_ref", "ticket_number"),
)

STANDARD = Standard(
    name="cmi-ticket",
    version="1.0",
    title="CMI airline ticket",
    description=(
        "The seed deck's ticket, namespaced and typed (IATA codes, ISO dates, decimal price)."
    ),
    templates=_HERE / "templates",
    document_types=(TICKET,),
)


@hookimpl
def cmi_register_standards(register: StandardRegistry) -> None:
    """Register the ``cmi-ticket`` standard."""
    register.add(STANDARD)
