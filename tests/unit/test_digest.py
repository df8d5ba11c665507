"""Digest terms: a window's documents go out together, as one document when the standard
has a digest form (an OFX statement of all the window's lines), one by one otherwise."""

from __future__ import annotations

import base64
import warnings
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from cmi_sdk import Adapter, RetrySchedule, Transaction, load_model
from cmi_sdk.signing import DETACHED_SIGNATURE_HEADER, verify_detached
from tests.fakes import Clock
from tests.support import CUSTOMER, ROOT, emitting_adapter, register, signer, ticket

BANK_LINE = load_model(Transaction, (ROOT / "examples" / "bank-transaction.json").read_text())
START = 1_900_000_000.0


def bank_line(n: int, amount: str = "-5.72", currency: str = "USD") -> Transaction:
    data = BANK_LINE.model_dump()
    data["id"] = f"FIT{n}"
    data["total"] = {"amount": amount, "currency": currency}
    data["details"] = {**data["details"], "fitid": f"FIT{n}"}
    return Transaction.model_validate(data)


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def digest_adapter(tmp_path: Path, clock: Clock) -> Iterator[Adapter]:
    adapter = emitting_adapter(tmp_path, clock=clock)
    yield adapter
    adapter.close()


def _deliver(adapter: Adapter) -> list[httpx.Request]:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    schedule = RetrySchedule(delays=(0,), jitter=0)
    transport = httpx.MockTransport(handler)
    with adapter.delivery_worker(transport=transport, schedule=schedule) as worker:
        worker.run_once()
    return sent


def test_an_ofx_digest_window_is_one_statement(digest_adapter: Adapter, clock: Clock) -> None:
    ofxtools = pytest.importorskip("ofxtools")
    register(digest_adapter, standard="ofx", when="digest:6h")
    emissions = [digest_adapter.emit(bank_line(n, f"-{n}.25"))[0] for n in range(1, 4)]
    assert {e.state for e in emissions} == {"digest"}
    assert _deliver(digest_adapter) == []  # the window is still open
    clock.now += 6 * 3600
    (request,) = _deliver(digest_adapter)
    # OFX is signed detached: the signature over the exact body is in a header.
    assert request.headers["content-type"] == "application/x-ofx"
    signature = base64.b64decode(request.headers[DETACHED_SIGNATURE_HEADER])
    verify_detached(request.content, signature, signer().certificate)
    assert request.content.count(b"<STMTTRN>") == 3
    # A real OFX reader reads every line of the one statement.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ofxtools warns about the private CMI.* tags
        tree = ofxtools.Parser.OFXTree()
        tree.parse(_bytes_io(request.content))
        statement = tree.convert().statements[0]
    amounts = sorted(t.trnamt for t in statement.transactions)
    assert amounts == [Decimal("-3.25"), Decimal("-2.25"), Decimal("-1.25")]
    assert statement.balance.balamt == Decimal("-6.75")
    rows = {r.msg_id: r for r in digest_adapter.store.rows()}
    assert {rows[e.msg_id].state for e in emissions} == {"merged"}
    (digest,) = [r for r in rows.values() if r.state == "delivered"]
    assert digest.body == request.content
    assert _deliver(digest_adapter) == []  # nothing goes out twice


def test_a_standard_without_a_digest_form_sends_the_window_one_by_one(
    digest_adapter: Adapter, clock: Clock
) -> None:
    register(digest_adapter, when="digest:6h")  # cmi-ticket: no digest form
    first, second = (digest_adapter.emit(ticket(id=f"DL-{n}"))[0] for n in range(2))
    assert {first.state, second.state} == {"pending"}
    assert _deliver(digest_adapter) == []
    clock.now += 6 * 3600
    assert len(_deliver(digest_adapter)) == 2


def test_a_window_that_cannot_be_merged_goes_out_one_by_one(
    digest_adapter: Adapter, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    register(digest_adapter, standard="ofx", when="digest:1h", customer_ref=CUSTOMER)
    digest_adapter.emit(bank_line(1))
    digest_adapter.emit(bank_line(2, "-1.00", "EUR"))  # one statement has one currency
    clock.now += 3600
    sent = _deliver(digest_adapter)
    assert len(sent) == 2
    assert "cannot be merged, sending them one by one" in caplog.text


def test_revocation_cancels_a_window_in_progress(digest_adapter: Adapter, clock: Clock) -> None:
    terms = register(digest_adapter, standard="ofx", when="digest:6h")
    digest_adapter.emit(bank_line(1))
    digest_adapter.revoke_terms(terms.id)
    clock.now += 6 * 3600
    assert _deliver(digest_adapter) == []
    assert {r.state for r in digest_adapter.store.rows()} == {"cancelled"}


def _bytes_io(data: bytes) -> Any:
    import io

    return io.BytesIO(data)
