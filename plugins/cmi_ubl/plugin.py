"""The ``ubl`` standard plugin: OASIS UBL 2.4 documents, in cmi-sdk's profile.

Four UBL document types, named as UBL names them, each expressing every field of its
canonical model so that a document always reads back into the model it came from:

=======================  ===========  ==================================================
document type            model        what it is
=======================  ===========  ==================================================
``RequestForQuotation``  Request      a customer's request for offers
``Quotation``            Offer        a firm's offer, valid for a window of time
``Order``                Acceptance   a customer's acceptance of an offer
``Invoice``              Transaction  a transaction of any kind
=======================  ===========  ==================================================

Documents carry ``cbc:UBLVersionID`` 2.4, ``cbc:CustomizationID`` :data:`CUSTOMIZATION_ID`
(``urn:cmi:ubl:profile:1.0``) and ``cbc:ProfileID`` :data:`PROFILE_ID`
(``urn:cmi:ubl:process:1.0``). They use the conventional prefixes ``cbc`` and ``cac``, with
the document's own namespace as the default; a signed document declares ``ext``, ``sig``,
``sac`` and ``sbc`` on the signature extension (see Signatures). Reading never depends on
prefixes: it goes by namespace URI.

Validation
----------
At run time the SDK validates against the plugin's own compact XSD profile (``schemas/``):
the subset of UBL 2.4 the plugin emits, with the canonical models' constraints on values.
Every document valid against it is valid against the official OASIS UBL 2.4 schemas too. To
validate against the official schemas as well, point the plugin at your copy of their
``xsdrt`` folder (the one holding ``maindoc/`` and ``common/``)::

    import cmi_ubl
    cmi_ubl.official_schemas("/opt/ubl-2.4/xsdrt")

or, without a line of code, ``export CMI_UBL_SCHEMAS=/opt/ubl-2.4/xsdrt``. From then on,
every UBL document the process renders, validates, parses or emits is also checked against
the official schema of its type, compiled once per document type on first use. The setting
is process-wide; ``official_schemas(None)`` goes back to the environment variable.

Signatures
----------
A signed document carries its XML-DSig signature where the UBL 2.x signature profile puts
it, so a signed document is valid against the official schemas as it is::

    <ext:UBLExtensions>                       (the root's first child)
      <ext:UBLExtension>
        <ext:ExtensionURI>urn:oasis:names:specification:ubl:dsig:enveloped</ext:ExtensionURI>
        <ext:ExtensionContent>
          <sig:UBLDocumentSignatures>
            <sac:SignatureInformation>
              <cbc:ID>urn:oasis:names:specification:ubl:signature:1</cbc:ID>
              <sbc:ReferencedSignatureID>urn:oasis:names:specification:ubl:signature:Invoice</sbc:ReferencedSignatureID>
              <ds:Signature>...</ds:Signature>
    ...
    <cac:Signature>                           (in UBL 2.4's place: before the parties)
      <cbc:ID>urn:oasis:names:specification:ubl:signature:Invoice</cbc:ID>
      <cbc:SignatureMethod>urn:oasis:names:specification:ubl:dsig:enveloped</cbc:SignatureMethod>
    </cac:Signature>

The signature's one reference is the whole document (``URI=""``) with the
enveloped-signature transform, so it covers everything but itself, the extension and
``cac:Signature`` included. (The profile's XPath transform, which leaves out every
signature of a document signed several times, is not used: a document is signed once, and
common verifiers such as signxml do not run XPath transforms.)

Sharing terms cannot minimize a UBL document: the official schemas have no room for the
``withheld`` marker. A UBL document type therefore has no fields to withhold and names none
as kept, so terms that list ``fields`` for ``ubl`` are refused: a customer who asks for less
is never sent more. Terms without ``fields`` get whole documents.

Mapping
-------
Paths are relative to the root. *Line 1* is the first line's ``cac:LineItem``
(``RequestForQuotationLine``, ``QuotationLine``, ``OrderLine``), or the first
``cac:InvoiceLine``; its ``cac:Item`` describes what the document is about. ``<ref code>`` is a
``cac:AdditionalDocumentReference`` whose ``cbc:DocumentTypeCode`` (listID
``urn:cmi:ubl:reference``) is *code*.

Every document:

======================  =======================================================================
canonical field         UBL
======================  =======================================================================
id                      cbc:ID
created_at,             cbc:IssueDate + cbc:IssueTime, in UTC (``09:00:01Z``)
occurred_at,
accepted_at
firm                    cac:SellerSupplierParty (Invoice: cac:AccountingSupplierParty)
                        /cac:Party/cac:PartyIdentification/cbc:ID
customer_ref            cac:BuyerCustomerParty (Invoice: cac:AccountingCustomerParty)
                        /cac:Party/cac:PartyIdentification/cbc:ID
reply_to                <ref reply-to>/cbc:ID
kind                    line 1 cac:Item/cac:CommodityClassification/cbc:ItemClassificationCode,
                        listID ``urn:cmi:ubl:kind``: flight, loan, bank_statement_line, purchase
wanted, product,        line 1 cac:Item/cac:AdditionalItemProperty, one per field that is set,
details                 in the model's order: cbc:Name is the field's name (origin, destination,
                        date, airline, flight, fare_class, ticket_number, row, seat, cabin,
                        transaction_type, posted_at, payee, memo, fitid, principal, amount,
                        term_months, apr, account), and the value is
                        - money (principal, amount): cbc:Value (plain amount) and
                          cbc:ValueQualifier (ISO 4217 code);
                        - term_months: cbc:ValueQuantity unitCode="MON";
                        - apr: cbc:ValueQuantity unitCode="P1" (percent);
                        - anything else: cbc:Value (dates and times in ISO 8601, UTC)
======================  =======================================================================

Line items (Offer.items, Transaction.items), one line each, numbered from 1 in cbc:ID:

======================  =======================================================================
description             cac:Item/cbc:Name
quantity                cbc:Quantity (Invoice: cbc:InvoicedQuantity), unitCode="C62"
unit_price              cac:Price/cbc:PriceAmount
amount                  cbc:LineExtensionAmount
sku                     cac:Item/cac:SellersItemIdentification/cbc:ID
======================  =======================================================================

Request to RequestForQuotation:

===========================  ==================================================================
respond_by                   note ``cmi:respond_by <dateTime>``, and its UTC date as
                             cbc:SubmissionDueDate (the two must agree)
wanted.passengers            line 1 cbc:Quantity unitCode="IE" (persons)
constraints.earliest_date,   line 1 cac:Delivery/cac:RequestedDeliveryPeriod/cbc:StartDate,
constraints.latest_date      cbc:EndDate
constraints.max_price        line 1 item property ``max_price`` (money, as above)
claims                       one <ref claim> each: cbc:ID is the claim's type,
                             cbc:DocumentDescription its value, and
                             cac:Attachment/cbc:EmbeddedDocument its evidence
(none)                       cac:SellerSupplierParty, empty: a request goes to whichever firms
                             the intermediary relays it to
===========================  ==================================================================

Offer to Quotation:

===========================  ==================================================================
valid_from, valid_until      cac:ValidityPeriod/cbc:StartDate + cbc:StartTime,
                             cbc:EndDate + cbc:EndTime
request_id                   cac:RequestForQuotationDocumentReference/cbc:ID
price                        cac:QuotedMonetaryTotal/cbc:PayableAmount (and LineExtensionAmount)
rewards                      note ``cmi:reward <code> <amount> <currency> <description>``, one
                             each, in order: they are already applied to the items' prices, so
                             an AllowanceCharge would be taken off a second time by UBL readers
advice                       note ``cmi:advice <code> <text>``, one each, in order
===========================  ==================================================================

Acceptance to Order:

===========================  ==================================================================
offer_id                     cac:QuotationDocumentReference/cbc:ID
identity                     cac:BuyerCustomerParty/cac:Party/cac:Contact, present exactly when
                             an identity is given; identity.name in its cbc:Name, identity.email
                             in its cbc:ElectronicMail
(none)                       one cac:OrderLine for the whole quotation, as quoted (UBL requires
                             a line); cac:SellerSupplierParty, empty (the quotation names it)
===========================  ==================================================================

Transaction to Invoice:

===========================  ==================================================================
total                        cac:LegalMonetaryTotal/cbc:PayableAmount (and LineExtensionAmount);
                             its currency is also cbc:DocumentCurrencyCode
items                        one cac:InvoiceLine each; without items, one cac:InvoiceLine with
                             no cac:Price and no quantity carries the total (and line 1's kind
                             and details): a line without a price is not a line item
===========================  ==================================================================

Notes are the profile's when they start with ``cmi:``; their fields are separated by single
spaces, and the text (which may hold spaces, line breaks, anything) runs to the end.

Reading is tolerant, so that documents from other UBL producers can be read with :func:`read`
(the profile's XSD, which the SDK validates with, admits only what the plugin emits): other
elements, notes and item properties are ignored; a missing cbc:IssueTime reads as midnight
UTC; a supplier without cac:PartyIdentification is identified by its cbc:EndpointID; an item's
cbc:Description stands in for a missing cbc:Name; an Invoice without a kind is a purchase; a
cbc:SubmissionDueDate without the ``cmi:respond_by`` note is the end of that day, UTC. What the
canonical model needs and the document lacks is a :class:`~cmi_sdk.MappingError` that names it.
"""

from __future__ import annotations

import datetime as dt
import decimal
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from importlib.resources import as_file, files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from lxml import etree
from pydantic import BaseModel, ValidationError

from cmi_sdk import (
    Acceptance,
    BankStatementLineDetails,
    ConfigurationError,
    DocumentType,
    DocumentValidationError,
    FlightDetails,
    FlightProduct,
    FlightWanted,
    HardenedParser,
    Identity,
    LineItem,
    LoanDetails,
    LoanProduct,
    LoanWanted,
    MappingError,
    Money,
    Offer,
    Request,
    SignaturePlacement,
    Standard,
    StandardRegistry,
    Transaction,
    ValidationIssue,
    hookimpl,
)
from cmi_sdk.mapping import leaf_text, xml_date, xml_datetime, xml_decimal

if TYPE_CHECKING:
    from lxml._types import _ElementOrTree

__all__ = [
    "CAC",
    "CBC",
    "CUSTOMIZATION_ID",
    "INVOICE",
    "KIND_LIST",
    "NAMESPACES",
    "OFFICIAL_SCHEMAS_ENV",
    "ORDER",
    "PROFILE_ID",
    "QUOTATION",
    "REFERENCE_LIST",
    "REQUEST_FOR_QUOTATION",
    "STANDARD",
    "UBL_VERSION",
    "UblDocumentType",
    "cmi_register_standards",
    "invoice_context",
    "invoice_from_xml",
    "official_schemas",
    "official_schemas_folder",
    "order_context",
    "order_from_xml",
    "quotation_context",
    "quotation_from_xml",
    "read",
    "request_for_quotation_context",
    "request_for_quotation_from_xml",
]

M = TypeVar("M", bound=BaseModel)

CBC: Final = "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2"
"""The namespace of UBL's basic components, conventionally ``cbc``."""
CAC: Final = "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2"
"""The namespace of UBL's aggregate components, conventionally ``cac``."""
NAMESPACES: Final = {"cac": CAC, "cbc": CBC}
"""The prefixes the plugin reads with (documents may use any)."""

UBL_VERSION: Final = "2.4"
CUSTOMIZATION_ID: Final = "urn:cmi:ubl:profile:1.0"
"""The profile every document names in cbc:CustomizationID."""
PROFILE_ID: Final = "urn:cmi:ubl:process:1.0"
"""The business process every document names in cbc:ProfileID: request, quotation, order,
invoice."""
KIND_LIST: Final = "urn:cmi:ubl:kind"
"""The listID of the item classification code that carries the canonical model's kind."""
REFERENCE_LIST: Final = "urn:cmi:ubl:reference"
"""The listID of the document type codes of the profile's additional document references."""

OFFICIAL_SCHEMAS_ENV: Final = "CMI_UBL_SCHEMAS"
"""The environment variable naming the official schemas' ``xsdrt`` folder."""

_DOCUMENT_NAMES: Final = ("RequestForQuotation", "Quotation", "Order", "Invoice")
# Item properties whose value is a quantity with a unit (UN/ECE Recommendation 20).
_UNITS: Final = {"term_months": "MON", "apr": "P1"}
_MONEY_PROPERTIES: Final = frozenset({"principal", "amount", "max_price"})
_ONE: Final = "C62"
_PERSON: Final = "IE"


def _root(name: str) -> str:
    return f"{{urn:oasis:names:specification:ubl:schema:xsd:{name}-2}}{name}"


# -- the official schemas, when the user points the plugin at them ------------------------


@dataclass
class _Settings:
    folder: Path | None = None


_SETTINGS = _Settings()
_SCHEMA_PARSER = etree.XMLParser(resolve_entities=False, load_dtd=False, no_network=True)


def official_schemas(path: str | os.PathLike[str] | None) -> None:
    """Validate every UBL document against the official OASIS UBL 2.4 schemas as well.

    :param path: the ``xsdrt`` folder of your copy of the schemas (it holds ``maindoc/``
        and ``common/``); ``None`` goes back to the default, the folder named by the
        :data:`OFFICIAL_SCHEMAS_ENV` environment variable (``CMI_UBL_SCHEMAS``), if set.
    :raises ConfigurationError: the folder lacks one of the four main schemas.

    The setting is process-wide. Each document type compiles its official schema once, on
    first use.
    """
    if path is None:
        _SETTINGS.folder = None
        return
    folder = Path(path).resolve()
    for name in _DOCUMENT_NAMES:
        main = _official_path(folder, name)
        if not main.is_file():
            raise ConfigurationError(
                f"{main} does not exist: official_schemas() takes the xsdrt folder of the "
                "OASIS UBL 2.4 schemas, the one holding maindoc/ and common/"
            )
    _SETTINGS.folder = folder


def official_schemas_folder() -> Path | None:
    """The official schemas' folder in use: the one :func:`official_schemas` set, else the
    one ``CMI_UBL_SCHEMAS`` names, else None (the profile alone is checked)."""
    if _SETTINGS.folder is not None:
        return _SETTINGS.folder
    named = os.environ.get(OFFICIAL_SCHEMAS_ENV, "")
    return Path(named).resolve() if named else None


def _official_path(folder: Path, name: str) -> Path:
    return folder / "maindoc" / f"UBL-{name}-2.4.xsd"


def _compile_official(folder: Path, name: str) -> etree.XMLSchema:
    path = _official_path(folder, name)
    try:
        # lxml resolves the schemas' relative imports (common/...) from the files themselves.
        return etree.XMLSchema(etree.parse(str(path), _SCHEMA_PARSER))
    except (OSError, etree.XMLSyntaxError, etree.XMLSchemaParseError) as exc:
        raise ConfigurationError(
            f"cannot load the official UBL 2.4 schema {path} (set by official_schemas() or "
            f"{OFFICIAL_SCHEMAS_ENV}): {exc}"
        ) from None


def _official_issues(
    official: etree.XMLSchema, doc: etree._Element | etree._ElementTree
) -> list[ValidationIssue]:
    if official.validate(doc):
        return []
    return [
        ValidationIssue(
            reason=f"official UBL 2.4 schema: {err.message}",
            path=err.path or "/",
            line=err.line or None,
        )
        for err in official.error_log
    ]


class _ProfileAndOfficial(etree.XMLSchema):
    """The profile's schema that also checks the official one: what a UBL document type's
    ``lxml_schema`` is while official schemas are configured, so that every place the SDK
    validates checks both."""

    def __init__(self, profile: etree._ElementTree, official: etree.XMLSchema) -> None:
        super().__init__(profile)
        self._official = official
        self._official_failed = False

    def __call__(self, etree: _ElementOrTree) -> bool:
        self._official_failed = False
        if not super().__call__(etree):
            return False
        if self._official(etree):
            return True
        self._official_failed = True
        return False

    def validate(self, etree: _ElementOrTree) -> bool:
        """Check the profile, then the official schema."""
        return self(etree)

    @property
    def error_log(self) -> etree._ListErrorLog:
        """The errors of the last validation, from whichever schema refused it."""
        return self._official.error_log if self._official_failed else super().error_log


@dataclass(frozen=True, eq=False)
class UblDocumentType(DocumentType[M]):
    """A UBL document type: validated against the plugin's profile and, when configured
    (:func:`official_schemas`), against the official UBL 2.4 schema of the same name."""

    _official: dict[Path, tuple[etree.XMLSchema, _ProfileAndOfficial]] = field(
        default_factory=dict, init=False, repr=False
    )
    _official_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def profile_schema(self) -> etree.XMLSchema:
        """The profile's XSD, compiled by lxml once."""
        return super().lxml_schema

    def _official_pair(self) -> tuple[etree.XMLSchema, _ProfileAndOfficial] | None:
        folder = official_schemas_folder()
        if folder is None:
            return None
        pair = self._official.get(folder)
        if pair is None:
            with self._official_lock:
                pair = self._official.get(folder)
                if pair is None:
                    official = _compile_official(folder, self.name)
                    with as_file(self.schema) as path:
                        profile = etree.parse(str(path), _SCHEMA_PARSER)
                    pair = (official, _ProfileAndOfficial(profile, official))
                    self._official[folder] = pair
        return pair

    @property
    def official_schema(self) -> etree.XMLSchema | None:
        """The official UBL 2.4 schema of this type, or None when none is configured.

        :raises ConfigurationError: the configured folder does not hold it.
        """
        pair = self._official_pair()
        return None if pair is None else pair[0]

    @property
    def lxml_schema(self) -> etree.XMLSchema:
        """The profile's XSD; with official schemas configured, a schema that checks the
        profile and then the official schema."""
        pair = self._official_pair()
        return super().lxml_schema if pair is None else pair[1]

    def issues(self, tree: etree._ElementTree) -> list[ValidationIssue]:
        """Explain why ``tree`` fails: the profile's issues, or else the official schema's
        (their reasons start with ``official UBL 2.4 schema:``)."""
        if not self.profile_schema.validate(tree):
            return super().issues(tree)
        official = self.official_schema
        return [] if official is None else _official_issues(official, tree)


# -- model to template variables ----------------------------------------------------------
# Every value is handed to the template as a ready string, so templates only place them.


def _money(money: Money) -> dict[str, str]:
    return {"currency": money.currency, "amount": xml_decimal(money.amount)}


def _date_and_time(value: dt.datetime) -> tuple[str, str]:
    date, time = xml_datetime(value).split("T")
    return date, time


def _header(doc_id: str, issued: dt.datetime) -> dict[str, str]:
    date, time = _date_and_time(issued)
    return {
        "version": UBL_VERSION,
        "customization_id": CUSTOMIZATION_ID,
        "profile_id": PROFILE_ID,
        "id": doc_id,
        "issue_date": date,
        "issue_time": time,
    }


def _party(ref: str, identity: Identity | None = None) -> dict[str, Any]:
    contact = None if identity is None else {"name": identity.name, "email": identity.email}
    return {"id": ref, "contact": contact}


def _reference(
    ref: str, code: str, description: str | None = None, attachment: str | None = None
) -> dict[str, str | None]:
    return {
        "id": ref,
        "code": code,
        "list": REFERENCE_LIST,
        "description": description,
        "attachment": attachment,
    }


def _property(name: str, value: object) -> dict[str, str | None]:
    prop: dict[str, str | None] = dict.fromkeys(("value", "quantity", "unit", "qualifier"))
    prop["name"] = name
    if isinstance(value, Money):
        prop["value"], prop["qualifier"] = xml_decimal(value.amount), value.currency
    elif name in _UNITS:
        prop["quantity"] = xml_decimal(value) if isinstance(value, Decimal) else str(value)
        prop["unit"] = _UNITS[name]
    elif isinstance(value, dt.datetime):
        prop["value"] = xml_datetime(value)
    elif isinstance(value, dt.date):
        prop["value"] = xml_date(value)
    else:
        prop["value"] = str(value)
    return prop


def _properties(subject: BaseModel | None, skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One item property per field of ``subject`` that is set, in the model's order."""
    if subject is None:
        return []
    return [
        _property(name, value)
        for name in type(subject).model_fields
        if name != "kind" and name not in skip and (value := getattr(subject, name)) is not None
    ]


def _item(
    name: str,
    *,
    sku: str | None = None,
    kind: str | None = None,
    subject: BaseModel | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "sku": sku,
        "kind": None if kind is None else {"code": kind, "list": KIND_LIST},
        "properties": _properties(subject),
    }


def _line(
    number: int, item: LineItem, *, kind: str | None = None, subject: BaseModel | None = None
) -> dict[str, Any]:
    return {
        "id": str(number),
        "quantity": {"value": xml_decimal(item.quantity), "unit": _ONE},
        "amount": _money(item.amount),
        "period": None,
        "price": _money(item.unit_price),
        "item": _item(item.description, sku=item.sku, kind=kind, subject=subject),
    }


def request_for_quotation_context(request: Request) -> dict[str, Any]:
    """Map a request to the RequestForQuotation template's variables."""
    wanted, limits = request.wanted, request.constraints
    notes, due = [], None
    if request.respond_by is not None:
        stamp = xml_datetime(request.respond_by)
        notes.append(f"cmi:respond_by {stamp}")
        due = stamp.split("T")[0]
    item = _item("", kind=request.kind)
    item["properties"] = _properties(wanted, skip=("passengers",))
    if limits.max_price is not None:
        item["properties"].append(_property("max_price", limits.max_price))
    quantity = None
    if isinstance(wanted, FlightWanted):
        item["name"] = f"Flight {wanted.origin}-{wanted.destination} on {xml_date(wanted.date)}"
        quantity = {"value": str(wanted.passengers), "unit": _PERSON}
    else:
        item["name"] = f"Loan of {wanted.amount} over {wanted.term_months} months"
    period = None
    if limits.earliest_date is not None or limits.latest_date is not None:
        period = {
            "start": None if limits.earliest_date is None else xml_date(limits.earliest_date),
            "end": None if limits.latest_date is None else xml_date(limits.latest_date),
        }
    return {
        "header": _header(request.id, request.created_at),
        "submission_due_date": due,
        "notes": notes,
        "references": [
            _reference(request.reply_to, "reply-to"),
            *(_reference(c.type, "claim", c.value, c.evidence) for c in request.claims),
        ],
        "customer": _party(request.customer_ref),
        "line": {
            "id": "1",
            "quantity": quantity,
            "amount": None,
            "period": period,
            "price": None,
            "item": item,
        },
    }


def quotation_context(offer: Offer) -> dict[str, Any]:
    """Map an offer to the Quotation template's variables."""
    start_date, start_time = _date_and_time(offer.valid_from)
    end_date, end_time = _date_and_time(offer.valid_until)
    notes = [
        f"cmi:reward {r.code} {xml_decimal(r.amount.amount)} {r.amount.currency} {r.description}"
        for r in offer.rewards
    ]
    notes += [f"cmi:advice {a.code} {a.text}" for a in offer.advice]
    lines = [_line(1, offer.items[0], kind=offer.kind, subject=offer.product)]
    lines += [_line(n, item) for n, item in enumerate(offer.items[1:], 2)]
    return {
        "header": _header(offer.id, offer.created_at),
        "notes": notes,
        "validity": {
            "start_date": start_date,
            "start_time": start_time,
            "end_date": end_date,
            "end_time": end_time,
        },
        "request_id": offer.request_id,
        "references": [_reference(offer.reply_to, "reply-to")],
        "firm": _party(offer.firm),
        "customer": _party(offer.customer_ref),
        "price": _money(offer.price),
        "lines": lines,
    }


def order_context(acceptance: Acceptance) -> dict[str, Any]:
    """Map an acceptance to the Order template's variables."""
    return {
        "header": _header(acceptance.id, acceptance.accepted_at),
        "offer_id": acceptance.offer_id,
        "customer": _party(acceptance.customer_ref, acceptance.identity),
        "line": {
            "id": "1",
            "quantity": None,
            "amount": None,
            "period": None,
            "price": None,
            "item": _item(f"Everything quoted in {acceptance.offer_id}, as quoted"),
        },
    }


def _summary(tx: Transaction) -> str:
    """A name for the one line of a transaction without line items."""
    details = tx.details
    if isinstance(details, FlightDetails):
        return (
            f"Flight {details.origin}-{details.destination} on {xml_date(details.date)},"
            f" ticket {details.ticket_number}"
        )
    if isinstance(details, LoanDetails):
        return f"Loan of {details.principal} over {details.term_months} months"
    if isinstance(details, BankStatementLineDetails):
        return f"Bank statement line ({details.transaction_type})"
    return f"Purchase {tx.id}"


def invoice_context(tx: Transaction) -> dict[str, Any]:
    """Map a transaction of any kind to the Invoice template's variables."""
    if tx.items:
        lines = [_line(1, tx.items[0], kind=tx.kind, subject=tx.details)]
        lines += [_line(n, item) for n, item in enumerate(tx.items[1:], 2)]
    else:
        lines = [
            {
                "id": "1",
                "quantity": None,
                "amount": _money(tx.total),
                "price": None,
                "item": _item(_summary(tx), kind=tx.kind, subject=tx.details),
            }
        ]
    return {
        "header": _header(tx.id, tx.occurred_at),
        "firm": _party(tx.firm),
        "customer": _party(tx.customer_ref),
        "total": _money(tx.total),
        "lines": lines,
    }


# -- XML back to models: by namespace URI, whatever the prefixes ---------------------------


def _local(element: etree._Element) -> str:
    return etree.QName(element).localname


def _find(element: etree._Element, path: str) -> etree._Element | None:
    return element.find(path, NAMESPACES)


def _findall(element: etree._Element, path: str) -> list[etree._Element]:
    return element.findall(path, NAMESPACES)


def _require(element: etree._Element, path: str, what: str) -> etree._Element:
    found = _find(element, path)
    if found is None:
        raise MappingError(f"{path} is missing under <{_local(element)}>: {what}")
    return found


def _text(element: etree._Element, path: str) -> str | None:
    """The text of the element at ``path`` ('' when empty), or None when it is absent."""
    found = _find(element, path)
    return None if found is None else leaf_text(found)


def _value(element: etree._Element, path: str, what: str) -> str:
    """The text of a required element that holds a typed value (XSD collapses its spaces)."""
    return leaf_text(_require(element, path, what)).strip()


def _amount(element: etree._Element, path: str, what: str) -> dict[str, str]:
    found = _require(element, path, what)
    currency = found.get("currencyID")
    if currency is None:
        raise MappingError(f"{path} under <{_local(element)}> has no currencyID: {what}")
    return {"amount": leaf_text(found).strip(), "currency": currency.strip()}


def _instant(element: etree._Element, date: str, time: str, what: str) -> str:
    """A date and a time of day as one xs:dateTime; a missing time is midnight UTC."""
    day = _value(element, date, what)
    clock = _text(element, time)
    return f"{day}T{'00:00:00Z' if clock is None else clock.strip()}"


def _issued(root: etree._Element, what: str) -> str:
    return _instant(root, "cbc:IssueDate", "cbc:IssueTime", what)


def _party_id(root: etree._Element, tag: str, what: str, *, endpoint: bool = False) -> str:
    party = _require(root, f"cac:{tag}/cac:Party", what)
    found = _text(party, "cac:PartyIdentification/cbc:ID")
    if not found and endpoint:
        found = _text(party, "cbc:EndpointID")
    if not found:
        also = " (nor cbc:EndpointID)" if endpoint else ""
        raise MappingError(
            f"cac:{tag}/cac:Party has no cac:PartyIdentification/cbc:ID{also}: {what}"
        )
    return found.strip()


def _references(root: etree._Element, code: str) -> list[etree._Element]:
    path = f"cbc:DocumentTypeCode[@listID='{REFERENCE_LIST}']"
    return [
        ref
        for ref in _findall(root, "cac:AdditionalDocumentReference")
        if (_text(ref, path) or "").strip() == code
    ]


def _reply_to(root: etree._Element) -> str:
    refs = _references(root, "reply-to")
    if not refs:
        raise MappingError(
            "no cac:AdditionalDocumentReference has the DocumentTypeCode reply-to (listID "
            f"{REFERENCE_LIST}): the intermediary's reference that offers quote"
        )
    return _value(refs[0], "cbc:ID", "the intermediary's reference")


def _notes(root: etree._Element, key: str, fields: int = 0) -> list[list[str]]:
    """The profile's notes ``cmi:<key> ...``: for each, its ``fields`` space-separated
    fields and then the text to the end."""
    prefix = f"cmi:{key} "
    found = []
    for note in _findall(root, "cbc:Note"):
        text = leaf_text(note)
        if not text.startswith(prefix):
            continue
        parts = text[len(prefix) :].split(" ", fields)
        if len(parts) != fields + 1:
            raise MappingError(f"a cmi:{key} note needs {fields} fields and a text: {text!r}")
        found.append(parts)
    return found


def _kind(item: etree._Element) -> str | None:
    code = _text(
        item, f"cac:CommodityClassification/cbc:ItemClassificationCode[@listID='{KIND_LIST}']"
    )
    return None if code is None else code.strip()


def _need_kind(item: etree._Element, kinds: tuple[str, ...], document: str) -> str:
    kind = _kind(item)
    if kind not in kinds:
        raise MappingError(
            f"the first line's item of a {document} must say what it is about in "
            "cac:CommodityClassification/cbc:ItemClassificationCode (listID "
            f"{KIND_LIST}): one of {', '.join(kinds)}, not {kind!r}"
        )
    return kind


def _property_value(name: str, prop: etree._Element) -> Any:
    if name in _MONEY_PROPERTIES:
        amount, currency = _text(prop, "cbc:Value"), _text(prop, "cbc:ValueQualifier")
        if amount is None or currency is None:
            raise MappingError(
                f"item property {name!r} is money: its amount is the cbc:Value and its "
                "currency the cbc:ValueQualifier"
            )
        return {"amount": amount.strip(), "currency": currency.strip()}
    if name in _UNITS:
        measure = _text(prop, "cbc:ValueQuantity")
        if measure is None:
            measure = _text(prop, "cbc:Value")
        if measure is None:
            raise MappingError(f"item property {name!r} has no cbc:ValueQuantity")
        return measure.strip()
    value = _text(prop, "cbc:Value")
    if value is None:
        raise MappingError(f"item property {name!r} has no cbc:Value")
    return value


def _properties_of(item: etree._Element) -> dict[str, etree._Element]:
    """The item's properties by name; the first of a name counts."""
    found: dict[str, etree._Element] = {}
    for prop in _findall(item, "cac:AdditionalItemProperty"):
        name = _text(prop, "cbc:Name")
        if name is not None:
            found.setdefault(name, prop)
    return found


def _subject(
    props: dict[str, etree._Element], model: type[BaseModel], skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The fields of ``model`` the item properties give (pydantic reports what is missing)."""
    return {
        name: _property_value(name, props[name])
        for name in model.model_fields
        if name != "kind" and name not in skip and name in props
    }


def _line_item(line: etree._Element, quantity: str, where: str) -> dict[str, Any]:
    """Read a priced line (a cac:LineItem or a cac:InvoiceLine) as a canonical line item."""
    price = _require(line, "cac:Price", f"{where} needs its unit price")
    base = _text(price, "cbc:BaseQuantity")
    try:
        per_one = base is None or Decimal(base.strip()) == 1
    except decimal.InvalidOperation:
        per_one = False
    if not per_one:
        raise MappingError(f"{where}: a price per {base!r} units is not a unit price")
    item = _require(line, "cac:Item", f"{where} needs its item")
    description = _text(item, "cbc:Name")
    if description is None:
        description = _text(item, "cbc:Description")
    if description is None:
        raise MappingError(f"{where}: its item has neither a cbc:Name nor a cbc:Description")
    amount_at = line
    parent = line.getparent()
    if _find(line, "cbc:LineExtensionAmount") is None and parent is not None:
        amount_at = parent  # a QuotationLine may carry it instead of its LineItem
    count = _text(line, quantity)
    sku = _text(item, "cac:SellersItemIdentification/cbc:ID")
    return {
        "description": description,
        "quantity": "1" if count is None else count.strip(),
        "unit_price": _amount(price, "cbc:PriceAmount", f"{where}'s unit price"),
        "amount": _amount(amount_at, "cbc:LineExtensionAmount", f"{where}'s amount"),
        "sku": None if sku is None else sku.strip(),
    }


def _respond_by(root: etree._Element) -> str | None:
    due = _text(root, "cbc:SubmissionDueDate")
    noted = _notes(root, "respond_by")
    if not noted:
        # Another producer's due date: offers are due by the end of that day.
        return None if due is None else f"{due.strip()}T23:59:59Z"
    stamp = noted[0][0].strip()
    if due is not None:
        try:
            when = dt.datetime.fromisoformat(stamp)
        except ValueError:
            raise MappingError(f"the cmi:respond_by note holds {stamp!r}, not a dateTime") from None
        if when.tzinfo is None or when.astimezone(dt.UTC).date().isoformat() != due.strip():
            raise MappingError(
                f"cbc:SubmissionDueDate {due.strip()} is not the UTC date of the "
                f"cmi:respond_by note's {stamp}"
            )
    return stamp


def request_for_quotation_from_xml(root: etree._Element) -> Request:
    """Read a RequestForQuotation back into a request."""
    lines = _findall(root, "cac:RequestForQuotationLine/cac:LineItem")
    if len(lines) != 1:
        raise MappingError(
            f"a request wants one thing: this RequestForQuotation has {len(lines)} lines"
        )
    line = lines[0]
    item = _require(line, "cac:Item", "what the request wants")
    kind = _need_kind(item, ("flight", "loan"), "RequestForQuotation")
    props = _properties_of(item)
    wanted = _subject(props, FlightWanted if kind == "flight" else LoanWanted, ("passengers",))
    passengers = _text(line, "cbc:Quantity")
    if kind == "flight" and passengers is not None:
        wanted["passengers"] = passengers.strip()
    constraints: dict[str, Any] = {}
    if "max_price" in props:
        constraints["max_price"] = _property_value("max_price", props["max_price"])
    if (period := _find(line, "cac:Delivery/cac:RequestedDeliveryPeriod")) is not None:
        for key, path in (("earliest_date", "cbc:StartDate"), ("latest_date", "cbc:EndDate")):
            if (day := _text(period, path)) is not None:
                constraints[key] = day.strip()
    return Request.model_validate(
        {
            "id": _value(root, "cbc:ID", "the request's id"),
            "kind": kind,
            "customer_ref": _party_id(
                root, "BuyerCustomerParty", "the customer's pseudonymous reference"
            ),
            "reply_to": _reply_to(root),
            "created_at": _issued(root, "when the request was made"),
            "respond_by": _respond_by(root),
            "wanted": wanted,
            "constraints": constraints,
            "claims": [
                {
                    "type": _value(ref, "cbc:ID", "the claim's type"),
                    "value": _text(ref, "cbc:DocumentDescription"),
                    "evidence": _text(ref, "cac:Attachment/cbc:EmbeddedDocument"),
                }
                for ref in _references(root, "claim")
            ],
        }
    )


def quotation_from_xml(root: etree._Element) -> Offer:
    """Read a Quotation back into an offer."""
    lines = _findall(root, "cac:QuotationLine/cac:LineItem")
    if not lines:
        raise MappingError("a Quotation needs at least one cac:QuotationLine/cac:LineItem")
    first = _require(lines[0], "cac:Item", "what is offered")
    kind = _need_kind(first, ("flight", "loan"), "Quotation")
    product = _subject(_properties_of(first), FlightProduct if kind == "flight" else LoanProduct)
    validity = _require(root, "cac:ValidityPeriod", "when the offer holds")
    return Offer.model_validate(
        {
            "id": _value(root, "cbc:ID", "the offer's id"),
            "request_id": _value(
                root, "cac:RequestForQuotationDocumentReference/cbc:ID", "the request answered"
            ),
            "kind": kind,
            "firm": _party_id(root, "SellerSupplierParty", "the firm's identifier", endpoint=True),
            "customer_ref": _party_id(
                root, "BuyerCustomerParty", "the customer's pseudonymous reference"
            ),
            "reply_to": _reply_to(root),
            "created_at": _issued(root, "when the offer was made"),
            "valid_from": _instant(
                validity, "cbc:StartDate", "cbc:StartTime", "when the offer starts to hold"
            ),
            "valid_until": _instant(
                validity, "cbc:EndDate", "cbc:EndTime", "when the offer stops holding"
            ),
            "product": product,
            "items": [
                _line_item(line, "cbc:Quantity", f"QuotationLine {n}")
                for n, line in enumerate(lines, 1)
            ],
            "price": _amount(
                root, "cac:QuotedMonetaryTotal/cbc:PayableAmount", "what the customer pays"
            ),
            "rewards": [
                {
                    "code": code,
                    "amount": {"amount": amount, "currency": currency},
                    "description": description,
                }
                for code, amount, currency, description in _notes(root, "reward", 3)
            ],
            "advice": [{"code": code, "text": text} for code, text in _notes(root, "advice", 1)],
        }
    )


def order_from_xml(root: etree._Element) -> Acceptance:
    """Read an Order back into an acceptance."""
    contact = _find(root, "cac:BuyerCustomerParty/cac:Party/cac:Contact")
    identity = None
    if contact is not None:
        identity = {
            "name": _text(contact, "cbc:Name"),
            "email": _text(contact, "cbc:ElectronicMail"),
        }
    return Acceptance.model_validate(
        {
            "id": _value(root, "cbc:ID", "the acceptance's id"),
            "offer_id": _value(root, "cac:QuotationDocumentReference/cbc:ID", "the offer accepted"),
            "customer_ref": _party_id(
                root, "BuyerCustomerParty", "the customer's pseudonymous reference"
            ),
            "accepted_at": _issued(root, "when the offer was accepted"),
            "identity": identity,
        }
    )


_DETAILS: Final[dict[str, type[BaseModel]]] = {
    "flight": FlightDetails,
    "bank_statement_line": BankStatementLineDetails,
    "loan": LoanDetails,
}


def invoice_from_xml(root: etree._Element) -> Transaction:
    """Read an Invoice back into a transaction."""
    lines = _findall(root, "cac:InvoiceLine")
    if not lines:
        raise MappingError("an Invoice needs at least one cac:InvoiceLine")
    first = _require(lines[0], "cac:Item", "what the first line is about")
    kind = _kind(first) or "purchase"
    if all(_find(line, "cac:Price") is not None for line in lines):
        items = [
            _line_item(line, "cbc:InvoicedQuantity", f"InvoiceLine {n}")
            for n, line in enumerate(lines, 1)
        ]
    elif len(lines) == 1:
        items = []  # the one line is the total, not a line item
    else:
        raise MappingError(
            "every cac:InvoiceLine of an Invoice with several lines needs a cac:Price: the "
            "canonical line items have unit prices"
        )
    model = _DETAILS.get(kind)
    return Transaction.model_validate(
        {
            "id": _value(root, "cbc:ID", "the transaction's id"),
            "kind": kind,
            "occurred_at": _issued(root, "when the transaction happened"),
            "firm": _party_id(
                root, "AccountingSupplierParty", "the firm's identifier", endpoint=True
            ),
            "customer_ref": _party_id(
                root, "AccountingCustomerParty", "the customer's pseudonymous reference"
            ),
            "items": items,
            "total": _amount(
                root, "cac:LegalMonetaryTotal/cbc:PayableAmount", "what the transaction comes to"
            ),
            "details": None if model is None else _subject(_properties_of(first), model),
        }
    )


# -- the standard ---------------------------------------------------------------------------

_HERE = files(__package__)
_SCHEMAS = _HERE / "schemas"


def _document_type(
    name: str,
    model: type[M],
    *,
    to_context: Callable[[M], dict[str, Any]],
    from_xml: Callable[[etree._Element], M],
    description: str,
    signature_before: str,
) -> UblDocumentType[M]:
    return UblDocumentType(
        name=name,
        root=_root(name),
        model=model,
        schema=_SCHEMAS / f"cmi-ubl-1.0-{name}.xsd",
        template=f"{name}.xml.j2",
        to_context=to_context,
        from_xml=from_xml,
        description=description,
        # Nothing can be withheld, and no field is named: terms that list fields are refused.
        fields={},
        kept=(),
        # cac:Signature goes before the first party the profile writes (UBL 2.4's order).
        signature=SignaturePlacement.ubl_extension(signature_before),
    )


REQUEST_FOR_QUOTATION = _document_type(
    "RequestForQuotation",
    Request,
    to_context=request_for_quotation_context,
    from_xml=request_for_quotation_from_xml,
    description="UBL 2.4 RequestForQuotation: a customer's request for offers.",
    signature_before="SellerSupplierParty",
)
QUOTATION = _document_type(
    "Quotation",
    Offer,
    to_context=quotation_context,
    from_xml=quotation_from_xml,
    description="UBL 2.4 Quotation: a firm's offer, valid for a window of time.",
    signature_before="SellerSupplierParty",
)
ORDER = _document_type(
    "Order",
    Acceptance,
    to_context=order_context,
    from_xml=order_from_xml,
    description="UBL 2.4 Order: a customer's acceptance of a quotation.",
    signature_before="BuyerCustomerParty",
)
INVOICE = _document_type(
    "Invoice",
    Transaction,
    to_context=invoice_context,
    from_xml=invoice_from_xml,
    description="UBL 2.4 Invoice: a transaction of any kind.",
    signature_before="AccountingSupplierParty",
)

STANDARD = Standard(
    name="ubl",
    version=UBL_VERSION,
    title="OASIS Universal Business Language",
    description=(
        "UBL 2.4 RequestForQuotation, Quotation, Order and Invoice, in cmi-sdk's profile "
        + CUSTOMIZATION_ID
    ),
    templates=_HERE / "templates",
    document_types=(REQUEST_FOR_QUOTATION, QUOTATION, ORDER, INVOICE),
)

_BY_ROOT: Final[dict[str, UblDocumentType[Any]]] = {
    d.root: d for d in (REQUEST_FOR_QUOTATION, QUOTATION, ORDER, INVOICE)
}
_PARSER = HardenedParser()


def read(xml: bytes, *, parser: HardenedParser | None = None) -> BaseModel:
    """Read a UBL 2.4 RequestForQuotation, Quotation, Order or Invoice from any producer into
    its canonical model.

    Unlike :meth:`cmi_sdk.Adapter.parse`, which admits only documents in the plugin's profile,
    this reads what the canonical model needs wherever UBL puts it and ignores the rest (see
    the module's documentation). With official schemas configured
    (:func:`official_schemas`), the document must pass the official schema first.

    :param parser: the hardened parser to use (its size and depth limits); a default one
        otherwise.
    :raises XMLInputError: the hardened parser refused the bytes.
    :raises DocumentValidationError: the official schema refused the document.
    :raises MappingError: it is not one of the four documents, or lacks something the
        canonical model needs; the message says what.
    """
    root = (parser or _PARSER).parse(xml).getroot()
    tag = str(root.tag)
    doc_type = _BY_ROOT.get(tag)
    if doc_type is None:
        raise MappingError(
            f"the ubl plugin reads {', '.join(_DOCUMENT_NAMES)} documents, not {tag}"
        )
    official = doc_type.official_schema
    issues = [] if official is None else _official_issues(official, root)
    if issues:
        raise DocumentValidationError(
            issues,
            document=xml,
            standard=STANDARD.name,
            document_type=doc_type.name,
        )
    try:
        model: BaseModel = doc_type.from_xml(root)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(document)'}: "
            + err["msg"].removeprefix("Value error, ")
            for err in exc.errors(include_url=False)
        )
        raise MappingError(
            f"this {doc_type.name} does not make a valid {doc_type.model.__name__}: {reasons}"
        ) from None
    return model


@hookimpl
def cmi_register_standards(register: StandardRegistry) -> None:
    """Register the ``ubl`` standard."""
    register.add(STANDARD)
