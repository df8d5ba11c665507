"""The ``ofx`` standard: bank transactions as OFX 2.2 statements, and banks' OFX read back.

ofxtools, a third-party OFX reader, is the interoperability oracle: every document rendered
here must read in it with the same amounts, times, ids and texts.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import io
import re
import subprocess
import sys
import warnings
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree
from ofxtools.models.base import PrivateTagWarning
from ofxtools.Parser import OFXTree

from cmi_sdk import (
    Adapter,
    BankStatementLineDetails,
    DocumentTooDeepError,
    DocumentTooLargeError,
    DocumentValidationError,
    ForbiddenXMLError,
    MalformedXMLError,
    MappingError,
    Money,
    RenderError,
    TermsError,
    TermsProposal,
    Transaction,
    XMLInputError,
    load_model,
)
from cmi_sdk.testing import make_adapter
from tests.strategies import ms_datetimes, ofx_transactions

ROOT = Path(__file__).resolve().parents[2]
try:
    import cmi_ofx
except ImportError:  # until pyproject registers the package
    sys.path.insert(0, str(ROOT / "plugins"))
    import cmi_ofx
import cmi_ofx.plugin  # noqa: E402
from cmi_ofx import (  # noqa: E402
    OFXPlugin,
    OFXSettings,
    parse_ofx,
    parse_ofx_amount,
    parse_ofx_datetime,
)

EXAMPLE = ROOT / "examples" / "bank-transaction.json"
DATA = Path(__file__).resolve().parents[1] / "data" / "ofx"
CUSTOMER = "cust-7f3a9c"
UTC = dt.UTC

# Only this plugin and the SDK's defaults: once the entry point is installed, registering
# the module again beside it would be a duplicate registration.
ADAPTER = make_adapter(cmi_ofx.plugin)


def example() -> Transaction:
    return load_model(Transaction, EXAMPLE.read_text())


ACCOUNT = "000000000000"


def read_back(tx: Transaction, customer_ref: str = ACCOUNT) -> Transaction:
    """``tx`` as a statement reads back: OFX has no place for the customer's reference, so
    it reads as the account's ACCTID (the placeholder by default)."""
    return tx.model_copy(update={"customer_ref": customer_ref})


def changed(tx: Transaction, **details: Any) -> Transaction:
    """``tx`` with its details and (``total``, ``id``, ``occurred_at``...) fields changed."""
    top = {k: details.pop(k) for k in list(details) if k in Transaction.model_fields}
    data = tx.model_dump()
    data.update(top)
    data["details"] = {**data["details"], **details}
    return Transaction.model_validate(data)


def ofxtools(xml: bytes) -> Any:
    """Parse with ofxtools and convert to its models. It warns when it skips a private tag
    (CMI.CUSTOMER), as it does for every bank's INTU.BID; any other warning fails."""
    tree = OFXTree()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrivateTagWarning)
        tree.parse(io.BytesIO(xml))
        return tree.convert()


def xpath(xml: bytes, path: str) -> list[str]:
    root = etree.fromstring(xml, ADAPTER.parser.lxml_parser())
    return [str(v) for v in root.xpath(path)]


# -- strategies ---------------------------------------------------------------------------


# -- the seed's statement line ------------------------------------------------------------


def test_example_is_the_seeds_stmttrn() -> None:
    xml = ADAPTER.render(example(), standard="ofx")
    assert len(xpath(xml, "//STMTTRN")) == 1
    text = xml.decode()
    for element in (
        "<TRNTYPE>DEBIT</TRNTYPE>",
        "<DTPOSTED>20030215070000.000[+0:UTC]</DTPOSTED>",
        "<TRNAMT>-5.72</TRNAMT>",
        "<FITID>320030460028109716</FITID>",
        "<NAME>AT&amp;T SERVICES 800-2220300</NAME>",
        "<MEMO>AT&amp;T SERVICES 800-2220300 NJ 090220230 TELECOMM SERVICE</MEMO>",
    ):
        assert element in text
    assert "<DTUSER>" not in text  # occurred when posted
    assert "<CMI.TRNID>" not in text  # the id is the FITID


def test_the_seeds_mountain_time_is_the_examples_instant() -> None:
    seed = parse_ofx_datetime("20030215000000.000[-7:MST]")
    assert seed == dt.datetime(2003, 2, 15, 7, tzinfo=UTC)
    details = example().details
    assert isinstance(details, BankStatementLineDetails)
    assert seed == details.posted_at


def test_a_complete_ofx_2_response() -> None:
    xml = ADAPTER.render(example(), standard="ofx")
    assert xml.startswith(
        b'<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n'
        b'<?OFX OFXHEADER="200" VERSION="220" SECURITY="NONE" OLDFILEUID="NONE"'
        b' NEWFILEUID="NONE"?>\n<OFX>'
    )
    sonrs = "/OFX/SIGNONMSGSRSV1/SONRS"
    stmtrs = "/OFX/BANKMSGSRSV1/STMTTRNRS/STMTRS"
    expected = {
        f"{sonrs}/STATUS/CODE": "0",
        f"{sonrs}/STATUS/SEVERITY": "INFO",
        f"{sonrs}/DTSERVER": "20030215070000.000[+0:UTC]",
        f"{sonrs}/LANGUAGE": "ENG",
        f"{sonrs}/FI/ORG": "bank.example",
        "/OFX/BANKMSGSRSV1/STMTTRNRS/STATUS/CODE": "0",
        f"{stmtrs}/CURDEF": "USD",
        f"{stmtrs}/BANKACCTFROM/BANKID": "000000000",
        f"{stmtrs}/BANKACCTFROM/ACCTID": "000000000000",
        f"{stmtrs}/BANKACCTFROM/ACCTTYPE": "CHECKING",
        f"{stmtrs}/BANKTRANLIST/DTSTART": "20030215070000.000[+0:UTC]",
        f"{stmtrs}/BANKTRANLIST/DTEND": "20030215070000.000[+0:UTC]",
        f"{stmtrs}/LEDGERBAL/BALAMT": "-5.72",
        f"{stmtrs}/LEDGERBAL/DTASOF": "20030215070000.000[+0:UTC]",
    }
    for path, value in expected.items():
        assert xpath(xml, f"{path}/text()") == [value], path
    # OFX has no place for the customer's reference: the terms identify the customer.
    assert CUSTOMER not in xml.decode()
    assert xpath(xml, "//*[starts-with(name(), 'CMI.CUSTOMER')]") == []
    (trnuid,) = xpath(xml, "//TRNUID/text()")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", trnuid)
    # The same transaction renders the same bytes: emitted twice, it is one message.
    assert ADAPTER.render(example(), standard="ofx") == xml


def test_validate_accepts_the_ofx_header_before_the_root() -> None:
    xml = ADAPTER.render(example(), standard="ofx")
    doc = ADAPTER.validate(xml)  # found by its root element, OFX
    assert (doc.standard.name, doc.document_type.name) == ("ofx", "statement")
    header = doc.tree.getroot().getprevious()
    assert isinstance(header, etree._ProcessingInstruction)
    assert header.target == "OFX"
    assert doc.to_model() == read_back(example())


def test_the_example_round_trips() -> None:
    tx = example()
    xml = ADAPTER.render(tx, standard="ofx")
    assert ADAPTER.parse(xml) == read_back(tx)
    assert ADAPTER.parse(xml, standard="ofx", document_type="statement") == read_back(tx)


def test_ofxtools_reads_the_example() -> None:
    ofx = ofxtools(ADAPTER.render(example(), standard="ofx"))
    assert ofx.signon.fi.org == "bank.example"
    (stmt,) = ofx.statements
    assert (stmt.curdef, stmt.account.bankid, stmt.account.acctid) == (
        "USD",
        "000000000",
        "000000000000",
    )
    assert stmt.balance.balamt == Decimal("-5.72")
    assert stmt.balance.dtasof == dt.datetime(2003, 2, 15, 7, tzinfo=UTC)
    (line,) = stmt.transactions
    assert line.trntype == "DEBIT"
    assert line.trnamt == Decimal("-5.72")
    assert line.dtposted == dt.datetime(2003, 2, 15, 7, tzinfo=UTC)
    assert line.fitid == "320030460028109716"
    assert line.name == "AT&T SERVICES 800-2220300"
    assert line.memo == "AT&T SERVICES 800-2220300 NJ 090220230 TELECOMM SERVICE"


# -- the mapping's rules ------------------------------------------------------------------


@pytest.mark.parametrize(("trntype", "amount"), [("DEBIT", "-5.72"), ("CREDIT", "1250.00")])
def test_debits_are_negative_and_credits_positive(trntype: str, amount: str) -> None:
    tx = changed(example(), transaction_type=trntype, total=Money(amount=amount, currency="USD"))
    xml = ADAPTER.render(tx, standard="ofx")
    assert xpath(xml, "//TRNAMT/text()") == [amount]
    assert ofxtools(xml).statements[0].transactions[0].trnamt == Decimal(amount)
    assert ADAPTER.parse(xml) == read_back(tx)


@pytest.mark.parametrize(("trntype", "amount"), [("DEBIT", "5.72"), ("CREDIT", "-5.72")])
def test_a_sign_against_the_type_is_refused(trntype: str, amount: str) -> None:
    tx = changed(example(), transaction_type=trntype, total=Money(amount=amount, currency="USD"))
    with pytest.raises(MappingError, match=f"a {trntype}"):
        ADAPTER.render(tx, standard="ofx")


def test_a_document_whose_sign_contradicts_its_type_is_invalid() -> None:
    xml = ADAPTER.render(example(), standard="ofx").replace(b"-5.72", b"5.72")
    with pytest.raises(DocumentValidationError, match="DEBIT takes money out"):
        ADAPTER.parse(xml)


def test_a_long_payee_goes_whole_into_a_private_tag_and_shortened_into_name() -> None:
    """OFX 2.2's EXTDNAME would be the place, but libofx refuses it: the whole payee goes
    into the private tag CMI.EXTDNAME, which every reader skips."""
    payee = "THE GREAT NORTHERN TELEPHONE & TELEGRAPH CO OF NJ"  # 49 characters
    tx = changed(example(), payee=payee)
    xml = ADAPTER.render(tx, standard="ofx")
    assert xpath(xml, "//NAME/text()") == [payee[:32]]
    assert xpath(xml, "//CMI.EXTDNAME/text()") == [payee]
    assert xpath(xml, "//EXTDNAME") == []
    assert ADAPTER.parse(xml) == read_back(tx)
    line = ofxtools(xml).statements[0].transactions[0]
    assert (line.name, line.extdname) == (payee[:32], None)


def test_a_payee_of_32_characters_is_name_alone() -> None:
    tx = changed(example(), payee="X" * 32)
    xml = ADAPTER.render(tx, standard="ofx")
    assert xpath(xml, "//EXTDNAME | //CMI.EXTDNAME") == []
    assert ADAPTER.parse(xml) == read_back(tx)


def test_occurred_at_is_dtuser_when_it_is_not_the_posted_time() -> None:
    tx = changed(example(), occurred_at=dt.datetime(2003, 2, 13, 18, 30, 0, 125000, tzinfo=UTC))
    xml = ADAPTER.render(tx, standard="ofx")
    assert xpath(xml, "//DTUSER/text()") == ["20030213183000.125[+0:UTC]"]
    assert ADAPTER.parse(xml) == read_back(tx)
    assert ofxtools(xml).statements[0].transactions[0].dtuser == tx.occurred_at


def test_an_id_that_is_not_the_fitid_travels_in_a_private_tag() -> None:
    tx = changed(example(), id="bank-tx-0001")
    xml = ADAPTER.render(tx, standard="ofx")
    assert xpath(xml, "//STMTTRN/CMI.TRNID/text()") == ["bank-tx-0001"]
    assert ADAPTER.parse(xml) == read_back(tx)
    assert ofxtools(xml).statements[0].transactions[0].fitid == "320030460028109716"


def test_a_fitid_that_is_no_identifier_gets_a_stable_derived_id() -> None:
    fitid = "2003/02#1&<x>"
    derived = cmi_ofx.transaction_id(fitid)
    assert re.fullmatch(r"ofx-[0-9a-f]{32}", derived)
    assert cmi_ofx.transaction_id(fitid) == derived
    tx = changed(example(), id=derived, fitid=fitid)
    xml = ADAPTER.render(tx, standard="ofx")
    assert xpath(xml, "//CMI.TRNID") == []
    assert ADAPTER.parse(xml) == read_back(tx)
    assert ofxtools(xml).statements[0].transactions[0].fitid == fitid


def test_quotes_are_written_as_themselves_for_ofx_readers() -> None:
    tx = changed(example(), payee='MCDONALD\'S "EXPRESS" <7>')
    xml = ADAPTER.render(tx, standard="ofx")
    assert b'<NAME>MCDONALD\'S "EXPRESS" &lt;7&gt;</NAME>' in xml
    assert ofxtools(xml).statements[0].transactions[0].name == 'MCDONALD\'S "EXPRESS" <7>'


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"posted_at": dt.datetime(2003, 2, 15, 7, 0, 0, 1500, tzinfo=UTC)}, "millisecond"),
        ({"occurred_at": dt.datetime(2003, 2, 15, 7, 0, 0, 999, tzinfo=UTC)}, "millisecond"),
        ({"memo": "M" * 256}, "MEMO holds 255"),
        ({"firm": "a-bank-whose-identifier-is-long.example"}, "32 characters"),
    ],
    ids=["posted-microseconds", "occurred-microseconds", "memo-256", "long-firm"],
)
def test_what_ofx_cannot_carry_is_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(MappingError, match=message):
        ADAPTER.render(changed(example(), **change), standard="ofx")


def test_characters_xml_cannot_carry_are_refused() -> None:
    tx = changed(example(), payee="AT\x00T")
    with pytest.raises(RenderError, match=r"U\+0000 in lines\[0\]\.name") as info:
        ADAPTER.render(tx, standard="ofx")
    assert info.value.character == "\x00"
    with pytest.raises(RenderError, match=r"U\+0000"):
        cmi_ofx.statement([tx])


def test_only_bank_statement_lines_without_items_are_statements(examples_dir: Path) -> None:
    ticket = load_model(Transaction, (examples_dir / "ticket.json").read_text())
    with pytest.raises(MappingError, match="bank_statement_line transaction, not a flight"):
        ADAPTER.render(ticket, standard="ofx")
    usd = {"amount": "-5.72", "currency": "USD"}
    item = {"description": "line", "unit_price": usd, "amount": usd}
    itemized = Transaction.model_validate({**example().model_dump(), "items": [item]})
    with pytest.raises(MappingError, match="not line items"):
        ADAPTER.render(itemized, standard="ofx")


# -- round trips and interoperability (hypothesis) ----------------------------------------


@given(ofx_transactions())
def test_round_trip_is_identity(tx: Transaction) -> None:
    xml = ADAPTER.render(tx, standard="ofx")
    assert ADAPTER.parse(xml) == read_back(tx)


@settings(max_examples=30)
@given(ofx_transactions(interop=True))
def test_ofxtools_reads_every_document_with_identical_values(tx: Transaction) -> None:
    details = tx.details
    assert isinstance(details, BankStatementLineDetails)
    ofx = ofxtools(ADAPTER.render(tx, standard="ofx"))
    assert ofx.signon.fi.org == tx.firm
    (stmt,) = ofx.statements
    assert stmt.curdef == tx.total.currency
    assert stmt.balance.balamt == tx.total.amount
    (line,) = stmt.transactions
    assert line.trntype == details.transaction_type
    assert line.trnamt == tx.total.amount
    assert line.dtposted == details.posted_at
    assert line.dtuser == (None if tx.occurred_at == details.posted_at else tx.occurred_at)
    assert line.fitid == details.fitid
    assert line.name == details.payee[:32].rstrip()
    assert line.extdname is None  # a long payee is in CMI.EXTDNAME, which ofxtools skips
    assert line.memo == details.memo


def _as_ofx1(xml: bytes) -> bytes:
    """The same statement as an OFX 1.02 export: the colon header, leaves left unclosed,
    one element a line, CRLF."""
    body = xml.decode().split("?>\n", 2)[2]
    body = re.sub(r"(<([A-Z.]+)>[^<]*)</\2>", r"\1", body)
    body = re.sub(r">\n\s*<", ">\r\n<", body)  # between tags only: text keeps its own
    header = (
        "OFXHEADER:100\r\nDATA:OFXSGML\r\nVERSION:102\r\nSECURITY:NONE\r\nENCODING:UTF-8\r\n"
        "CHARSET:NONE\r\nCOMPRESSION:NONE\r\nOLDFILEUID:NONE\r\nNEWFILEUID:NONE\r\n\r\n"
    )
    return (header + body).encode()


@given(ofx_transactions(interop=True))
def test_parse_ofx_reads_rendered_statements_as_ofx_2_and_as_ofx_1(tx: Transaction) -> None:
    xml = ADAPTER.render(tx, standard="ofx")
    assert parse_ofx(xml, customer_ref=tx.customer_ref) == [tx]
    sgml = _as_ofx1(xml)
    assert b"</TRNAMT>" not in sgml
    assert parse_ofx(sgml, customer_ref=tx.customer_ref) == [tx]


# -- times and amounts --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "utc"),
    [
        ("20030215000000.000[-7:MST]", (2003, 2, 15, 7, 0)),
        ("20030215070000.000[+0:UTC]", (2003, 2, 15, 7, 0)),
        ("20030215", (2003, 2, 15, 0, 0)),  # no time: midnight, and no zone: UTC
        ("20030215123000", (2003, 2, 15, 12, 30)),
        ("200302151230", (2003, 2, 15, 12, 30)),
        ("20030215123000.000", (2003, 2, 15, 12, 30)),
        ("20030215123000[-5:EST]", (2003, 2, 15, 17, 30)),  # no milliseconds, as JPM writes
        ("20030215123000.000[-5]", (2003, 2, 15, 17, 30)),
        ("20030215123000.000[0:GMT]", (2003, 2, 15, 12, 30)),
        ("20030215123000.000[+14:LINT]", (2003, 2, 14, 22, 30)),
        ("20030215123000.000[-12]", (2003, 2, 16, 0, 30)),
        ("20030215123000.000[-5.5:X]", (2003, 2, 15, 18, 0)),  # decimal hours
        ("20030215123000.000[5.75:NPT]", (2003, 2, 15, 6, 45)),  # +05:45
        ("20030215123000.000[+5.5:IST]", (2003, 2, 15, 7, 0)),  # +05:30
        ("20030215123000.000[+5.30:IST]", (2003, 2, 15, 7, 0)),  # hours.minutes: +05:30
        ("20030215123000.000[+5.45:NPT]", (2003, 2, 15, 6, 45)),  # hours.minutes: +05:45
        ("20030215123000.000[-3.50:NST]", (2003, 2, 15, 16, 0)),  # decimal: -03:30
        ("20030215123000.000[EST]", (2003, 2, 15, 17, 30)),  # a name alone
        ("20030215123000.000[:EST]", (2003, 2, 15, 17, 30)),
        ("20030215123000.000[-:EST]", (2003, 2, 15, 17, 30)),  # as one broker writes it
        ("20030215123000.000[-7:EST]", (2003, 2, 15, 19, 30)),  # the offset defines the zone
        ("  20030215123000.000 [ -5 : EST ] ", (2003, 2, 15, 17, 30)),
        ("20030215000000.000[+1:CET]", (2003, 2, 14, 23, 0)),  # across midnight
    ],
)
def test_ofx_times_read_to_the_right_utc_instant(text: str, utc: tuple[int, ...]) -> None:
    value = parse_ofx_datetime(text)
    assert value == dt.datetime(*utc, tzinfo=UTC)
    assert value.tzinfo is UTC


def test_milliseconds_and_finer_fractions_are_kept() -> None:
    assert parse_ofx_datetime("20030215123000.125").microsecond == 125000
    assert parse_ofx_datetime("20030215123000.5").microsecond == 500000


def test_times_without_a_zone_can_be_read_in_the_banks_zone() -> None:
    paris = dt.timezone(dt.timedelta(hours=1))
    value = parse_ofx_datetime("20240115", assume=paris)
    assert value == dt.datetime(2024, 1, 14, 23, tzinfo=UTC)
    # a stated zone wins over the assumed one
    assert parse_ofx_datetime("20240115[0:GMT]", assume=paris) == dt.datetime(
        2024, 1, 15, tzinfo=UTC
    )


@pytest.mark.parametrize(
    "text",
    [
        "2003021",
        "20031315",
        "20030230",
        "20030215250000",
        "20030215126000",
        "20030215123000.000[+15]",
        "20030215123000.000[-13]",
        "20030215123000.000[+5.1]",  # 6 minutes, or 1 minute: neither is a zone
        "20030215123000.000[+5.40]",
        "20030215123000.000[IST]",  # India, Ireland or Israel?
        "20030215123000.000[-]",
        "20030215123000.000[-7:MST",
        "20030215123000.0000000",
        "yesterday",
    ],
)
def test_malformed_times_are_refused(text: str) -> None:
    with pytest.raises(MappingError):
        parse_ofx_datetime(text)


quarter_hours = st.integers(-12 * 4, 14 * 4).map(lambda q: q * 15)


@given(ms_datetimes, quarter_hours)
def test_any_offset_written_as_decimal_hours_reads_back(instant: dt.datetime, minutes: int) -> None:
    local = instant.astimezone(dt.timezone(dt.timedelta(minutes=minutes)))
    hours = Decimal(abs(minutes)) / 60
    offset = f"{'-' if minutes < 0 else '+'}{hours:f}"
    text = local.strftime("%Y%m%d%H%M%S") + f".{local.microsecond // 1000:03d}[{offset}:TZ]"
    assert parse_ofx_datetime(text) == instant


@given(ms_datetimes)
def test_written_times_read_back(instant: dt.datetime) -> None:
    assert parse_ofx_datetime(cmi_ofx.format_ofx_datetime(instant)) == instant


@pytest.mark.parametrize(
    ("text", "amount"),
    [
        ("-5.72", "-5.72"),
        ("+5.72", "5.72"),
        ("5,72", "5.72"),
        ("-.50", "-0.50"),
        ("5.", "5"),
        ("1250", "1250"),
        ("  -5.72 ", "-5.72"),
        ("-123456789012345678.1234", "-123456789012345678.1234"),
    ],
)
def test_ofx_amounts(text: str, amount: str) -> None:
    value = parse_ofx_amount(text)
    assert value == Decimal(amount)
    assert str(value) == amount


@pytest.mark.parametrize("text", ["", "-", "1,234.56", "1.234,56", "--5", "5e3", "abc", "9" * 33])
def test_malformed_amounts_are_refused(text: str) -> None:
    with pytest.raises(MappingError):
        parse_ofx_amount(text)


# -- banks' exports -----------------------------------------------------------------------


def line(  # noqa: PLR0917  (a table row: positions read better than keywords)
    id_: str,
    firm: str,
    trntype: str,
    posted: dt.datetime,
    amount: str,
    currency: str,
    payee: str,
    memo: str | None = None,
    *,
    occurred: dt.datetime | None = None,
    fitid: str | None = None,
) -> Transaction:
    return Transaction.model_validate(
        {
            "id": id_,
            "kind": "bank_statement_line",
            "occurred_at": occurred or posted,
            "firm": firm,
            "customer_ref": CUSTOMER,
            "total": {"amount": amount, "currency": currency},
            "details": {
                "transaction_type": trntype,
                "posted_at": posted,
                "payee": payee,
                "memo": memo,
                "fitid": fitid or id_,
            },
        }
    )


def at(*parts: int) -> dt.datetime:
    return dt.datetime(*parts, tzinfo=UTC)


def test_the_seed_as_quicken_era_sgml() -> None:
    """Lower-case tags, values on the line after their tag, nothing closed but aggregates,
    CRLF, Windows-1252, &amp;, a trailing space, the seed's [-7:MST]."""
    got = parse_ofx((DATA / "seed-quicken-1252.ofx").read_bytes(), customer_ref=CUSTOMER)
    assert got == [
        example().model_copy(update={"firm": "SEEDBANK"}),
        line(
            "320030590012345678",
            "SEEDBANK",
            "CREDIT",
            at(2003, 2, 28, 7),
            "1250.00",
            "USD",
            "PAYROLL CAFÉ DU MONDE",
            "DIRECT DEPOSIT – FEB",  # noqa: RUF001
            occurred=at(2003, 2, 27),
        ),
    ]
    firm = parse_ofx(
        (DATA / "seed-quicken-1252.ofx").read_bytes(), customer_ref=CUSTOMER, firm="bank.example"
    )
    assert firm[0] == example()


def test_a_credit_union_in_latin_1() -> None:
    """Spaces in the header, ISO-8859-1, tabs, closed and unclosed leaves, comma radix,
    dates without times or zones, a bare '&', &nbsp;, empty and missing MEMOs, INTU.BID,
    a DOS end-of-file mark; the FI's ORG made an identifier."""
    got = parse_ofx((DATA / "credit-union-latin1.ofx").read_bytes(), customer_ref=CUSTOMER)
    firm = "Caisse-Populaire-Test"
    assert got == [
        line("2024011500001", firm, "POS", at(2024, 1, 15), "-12.50", "EUR", "Fish & Chips Ltd"),
        line(
            "2024011600002",
            firm,
            "DEBIT",
            at(2024, 1, 16, 14, 30),
            "-45.00",
            "EUR",
            "Café Müller & Söhne",
            "Carte 1234  16/01",
        ),
        line("2024012500003", firm, "DIRECTDEP", at(2024, 1, 25), "2150", "EUR", "SALAIRE JANVIER"),
        line(
            "2024013100004",
            firm,
            "SRVCHG",
            at(2024, 1, 31),
            "-0.90",
            "EUR",
            "FRAIS TENUE DE COMPTE",
        ),
    ]


def test_a_card_issuers_one_line_export() -> None:
    """OFX 1.03 on one line, Windows-1252, a credit card statement, lines in a foreign
    currency, fractional offsets written both ways, a lower-case and an unknown TRNTYPE,
    a '+' sign, EXTDNAME over a NAME cut at 32 characters."""
    got = parse_ofx((DATA / "card-1252-oneline.qfx").read_bytes(), customer_ref=CUSTOMER)
    assert got == [
        line(
            "24030200001",
            "CARDCO",
            "DEBIT",
            at(2024, 3, 2, 5),
            "-3250",
            "NPR",
            "KATHMANDU GUEST HOUSE",
            "Foreign transaction",
            occurred=at(2024, 3, 1, 13, 45),  # 19:30 at +5.45, hours.minutes
        ),
        line(
            "24030300002",
            "CARDCO",
            "DEBIT",
            at(2024, 3, 3, 5),
            "-1500",
            "NPR",
            "NEPAL TREKS",
            occurred=at(2024, 3, 2, 6, 15),  # 12:00 at 5.75, decimal hours: the same zone
        ),
        line(
            "24030400003",
            "CARDCO",
            "PAYMENT",
            at(2024, 3, 4, 17),
            "25",
            "USD",
            "PAYMENT – THANK YOU",  # noqa: RUF001  (Windows-1252 en dash, on purpose)
        ),
        line(
            "24030500004",
            "CARDCO",
            "OTHER",
            at(2024, 3, 5, 5),
            "-89.99",
            "USD",
            "O’Reilly Books & Music Online Store – Sebastopol CA",  # noqa: RUF001
            "€ price shown in USD",
        ),
    ]


def test_an_ofx_2_export_with_two_accounts() -> None:
    """A byte-order mark, CRLF, a comment, CDATA, &apos;, <MEMO/>, INTU.BID, a FITID that is
    no identifier, and +05:30 written as +5.30 and as +5.5."""
    got = parse_ofx((DATA / "bank-v2-bom.ofx").read_bytes(), customer_ref=CUSTOMER)
    firm = "DEMO-BANK-OF-INDIA"
    assert got == [
        line(
            cmi_ofx.transaction_id("N123/2024/0001"),
            firm,
            "XFER",
            at(2024, 4, 10, 5),
            "-15000",
            "INR",
            "NEFT-RAHUL'S SHOP",
            "<NEFT> ref 4455 & co",
            fitid="N123/2024/0001",
        ),
        line(
            "ATM0411",
            firm,
            "ATM",
            at(2024, 4, 11),
            "-2000",
            "INR",
            "ATM WDL MG ROAD",
            occurred=at(2024, 4, 11, 4),
        ),
        line("INT202404", firm, "INT", at(2024, 4, 29, 18, 30), "123.45", "INR", "INTEREST CREDIT"),
    ]


def test_an_ofx_2_header_over_an_sgml_body_is_read_as_sgml() -> None:
    data = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<?OFX OFXHEADER="200" VERSION="200" SECURITY="NONE" OLDFILEUID="NONE"'
        b' NEWFILEUID="NONE"?>\n'
        b"<OFX><SIGNONMSGSRSV1><SONRS><STATUS><CODE>0<SEVERITY>INFO</STATUS>"
        b"<DTSERVER>20240101<LANGUAGE>ENG<FI><ORG>B1</FI></SONRS></SIGNONMSGSRSV1>"
        b"<BANKMSGSRSV1><STMTTRNRS><TRNUID>1<STATUS><CODE>0<SEVERITY>INFO</STATUS><STMTRS>"
        b"<CURDEF>USD<BANKTRANLIST><STMTTRN><TRNTYPE>FEE<DTPOSTED>20240101<TRNAMT>-1"
        b"<FITID>F1<NAME>MONTHLY&nbsp;FEE</STMTTRN></BANKTRANLIST></STMTRS></STMTTRNRS>"
        b"</BANKMSGSRSV1></OFX>"
    )
    assert parse_ofx(data, customer_ref=CUSTOMER) == [
        line("F1", "B1", "FEE", at(2024, 1, 1), "-1.00", "USD", "MONTHLY FEE")
    ]


def test_parse_ofx_reads_what_the_sdk_rendered() -> None:
    tx = changed(example(), id="bank-tx-0001", occurred_at=at(2003, 2, 14, 9))
    assert parse_ofx(ADAPTER.render(tx, standard="ofx"), customer_ref=CUSTOMER) == [tx]


def test_parse_ofx_names_the_line_it_cannot_read() -> None:
    seed = (DATA / "seed-quicken-1252.ofx").read_bytes()
    with pytest.raises(MappingError, match=r"STMTTRN 1 \(FITID 320030460028109716\): .*amount"):
        parse_ofx(seed.replace(b"-5.72", b"-5.725"), customer_ref=CUSTOMER)
    with pytest.raises(MappingError, match=r"STMTTRN 2 .*not an OFX date"):
        parse_ofx(seed.replace(b"20030227", b"2003-02-27"), customer_ref=CUSTOMER)
    with pytest.raises(MappingError, match="no FITID"):
        parse_ofx(seed.replace(b"<fitid>\r\n320030590012345678", b""), customer_ref=CUSTOMER)
    with pytest.raises(MappingError, match="customer_ref"):
        parse_ofx(seed, customer_ref="jane@example.com")
    with pytest.raises(MappingError, match="no FI ORG"):
        parse_ofx(seed.replace(b"<org>\r\nSEEDBANK\r\n", b""), customer_ref=CUSTOMER)


def test_a_bank_error_is_reported() -> None:
    seed = (DATA / "seed-quicken-1252.ofx").read_bytes()
    refused = seed.replace(
        b"<trnuid>\r\n1\r\n<status>\r\n<code>\r\n0\r\n<severity>\r\nINFO",
        b"<trnuid>\r\n1\r\n<status>\r\n<code>\r\n2000\r\n<severity>\r\nERROR"
        b"\r\n<message>\r\nGeneral error",
    )
    with pytest.raises(MappingError, match=r"error \(2000\): General error"):
        parse_ofx(refused, customer_ref=CUSTOMER)


# -- hostile input ------------------------------------------------------------------------

SGML_HEADER = (
    b"OFXHEADER:100\r\nDATA:OFXSGML\r\nVERSION:102\r\nSECURITY:NONE\r\nENCODING:USASCII\r\n"
    b"CHARSET:1252\r\nCOMPRESSION:NONE\r\nOLDFILEUID:NONE\r\nNEWFILEUID:NONE\r\n\r\n"
)


def test_an_oversized_file_is_refused_before_it_is_read() -> None:
    seed = (DATA / "seed-quicken-1252.ofx").read_bytes()
    with pytest.raises(DocumentTooLargeError) as info:
        parse_ofx(seed, customer_ref=CUSTOMER, max_bytes=len(seed) - 1)
    assert info.value.limit == len(seed) - 1
    xml = ADAPTER.render(example(), standard="ofx")
    with pytest.raises(DocumentTooLargeError):
        parse_ofx(xml, customer_ref=CUSTOMER, max_bytes=100)


def test_deep_nesting_is_refused() -> None:
    deep = SGML_HEADER + b"<OFX>" + b"<AGG>" * 100 + b"</AGG>" * 100 + b"</OFX>"
    with pytest.raises(DocumentTooDeepError):
        parse_ofx(deep, customer_ref=CUSTOMER)
    deep_xml = b'<?xml version="1.0"?><OFX>' + b"<A>" * 100 + b"</A>" * 100 + b"</OFX>"
    with pytest.raises(DocumentTooDeepError):
        parse_ofx(deep_xml, customer_ref=CUSTOMER)


@pytest.mark.parametrize(
    "body",
    [
        b'<!DOCTYPE OFX [<!ENTITY x "boom">]><OFX><X>&x;</X></OFX>',
        b'<OFX><!ENTITY x SYSTEM "file:///etc/passwd"></OFX>',
        b"<OFX><![CDATA[x]]></OFX>",
        b"<OFX><!-- a comment hides nothing --></OFX>",
        b'<OFX><?xml-stylesheet href="x"?></OFX>',
    ],
    ids=["doctype", "entity", "cdata", "comment", "pi"],
)
def test_declarations_and_instructions_in_sgml_are_forbidden(body: bytes) -> None:
    with pytest.raises(ForbiddenXMLError):
        parse_ofx(SGML_HEADER + body, customer_ref=CUSTOMER)


def test_entity_tricks_in_xml_are_forbidden() -> None:
    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE OFX [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><OFX>&b;</OFX>'
    )
    with pytest.raises(ForbiddenXMLError):
        parse_ofx(laughs, customer_ref=CUSTOMER)
    external = b'<?xml version="1.0"?><!DOCTYPE OFX SYSTEM "http://evil.example/x.dtd"><OFX/>'
    with pytest.raises(ForbiddenXMLError):
        parse_ofx(external, customer_ref=CUSTOMER)


def test_undeclared_entities_are_kept_as_written_never_expanded() -> None:
    tree = cmi_ofx.read_sgml(SGML_HEADER + b"<OFX><NAME>A&xxe;B &#65;&#x42; AT&T</OFX>")
    assert tree.root.findtext("NAME") == "A&xxe;B AB AT&T"
    assert tree.encoding == "cp1252"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<OFX><NAME>x&#0;y</OFX>", "character reference"),
        (b"<OFX><NAME>x\x01y</OFX>", "control character U\\+0001"),
        (b"<OFX><NAME>x</OFX", "not terminated"),
        (b"<OFX><STMTTRN><NAME>x</BOGUS></OFX>", "closes no open element"),
        (b"<OFX><STMTTRN><NAME>x", "truncated"),
        (b'<OFX><NAME id="1">x</OFX>', "attributes"),
        (b"<OFX>stray text<NAME>x</OFX>", "outside any data element"),
        (b"<OFX></OFX><OFX></OFX>", "after the end"),
        (b"<HTML><BODY>x</HTML>", "not an OFX file"),
    ],
)
def test_malformed_sgml_is_refused_with_its_line(body: bytes, message: str) -> None:
    with pytest.raises(MalformedXMLError, match=message) as info:
        parse_ofx(SGML_HEADER + body, customer_ref=CUSTOMER)
    assert isinstance(info.value, XMLInputError)


def test_compressed_or_headerless_garbage_is_refused() -> None:
    with pytest.raises(MalformedXMLError, match="compressed"):
        parse_ofx(
            SGML_HEADER.replace(b"COMPRESSION:NONE", b"COMPRESSION:ZLIB") + b"<OFX></OFX>",
            customer_ref=CUSTOMER,
        )
    with pytest.raises(MalformedXMLError, match="OFXHEADER"):
        parse_ofx(b"Dear customer, <OFX></OFX>", customer_ref=CUSTOMER)
    with pytest.raises(MalformedXMLError, match="no <OFX>"):
        parse_ofx(b"just text", customer_ref=CUSTOMER)


def test_a_file_without_statements_has_no_lines() -> None:
    assert (
        parse_ofx(
            SGML_HEADER + b"<OFX><SIGNONMSGSRSV1></SIGNONMSGSRSV1></OFX>", customer_ref=CUSTOMER
        )
        == []
    )


# -- the digest ---------------------------------------------------------------------------


def month_of_lines(count: int = 40) -> list[Transaction]:
    base = example()
    lines = []
    for n in range(count):
        credit = n % 5 == 0
        amount = Decimal(f"{1000 + n}.{n:02d}") if credit else Decimal(f"-{n + 1}.{n:02d}")
        posted = at(2003, 2, 1, 7) + dt.timedelta(hours=17 * n)
        lines.append(
            changed(
                base,
                id=f"3200300{n:05d}",
                fitid=f"3200300{n:05d}",
                transaction_type="CREDIT" if credit else "DEBIT",
                total=Money(amount=amount, currency="USD"),
                posted_at=posted,
                occurred_at=posted,
                payee=f"PAYEE & CO NUMBER {n}",
            )
        )
    return lines


def test_a_digest_is_one_statement_of_many_lines() -> None:
    lines = month_of_lines()
    xml = cmi_ofx.render_digest(ADAPTER, lines)
    assert len(xpath(xml, "//STMTTRN")) == len(lines)
    assert len(xpath(xml, "//STMTRS")) == 1
    ADAPTER.validate(xml)  # the single statement's schema
    total = sum((tx.total.amount for tx in lines), Decimal(0))
    (stmt,) = ofxtools(xml).statements
    assert stmt.balance.balamt == total
    assert [t.trnamt for t in stmt.transactions] == [tx.total.amount for tx in lines]
    assert [t.fitid for t in stmt.transactions] == [tx.id for tx in lines]
    assert stmt.banktranlist.dtstart == lines[0].occurred_at
    assert stmt.banktranlist.dtend == lines[-1].occurred_at
    assert cmi_ofx.parse_digest(ADAPTER, xml) == [read_back(tx) for tx in lines]
    assert parse_ofx(xml, customer_ref=CUSTOMER) == lines


def test_a_digest_is_not_one_transaction() -> None:
    xml = cmi_ofx.render_digest(ADAPTER, month_of_lines(3))
    with pytest.raises(DocumentValidationError, match="3 lines, a digest"):
        ADAPTER.parse(xml)


def test_a_digest_takes_the_real_balance_when_given() -> None:
    xml = cmi_ofx.render_digest(ADAPTER, month_of_lines(3), balance=Decimal("10432.17"))
    assert xpath(xml, "//LEDGERBAL/BALAMT/text()") == ["10432.17"]
    with pytest.raises(MappingError, match="balance"):
        cmi_ofx.render_digest(ADAPTER, month_of_lines(3), balance=Decimal("1.234"))


def test_statement_renders_without_an_adapter() -> None:
    assert cmi_ofx.statement([example()]) == ADAPTER.render(example(), standard="ofx")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"firm": "other.example"}, "one firm"),
        ({"customer_ref": "cust-000000"}, "one customer"),
        ({"total": Money(amount="-1.00", currency="EUR")}, "one currency"),
        ({"id": "dup"}, "FITID 320030000001 appears twice"),
    ],
)
def test_a_digest_is_of_one_customers_account(change: dict[str, Any], message: str) -> None:
    lines = month_of_lines(3)
    odd = changed(lines[2], **change)
    if "id" in change:  # the same FITID again
        odd = changed(odd, fitid=lines[1].id)
    with pytest.raises(MappingError, match=message):
        cmi_ofx.render_digest(ADAPTER, [*lines[:2], odd])
    with pytest.raises(MappingError, match="at least one"):
        cmi_ofx.render_digest(ADAPTER, [])


# -- a bank's own settings, signing, emission, the CLI -------------------------------------


def test_a_bank_sets_its_account_and_fi() -> None:
    settings_ = OFXSettings(
        bank_id="121000248",
        account_id=lambda tx: "ACCT-" + tx.customer_ref[-6:].upper(),
        account_type="SAVINGS",
        fid="3001",
    )
    adapter = make_adapter(OFXPlugin(settings_))
    xml = adapter.render(example(), standard="ofx")
    stmt = ofxtools(xml).statements[0]
    assert (stmt.account.bankid, stmt.account.acctid, stmt.account.accttype) == (
        "121000248",
        "ACCT-7F3A9C",
        "SAVINGS",
    )
    assert ofxtools(xml).signon.fi.fid == "3001"
    assert adapter.parse(xml) == read_back(example(), "ACCT-7F3A9C")
    assert cmi_ofx.statement([example()], settings_) == xml


def test_the_installed_plugin_can_be_replaced_by_a_banks_own() -> None:
    adapter = Adapter(
        plugins=[OFXPlugin(OFXSettings(bank_id="121000248"))], entry_points=True, block=["ofx"]
    )
    xml = adapter.render(example(), standard="ofx")
    assert xpath(xml, "//BANKID/text()") == ["121000248"]


@pytest.mark.parametrize(
    "options",
    [
        {"bank_id": "1234567890"},
        {"account_id": ""},
        {"account_id": "x" * 23},
        {"fid": " 1"},
        {"account_type": "BROKERAGE"},
        {"language": "en"},
    ],
)
def test_settings_ofx_cannot_carry_are_refused(options: dict[str, Any]) -> None:
    from cmi_sdk import ConfigurationError

    with pytest.raises(ConfigurationError):
        OFXSettings(**options)


def test_a_statement_signed_earlier_inside_still_reads() -> None:
    """Statements sent by earlier releases carried an enveloped signature as the root's last
    child; a store that kept them still validates and reads them. New statements are signed
    detached (tests/security/test_document_signatures.py)."""
    from tests.support import signer

    xml = ADAPTER.render(example(), standard="ofx")
    signed = signer().sign(xml)
    assert b"<Signature" in signed
    assert ADAPTER.parse(signed) == read_back(example())
    assert ofxtools(signed).statements[0].transactions[0].trnamt == Decimal("-5.72")


def test_emitted_under_ofx_terms(tmp_path: Path) -> None:
    from cmi_sdk.webhooks import generate_secret
    from tests.support import emitting_adapter, register

    adapter = emitting_adapter(tmp_path, plugins=[cmi_ofx.plugin], entry_points=False)
    try:
        register(adapter, standard="ofx", customer_ref=CUSTOMER)
        (emission,) = adapter.emit(example())
        assert (emission.standard, emission.document_type, emission.signed) == (
            "ofx",
            "statement",
            True,
        )
        assert adapter.parse(emission.document) == read_back(example())
        # Signed detached: the stored document is the statement as rendered.
        assert emission.document == adapter.render(example(), standard="ofx")
        assert ofxtools(emission.document).statements[0].transactions[0].fitid == (
            "320030460028109716"
        )
        proposal = TermsProposal.model_validate(
            {
                "customer_ref": CUSTOMER,
                "destination": "http://127.0.0.1:9/inbox",
                "secret": generate_secret(),
                "standard": "ofx",
                "fields": ["payee", "total"],
                "purpose": {"code": "records", "text": "Keep my statements"},
            }
        )
        with pytest.raises(TermsError, match="no field payee, total"):
            adapter.propose_terms(proposal)
    finally:
        adapter.close()


def _ofx_entry_point_installed() -> bool:
    return any(ep.name == "ofx" for ep in importlib.metadata.entry_points(group="cmi_sdk"))


@pytest.mark.skipif(
    not _ofx_entry_point_installed(),
    reason="the ofx entry point is not installed yet (pyproject's cmi_sdk group)",
)
@pytest.mark.slow
def test_cli_renders_the_example(tmp_path: Path) -> None:
    out = tmp_path / "statement.ofx"
    rendered = subprocess.run(
        [sys.executable, "-m", "cmi_sdk.cli", "render", "--standard", "ofx", str(EXAMPLE)],
        capture_output=True,
        check=False,
        cwd=tmp_path,
    )
    assert rendered.returncode == 0, rendered.stderr
    out.write_bytes(rendered.stdout)
    assert b"<TRNAMT>-5.72</TRNAMT>" in rendered.stdout
    assert Adapter().parse(rendered.stdout) == read_back(example())
    checked = subprocess.run(
        [sys.executable, "-m", "cmi_sdk.cli", "validate", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert "valid ofx statement" in checked.stdout
