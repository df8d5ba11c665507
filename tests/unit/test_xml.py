"""The hardened parser and validation against hostile or broken input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cmi_sdk import (
    Adapter,
    CMIError,
    DocumentTooDeepError,
    DocumentTooLargeError,
    DocumentTypeNotFoundError,
    DocumentValidationError,
    ForbiddenXMLError,
    HardenedParser,
    InvalidInputError,
    MalformedXMLError,
    Transaction,
    XMLInputError,
    load_model,
)

HOSTILE = {
    "internal entity": b'<!DOCTYPE t [<!ENTITY x "boom">]><t>&x;</t>',
    "xxe file": b'<!DOCTYPE t [<!ENTITY x SYSTEM "file:///etc/passwd">]><t>&x;</t>',
    "xxe network": b'<!DOCTYPE t [<!ENTITY x SYSTEM "http://127.0.0.1:9/x">]><t>&x;</t>',
    "external dtd": b'<!DOCTYPE t SYSTEM "http://127.0.0.1:9/t.dtd"><t/>',
    "billion laughs": b"""<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
]><lolz>&lol5;</lolz>""",
    "doctype only": b"<!DOCTYPE t><t/>",
}


@pytest.mark.parametrize("payload", list(HOSTILE.values()), ids=list(HOSTILE))
def test_dtds_and_entities_are_refused(payload: bytes) -> None:
    with pytest.raises(ForbiddenXMLError, match="DOCTYPE"):
        HardenedParser().parse(payload)


def test_undefined_entity_is_malformed() -> None:
    with pytest.raises(MalformedXMLError, match="not well-formed"):
        HardenedParser().parse(b"<t>&nope;</t>")


def test_size_cap_applies_before_parsing() -> None:
    parser = HardenedParser(max_bytes=100)
    parser.parse(b"<t>" + b"x" * 93 + b"</t>")  # exactly 100 bytes
    with pytest.raises(DocumentTooLargeError) as info:
        parser.parse(b"<t>" + b"x" * 94 + b"</t>")
    assert info.value.limit == 100
    # Oversized garbage is refused for its size, not parsed.
    with pytest.raises(DocumentTooLargeError):
        parser.parse(b"\x00" * 101)


def test_parse_file_reads_at_most_one_byte_past_the_cap(tmp_path: Path) -> None:
    big = tmp_path / "big.xml"
    big.write_bytes(b"<t>" + b"x" * 10_000_000 + b"</t>")
    with pytest.raises(DocumentTooLargeError):
        HardenedParser(max_bytes=1000).parse_file(big)


def _nested(depth: int) -> bytes:
    return b"<a>" * depth + b"</a>" * depth


def test_depth_limit() -> None:
    parser = HardenedParser(max_depth=10)
    parser.parse(_nested(10))
    with pytest.raises(DocumentTooDeepError) as info:
        parser.parse(_nested(11))
    assert info.value.limit == 10


def test_malformed_reports_line() -> None:
    with pytest.raises(MalformedXMLError) as info:
        HardenedParser().parse(b"<t>\n<u>\n</t>")
    assert info.value.line == 3


def test_text_is_refused() -> None:
    with pytest.raises(TypeError, match="bytes"):
        HardenedParser().parse("<t/>")


@pytest.mark.parametrize(
    "error",
    [DocumentTooLargeError, MalformedXMLError, ForbiddenXMLError, DocumentTooDeepError],
)
def test_error_hierarchy(error: type[Exception]) -> None:
    for base in (XMLInputError, InvalidInputError, ValueError, CMIError):
        assert issubclass(error, base)


def test_adapter_validate_uses_the_hardened_parser(default_adapter: Adapter) -> None:
    with pytest.raises(ForbiddenXMLError):
        default_adapter.validate(HOSTILE["xxe file"])
    small = Adapter(max_document_bytes=64)
    with pytest.raises(DocumentTooLargeError):
        small.validate(b"<t>" + b"x" * 100 + b"</t>")


def test_unknown_root_is_not_found(default_adapter: Adapter) -> None:
    with pytest.raises(DocumentTypeNotFoundError, match="no installed standard"):
        default_adapter.validate(b"<x xmlns='urn:example:unknown'/>")


def test_schema_errors_are_located(default_adapter: Adapter, ticket_xml: bytes) -> None:
    bad = ticket_xml.replace(b"<origin>ATL", b"<origin>atl").replace(b"<row>27", b"<row>0")
    with pytest.raises(DocumentValidationError) as info:
        default_adapter.validate(bad)
    err = info.value
    assert (err.standard, err.document_type, err.document) == ("cmi-ticket", "ticket", bad)
    by_path = {issue.path.rsplit("/", 1)[-1]: issue for issue in err.issues}
    assert by_path["origin"].line == 4
    assert "pattern" in by_path["origin"].reason
    assert by_path["row"].line == 9
    assert err.reason == err.issues[0].reason
    assert isinstance(err, ValueError)


def test_missing_element_is_reported(default_adapter: Adapter, ticket_xml: bytes) -> None:
    bad = ticket_xml.replace(b"  <ticketnumber>12524057</ticketnumber>\n", b"")
    with pytest.raises(DocumentValidationError) as info:
        default_adapter.validate(bad)
    assert any(issue.line is not None for issue in info.value.issues)


def test_a_field_missing_without_being_withheld_is_reported_on_parse(
    default_adapter: Adapter, ticket_xml: bytes
) -> None:
    # Withholdable fields are optional in the XSD; absent without a withheld list, the
    # document cannot be read back, and the error names the element.
    bad = ticket_xml.replace(b"  <currency>USD</currency>\n", b"")
    default_adapter.validate(bad)
    with pytest.raises(DocumentValidationError, match="currency"):
        default_adapter.parse(bad)


def test_a_minimized_document_says_what_was_withheld_on_parse(
    default_adapter: Adapter, ticket_xml: bytes
) -> None:
    minimized = ticket_xml.replace(b"  <seat>E</seat>\n", b"").replace(
        b'customer="cust-7f3a9c"', b'customer="cust-7f3a9c" withheld="seat"'
    )
    doc = default_adapter.validate(minimized)
    assert doc.withheld == ("seat",)
    with pytest.raises(DocumentValidationError, match="withheld under the customer's terms: seat"):
        doc.to_model()


def test_currency_digits_are_checked_on_parse(default_adapter: Adapter, ticket_xml: bytes) -> None:
    finer = ticket_xml.replace(b"451.89", b"451.891")
    default_adapter.validate(finer)  # XSD 1.0 cannot tie decimals to the currency
    with pytest.raises(DocumentValidationError, match="more decimal places than USD allows"):
        default_adapter.parse(finer)


def test_named_standard_and_type(default_adapter: Adapter, ticket_xml: bytes) -> None:
    doc = default_adapter.validate(ticket_xml, standard="cmi-ticket", document_type="ticket")
    assert doc.document_type.name == "ticket"
    with pytest.raises(DocumentTypeNotFoundError):
        default_adapter.validate(ticket_xml, standard="cmi-ticket", document_type="nope")
    with pytest.raises(DocumentTypeNotFoundError, match="has no document whose root"):
        default_adapter.validate(ticket_xml, standard="cmi")
    with pytest.raises(DocumentTypeNotFoundError, match="not a transaction"):
        default_adapter.validate(ticket_xml, document_type="transaction")


def test_wrong_root_for_a_named_type(default_adapter: Adapter, ticket_xml: bytes) -> None:
    with pytest.raises(DocumentValidationError, match="expected"):
        default_adapter.validate(ticket_xml, standard="cmi", document_type="transaction")


def test_validated_document_gives_the_model(
    default_adapter: Adapter, ticket_xml: bytes, examples_dir: Any
) -> None:
    doc = default_adapter.validate(ticket_xml)
    assert doc.to_model() == load_model(Transaction, (examples_dir / "ticket.json").read_text())
