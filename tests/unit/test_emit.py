"""The emit pipeline: terms select, the standard renders, terms minimize, the firm signs,
and the outbox row lives or dies with the firm's own transaction."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import pytest
from lxml import etree

from cmi_sdk import (
    Adapter,
    ConfigurationError,
    SharingTerms,
    SignatureVerificationError,
    Transaction,
    hookimpl,
)
from cmi_sdk.signing import verify_document
from tests.support import CUSTOMER, emitting_adapter, register, signer, ticket

TICKET_NS = "{urn:cmi:ticket:1.0}"
TICKET_FIELDS = {
    "origin": ["origin"],
    "destination": ["destination"],
    "date": ["date"],
    "airline": ["airline"],
    "flight": ["flight"],
    "row": ["row"],
    "seat": ["seat"],
    "fare_class": ["class"],
    "total": ["currency", "price"],
}


def _children(xml: bytes) -> set[str]:
    root = etree.fromstring(xml)
    return {etree.QName(child).localname for child in root}


def test_no_terms_no_document_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adapter = emitting_adapter(tmp_path)
    with caplog.at_level(logging.INFO, logger="cmi_sdk.emit"):
        assert adapter.emit(ticket()) == []
    assert "no active sharing terms for customer cust-7f3a9c" in caplog.text
    assert adapter.store.rows() == []


def test_emit_writes_a_signed_valid_document(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    terms = register(adapter)
    (emission,) = adapter.emit(ticket())
    assert (emission.terms_id, emission.standard, emission.document_type) == (
        terms.id,
        "cmi-ticket",
        "ticket",
    )
    assert emission.state == "pending"
    assert emission.signed
    assert emission.withheld == ()
    row = adapter.store.get_row(emission.msg_id)
    assert row.body == emission.document
    assert row.destination == terms.destination
    vouched = verify_document(row.body, signer().certificate)
    assert b"<ticketnumber>12524057</ticketnumber>" in vouched
    # The stored document is a valid ticket, signature included, and reads back whole.
    assert adapter.parse(row.body) == ticket()


def test_the_signed_bytes_are_the_rendered_bytes(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    register(adapter)
    (emission,) = adapter.emit(ticket())
    rendered = adapter.render(ticket(), standard="cmi-ticket")
    end = rendered.rindex(b"</ticket>")
    assert emission.document.startswith(rendered[:end])
    assert emission.document.endswith(rendered[end:])


@pytest.mark.parametrize("position", [60, 180, 260, 330, 390])
def test_any_changed_byte_of_the_signed_content_fails(tmp_path: Path, position: int) -> None:
    adapter = emitting_adapter(tmp_path)
    register(adapter)
    (emission,) = adapter.emit(ticket())
    doc = emission.document
    signature_start = doc.index(b"<Signature")
    assert position < signature_start
    if doc[position : position + 1] in b'<>="/ \n':
        position += 1
    changed = doc[:position] + bytes([doc[position] ^ 0x01]) + doc[position + 1 :]
    with pytest.raises((SignatureVerificationError, ValueError)):
        verify_document(changed, signer().certificate)


@pytest.mark.parametrize("allowed", [[], ["origin", "destination", "date", "total"], ["seat"]])
def test_minimization_removes_exactly_the_fields_not_allowed(
    tmp_path: Path, allowed: list[str]
) -> None:
    adapter = emitting_adapter(tmp_path)
    register(adapter, fields=allowed)
    (emission,) = adapter.emit(ticket())
    withheld = sorted(set(TICKET_FIELDS) - set(allowed))
    assert list(emission.withheld) == withheld
    present = _children(emission.document)
    for name, elements in TICKET_FIELDS.items():
        for element in elements:
            assert (element in present) == (name in allowed), (name, element)
    assert "ticketnumber" in present  # kept whatever the terms say
    root = etree.fromstring(emission.document)
    assert root.get("withheld", "").split() == withheld
    assert root.get("customer") == CUSTOMER
    # Still valid and still signed: minimization happens before signing.
    doc = adapter.validate(emission.document)
    assert doc.withheld == tuple(withheld)
    verify_document(emission.document, signer().certificate)


def test_all_fields_allowed_is_the_full_document(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    register(adapter, fields=[*TICKET_FIELDS, "ticket_number", "id"])
    (emission,) = adapter.emit(ticket())
    assert emission.withheld == ()
    assert b"withheld" not in emission.document


def test_minimization_of_the_core_transaction(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    register(adapter, standard="cmi", fields=["total", "seat"])
    (emission,) = adapter.emit(ticket())
    assert emission.document_type == "transaction"
    assert set(emission.withheld) == {"items", "sku", "details", "row", "memo", "account"}
    present = _children(emission.document)
    assert "total" in present
    assert "flight" not in present
    adapter.validate(emission.document)


def test_each_customer_of_a_transaction_gets_their_own_document(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    payer = register(adapter, customer_ref="payer-1234")
    traveller = register(adapter, customer_ref=CUSTOMER)
    emissions = adapter.emit(ticket(), customer_refs=["payer-1234", CUSTOMER])
    assert {e.terms_id for e in emissions} == {payer.id, traveller.id}
    for emission in emissions:
        root = etree.fromstring(emission.document)
        assert root.get("customer") == emission.customer_ref  # never the other's reference
    assert len({e.msg_id for e in emissions}) == 2


def test_several_terms_of_one_customer_each_get_a_document(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    register(adapter)
    register(adapter, standard="cmi", when="pull", destination=None)
    emissions = adapter.emit(ticket())
    assert sorted((e.standard, e.state) for e in emissions) == [
        ("cmi", "pull"),
        ("cmi-ticket", "pending"),
    ]


def test_emitting_the_same_document_twice_stores_it_once(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    register(adapter)
    first = adapter.emit(ticket())
    second = adapter.emit(ticket())
    assert [e.msg_id for e in first] == [e.msg_id for e in second]
    assert len(adapter.store.rows()) == 1
    # A changed transaction is another document.
    adapter.emit(ticket(total={"amount": "460.00", "currency": "USD"}))
    assert len(adapter.store.rows()) == 2


def test_the_row_commits_with_the_callers_transaction(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    register(adapter)
    conn = sqlite3.connect(tmp_path / "cmi.db")
    conn.execute("CREATE TABLE sales (id TEXT PRIMARY KEY)")
    conn.commit()
    with conn:
        conn.execute("INSERT INTO sales VALUES ('DL-12524057')")
        (emission,) = adapter.emit(ticket(), connection=conn)
        # Not committed yet: the store's own connection does not see it.
        assert adapter.store.rows() == []
    assert adapter.store.get_row(emission.msg_id).state == "pending"
    conn.close()


def test_the_row_rolls_back_with_the_callers_transaction(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    register(adapter)
    conn = sqlite3.connect(tmp_path / "cmi.db")
    conn.execute("CREATE TABLE sales (id TEXT PRIMARY KEY)")
    conn.commit()

    def sale() -> None:
        with conn:
            conn.execute("INSERT INTO sales VALUES ('DL-1')")
            adapter.emit(ticket(), connection=conn)
            conn.execute("INSERT INTO sales VALUES ('DL-1')")  # the firm's own write fails

    with pytest.raises(sqlite3.IntegrityError):
        sale()
    assert adapter.store.rows() == []
    assert conn.execute("SELECT COUNT(*) FROM sales").fetchone() == (0,)
    conn.close()


def test_a_connection_to_another_database_is_refused(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    register(adapter)
    other = sqlite3.connect(tmp_path / "other.db")
    with pytest.raises(ConfigurationError, match="same database"):
        adapter.emit(ticket(), connection=other)
    with pytest.raises(ConfigurationError, match="sqlite3 connection"):
        adapter.emit(ticket(), connection=object())
    other.close()
    assert adapter.store.rows() == []


def test_emit_many_is_one_commit(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    register(adapter)
    txs = [ticket(id=f"DL-{i}") for i in range(20)]
    emissions = adapter.emit_many(txs)
    assert len(emissions) == 20
    assert len(adapter.store.rows(limit=100)) == 20


def test_unsigned_when_no_signer_is_configured(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adapter = emitting_adapter(tmp_path, signer=None)
    register(adapter)
    with caplog.at_level(logging.WARNING, logger="cmi_sdk.emit"):
        (emission,) = adapter.emit(ticket())
        adapter.emit(ticket(id="DL-2"))
    assert not emission.signed
    assert b"Signature" not in emission.document
    assert caplog.text.count("unsigned") == 1  # warned once, not per document


def test_revoked_or_lapsed_terms_emit_nothing(tmp_path: Path) -> None:
    clock = [1_900_000_000.0]
    adapter = emitting_adapter(tmp_path, clock=lambda: clock[0])
    terms = register(adapter, until="2030-03-18T00:00:00Z")  # 1_900_000_000 is 2030-03-17
    assert len(adapter.emit(ticket())) == 1
    clock[0] += 86400 * 2
    assert adapter.emit(ticket(id="DL-late")) == []
    clock[0] -= 86400 * 2
    adapter.revoke_terms(terms.id)
    assert adapter.emit(ticket(id="DL-after")) == []


def test_digest_terms_hold_documents_to_the_end_of_the_window(tmp_path: Path) -> None:
    clock = [1_900_000_000.0]
    adapter = emitting_adapter(tmp_path, clock=lambda: clock[0])
    terms = register(adapter, when="digest:6h")
    clock[0] += 3600
    (first,) = adapter.emit(ticket())
    clock[0] += 3 * 3600
    (second,) = adapter.emit(ticket(id="DL-2"))
    start = terms.created_at.timestamp()
    assert first.due.timestamp() == second.due.timestamp() == start + 6 * 3600
    clock[0] += 3 * 3600  # into the next window
    (third,) = adapter.emit(ticket(id="DL-3"))
    assert third.due.timestamp() == start + 12 * 3600


class _PreferCoreForLoans:
    """A firm's plugin: choose the core transaction document whatever the terms say."""

    @hookimpl
    def cmi_select_standard(
        self, transaction: Transaction, terms: SharingTerms
    ) -> tuple[str, str | None] | None:
        if transaction.kind == "flight" and terms.customer_ref == "core-lover":
            return "cmi", "transaction"
        return None


def test_cmi_select_standard_can_override_the_terms(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path, plugins=[_PreferCoreForLoans()])
    register(adapter, customer_ref="core-lover")
    register(adapter)
    by_customer = {
        e.customer_ref: e.document_type
        for e in adapter.emit(ticket(), customer_refs=["core-lover", CUSTOMER])
    }
    assert by_customer == {"core-lover": "transaction", CUSTOMER: "ticket"}


def test_the_default_select_standard_answers_last() -> None:
    adapter = Adapter(entry_points=False)
    impls = adapter.plugin_manager.hook.cmi_select_standard.get_hookimpls()
    assert impls[0].plugin_name == "cmi-defaults"
    assert impls[0].trylast


def test_the_first_emit_inside_the_callers_write_does_not_wait_for_itself(
    tmp_path: Path,
) -> None:
    db = tmp_path / "cmi.db"
    register(emitting_adapter(tmp_path))  # the tables exist, with terms
    # A new adapter opens its store lazily, here inside the firm's open write transaction.
    fresh = Adapter(database_url=f"sqlite:///{db}", signer=signer())
    conn = sqlite3.connect(db, timeout=0.5)
    conn.execute("CREATE TABLE sales (id TEXT)")
    started = time.monotonic()
    with conn:
        conn.execute("INSERT INTO sales VALUES ('DL-1')")
        assert len(fresh.emit(ticket(), connection=conn)) == 1
    assert time.monotonic() - started < 5
    assert len(fresh.store.rows()) == 1
    conn.close()
