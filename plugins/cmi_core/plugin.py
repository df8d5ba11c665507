"""The ``cmi`` standard plugin: the CMI core vocabulary, namespace ``urn:cmi:core:1.0``.

Six document types, each expressing every field of its canonical model, so that a
document can always be read back into the model it came from: ``transaction`` (the envelope
for a transaction of any kind), ``request``, ``offer``, ``offers`` (the answer to a
request), ``acceptance`` and ``consent`` (the consent record of sharing terms). The XSDs live in
the project's top-level ``schemas/`` folder, shipped as the package ``cmi_core.schemas``.
``offer`` and ``offers``, rendered on the request-to-offer path, also have hand-written
renderers (``cmi_core._render``) that write exactly what their templates do.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from lxml import etree

from cmi_core._render import render_offer, render_offers
from cmi_sdk import (
    Acceptance,
    BankStatementLineDetails,
    ConsentRecord,
    DocumentType,
    FlightDetails,
    FlightProduct,
    LineItem,
    LoanDetails,
    LoanProduct,
    Money,
    Offer,
    OfferSet,
    Request,
    Standard,
    StandardRegistry,
    Transaction,
    hookimpl,
)
from cmi_sdk.mapping import Reader, xml_date, xml_datetime, xml_decimal

NAMESPACE = "urn:cmi:core:1.0"

# -- model to template variables ---------------------------------------------------------
# Every value is handed to the template as a ready string, so templates only place them.


def _money(money: Money) -> dict[str, str]:
    return {"currency": money.currency, "amount": xml_decimal(money.amount)}


def _item(item: LineItem) -> dict[str, Any]:
    return {
        "description": item.description,
        "quantity": xml_decimal(item.quantity),
        "unit_price": _money(item.unit_price),
        "amount": _money(item.amount),
        "sku": item.sku,
    }


def _flight(product: FlightProduct) -> dict[str, Any]:
    out: dict[str, Any] = {
        "origin": product.origin,
        "destination": product.destination,
        "date": xml_date(product.date),
        "airline": product.airline,
        "flight": product.flight,
        "fare_class": product.fare_class,
    }
    if isinstance(product, FlightDetails):
        out["ticket_number"] = product.ticket_number
        out["row"] = None if product.row is None else str(product.row)
        out["seat"] = product.seat
    return out


def _loan(product: LoanProduct) -> dict[str, Any]:
    out: dict[str, Any] = {
        "principal": _money(product.principal),
        "term_months": str(product.term_months),
        "apr": xml_decimal(product.apr),
    }
    if isinstance(product, LoanDetails):
        out["account"] = product.account
    return out


def transaction_context(tx: Transaction) -> dict[str, Any]:
    """Map a transaction of any kind to the envelope template's variables."""
    details = tx.details
    bank = None
    if isinstance(details, BankStatementLineDetails):
        bank = {
            "transaction_type": details.transaction_type,
            "posted_at": xml_datetime(details.posted_at),
            "payee": details.payee,
            "memo": details.memo,
            "fitid": details.fitid,
        }
    return {
        "id": tx.id,
        "kind": tx.kind,
        "occurred_at": xml_datetime(tx.occurred_at),
        "firm": tx.firm,
        "customer_ref": tx.customer_ref,
        "items": [_item(i) for i in tx.items],
        "total": _money(tx.total),
        "flight": _flight(details) if isinstance(details, FlightDetails) else None,
        "bank": bank,
        "loan": _loan(details) if isinstance(details, LoanDetails) else None,
    }


def request_context(request: Request) -> dict[str, Any]:
    """Map a request to the request template's variables."""
    wanted = request.wanted
    c = request.constraints
    constraints = None
    if c.max_price is not None or c.earliest_date is not None or c.latest_date is not None:
        constraints = {
            "max_price": None if c.max_price is None else _money(c.max_price),
            "earliest_date": None if c.earliest_date is None else xml_date(c.earliest_date),
            "latest_date": None if c.latest_date is None else xml_date(c.latest_date),
        }
    flight = loan = None
    if wanted.kind == "flight":
        flight = {
            "origin": wanted.origin,
            "destination": wanted.destination,
            "date": xml_date(wanted.date),
            "cabin": wanted.cabin,
            "passengers": str(wanted.passengers),
        }
    else:
        loan = {"amount": _money(wanted.amount), "term_months": str(wanted.term_months)}
    return {
        "id": request.id,
        "kind": request.kind,
        "customer_ref": request.customer_ref,
        "reply_to": request.reply_to,
        "created_at": xml_datetime(request.created_at),
        "respond_by": None if request.respond_by is None else xml_datetime(request.respond_by),
        "flight": flight,
        "loan": loan,
        "constraints": constraints,
        "claims": [
            {"type": c.type, "value": c.value, "evidence": c.evidence} for c in request.claims
        ],
    }


def offer_context(offer: Offer) -> dict[str, Any]:
    """Map an offer to the offer template's variables."""
    return {"offer": _offer(offer)}


def _offer(offer: Offer) -> dict[str, Any]:
    product = offer.product
    return {
        "id": offer.id,
        "kind": offer.kind,
        "request_id": offer.request_id,
        "firm": offer.firm,
        "customer_ref": offer.customer_ref,
        "reply_to": offer.reply_to,
        "created_at": xml_datetime(offer.created_at),
        "valid_from": xml_datetime(offer.valid_from),
        "valid_until": xml_datetime(offer.valid_until),
        "flight": _flight(product) if isinstance(product, FlightProduct) else None,
        "loan": _loan(product) if isinstance(product, LoanProduct) else None,
        "items": [_item(i) for i in offer.items],
        "price": _money(offer.price),
        "rewards": [
            {"code": r.code, "description": r.description, "amount": _money(r.amount)}
            for r in offer.rewards
        ],
        "advice": [{"code": a.code, "text": a.text} for a in offer.advice],
    }


def offers_context(answer: OfferSet) -> dict[str, Any]:
    """Map a firm's answer to a request to the offers template's variables."""
    return {
        "request_id": answer.request_id,
        "firm": answer.firm,
        "reply_to": answer.reply_to,
        "answered_at": xml_datetime(answer.answered_at),
        "offers": [_offer(o) for o in answer.offers],
        "declined": answer.declined,
    }


def acceptance_context(acceptance: Acceptance) -> dict[str, Any]:
    """Map an acceptance to the acceptance template's variables."""
    identity = acceptance.identity
    return {
        "id": acceptance.id,
        "offer_id": acceptance.offer_id,
        "customer_ref": acceptance.customer_ref,
        "accepted_at": xml_datetime(acceptance.accepted_at),
        "identity": None if identity is None else {"name": identity.name, "email": identity.email},
    }


# -- XML back to models -------------------------------------------------------------------


def _read_items(r: Reader) -> list[dict[str, Any]]:
    return [
        {
            "description": i.text("description"),
            "quantity": i.text("quantity"),
            "unit_price": i.money("unitPrice"),
            "amount": i.money("amount"),
            "sku": i.optional("sku"),
        }
        for i in r.children("item")
    ]


def _read_flight(f: Reader) -> dict[str, Any]:
    out: dict[str, Any] = {
        "origin": f.text("origin"),
        "destination": f.text("destination"),
        "date": f.text("date"),
        "airline": f.text("airline"),
        "flight": f.text("flightNumber"),
        "fare_class": f.text("fareClass"),
    }
    ticket = f.optional("ticketNumber")
    if ticket is not None:
        out["ticket_number"] = ticket
        out["row"] = f.optional("row")
        out["seat"] = f.optional("seat")
    return out


def _read_loan(r: Reader) -> dict[str, Any]:
    out: dict[str, Any] = {
        "principal": r.money("principal"),
        "term_months": r.text("termMonths"),
        "apr": r.text("apr"),
    }
    account = r.optional("account")
    if account is not None:
        out["account"] = account
    return out


def transaction_from_xml(root: etree._Element) -> Transaction:
    """Read a transaction envelope back into a transaction."""
    r = Reader(root, NAMESPACE)
    details: dict[str, Any] | None = None
    if (flight := r.child("flight")) is not None:
        details = _read_flight(flight)
    elif (bank := r.child("bankStatementLine")) is not None:
        details = {
            "transaction_type": bank.text("transactionType"),
            "posted_at": bank.text("postedAt"),
            "payee": bank.text("payee"),
            "memo": bank.optional("memo"),
            "fitid": bank.text("fitid"),
        }
    elif (loan := r.child("loan")) is not None:
        details = _read_loan(loan)
    return Transaction.model_validate(
        {
            "id": r.attr("id"),
            "kind": r.attr("kind"),
            "occurred_at": r.text("occurredAt"),
            "firm": r.text("firm"),
            "customer_ref": r.text("customerRef"),
            "items": _read_items(r),
            "total": r.money("total"),
            "details": details,
        }
    )


def request_from_xml(root: etree._Element) -> Request:
    """Read a request document back into a request."""
    r = Reader(root, NAMESPACE)
    wanted_el = r.require("wanted")
    wanted: dict[str, Any]
    if (flight := wanted_el.child("flight")) is not None:
        wanted = {
            "origin": flight.text("origin"),
            "destination": flight.text("destination"),
            "date": flight.text("date"),
            "cabin": flight.text("cabin"),
            "passengers": flight.text("passengers"),
        }
    else:
        loan = wanted_el.require("loan")
        wanted = {"amount": loan.money("amount"), "term_months": loan.text("termMonths")}
    constraints: dict[str, Any] = {}
    if (c := r.child("constraints")) is not None:
        if c.child("maxPrice") is not None:
            constraints["max_price"] = c.money("maxPrice")
        constraints["earliest_date"] = c.optional("earliestDate")
        constraints["latest_date"] = c.optional("latestDate")
    return Request.model_validate(
        {
            "id": r.attr("id"),
            "kind": r.attr("kind"),
            "customer_ref": r.text("customerRef"),
            "reply_to": r.text("replyTo"),
            "created_at": r.text("createdAt"),
            "respond_by": r.optional("respondBy"),
            "wanted": wanted,
            "constraints": constraints,
            "claims": [
                {
                    "type": cl.text("type"),
                    "value": cl.text("value"),
                    "evidence": cl.optional("evidence"),
                }
                for cl in r.children("claim")
            ],
        }
    )


def offer_from_xml(root: etree._Element) -> Offer:
    """Read an offer document back into an offer."""
    r = Reader(root, NAMESPACE)
    product_el = r.require("product")
    if (flight := product_el.child("flight")) is not None:
        product = _read_flight(flight)
    else:
        loan = product_el.require("loan")
        product = _read_loan(loan)
    return Offer.model_validate(
        {
            "id": r.attr("id"),
            "kind": r.attr("kind"),
            "request_id": r.text("requestId"),
            "firm": r.text("firm"),
            "customer_ref": r.text("customerRef"),
            "reply_to": r.text("replyTo"),
            "created_at": r.text("createdAt"),
            "valid_from": r.text("validFrom"),
            "valid_until": r.text("validUntil"),
            "product": product,
            "items": _read_items(r),
            "price": r.money("price"),
            "rewards": [
                {
                    "code": w.text("code"),
                    "description": w.text("description"),
                    "amount": w.money("amount"),
                }
                for w in r.children("reward")
            ],
            "advice": [
                {"code": a.text("code"), "text": a.text("text")} for a in r.children("advice")
            ],
        }
    )


def offers_from_xml(root: etree._Element) -> OfferSet:
    """Read a firm's answer back: its offers, or why it declined."""
    r = Reader(root, NAMESPACE)
    return OfferSet.model_validate(
        {
            "request_id": r.attr("requestId"),
            "firm": r.text("firm"),
            "reply_to": r.text("replyTo"),
            "answered_at": r.text("answeredAt"),
            "offers": [offer_from_xml(o.element) for o in r.children("offer")],
            "declined": r.optional("declined"),
        }
    )


def acceptance_from_xml(root: etree._Element) -> Acceptance:
    """Read an acceptance document back into an acceptance."""
    r = Reader(root, NAMESPACE)
    identity = None
    if (who := r.child("identity")) is not None:
        identity = {"name": who.optional("name"), "email": who.optional("email")}
    return Acceptance.model_validate(
        {
            "id": r.attr("id"),
            "offer_id": r.text("offerId"),
            "customer_ref": r.text("customerRef"),
            "accepted_at": r.text("acceptedAt"),
            "identity": identity,
        }
    )


_SCHEMAS = files("cmi_core.schemas")


def consent_context(record: ConsentRecord) -> dict[str, Any]:
    """Map a consent record to the consent template's variables."""
    return {
        "id": record.id,
        "version": record.version,
        "event": record.event,
        "issued_at": xml_datetime(record.issued_at),
        "firm": record.firm,
        "customer_ref": record.customer_ref,
        "intermediary": record.intermediary,
        "terms_id": record.terms_id,
        "terms_digest": record.terms_digest,
        "standard": record.standard,
        "document_type": record.document_type,
        "fields": None if record.fields is None else " ".join(record.fields),
        "when": record.when,
        "destination": record.destination,
        "valid_until": None if record.valid_until is None else xml_datetime(record.valid_until),
        "purpose": {"code": record.purpose.code, "text": record.purpose.text},
        "policy_url": record.policy_url,
        "jurisdiction": record.jurisdiction,
    }


def consent_from_xml(root: etree._Element) -> ConsentRecord:
    """Read a consent record document back into the model."""
    r = Reader(root, NAMESPACE)
    terms = r.require("terms")
    purpose = r.require("purpose")
    fields = terms.optional("fields")
    return ConsentRecord.model_validate(
        {
            "id": r.attr("id"),
            "version": r.attr("version"),
            "event": r.attr("event"),
            "issued_at": r.text("issuedAt"),
            "firm": r.text("firm"),
            "customer_ref": r.text("customerRef"),
            "intermediary": r.optional("intermediary"),
            "terms_id": terms.attr("id"),
            "terms_digest": terms.text("digest"),
            "standard": terms.text("standard"),
            "document_type": terms.text("documentType"),
            "fields": None if fields is None else fields.split(),
            "when": terms.text("when"),
            "destination": terms.optional("destination"),
            "valid_until": terms.optional("validUntil"),
            "purpose": {"code": purpose.text("code"), "text": purpose.text("text")},
            "policy_url": r.optional("policyUrl"),
            "jurisdiction": r.optional("jurisdiction"),
        }
    )


def _document_type(
    name: str,
    model: type[Any],
    to_context: Any,
    from_xml: Any,
    description: str,
    **extra: Any,
) -> DocumentType[Any]:
    """A core document type: root ``name``, XSD ``name-1.0.xsd``, template ``name.xml.j2``."""
    return DocumentType(
        name=name,
        root=f"{{{NAMESPACE}}}{name}",
        model=model,
        schema=_SCHEMAS / f"{name}-1.0.xsd",
        template=f"{name}.xml.j2",
        to_context=to_context,
        from_xml=from_xml,
        description=description,
        **extra,
    )


TRANSACTION = _document_type(
    "transaction",
    Transaction,
    transaction_context,
    transaction_from_xml,
    "The transaction envelope: any kind of transaction, every field.",
    fields={
        "items": ("d:item",),
        "sku": ("d:item/d:sku",),
        "total": ("d:total",),
        "details": ("d:flight", "d:bankStatementLine", "d:loan"),
        "row": ("d:flight/d:row",),
        "seat": ("d:flight/d:seat",),
        "memo": ("d:bankStatementLine/d:memo",),
        "account": ("d:loan/d:account",),
    },
    kept=("id", "kind", "occurred_at", "firm", "customer_ref"),
)
REQUEST = _document_type(
    "request",
    Request,
    request_context,
    request_from_xml,
    "A customer's request for offers, without their identity.",
)
OFFER = _document_type(
    "offer",
    Offer,
    offer_context,
    offer_from_xml,
    "A firm's priced quote answering a request, valid for a window of time.",
    render=render_offer,
)
ACCEPTANCE = _document_type(
    "acceptance",
    Acceptance,
    acceptance_context,
    acceptance_from_xml,
    "A customer's acceptance of an offer (the id is the idempotency key).",
)
OFFERS = _document_type(
    "offers",
    OfferSet,
    offers_context,
    offers_from_xml,
    "A firm's answer to a request: its offers, or none and why; signed as a whole.",
    # rendered once per request on the request-to-offer path: see _render
    render=render_offers,
)
CONSENT = _document_type(
    "consent",
    ConsentRecord,
    consent_context,
    consent_from_xml,
    "A consent record: sharing terms granted or revoked, signed by the firm.",
)

STANDARD = Standard(
    name="cmi",
    version="1.0",
    title="CMI core vocabulary",
    description=(
        "Transaction envelope, request, offer, acceptance and consent record, namespace "
        + NAMESPACE
    ),
    templates=files(__package__) / "templates",
    document_types=(TRANSACTION, REQUEST, OFFER, OFFERS, ACCEPTANCE, CONSENT),
)


@hookimpl
def cmi_register_standards(register: StandardRegistry) -> None:
    """Register the ``cmi`` core vocabulary."""
    register.add(STANDARD)
