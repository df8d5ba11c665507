"""A booking is never lost and never doubled.

The reproductions: a document that cannot be made for one of the customer's terms used to
fail the acceptance after the seat was sold (422, then 500 "nothing was booked" on retry);
one offer could be booked once per acceptance id (and ``cmi accept`` made a fresh id each
run); an acceptance whose process died inside ``cmi_book`` stayed ``processing`` for ever.
Each runs on SQLite and, with ``CMI_TEST_POSTGRES_DSN``, on PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest

from cmi_sdk import (
    Acceptance,
    AcceptanceError,
    Adapter,
    ConfigurationError,
    EgressGuard,
    Identity,
    MappingError,
    Offer,
    OfferSet,
    Standard,
    TermsError,
    TermsProposal,
    Transaction,
    hookimpl,
)
from cmi_sdk._adapter import open_store
from cmi_sdk.asgi import prometheus_text
from cmi_sdk.cli import main
from cmi_sdk.client import CMIClient
from cmi_sdk.outbox import OutboxStore, RetentionStore
from cmi_sdk.outbox.sqlite import SQLiteStore
from cmi_sdk.webhooks import generate_secret
from tests.contract.legacy import as_legacy_postgres, as_legacy_sqlite
from tests.fakes import Clock, Shop, flight_request
from tests.support import CUSTOMER, register, serve_app, signer, ticket

try:
    from cmi_airline import ReferenceAirline
except ImportError:  # not installed: the plugins' source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))
    from cmi_airline import ReferenceAirline
from cmi_ticket.plugin import TICKET

DSN = os.environ.get("CMI_TEST_POSTGRES_DSN", "")
ROOT = Path(__file__).resolve().parents[2]

# -- the pieces: stores, a standard that cannot carry a flight, a slow booking ---------------


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store's URL: every ``open_store`` of it is another store instance on one database
    (two processes, as far as the store can tell)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cmi.db'}"
        return
    if not DSN:
        pytest.skip("CMI_TEST_POSTGRES_DSN is not set")
    import psycopg

    schema = f"cmi_bookings_{secrets.token_hex(4)}"
    yield f"{DSN}?schema={schema}"
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def firm(store_url: str, *plugins: object, **options: Any) -> Adapter:
    """An adapter of the delta.com firm on its own instance of the store."""
    options.setdefault("signer", signer())
    options.setdefault("egress", EgressGuard(allow_loopback=True))
    return Adapter(store=open_store(store_url), plugins=plugins, firm="delta.com", **options)


def closing(*adapters: Adapter) -> None:
    """Close the adapters and their stores (a PostgreSQL store's connections)."""
    for adapter in adapters:
        adapter.close()
        close = getattr(adapter.store, "close", None)
        if close is not None:
            close()


def _refuse_flights(tx: Transaction) -> dict[str, Any]:
    raise MappingError(f"a flightless document cannot carry a {tx.kind} transaction")


FLIGHTLESS = Standard(
    name="flightless",
    version="1.0",
    templates=files("cmi_ticket") / "templates",
    # A third-party standard that declares no kinds (so it is taken to express every
    # kind) and whose mapping then refuses a flight: the failure comes at emission.
    document_types=(
        dataclasses.replace(
            TICKET, root="{urn:test:flightless}ticket", to_context=_refuse_flights, render=None
        ),
    ),
)


class Flightless:
    @hookimpl
    def cmi_register_standards(self, register: Any) -> None:
        register.add(FLIGHTLESS)


class SlowBooking:
    """Keeps ``cmi_book`` busy a moment, so that concurrent acceptances overlap."""

    @hookimpl(wrapper=True)
    def cmi_book(self) -> Any:
        time.sleep(0.05)
        return (yield)


def accepting(offer: Offer, acceptance_id: str) -> Acceptance:
    return Acceptance(
        id=acceptance_id,
        offer_id=offer.id,
        customer_ref=offer.customer_ref,
        accepted_at=dt.datetime.now(dt.UTC),
    )


def an_offer(adapter: Adapter, request_id: str = "req-1", **options: Any) -> Offer:
    (offer,) = adapter.answer_request(flight_request(id=request_id), **options).offers.offers
    return offer


# -- once booked, the answer is "booked" -----------------------------------------------------


def test_a_document_that_cannot_be_made_never_fails_a_booking(store_url: str) -> None:
    shop = Shop()
    adapter = firm(store_url, shop, Flightless())
    try:
        kept = register(adapter)  # the ticket
        broken = register(adapter, standard="flightless")
        offer = an_offer(adapter)
        result = adapter.accept_offer(offer.id, accepting(offer, "acc-1"))
        assert result.outcome == "booked"
        assert shop.booked == ["acc-1"]
        (document,) = result.documents  # the ticket went out; the other is a problem
        row = adapter.store.get_row(document)
        assert (row.terms_id, row.state) == (kept.id, "pending")
        (problem,) = adapter.store.emission_problems()
        assert (problem.terms_id, problem.transaction_id) == (broken.id, result.transaction_id)
        assert "cannot carry a flight" in problem.reason
        assert Transaction.model_validate_json(problem.transaction).id == result.transaction_id
        again = adapter.accept_offer(offer.id, accepting(offer, "acc-1"))
        assert (again.outcome, again.transaction_id, again.replayed) == (
            "booked",
            result.transaction_id,
            True,
        )
        assert shop.booked == ["acc-1"]
    finally:
        closing(adapter)


def test_terms_that_cannot_express_the_kind_are_skipped(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    shop = Shop()
    adapter = firm(store_url, shop)
    try:
        register(adapter)
        ofx = register(adapter, standard="ofx")  # bank lines: this customer's bank terms
        offer = an_offer(adapter)
        with caplog.at_level(logging.INFO, logger="cmi_sdk.emit"):
            result = adapter.accept_offer(offer.id, accepting(offer, "acc-1"))
        assert result.outcome == "booked"
        assert len(result.documents) == 1
        assert adapter.store.emission_problems() == []  # not a problem: not theirs
        assert any("skipped for terms " + ofx.id in r.getMessage() for r in caplog.records)
    finally:
        closing(adapter)


def test_emit_never_fails_for_one_terms_that_does_not_fit(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "cmi.db")
    adapter = Adapter(
        store=store,
        plugins=[Flightless()],
        signer=signer(),
        egress=EgressGuard(allow_loopback=True),
    )
    register(adapter)
    register(adapter, standard="flightless")
    (emission,) = adapter.emit(ticket())
    assert emission.standard == "cmi-ticket"
    assert store.count_emission_problems() == 1
    # In the firm's own transaction, the problem commits or rolls back with its write.
    conn = store.connect()
    conn.execute("BEGIN")
    adapter.emit(ticket(id="DL-2"), connection=conn)
    conn.rollback()
    assert store.count_emission_problems() == 1
    conn.execute("BEGIN")
    adapter.emit(ticket(id="DL-3"), connection=conn)
    conn.commit()
    conn.close()
    assert [p.transaction_id for p in store.emission_problems()] == ["DL-3", "DL-12524057"]
    assert "cmi_emission_problems 2\n" in prometheus_text(adapter)


def test_the_operator_lists_emission_problems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    adapter = Adapter(
        database_url="sqlite:///./cmi.db",
        plugins=[Flightless()],
        signer=signer(),
        egress=EgressGuard(allow_loopback=True),
    )
    broken = register(adapter, standard="flightless")
    assert adapter.emit(ticket()) == []
    capsys.readouterr()
    assert main(["outbox", "problems"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"DL-12524057  terms={broken.id}  flightless: ")
    assert "cannot carry a flight" in out
    assert main(["outbox", "problems", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["terms_id"] == broken.id
    assert "transaction" not in listed  # the customer's data stays in the store


@dataclasses.dataclass
class Served:
    adapter: Adapter
    shop: Shop
    url: str
    secret: str

    def client(self) -> CMIClient:
        return CMIClient(self.url, secret=self.secret, intermediary="relay")

    def offer(self) -> Offer:
        request = flight_request(id=f"req-{secrets.token_hex(4)}")
        xml = self.adapter.render(request, standard="cmi", document_type="request")
        with self.client() as client:
            response = client.post_request(xml)
        assert response.status_code == 200, response.text
        answer = self.adapter.parse(response.content)
        assert isinstance(answer, OfferSet)
        (offer,) = answer.offers
        return offer


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    shop = Shop()
    adapter = firm(f"sqlite:///{tmp_path / 'cmi.db'}", shop)
    secret = generate_secret()
    adapter.store.add_intermediary("relay", secret, at=time.time())
    with serve_app(adapter.asgi_app()) as url:
        yield Served(adapter, shop, url.rstrip("/"), secret)
    adapter.close()


def test_over_http_the_customer_is_told_booked_once_it_is(served: Served) -> None:
    register(served.adapter)
    register(served.adapter, standard="ofx")  # cannot express a flight
    offer = served.offer()
    xml = served.adapter.render(
        accepting(offer, "acc-http"), standard="cmi", document_type="acceptance"
    )
    with served.client() as client:
        first = client.accept(offer.id, xml)
        assert first.status_code == 201, first.text  # was 422, with the seat sold
        again = client.accept(offer.id, xml)
        assert again.status_code == 201, again.text  # was 500 "nothing was booked"
    assert first.json()["outcome"] == again.json()["outcome"] == "booked"
    assert again.json()["transaction_id"] == first.json()["transaction_id"]
    assert again.json()["replayed"] is True
    assert served.shop.booked == ["acc-http"]


# -- an offer is accepted at most once -------------------------------------------------------


def test_an_offer_is_booked_once_whatever_the_acceptance_ids(store_url: str) -> None:
    shop = Shop()
    adapter = firm(store_url, shop)
    try:
        offer = an_offer(adapter)
        first = adapter.accept_offer(offer.id, accepting(offer, "acc-1"), intermediary="relay")
        second = adapter.accept_offer(offer.id, accepting(offer, "acc-2"), intermediary="relay")
        assert second.replayed
        assert (second.acceptance_id, second.transaction_id) == ("acc-1", first.transaction_id)
        assert shop.booked == ["acc-1"]
    finally:
        closing(adapter)


def test_another_party_is_told_already_accepted_and_nothing_more(store_url: str) -> None:
    shop = Shop()
    adapter = firm(store_url, shop)
    try:
        offer = an_offer(adapter)  # made by the firm's own code: no intermediary on it
        booked = adapter.accept_offer(offer.id, accepting(offer, "acc-a"), intermediary="a")
        with pytest.raises(AcceptanceError) as info:
            adapter.accept_offer(offer.id, accepting(offer, "acc-b"), intermediary="b")
        assert info.value.problem == "already-accepted"
        message = str(info.value)
        for secret_of_a in ("acc-a", booked.transaction_id or "?", '"a"', "intermediary"):
            assert secret_of_a not in message
        assert shop.booked == ["acc-a"]
    finally:
        closing(adapter)


def test_concurrent_acceptances_of_one_offer_book_once(store_url: str) -> None:
    shop = Shop()
    # Two store instances (two processes, as far as the store can tell), one firm system.
    adapters = [firm(store_url, shop, SlowBooking()) for _ in range(2)]
    try:
        offer = an_offer(adapters[0])
        barrier = threading.Barrier(8)
        answers: list[tuple[str, str | None]] = []
        lock = threading.Lock()

        def accept(n: int) -> None:
            barrier.wait(10)
            try:
                result = adapters[n % 2].accept_offer(
                    offer.id, accepting(offer, f"acc-{n}"), intermediary="relay"
                )
                answer = (result.outcome, result.transaction_id)
            except AcceptanceError as exc:
                answer = (exc.problem, None)
            with lock:
                answers.append(answer)

        threads = [threading.Thread(target=accept, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(answers) == 8
        assert len(shop.booked) == 1
        booked = {t for outcome, t in answers if outcome == "booked"}
        assert len(booked) == 1
        assert {o for o, _ in answers} <= {"booked", "acceptance-in-progress"}
        # Once it is booked, every one of them gets the booking's answer.
        for n in range(8):
            late = adapters[n % 2].accept_offer(
                offer.id, accepting(offer, f"acc-{n}"), intermediary="relay"
            )
            assert late.transaction_id in booked
        assert len(shop.booked) == 1
    finally:
        closing(*adapters)


def test_cmi_accept_run_twice_books_once(
    served: Served, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    offer = served.offer()
    monkeypatch.setenv("CMI_INTERMEDIARY_SECRET", served.secret)
    command = [
        "accept",
        offer.id,
        "--to",
        served.url,
        "--intermediary",
        "relay",
        "--customer",
        offer.customer_ref,
    ]
    assert main(command) == 0
    first = capsys.readouterr().out
    assert main(command) == 0
    second = capsys.readouterr().out
    assert first.startswith("booked: ")
    assert second.startswith("already booked: ")
    assert "nothing more was booked" in second
    assert len(served.shop.booked) == 1


# -- terms are checked against what the firm emits -------------------------------------------


def test_terms_that_express_nothing_the_firm_emits_are_refused(tmp_path: Path) -> None:
    adapter = firm(f"sqlite:///{tmp_path / 'cmi.db'}", transaction_kinds=["flight"])
    proposal = TermsProposal.model_validate(
        {
            "customer_ref": CUSTOMER,
            "destination": "http://127.0.0.1:9/inbox",
            "secret": generate_secret(),
            "standard": "ofx",
            "purpose": {"code": "records", "text": "Keep my records"},
        }
    )
    with pytest.raises(TermsError, match="bank_statement_line") as info:
        adapter.propose_terms(proposal)
    assert "it emits flight" in str(info.value)
    assert adapter.list_terms() == []
    assert "ofx" not in adapter.policy.standards  # not offered in /.well-known/cmi either
    assert {"cmi", "cmi-ticket", "ubl"} <= set(adapter.policy.standards)
    register(adapter)  # the ticket expresses flights
    register(adapter, standard="ubl")  # an invoice expresses every kind
    with pytest.raises(ConfigurationError, match="transaction_kinds"):
        firm(f"sqlite:///{tmp_path / 'other.db'}", transaction_kinds=["seat"])


def test_the_endpoint_refuses_such_terms(tmp_path: Path) -> None:
    adapter = firm(f"sqlite:///{tmp_path / 'cmi.db'}", transaction_kinds=["flight"])
    secret = generate_secret()
    adapter.store.add_intermediary("relay", secret, at=time.time())
    with (
        serve_app(adapter.asgi_app()) as url,
        CMIClient(url.rstrip("/"), secret=secret, intermediary="relay") as client,
    ):
        response = client.propose_terms(
            {
                "customer_ref": CUSTOMER,
                "destination": "http://127.0.0.1:9/inbox",
                "secret": generate_secret(),
                "standard": "ofx",
                "purpose": {"code": "records", "text": "Keep my records"},
            }
        )
    assert response.status_code == 422, response.text
    assert response.json()["type"] == "urn:cmi:problem:terms-refused"
    assert "it emits flight" in response.json()["detail"]
    assert adapter.list_terms() == []


def test_cmi_terms_add_refuses_such_terms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["keys", "generate", "keys"]) == 0
    monkeypatch.setenv("CMI_SIGNING_KEY", "keys/key.pem")
    monkeypatch.setenv("CMI_SIGNING_CERT", "keys/cert.pem")
    monkeypatch.setenv("CMI_ALLOW_LOOPBACK", "1")
    monkeypatch.setenv("CMI_TRANSACTION_KINDS", "flight")
    monkeypatch.setenv("CMI_DESTINATION_SECRET", generate_secret())
    command = [
        "terms",
        "add",
        "--customer",
        CUSTOMER,
        "--destination",
        "http://127.0.0.1:9/inbox",
        "--purpose",
        "Keep my records",
        "--standard",
    ]
    capsys.readouterr()
    assert main([*command, "ofx"]) != 0
    assert "it emits flight" in capsys.readouterr().err
    assert main([*command, "cmi-ticket"]) == 0


# -- an acceptance left processing by a crash is recovered -----------------------------------

CHILD = textwrap.dedent(
    """
    import datetime as dt, json, sys, time
    from pathlib import Path
    from cmi_sdk import Acceptance, Adapter, hookimpl
    from cmi_sdk._adapter import open_store
    from cmi_airline import ReferenceAirline

    args = json.loads(sys.argv[1])
    marker = Path(args["marker"])

    class Stall:
        if args["when"] == "before":
            @hookimpl(tryfirst=True)
            def cmi_book(self):
                marker.touch()  # inside cmi_book, before the airline books
                time.sleep(60)
        else:
            @hookimpl(wrapper=True)
            def cmi_book(self):
                booked = yield  # the airline has booked and committed
                marker.touch()
                time.sleep(60)
                return booked

    airline = ReferenceAirline(database=args["airline"])
    adapter = Adapter(
        store=open_store(args["store"]),
        plugins=[airline, Stall()],
        acceptance_lease=args["lease"],
    )
    adapter.accept_offer(args["offer"], Acceptance.model_validate_json(args["acceptance"]))
    """
)


def killed_inside_cmi_book(
    tmp_path: Path, store_url: str, offer: Offer, acceptance: Acceptance, when: str
) -> None:
    """Accept in another process and SIGKILL it inside ``cmi_book``."""
    marker = tmp_path / f"inside-{when}"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    args = {
        "marker": str(marker),
        "when": when,
        "airline": str(tmp_path / "airline.db"),
        "store": store_url,
        "lease": 3.0,  # outlasts the kill, so that a retry meanwhile is told to wait
        "offer": offer.id,
        "acceptance": acceptance.model_dump_json(),
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT)])}
    child = subprocess.Popen(
        [sys.executable, str(script), json.dumps(args)], env=env, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            if child.poll() is not None:
                _, err = child.communicate()
                pytest.fail(f"the child ended before cmi_book: {err.decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the child never reached cmi_book")
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
        if child.stderr is not None:
            child.stderr.close()


@pytest.fixture
def airline(tmp_path: Path) -> Iterator[ReferenceAirline]:
    airline = ReferenceAirline(database=tmp_path / "airline.db")
    airline.add_flight(
        origin="ATL",
        destination="CDG",
        date=dt.date(2099, 7, 1),
        flight="2231",
        capacity=10,
        fares=(("Y", Decimal("300.00"), 5.0, 2.0),),
    )
    yield airline
    airline.close()


def airline_offer(adapter: Adapter) -> Offer:
    request = flight_request(
        wanted={"origin": "ATL", "destination": "CDG", "date": "2099-07-01", "passengers": 1},
        claims=[],
    )
    (offer,) = adapter.answer_request(request).offers.offers
    return offer


def bookings(tmp_path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(tmp_path / "airline.db") as conn:
        return conn.execute("SELECT acceptance_id, ticket_number FROM bookings").fetchall()


def holds(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "airline.db") as conn:
        return int(conn.execute("SELECT COUNT(*) FROM holds").fetchone()[0])


def wait_for_the_lease(store: OutboxStore, acceptance_id: str) -> None:
    record = store.get_acceptance(acceptance_id)
    assert record is not None
    assert record.state == "processing"  # left so by the crash
    assert record.lease_until is not None
    time.sleep(max(0.0, record.lease_until - time.time()) + 0.05)


@pytest.mark.slow
def test_a_process_killed_before_booking_is_released_and_the_retry_books(
    tmp_path: Path, store_url: str, airline: ReferenceAirline
) -> None:
    adapter = firm(store_url, airline)
    try:
        register(adapter)
        offer = airline_offer(adapter)
        acceptance = accepting(offer, "acc-crash")
        killed_inside_cmi_book(tmp_path, store_url, offer, acceptance, "before")
        assert holds(tmp_path) == 1  # the seat held by the dead process
        assert bookings(tmp_path) == []
        with pytest.raises(AcceptanceError) as info:  # while its lease is live
            adapter.accept_offer(offer.id, acceptance)
        assert info.value.problem == "acceptance-in-progress"
        wait_for_the_lease(adapter.store, "acc-crash")
        result = adapter.accept_offer(offer.id, acceptance)  # was "retry shortly" for ever
        assert result.outcome == "booked"
        assert not result.replayed
        ((acceptance_id, _),) = bookings(tmp_path)
        assert acceptance_id == "acc-crash"
        assert holds(tmp_path) == 0  # the dead process's hold was released, then rebooked
        (document,) = result.documents
        assert adapter.store.get_row(document).transaction_id == result.transaction_id
    finally:
        closing(adapter)


@pytest.mark.slow
def test_a_process_killed_after_booking_is_completed_by_a_recovery_pass(
    tmp_path: Path, store_url: str, airline: ReferenceAirline
) -> None:
    adapter = firm(store_url, airline)
    try:
        register(adapter)
        offer = airline_offer(adapter)
        acceptance = accepting(offer, "acc-crash")
        killed_inside_cmi_book(tmp_path, store_url, offer, acceptance, "after")
        ((_, ticket_number),) = bookings(tmp_path)  # the airline sold the seat
        assert adapter.store.rows() == []  # and nobody was told
        wait_for_the_lease(adapter.store, "acc-crash")
        assert adapter.recover_acceptances() == {"booked": 1, "released": 0}
        assert adapter.recover_acceptances() == {"booked": 0, "released": 0}
        record = adapter.store.get_acceptance("acc-crash")
        assert record is not None
        assert record.state == "booked"
        (row,) = adapter.store.rows()
        assert row.transaction_id.endswith(ticket_number)
        retry = adapter.accept_offer(offer.id, acceptance)
        assert (retry.outcome, retry.replayed, retry.documents) == ("booked", True, (row.msg_id,))
        assert len(bookings(tmp_path)) == 1
    finally:
        closing(adapter)


def test_a_recovery_finds_a_loan_booked_by_the_lender(tmp_path: Path) -> None:
    """The reference lender answers cmi_find_booking from its loans (see test_lender for
    its booking): an acceptance it booked is found, another is not."""
    from cmi_lender import ReferenceLender
    from cmi_sdk import Money
    from tests.fakes import loan_request

    lender = ReferenceLender(
        database=tmp_path / "lender.db",
        daily_limit=Money(amount="1000000.00", currency="USD"),
        default_band="B",
    )
    adapter = firm(f"sqlite:///{tmp_path / 'cmi.db'}", lender)
    try:
        (offer,) = adapter.answer_request(loan_request(band=None)).offers.offers
        result = adapter.accept_offer(offer.id, accepting(offer, "acc-loan"))
        hook = adapter.plugin_manager.hook
        found = hook.cmi_find_booking(offer=offer, acceptance=accepting(offer, "acc-loan"))
        assert found is not None
        assert found.id == result.transaction_id
        assert hook.cmi_find_booking(offer=offer, acceptance=accepting(offer, "acc-x")) is None
    finally:
        closing(adapter)
        lender.close()


def test_cmi_acceptances_recover_releases_what_nobody_booked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cmi_sdk.outbox import AcceptanceClaim

    monkeypatch.chdir(tmp_path)
    adapter = firm("sqlite:///./cmi.db", Shop())
    offer = an_offer(adapter)
    stalled = AcceptanceClaim(
        acceptance_id="acc-dead",
        offer_id=offer.id,
        intermediary=None,
        acceptance=accepting(offer, "acc-dead").model_dump_json(),
        owner="a process that died",
        lease_until=time.time() - 1,
    )
    assert adapter.store.begin_acceptance(stalled, time.time() - 2) is None
    closing(adapter)
    capsys.readouterr()
    # Nothing here can see the firm's bookings: releasing blindly is refused by default.
    assert main(["acceptances", "recover"]) == 2
    assert "cannot be seen" in capsys.readouterr().err
    assert main(["acceptances", "recover", "--assume-not-booked"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "booked 0\nreleased 1\n"
    assert "no plugin implements cmi_find_booking" in captured.err
    assert main(["acceptances", "recover", "--assume-not-booked"]) == 0
    assert capsys.readouterr().out == "booked 0\nreleased 0\n"
    # With the reference firms, which answer cmi_find_booking, nothing is assumed.
    assert main(["acceptances", "recover", "--reference-firms"]) == 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("booked 0\nreleased 0\n", "")
    shop = Shop()
    adapter = firm("sqlite:///./cmi.db", shop)
    try:  # released: the retry books
        result = adapter.accept_offer(offer.id, accepting(offer, "acc-dead"))
        assert (result.outcome, result.replayed, shop.booked) == ("booked", False, ["acc-dead"])
    finally:
        closing(adapter)


# -- the lease fences a process that lost it --------------------------------------------------


def test_the_store_keeps_no_identity_given_with_an_acceptance(store_url: str) -> None:
    shop = Shop()
    adapter = firm(store_url, shop)
    try:
        offer = an_offer(adapter)
        given = accepting(offer, "acc-1").model_copy(
            update={"identity": Identity(name="Ada Lovelace", email="ada@example.org")}
        )
        adapter.accept_offer(offer.id, given)
        record = adapter.store.get_acceptance("acc-1")
        assert record is not None
        assert record.acceptance is not None
        assert "Ada" not in record.acceptance
        assert "ada@example.org" not in (record.result or "")
    finally:
        closing(adapter)


def test_a_process_whose_lease_ran_out_completes_nothing(store_url: str) -> None:
    from cmi_sdk.outbox import AcceptanceClaim

    adapter = firm(store_url, Shop())
    store = open_store(store_url)
    other = open_store(store_url)
    try:
        offer = an_offer(adapter)
        now = time.time()
        claim = AcceptanceClaim(
            acceptance_id="acc-1",
            offer_id=offer.id,
            intermediary=None,
            acceptance=accepting(offer, "acc-1").model_dump_json(),
            owner="slow",
            lease_until=now + 1,
        )
        assert store.begin_acceptance(claim, now) is None
        assert other.take_over_acceptance("acc-1", "recoverer", now, now + 60) is False  # live
        assert other.take_over_acceptance("acc-1", "recoverer", now + 2, now + 60) is True
        assert store.renew_acceptance("acc-1", "slow", now + 90) is False
        stale = store.finish_acceptance("acc-1", "slow", "refused", "{}", now + 3)
        assert stale is not None
        assert (stale.state, stale.lease_owner) == ("processing", "recoverer")
        assert other.finish_acceptance("acc-1", "recoverer", "released", "{}", now + 4) is None
        # Released: the slow process's booking, should it have made one, still counts.
        assert store.finish_acceptance("acc-1", "slow", "booked", '{"b": 1}', now + 5) is None
        record = other.get_acceptance("acc-1")
        assert record is not None
        assert (record.state, record.result) == ("booked", '{"b": 1}')
    finally:
        closing(adapter)
        for each in (store, other):
            getattr(each, "close", lambda: None)()


class SlowHold:
    """Keeps ``cmi_hold`` busy until the test lets it go."""

    def __init__(self) -> None:
        self.go = threading.Event()

    @hookimpl(wrapper=True)
    def cmi_hold(self) -> Any:
        self.go.wait(10)
        return (yield)


def test_a_booking_whose_lease_was_taken_over_books_nothing(store_url: str) -> None:
    shop = Shop()
    hold = SlowHold()
    slow = firm(store_url, shop, hold, acceptance_lease=0.1)
    recoverer = firm(store_url, shop)
    try:
        offer = an_offer(slow)
        answers: list[str] = []

        def accept() -> None:
            try:
                slow.accept_offer(offer.id, accepting(offer, "acc-1"))
                answers.append("booked")
            except AcceptanceError as exc:
                answers.append(exc.problem)

        thread = threading.Thread(target=accept)
        thread.start()
        deadline = time.monotonic() + 10
        while recoverer.store.stalled_acceptances(time.time()) == []:  # claimed, lease out
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert recoverer.recover_acceptances() == {"booked": 0, "released": 1}
        hold.go.set()  # cmi_hold returns, after the lease was taken over
        thread.join(10)
        assert answers == ["acceptance-in-progress"]
        assert shop.booked == []
        assert shop.released == ["hold-acc-1"]  # its hold let go, not booked
        retry = recoverer.accept_offer(offer.id, accepting(offer, "acc-1"))
        assert retry.outcome == "booked"
        assert shop.booked == ["acc-1"]
    finally:
        closing(slow, recoverer)


_NEW_COLUMNS = (
    ("offers", "accepted_by"),
    ("acceptances", "intermediary"),
    ("acceptances", "acceptance"),
    ("acceptances", "hold"),
    ("acceptances", "lease_owner"),
    ("acceptances", "lease_until"),
)


def _as_before(store_url: str, offer_id: str) -> None:
    """Turn the store's tables back into what the previous schema version made (SQLite 5,
    PostgreSQL 4), with an offer booked twice, as the bug allowed."""
    rows = [
        (
            f"acc-{n}",
            offer_id,
            json.dumps(
                {
                    "outcome": "booked",
                    "acceptance_id": f"acc-{n}",
                    "offer_id": offer_id,
                    "transaction_id": f"T{n}",
                }
            ),
            at,
            at,
        )
        for n, at in ((2, 20.0), (1, 10.0))
    ]
    if store_url.startswith("sqlite:"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            for table, column in _NEW_COLUMNS:
                conn.execute(f"ALTER TABLE cmi_{table} DROP COLUMN {column}")
            conn.execute("DROP TABLE cmi_emission_problems")
            as_legacy_sqlite(conn, 5)
            conn.executemany(
                "INSERT INTO cmi_acceptances (id, offer_id, state, result, created_at,"
                " updated_at) VALUES (?, ?, 'booked', ?, ?, ?)",
                rows,
            )
        return
    import psycopg

    dsn, _, schema = store_url.partition("?schema=")
    with psycopg.connect(dsn) as conn:
        conn.execute(f'SET search_path TO "{schema}"')
        for table, column in _NEW_COLUMNS:
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.execute("DROP TABLE emission_problems")
        as_legacy_postgres(conn, schema, 4)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO acceptances (id, offer_id, state, result, created_at,"
                " updated_at) VALUES (%s, %s, 'booked', %s, %s, %s)",
                rows,
            )


def test_a_store_made_before_the_rule_keeps_its_doubled_bookings_answers(
    store_url: str,
) -> None:
    adapter = firm(store_url, Shop())
    offer = an_offer(adapter)
    closing(adapter)
    _as_before(store_url, offer.id)
    shop = Shop()
    adapter = firm(store_url, shop)  # the store migrates when opened
    try:
        replay = adapter.accept_offer(offer.id, accepting(offer, "acc-2"))
        assert (replay.transaction_id, replay.replayed) == ("T2", True)  # its own answer
        third = adapter.accept_offer(offer.id, accepting(offer, "acc-3"))
        assert third.transaction_id == "T1"  # the first booking holds the offer
        assert shop.booked == []
        assert adapter.store.emission_problems() == []
    finally:
        closing(adapter)


# -- retention never reopens a booking -------------------------------------------------------
# An offer's id comes from the intermediary's request id (the same request sent again finds
# its offer), so once an expired offer and its acceptance are purged, the same request id
# asks again and gets an offer with the very id of the purged one. A late retry of the old
# acceptance (its id now unknown) would then book that new offer.

DAY = 86400.0


def test_a_late_retry_of_a_purged_acceptance_books_nothing(store_url: str) -> None:
    clock = Clock(time.time())
    shop = Shop()
    adapter = firm(store_url, shop, clock=clock)
    try:
        offer = an_offer(adapter, intermediary="relay")
        acceptance = accepting(offer, "acc-1")
        first = adapter.accept_offer(offer.id, acceptance, intermediary="relay")
        assert not first.replayed
        store = adapter.store
        assert isinstance(store, RetentionStore)
        # The worker's windows, long after the offer expired: both records go.
        clock.now = offer.valid_until.timestamp() + 61 * DAY
        with adapter.delivery_worker() as worker:
            worker.run_once()
        assert store.get_acceptance("acc-1") is None
        again = an_offer(adapter, intermediary="relay")  # the same request id asks again
        assert again.id == offer.id
        with pytest.raises(AcceptanceError, match="before offer"):
            adapter.accept_offer(offer.id, acceptance, intermediary="relay")
        assert shop.booked == ["acc-1"]
        # A new acceptance of the new offer books it, once.
        fresh = accepting(again, "acc-2").model_copy(update={"accepted_at": again.created_at})
        assert not adapter.accept_offer(again.id, fresh, intermediary="relay").replayed
        assert shop.booked == ["acc-1", "acc-2"]
    finally:
        closing(adapter)


def test_the_offer_windows_cannot_be_shorter_than_a_day(store_url: str) -> None:
    # Shorter, a purged offer's id could be given again while its acceptance's time still
    # lies within the day of clock skew an acceptance is allowed.
    adapter = firm(store_url)
    try:
        for option in ("keep_offers", "keep_acceptances"):
            with pytest.raises(ConfigurationError, match="a day"):
                adapter.delivery_worker(**{option: DAY - 1})
    finally:
        closing(adapter)


def test_the_operator_sees_what_would_go_and_cannot_shorten_the_offer_windows(
    store_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cmi_sdk.cli import EXIT_USAGE, main

    adapter = firm(store_url, Shop())
    try:
        offer = an_offer(adapter, intermediary="relay")
        adapter.accept_offer(offer.id, accepting(offer, "acc-1"), intermediary="relay")
    finally:
        closing(adapter)
    monkeypatch.setenv("CMI_DATABASE_URL", store_url)
    assert main(["outbox", "purge", "--dry-run", "--keep-offer-days", "0.5"]) == EXIT_USAGE
    assert "--keep-offer-days and --keep-acceptance-days must be >= 1" in capsys.readouterr().err
    # Within its windows the booked offer stays, and a dry run says so.
    assert main(["outbox", "purge", "--dry-run"]) == 0
    assert "0 offers, 0 acceptances" in capsys.readouterr().out
