"""The ``ubl`` standard: UBL 2.4 documents round-trip, follow the profile, and validate
against the official OASIS UBL 2.4 schemas (required in CI)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree
from pydantic import BaseModel

from cmi_sdk import (
    Acceptance,
    Adapter,
    Advice,
    BankStatementLineDetails,
    Claim,
    ConfigurationError,
    Constraints,
    Documents,
    DocumentValidationError,
    FlightDetails,
    FlightWanted,
    Identity,
    LineItem,
    LoanDetails,
    LoanWanted,
    MappingError,
    Offer,
    Request,
    Reward,
    Transaction,
    XMLInputError,
    load_model,
)
from cmi_sdk.signing import DocumentSigner, self_signed_certificate, verify_document
from tests import strategies as s

ROOT = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("cmi_ubl") is None:  # not installed yet: the checkout's copy
    sys.path.insert(0, str(ROOT / "plugins"))

import cmi_ubl  # noqa: E402
import cmi_ubl.plugin  # noqa: E402
from cmi_ubl.plugin import CAC, CBC  # noqa: E402

EXAMPLES = ROOT / "examples"
# CMI_TEST_UBL_XSDRT points elsewhere (a checkout beside another copy of the schemas).
EXT = "urn:oasis:names:specification:ubl:schema:xsd:CommonExtensionComponents-2"
SIGNATURE_NS = {
    "ext": EXT,
    "sig": "urn:oasis:names:specification:ubl:schema:xsd:CommonSignatureComponents-2",
    "sac": "urn:oasis:names:specification:ubl:schema:xsd:SignatureAggregateComponents-2",
    "sbc": "urn:oasis:names:specification:ubl:schema:xsd:SignatureBasicComponents-2",
    "ds": "http://www.w3.org/2000/09/xmldsig#",
}
XSDRT = Path(
    os.environ.get("CMI_TEST_UBL_XSDRT")
    or ROOT.parent / "shared" / "standards" / "ubl-2.4" / "xsdrt"
)
IN_CI = os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}
UBL_ENTRY_POINT = "ubl" in {ep.name for ep in importlib.metadata.entry_points(group="cmi_sdk")}

# Entry points off: the same adapter whether or not the ubl entry point is installed (pluggy
# refuses a module registered twice).
ADAPTER = Adapter(entry_points=False, plugins=[cmi_ubl.plugin])

CASES: dict[str, st.SearchStrategy[Any]] = {
    "RequestForQuotation": s.requests(),
    "Quotation": s.offers(),
    "Order": s.acceptances(),
    "Invoice": s.transactions(),
}
NS = {"cac": CAC, "cbc": CBC}
ACCEPTANCE = Acceptance(
    id="acc-2026-0001",
    offer_id="off-2026-0001",
    customer_ref="cust-7f3a9c",
    accepted_at=dt.datetime(2026, 6, 1, 9, 3, 12, 250000, tzinfo=dt.UTC),
    identity=Identity(name="Ann Example", email="ann@example.com"),
)
EXAMPLE_FILES = {
    "RequestForQuotation": (Request, "request.json"),
    "Quotation": (Offer, "offer.json"),
    "Invoice": (Transaction, "ticket.json"),
}


def example(doc_type: str) -> BaseModel:
    """The canonical model each document type is shown with: the examples/ file, or (for
    Order, which has none) an acceptance of the example offer."""
    if doc_type == "Order":
        return ACCEPTANCE
    model, name = EXAMPLE_FILES[doc_type]
    loaded = load_model(model, (EXAMPLES / name).read_text(encoding="utf-8"))
    if doc_type == "RequestForQuotation":
        # The example file has no deadline (one would expire); how one maps is shown here.
        deadline = dt.datetime(2026, 6, 1, 9, 0, 30, tzinfo=dt.UTC)
        return loaded.model_copy(update={"respond_by": deadline})
    return loaded


def render(model: BaseModel, doc_type: str) -> bytes:
    return ADAPTER.render(model, standard="ubl", document_type=doc_type)


def text_at(root: etree._Element, path: str) -> str | None:
    found = root.find(path, NS)
    return None if found is None else found.text


@pytest.fixture(scope="module")
def official() -> dict[str, etree.XMLSchema]:
    """The official OASIS UBL 2.4 schemas, compiled once for the module."""
    if not XSDRT.is_dir():
        reason = (
            f"the OASIS UBL 2.4 schemas are not at {XSDRT} "
            "(../shared/standards/ubl-2.4/xsdrt from the project root)"
        )
        if IN_CI:
            pytest.fail(f"{reason}; CI (CI is set) requires them")
        pytest.skip(f"{reason}; the official-schema checks run where they are (and in CI)")
    return {
        name: etree.XMLSchema(etree.parse(str(XSDRT / "maindoc" / f"UBL-{name}-2.4.xsd")))
        for name in CASES
    }


@pytest.fixture
def no_official_setting(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No official schemas configured before the test, whatever the environment says, and
    none left configured after it."""
    monkeypatch.delenv(cmi_ubl.OFFICIAL_SCHEMAS_ENV, raising=False)
    cmi_ubl.official_schemas(None)
    yield
    cmi_ubl.official_schemas(None)


def assert_officially_valid(schema: etree.XMLSchema, xml: bytes) -> None:
    assert schema.validate(etree.fromstring(xml)), f"{schema.error_log}\n{xml.decode()}"


# -- the standard ----------------------------------------------------------------------------


def test_standard_registers_four_ubl_document_types() -> None:
    std = ADAPTER.standards.get("ubl")
    assert (std.name, std.version) == ("ubl", "2.4")
    assert [d.name for d in std.document_types] == list(CASES)
    assert {d.name: d.model for d in std.document_types} == {
        "RequestForQuotation": Request,
        "Quotation": Offer,
        "Order": Acceptance,
        "Invoice": Transaction,
    }
    for d in std.document_types:
        assert d.root == f"{{urn:oasis:names:specification:ubl:schema:xsd:{d.name}-2}}{d.name}"
        # nothing can be withheld from a UBL document, so terms may name no field
        assert (dict(d.fields), d.kept) == ({}, ())


def test_standard_coexists_with_the_installed_ones() -> None:
    # blocking the entry point by name lets the explicit plugin in, installed or not
    adapter = Adapter(plugins=[cmi_ubl.plugin], block=["ubl"])
    names = {std.name for std in adapter.standards}
    assert {"cmi", "cmi-ticket", "ubl"} <= names
    listed = {d["name"]: d for d in adapter.standards.describe()}["ubl"]
    assert [d["name"] for d in listed["document_types"]] == list(CASES)


# -- round trips and validity, for every document type ---------------------------------------


@pytest.mark.parametrize("doc_type", list(CASES))
@pytest.mark.slow
def test_round_trip_is_identity(doc_type: str) -> None:
    profile = ADAPTER.standards.resolve("ubl", doc_type)[1]
    assert isinstance(profile, cmi_ubl.UblDocumentType)

    @given(CASES[doc_type])
    def check(model: BaseModel) -> None:
        xml = render(model, doc_type)
        assert profile.profile_schema.validate(etree.fromstring(xml))
        assert ADAPTER.parse(xml) == model
        assert ADAPTER.parse(xml, standard="ubl", document_type=doc_type) == model
        assert cmi_ubl.read(xml) == model

    check()


@pytest.mark.parametrize("doc_type", list(CASES))
@pytest.mark.slow
def test_generated_documents_are_valid_against_the_official_schemas(
    doc_type: str, official: dict[str, etree.XMLSchema]
) -> None:
    schema = official[doc_type]

    @given(CASES[doc_type])
    def check(model: BaseModel) -> None:
        assert_officially_valid(schema, render(model, doc_type))

    check()


@pytest.mark.parametrize("doc_type", list(CASES))
def test_examples_round_trip_and_are_officially_valid(
    doc_type: str, official: dict[str, etree.XMLSchema]
) -> None:
    model = example(doc_type)
    xml = render(model, doc_type)
    assert_officially_valid(official[doc_type], xml)
    assert ADAPTER.parse(xml) == model


@pytest.mark.parametrize("kind", ["flight", "bank_statement_line", "loan", "purchase"])
@pytest.mark.parametrize("items", [True, False], ids=["items", "no-items"])
@pytest.mark.slow
def test_every_transaction_kind_with_and_without_items(
    kind: str, items: bool, official: dict[str, etree.XMLSchema]
) -> None:
    @given(s.transactions(kind=kind, items=items))
    def check(tx: Transaction) -> None:
        xml = render(tx, "Invoice")
        assert_officially_valid(official["Invoice"], xml)
        assert ADAPTER.parse(xml) == tx

    check()


def test_every_optional_field_set_survives() -> None:
    """One model of each type with every optional field set, to be sure none is dropped."""
    request = Request(
        id="req-1",
        kind="loan",
        customer_ref="cust-7f3a9c",
        reply_to="relay-1",
        created_at=dt.datetime(2026, 1, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
        respond_by=dt.datetime(2026, 2, 1, 0, 0, 5, tzinfo=dt.UTC),
        wanted=LoanWanted(amount={"amount": "25000.00", "currency": "EUR"}, term_months=48),
        constraints=Constraints(
            max_price={"amount": "1200", "currency": "JPY"},
            earliest_date=dt.date(2026, 2, 1),
            latest_date=dt.date(2026, 3, 1),
        ),
        claims=(
            Claim(type="credit-band", value=" A \n", evidence="sig:abc&<def>"),
            Claim(type="loyalty-tier", value="gold"),
        ),
    )
    offer = load_model(Offer, (EXAMPLES / "offer.json").read_text()).model_copy(
        update={
            "rewards": (
                Reward(
                    code="gold",
                    description="Gold  tier\n-5",
                    amount={"amount": "5.00", "currency": "USD"},
                ),
            ),
            "advice": (Advice(code="a1", text=" leading space"), Advice(code="a2", text="x")),
        }
    )
    loan = Transaction(
        id="loan-1",
        kind="loan",
        occurred_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        firm="bank.example",
        customer_ref="cust-7f3a9c",
        items=(
            LineItem(
                description="Origination fee",
                quantity=Decimal("2.5"),
                unit_price={"amount": "10.000", "currency": "KWD"},
                amount={"amount": "25.000", "currency": "KWD"},
                sku="FEE-1",
            ),
        ),
        total={"amount": "25.000", "currency": "KWD"},
        details=LoanDetails(
            principal={"amount": "1000.000", "currency": "KWD"},
            term_months=12,
            apr=Decimal("6.9500"),
            account="ACC-9",
        ),
    )
    bank = Transaction(
        id="stmt-1",
        kind="bank_statement_line",
        occurred_at=dt.datetime(2026, 1, 2, tzinfo=dt.UTC),
        firm="bank.example",
        customer_ref="cust-7f3a9c",
        total={"amount": "-12.34", "currency": "USD"},
        details=BankStatementLineDetails(
            transaction_type="POS",
            posted_at=dt.datetime(2026, 1, 2, 8, 30, tzinfo=dt.UTC),
            payee="Café <&> Co",
            memo="card ****1234",
            fitid="2026010201<&>",
        ),
    )
    no_identity = ACCEPTANCE.model_copy(update={"identity": Identity()})
    for model, doc_type in [
        (request, "RequestForQuotation"),
        (offer, "Quotation"),
        (loan, "Invoice"),
        (bank, "Invoice"),
        (ACCEPTANCE, "Order"),
        (no_identity, "Order"),
        (ACCEPTANCE.model_copy(update={"identity": None}), "Order"),
    ]:
        assert ADAPTER.parse(render(model, doc_type)) == model


# -- what the documents say, and how -----------------------------------------------------------


@pytest.mark.parametrize("doc_type", list(CASES))
def test_documents_use_the_conventional_prefixes_and_name_the_profile(doc_type: str) -> None:
    xml = render(example(doc_type), doc_type)
    root = etree.fromstring(xml)
    ns = f"urn:oasis:names:specification:ubl:schema:xsd:{doc_type}-2"
    assert root.nsmap == {None: ns, "cac": CAC, "cbc": CBC}
    for element in root.iterdescendants():
        namespace = etree.QName(element).namespace
        assert element.prefix == {CAC: "cac", CBC: "cbc"}[namespace]
    assert b"xmlns:ext" not in xml  # no ext:UBLExtensions, so no ext declaration
    assert text_at(root, "cbc:UBLVersionID") == "2.4"
    assert text_at(root, "cbc:CustomizationID") == "urn:cmi:ubl:profile:1.0"
    assert text_at(root, "cbc:ProfileID") == cmi_ubl.PROFILE_ID
    assert [etree.QName(c).localname for c in root][:6] == [
        "UBLVersionID",
        "CustomizationID",
        "ProfileID",
        "ID",
        "IssueDate",
        "IssueTime",
    ]


def test_quotation_carries_validity_period_and_request_reference() -> None:
    root = etree.fromstring(render(example("Quotation"), "Quotation"))
    assert text_at(root, "cbc:ID") == "off-2026-0001"
    assert (text_at(root, "cbc:IssueDate"), text_at(root, "cbc:IssueTime")) == (
        "2026-06-01",
        "09:00:01Z",
    )
    period = [(etree.QName(e).localname, e.text) for e in root.find("cac:ValidityPeriod", NS)]
    assert period == [
        ("StartDate", "2026-06-01"),
        ("StartTime", "09:00:01Z"),
        ("EndDate", "2026-06-01"),
        ("EndTime", "09:15:01Z"),
    ]
    assert text_at(root, "cac:RequestForQuotationDocumentReference/cbc:ID") == "req-2026-0001"
    payable = root.find("cac:QuotedMonetaryTotal/cbc:PayableAmount", NS)
    assert (payable.get("currencyID"), payable.text) == ("USD", "451.89")
    party = "cac:SellerSupplierParty/cac:Party/cac:PartyIdentification/cbc:ID"
    assert text_at(root, party) == "delta.com"
    assert [n.text for n in root.findall("cbc:Note", NS)] == [
        "cmi:advice alt-date Flying on 2026-06-30 costs 40.00 USD less."
    ]
    line = root.find("cac:QuotationLine/cac:LineItem", NS)
    assert text_at(line, "cac:Item/cbc:Name") == "Economy seat ATL-CDG, Delta 2231, fare class B"
    props = {
        text_at(p, "cbc:Name"): text_at(p, "cbc:Value")
        for p in line.findall("cac:Item/cac:AdditionalItemProperty", NS)
    }
    assert props == {
        "origin": "ATL",
        "destination": "CDG",
        "date": "2026-07-01",
        "airline": "Delta",
        "flight": "2231",
        "fare_class": "B",
    }


def test_request_for_quotation_carries_the_deadline_claims_and_reply_to() -> None:
    root = etree.fromstring(render(example("RequestForQuotation"), "RequestForQuotation"))
    assert text_at(root, "cbc:SubmissionDueDate") == "2026-06-01"
    assert [n.text for n in root.findall("cbc:Note", NS)] == ["cmi:respond_by 2026-06-01T09:00:30Z"]
    refs = [
        (
            text_at(r, "cbc:ID"),
            text_at(r, "cbc:DocumentTypeCode"),
            text_at(r, "cbc:DocumentDescription"),
        )
        for r in root.findall("cac:AdditionalDocumentReference", NS)
    ]
    assert refs == [("relay-8841", "reply-to", None), ("loyalty-tier", "claim", "gold")]
    assert root.find("cac:SellerSupplierParty", NS) is not None  # UBL requires it
    line = root.find("cac:RequestForQuotationLine/cac:LineItem", NS)
    quantity = line.find("cbc:Quantity", NS)
    assert (quantity.get("unitCode"), quantity.text) == ("IE", "1")
    kind = line.find("cac:Item/cac:CommodityClassification/cbc:ItemClassificationCode", NS)
    assert (kind.get("listID"), kind.text) == ("urn:cmi:ubl:kind", "flight")


def test_invoice_carries_the_total_and_a_line() -> None:
    root = etree.fromstring(render(example("Invoice"), "Invoice"))
    payable = root.find("cac:LegalMonetaryTotal/cbc:PayableAmount", NS)
    assert (payable.get("currencyID"), payable.text) == ("USD", "451.89")
    assert text_at(root, "cbc:DocumentCurrencyCode") == "USD"
    supplier = "cac:AccountingSupplierParty/cac:Party/cac:PartyIdentification/cbc:ID"
    customer = "cac:AccountingCustomerParty/cac:Party/cac:PartyIdentification/cbc:ID"
    assert (text_at(root, supplier), text_at(root, customer)) == ("delta.com", "cust-7f3a9c")
    (line,) = root.findall("cac:InvoiceLine", NS)
    assert text_at(line, "cbc:LineExtensionAmount") == "451.89"
    assert line.find("cac:Price", NS) is None  # the total, not a line item
    props = {
        text_at(p, "cbc:Name"): text_at(p, "cbc:Value")
        for p in line.findall("cac:Item/cac:AdditionalItemProperty", NS)
    }
    assert props["ticket_number"] == "12524057"
    assert (props["row"], props["seat"]) == ("27", "E")


def test_loan_terms_are_quantities_with_units() -> None:
    tx = Transaction(
        id="loan-2",
        kind="loan",
        occurred_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        firm="bank.example",
        customer_ref="cust-7f3a9c",
        total={"amount": "0.00", "currency": "USD"},
        details=LoanDetails(
            principal={"amount": "5000.00", "currency": "USD"}, term_months=36, apr="6.95"
        ),
    )
    root = etree.fromstring(render(tx, "Invoice"))
    props = {text_at(p, "cbc:Name"): p for p in root.iterfind(".//cac:AdditionalItemProperty", NS)}
    term = props["term_months"].find("cbc:ValueQuantity", NS)
    apr = props["apr"].find("cbc:ValueQuantity", NS)
    assert (term.get("unitCode"), term.text) == ("MON", "36")
    assert (apr.get("unitCode"), apr.text) == ("P1", "6.95")
    principal = props["principal"]
    assert (text_at(principal, "cbc:Value"), text_at(principal, "cbc:ValueQualifier")) == (
        "5000.00",
        "USD",
    )


def test_order_references_the_quotation_and_carries_the_identity() -> None:
    root = etree.fromstring(render(ACCEPTANCE, "Order"))
    assert text_at(root, "cac:QuotationDocumentReference/cbc:ID") == "off-2026-0001"
    assert text_at(root, "cbc:IssueTime") == "09:03:12.250000Z"
    contact = root.find("cac:BuyerCustomerParty/cac:Party/cac:Contact", NS)
    assert (text_at(contact, "cbc:Name"), text_at(contact, "cbc:ElectronicMail")) == (
        "Ann Example",
        "ann@example.com",
    )
    anonymous = etree.fromstring(render(ACCEPTANCE.model_copy(update={"identity": None}), "Order"))
    assert anonymous.find(".//cac:Contact", NS) is None


def test_the_mapping_table_names_every_canonical_field() -> None:
    doc = cmi_ubl.plugin.__doc__ or ""
    models = [
        Request, Offer, Acceptance, Transaction, LineItem, FlightWanted, LoanWanted,
        FlightDetails, LoanDetails, BankStatementLineDetails, Claim, Constraints, Reward,
        Advice, Identity,
    ]  # fmt: skip
    missing = {
        f"{m.__name__}.{name}"
        for m in models
        for name in m.model_fields
        if not re.search(rf"\b{name}\b", doc)
    }
    assert not missing


# -- parsing does not depend on prefixes -------------------------------------------------------


def reprefixed(root: etree._Element, prefixes: dict[str, str | None]) -> bytes:
    """The document again, each element declaring its namespace with the prefix
    ``prefixes[namespace]`` (None: as the default namespace)."""

    def copy(element: etree._Element, parent: etree._Element | None) -> etree._Element:
        namespace = etree.QName(element).namespace
        nsmap = {prefixes[namespace]: namespace}
        new = (
            etree.Element(element.tag, nsmap=nsmap)
            if parent is None
            else etree.SubElement(parent, element.tag, nsmap=nsmap)
        )
        new.attrib.update(element.attrib)
        new.text, new.tail = element.text, element.tail
        for child in element:
            copy(child, new)
        return new

    return etree.tostring(copy(root, None), xml_declaration=True, encoding="UTF-8")


@pytest.mark.parametrize(
    "style",
    ["other-prefixes", "default-namespaces", "swapped-prefixes"],
)
@pytest.mark.parametrize("doc_type", list(CASES))
def test_parsing_goes_by_namespace_not_prefix(doc_type: str, style: str) -> None:
    model = example(doc_type)
    root = etree.fromstring(render(model, doc_type))
    doc_ns = etree.QName(root).namespace
    prefixes: dict[str, str | None] = {
        "other-prefixes": {doc_ns: "u", CAC: "agg", CBC: "basic"},
        "default-namespaces": {doc_ns: None, CAC: None, CBC: None},
        # cac bound to the basic components' namespace and cbc to the aggregates'
        "swapped-prefixes": {doc_ns: "doc", CAC: "cbc", CBC: "cac"},
    }[style]
    xml = reprefixed(root, prefixes)
    assert b"<cbc:ID>" not in xml
    assert ADAPTER.parse(xml) == model
    assert cmi_ubl.read(xml) == model


# -- documents from other UBL producers ------------------------------------------------------

FOREIGN_INVOICE = """<?xml version="1.0" encoding="UTF-8"?>
<inv:Invoice xmlns:inv="urn:oasis:names:specification:ubl:schema:xsd:Invoice-2"
    xmlns:a="urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2"
    xmlns:b="urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2">
  <b:CustomizationID>urn:example:another-producer</b:CustomizationID>
  <b:ID>INV-2024-001</b:ID>
  <b:IssueDate>2024-03-15</b:IssueDate>{issue_time}
  <b:DueDate>2024-04-14</b:DueDate>
  <b:InvoiceTypeCode>380</b:InvoiceTypeCode>
  <b:Note>Thank you for your business.</b:Note>
  <b:DocumentCurrencyCode>EUR</b:DocumentCurrencyCode>
  <b:BuyerReference>PO-77</b:BuyerReference>
  <a:AccountingSupplierParty>
    <a:Party>
      <b:EndpointID schemeID="0088">5790000435968</b:EndpointID>
      <a:PartyName><b:Name>Fournitures SA</b:Name></a:PartyName>
      <a:PostalAddress><a:Country><b:IdentificationCode>FR</b:IdentificationCode></a:Country></a:PostalAddress>
    </a:Party>
  </a:AccountingSupplierParty>{customer}
  <a:PaymentMeans><b:PaymentMeansCode>30</b:PaymentMeansCode></a:PaymentMeans>{tax}
  <a:LegalMonetaryTotal>
    <b:LineExtensionAmount currencyID="EUR">120.00</b:LineExtensionAmount>
    <b:TaxExclusiveAmount currencyID="EUR">120.00</b:TaxExclusiveAmount>
    <b:PayableAmount currencyID="EUR">{payable}</b:PayableAmount>
  </a:LegalMonetaryTotal>
  <a:InvoiceLine>
    <b:ID>10</b:ID>
    <b:InvoicedQuantity unitCode="EA">3</b:InvoicedQuantity>
    <b:LineExtensionAmount currencyID="EUR">90.00</b:LineExtensionAmount>
    <a:Item>
      <b:Description>Paper, A4, 500 sheets</b:Description>
      <a:SellersItemIdentification><b:ID>P-A4</b:ID></a:SellersItemIdentification>
    </a:Item>
    <a:Price>
      <b:PriceAmount currencyID="EUR">30.00</b:PriceAmount>
      <b:BaseQuantity unitCode="EA">1</b:BaseQuantity>
    </a:Price>
  </a:InvoiceLine>
  <a:InvoiceLine>
    <b:ID>20</b:ID>
    <b:LineExtensionAmount currencyID="EUR">30.00</b:LineExtensionAmount>
    <a:Item><b:Name>Delivery</b:Name></a:Item>
    <a:Price><b:PriceAmount currencyID="EUR">30.00</b:PriceAmount></a:Price>
  </a:InvoiceLine>
</inv:Invoice>
"""
CUSTOMER = """
  <a:AccountingCustomerParty>
    <a:Party>
      <a:PartyIdentification><b:ID>cust-4411</b:ID></a:PartyIdentification>
      <a:PartyName><b:Name>Example Buyer</b:Name></a:PartyName>
    </a:Party>
  </a:AccountingCustomerParty>"""
TAX = """
  <a:TaxTotal><b:TaxAmount currencyID="EUR">24.00</b:TaxAmount></a:TaxTotal>"""


def foreign(**changes: str) -> bytes:
    parts = {"issue_time": "", "customer": CUSTOMER, "tax": "", "payable": "120.00"}
    parts.update(changes)
    return FOREIGN_INVOICE.format(**parts).encode()


FOREIGN_VARIANTS = {
    "plain": foreign(),
    "with-tax": foreign(tax=TAX, payable="144.00"),
    "no-customer": foreign(customer=""),
    "local-time": foreign(issue_time="\n  <b:IssueTime>10:30:00</b:IssueTime>"),
    "offset-time": foreign(issue_time="\n  <b:IssueTime>10:30:00+02:00</b:IssueTime>"),
}


@pytest.mark.parametrize("variant", list(FOREIGN_VARIANTS))
def test_foreign_invoices_are_valid_ubl(variant: str, official: dict[str, etree.XMLSchema]) -> None:
    """The hand-written documents below are real UBL 2.4, not our profile."""
    assert_officially_valid(official["Invoice"], FOREIGN_VARIANTS[variant])


def test_a_foreign_invoice_reads_as_a_purchase() -> None:
    tx = cmi_ubl.read(FOREIGN_VARIANTS["plain"])
    assert tx == Transaction(
        id="INV-2024-001",
        kind="purchase",
        occurred_at=dt.datetime(2024, 3, 15, tzinfo=dt.UTC),  # no IssueTime: midnight UTC
        firm="5790000435968",  # the supplier's EndpointID
        customer_ref="cust-4411",
        items=(
            LineItem(
                description="Paper, A4, 500 sheets",
                quantity=3,
                unit_price={"amount": "30.00", "currency": "EUR"},
                amount={"amount": "90.00", "currency": "EUR"},
                sku="P-A4",
            ),
            LineItem(
                description="Delivery",
                unit_price={"amount": "30.00", "currency": "EUR"},
                amount={"amount": "30.00", "currency": "EUR"},
            ),
        ),
        total={"amount": "120.00", "currency": "EUR"},
    )
    offset = cmi_ubl.read(FOREIGN_VARIANTS["offset-time"])
    assert isinstance(offset, Transaction)
    assert offset.occurred_at == dt.datetime(2024, 3, 15, 8, 30, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("with-tax", r"total 144\.00 is not the sum of the line items \(120\.00\)"),
        ("no-customer", r"cac:AccountingCustomerParty/cac:Party is missing.*pseudonymous"),
        ("local-time", r"occurred_at: must be timezone-aware"),
    ],
)
def test_what_a_foreign_invoice_lacks_is_a_clear_mapping_error(variant: str, message: str) -> None:
    with pytest.raises(MappingError, match=message):
        cmi_ubl.read(FOREIGN_VARIANTS[variant])


def test_a_due_date_without_the_exact_deadline_reads_as_the_end_of_that_day() -> None:
    request = example("RequestForQuotation")
    xml = render(request, "RequestForQuotation")
    note = b"  <cbc:Note>cmi:respond_by 2026-06-01T09:00:30Z</cbc:Note>\n"
    assert note in xml
    read = cmi_ubl.read(xml.replace(note, b""))
    assert isinstance(read, Request)
    assert read.respond_by == dt.datetime(2026, 6, 1, 23, 59, 59, tzinfo=dt.UTC)
    assert read.model_copy(update={"respond_by": request.respond_by}) == request  # type: ignore[attr-defined]


def test_a_foreign_request_must_say_what_it_wants() -> None:
    xml = render(example("RequestForQuotation"), "RequestForQuotation")
    start = xml.index(b"<cac:CommodityClassification>")
    end = xml.index(b"</cac:CommodityClassification>") + len(b"</cac:CommodityClassification>")
    with pytest.raises(MappingError, match=r"cac:CommodityClassification.*not None"):
        cmi_ubl.read(xml[:start] + xml[end:])


def test_the_adapter_admits_only_the_profile() -> None:
    with pytest.raises(DocumentValidationError) as info:
        ADAPTER.parse(FOREIGN_VARIANTS["plain"])
    assert (info.value.standard, info.value.document_type) == ("ubl", "Invoice")
    assert any("CustomizationID" in issue.reason for issue in info.value.issues)


def test_read_refuses_other_documents_and_hostile_xml() -> None:
    with pytest.raises(MappingError, match="reads RequestForQuotation, Quotation, Order, Invoice"):
        cmi_ubl.read(render(example("Invoice"), "Invoice").replace(b"Invoice", b"CreditNote"))
    with pytest.raises(XMLInputError):
        cmi_ubl.read(b'<!DOCTYPE x [<!ENTITY e "e">]><x>&e;</x>')


# -- documents that break the profile's conventions --------------------------------------------


@pytest.mark.parametrize(
    ("doc_type", "old", "new", "reason"),
    [
        (
            "RequestForQuotation",
            b"<cbc:SubmissionDueDate>2026-06-01<",
            b"<cbc:SubmissionDueDate>2026-06-02<",
            "is not the UTC date of the cmi:respond_by note",
        ),
        (
            "RequestForQuotation",
            b'<cbc:ItemClassificationCode listID="urn:cmi:ubl:kind">flight<',
            b'<cbc:ItemClassificationCode listID="urn:cmi:ubl:kind">purchase<',
            "one of flight, loan, not 'purchase'",
        ),
        (
            "Quotation",
            b">cmi:advice alt-date Flying on 2026-06-30 costs 40.00 USD less.<",
            b">cmi:advice alt-date<",
            "a cmi:advice note needs 1 fields and a text",
        ),
        (
            "Quotation",
            b"<cbc:Value>2231</cbc:Value>",
            b"<cbc:Value>22 31</cbc:Value>",
            "String should match pattern",
        ),
    ],
)
def test_documents_that_break_the_conventions_are_refused_clearly(
    doc_type: str, old: bytes, new: bytes, reason: str
) -> None:
    xml = render(example(doc_type), doc_type)
    assert old in xml
    with pytest.raises(DocumentValidationError) as info:
        ADAPTER.parse(xml.replace(old, new))
    assert any(reason in issue.reason for issue in info.value.issues), info.value.issues


def test_a_model_of_another_type_is_a_mapping_error() -> None:
    with pytest.raises(MappingError, match="made from a Transaction, not a Offer"):
        render(example("Quotation"), "Invoice")


# -- validating against the official schemas at run time -------------------------------------


@pytest.mark.usefixtures("no_official_setting")
def test_official_schemas_are_checked_at_run_time_once_configured(
    official: dict[str, etree.XMLSchema],
) -> None:
    invoice = cmi_ubl.plugin.INVOICE
    assert cmi_ubl.official_schemas_folder() is None
    assert invoice.official_schema is None
    assert invoice.lxml_schema is invoice.profile_schema
    cmi_ubl.official_schemas(XSDRT)
    assert cmi_ubl.official_schemas_folder() == XSDRT.resolve()
    compiled = invoice.official_schema
    assert compiled is not None
    assert invoice.official_schema is compiled  # compiled once
    for doc_type in CASES:
        model = example(doc_type)
        xml = render(model, doc_type)
        assert ADAPTER.parse(xml) == model
        assert cmi_ubl.read(xml) == model


@pytest.fixture
def stricter_copy(tmp_path: Path, official: dict[str, etree.XMLSchema]) -> Path:
    """A copy of the official schemas whose Invoice requires a cbc:DueDate, which the
    profile never writes: what only the official check can catch."""
    copy = tmp_path / "xsdrt"
    shutil.copytree(XSDRT, copy)
    main = copy / "maindoc" / "UBL-Invoice-2.4.xsd"
    text = main.read_text(encoding="utf-8")
    optional = '<xsd:element ref="cbc:DueDate" minOccurs="0" maxOccurs="1"/>'
    assert optional in text
    main.write_text(text.replace(optional, '<xsd:element ref="cbc:DueDate"/>'), encoding="utf-8")
    return copy


@pytest.mark.usefixtures("no_official_setting")
def test_the_environment_variable_names_the_official_schemas(
    monkeypatch: pytest.MonkeyPatch, stricter_copy: Path
) -> None:
    tx = example("Invoice")
    xml = render(tx, "Invoice")
    monkeypatch.setenv(cmi_ubl.OFFICIAL_SCHEMAS_ENV, str(stricter_copy))
    assert cmi_ubl.official_schemas_folder() == stricter_copy.resolve()
    for attempt in (lambda: render(tx, "Invoice"), lambda: ADAPTER.validate(xml)):
        with pytest.raises(DocumentValidationError) as info:
            attempt()
        (issue,) = info.value.issues
        assert issue.reason.startswith("official UBL 2.4 schema: ")
        assert "DueDate" in issue.reason
    with pytest.raises(DocumentValidationError, match=r"official UBL 2\.4 schema"):
        cmi_ubl.read(xml)
    # the other document types are unchanged in the copy
    assert ADAPTER.parse(render(example("Quotation"), "Quotation")) == example("Quotation")
    monkeypatch.delenv(cmi_ubl.OFFICIAL_SCHEMAS_ENV)
    assert ADAPTER.parse(render(tx, "Invoice")) == tx


@pytest.mark.usefixtures("no_official_setting")
def test_an_official_schemas_folder_that_is_not_one_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigurationError, match=r"maindoc/UBL-RequestForQuotation-2\.4\.xsd"):
        cmi_ubl.official_schemas(tmp_path)
    assert cmi_ubl.official_schemas_folder() is None
    monkeypatch.setenv(cmi_ubl.OFFICIAL_SCHEMAS_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigurationError, match="CMI_UBL_SCHEMAS"):
        render(example("Invoice"), "Invoice")


@pytest.mark.usefixtures("no_official_setting")
def test_signed_documents_pass_both_checks(official: dict[str, etree.XMLSchema]) -> None:
    """Signed in UBL's signature extension, a document is valid against the official
    schema as it is: nothing is set aside."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = self_signed_certificate(key, common_name="delta.com")
    documents = Documents(
        standards=ADAPTER.standards, signer=DocumentSigner(key=key, certificate=certificate)
    )
    for name in CASES:
        signed = documents.render_signed(example(name), standard="ubl", document_type=name)
        root = etree.fromstring(signed)
        assert official[name].validate(root), (name, official[name].error_log)
        assert verify_document(signed, certificate)
        cmi_ubl.official_schemas(XSDRT)
        assert ADAPTER.parse(signed) == example(name)
        cmi_ubl.official_schemas(None)
        # the signature is in the extension, referred to by cac:Signature
        info = root.find(
            "ext:UBLExtensions/ext:UBLExtension/ext:ExtensionContent/sig:UBLDocumentSignatures"
            "/sac:SignatureInformation",
            SIGNATURE_NS,
        )
        assert info is not None
        assert info.find("ds:Signature", SIGNATURE_NS) is not None
        referred = text_at(root, "cac:Signature/cbc:ID")
        assert referred == info.findtext("sbc:ReferencedSignatureID", namespaces=SIGNATURE_NS)
        assert referred == f"urn:oasis:names:specification:ubl:signature:{name}"


def test_emitted_under_ubl_terms(tmp_path: Path, official: dict[str, etree.XMLSchema]) -> None:
    from cmi_sdk import TermsError, TermsProposal
    from cmi_sdk.webhooks import generate_secret
    from tests.support import emitting_adapter, register

    adapter = emitting_adapter(tmp_path, plugins=[cmi_ubl.plugin], entry_points=False)
    tx = example("Invoice")
    try:
        register(adapter, standard="ubl", customer_ref=tx.customer_ref)  # type: ignore[attr-defined]
        (emission,) = adapter.emit(tx)
        assert (emission.standard, emission.document_type, emission.signed) == (
            "ubl",
            "Invoice",
            True,
        )
        assert adapter.parse(emission.document) == tx
        # officially valid as delivered: the signature is in UBL's extension
        root = etree.fromstring(emission.document)
        assert root[0].tag == f"{{{EXT}}}UBLExtensions"
        assert official["Invoice"].validate(root), official["Invoice"].error_log
        proposal = TermsProposal.model_validate(
            {
                "customer_ref": "cust-other",
                "destination": "http://127.0.0.1:9/inbox",
                "secret": generate_secret(),
                "standard": "ubl",
                "fields": ["total"],
                "purpose": {"code": "records", "text": "Keep my invoices"},
            }
        )
        with pytest.raises(
            TermsError, match=r"ubl Invoice documents are shared whole.*no field total"
        ):
            adapter.propose_terms(proposal)
    finally:
        adapter.close()


# -- the command line ------------------------------------------------------------------------

CLI_RENDERS = [
    ("Quotation", "offer.json"),
    ("RequestForQuotation", "request.json"),
    ("Invoice", "ticket.json"),
]


@pytest.mark.parametrize(("doc_type", "file"), CLI_RENDERS)
def test_examples_render_in_process(
    doc_type: str, file: str, official: dict[str, etree.XMLSchema]
) -> None:
    """What ``cmi render --standard ubl --type <doc_type> examples/<file>`` prints."""
    model_type = ADAPTER.standards.resolve("ubl", doc_type)[1].model
    model = load_model(model_type, (EXAMPLES / file).read_text(encoding="utf-8"))
    xml = render(model, doc_type)
    assert xml.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<' + doc_type.encode())
    assert_officially_valid(official[doc_type], xml)
    assert ADAPTER.parse(xml) == model


@pytest.mark.skipif(
    not UBL_ENTRY_POINT,
    reason="the ubl plugin is not registered under the cmi_sdk entry points yet "
    "(pyproject.toml); test_examples_render_in_process covers the same renders",
)
@pytest.mark.parametrize(("doc_type", "file"), CLI_RENDERS)
@pytest.mark.slow
def test_cmi_render_ubl(doc_type: str, file: str, official: dict[str, etree.XMLSchema]) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cmi_sdk.cli",
            "render",
            "--standard",
            "ubl",
            "--type",
            doc_type,
            str(EXAMPLES / file),
        ],
        capture_output=True,
        check=False,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    model_type = ADAPTER.standards.resolve("ubl", doc_type)[1].model
    model = load_model(model_type, (EXAMPLES / file).read_text(encoding="utf-8"))
    assert done.stdout == render(model, doc_type)
    assert_officially_valid(official[doc_type], done.stdout)
