"""The OFX the SDK emits, read by independent readers with zero errors: libofx's
``ofxdump``, ofxtools and ofxparse, for both document types (``statement``, OFX 2.2 XML;
``statement-sgml``, OFX 1.0.2 SGML) and payees in any script."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from cmi_sdk import Adapter, Transaction, load_model
from tests.integration.ofx_readers import ofxdump, ofxdump_values, ofxparse, ofxtools

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = Adapter()
TYPES = ("statement", "statement-sgml")
PAYEES = (
    "AT&T SERVICES 800-2220300",
    "Café Zürich, Bäckerei Ørsted",
    "東京電力 請求",
    '<Smith & Sons> "quoted" it\'s',
    "THE GREAT NORTHERN TELEPHONE & TELEGRAPH CO OF NJ",  # longer than NAME's 32
)


def transaction(payee: str, **changes: Any) -> Transaction:
    data = load_model(Transaction, (ROOT / "examples" / "bank-transaction.json").read_text())
    dumped = data.model_dump()
    dumped["details"] = {**dumped["details"], "payee": payee}
    dumped.update(changes)
    return Transaction.model_validate(dumped)


@pytest.mark.parametrize("doc_type", TYPES)
@pytest.mark.parametrize("payee", PAYEES)
def test_libofx_reads_every_payee_without_an_error(
    doc_type: str, payee: str, tmp_path: Path
) -> None:
    xml = ADAPTER.render(transaction(payee), standard="ofx", document_type=doc_type)
    lines = ofxdump(xml, tmp_path)
    assert ofxdump_values(lines, "Name of payee or transaction description") == [payee[:32]]
    assert ofxdump_values(lines, "Total money amount") == ["-5.72"]
    assert ofxdump_values(lines, "Financial institution's ID for this transaction") == [
        "320030460028109716"
    ]


@pytest.mark.parametrize("doc_type", TYPES)
@pytest.mark.parametrize("payee", PAYEES)
def test_ofxtools_reads_every_payee(doc_type: str, payee: str) -> None:
    xml = ADAPTER.render(transaction(payee), standard="ofx", document_type=doc_type)
    (line,) = ofxtools(xml).statements[0].transactions
    assert (line.name, line.trnamt, line.fitid) == (
        payee[:32],
        Decimal("-5.72"),
        "320030460028109716",
    )
    assert line.dtposted == dt.datetime(2003, 2, 15, 7, tzinfo=dt.UTC)


@pytest.mark.parametrize("payee", PAYEES)
def test_ofxparse_reads_ofx_1_with_every_payee(payee: str) -> None:
    xml = ADAPTER.render(transaction(payee), standard="ofx", document_type="statement-sgml")
    ofx = ofxparse(xml)
    (line,) = ofx.account.statement.transactions
    assert (line.payee, line.amount, line.id) == (
        payee[:32],
        Decimal("-5.72"),
        "320030460028109716",
    )
    assert ofx.account.account_id == "000000000000"


def test_ofxparse_reads_ofx_2_in_ascii_only() -> None:
    """ofxparse 0.21 reads OFX 2 only in ASCII: it takes the character set from an OFX 1
    header, and without one decodes the body as ASCII, so a payee such as "Café" stops it.
    The docs say so and point such customers to ``statement-sgml``; if this test fails,
    ofxparse has learnt OFX 2's UTF-8, and the docs should say that instead."""
    ascii_xml = ADAPTER.render(transaction(PAYEES[0]), standard="ofx")
    assert ofxparse(ascii_xml).account.statement.transactions[0].payee == PAYEES[0]
    with pytest.raises(UnicodeDecodeError):
        ofxparse(ADAPTER.render(transaction(PAYEES[1]), standard="ofx"))


@pytest.mark.parametrize("doc_type", TYPES)
def test_a_digest_reads_as_one_statement_of_many_lines(doc_type: str, tmp_path: Path) -> None:
    import cmi_ofx

    lines = [
        transaction(payee, id=f"tx-{n}").model_copy(
            update={
                "details": transaction(payee).details.model_copy(update={"fitid": f"F{n}"}),
            }
        )
        for n, payee in enumerate(PAYEES[:3])
    ]
    std = ADAPTER.standards.get("ofx")
    doc = std.document_type(doc_type)
    context = cmi_ofx.plugin.StatementMapping(cmi_ofx.OFXSettings()).context(lines)
    xml = ADAPTER.documents.render_context(context, standard=std, document_type=doc.name)
    dumped = ofxdump(xml, tmp_path)
    assert ofxdump_values(dumped, "Financial institution's ID for this transaction") == [
        "F0",
        "F1",
        "F2",
    ]
    assert [t.fitid for t in ofxtools(xml).statements[0].transactions] == ["F0", "F1", "F2"]
    if doc_type == "statement-sgml":
        assert [t.id for t in ofxparse(xml).account.statement.transactions] == ["F0", "F1", "F2"]
    assert [t.details.fitid for t in cmi_ofx.parse_digest(ADAPTER, xml)] == ["F0", "F1", "F2"]


def test_ofx_1_reads_back_into_the_same_transaction() -> None:
    tx = transaction(PAYEES[2])
    xml = ADAPTER.render(tx, standard="ofx", document_type="statement-sgml")
    assert xml.startswith(b"OFXHEADER:100\nDATA:OFXSGML\nVERSION:102\n")
    assert b"ENCODING:UTF-8\nCHARSET:NONE\n" in xml
    # OFX has no place for the customer: it reads back as the account.
    assert ADAPTER.parse(xml) == tx.model_copy(update={"customer_ref": "000000000000"})
    assert ADAPTER.validate(xml).document_type.name == "statement-sgml"


def test_ofx_1_refuses_a_payee_of_only_whitespace() -> None:
    """An OFX 1 data element's text runs to the next tag and readers strip it: a payee of
    only whitespace would arrive as none, so it is refused, naming why."""
    from cmi_sdk import MappingError

    with pytest.raises(MappingError, match="OFX 1 cannot carry a payee of only whitespace"):
        ADAPTER.render(transaction("\t "), standard="ofx", document_type="statement-sgml")
