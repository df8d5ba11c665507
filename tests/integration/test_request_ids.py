"""A request id sent again by the same intermediary gets the first answer while its offer is
valid, as an idempotency key does; the same id for another request is a conflict."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from cmi_sdk import (
    Adapter,
    Availability,
    FlightProduct,
    LineItem,
    Money,
    Quote,
    Request,
    RevenueDecision,
    hookimpl,
    load_model,
)
from cmi_sdk._offers import REQUEST_ID_GENERATIONS, request_offer_id
from cmi_sdk._serving import serving
from cmi_sdk.client import signed_headers
from cmi_sdk.webhooks import generate_secret
from tests.support import signer


class Seats:
    """A firm with seats ATL-CDG at 451.89 USD; counts what its pricing system is asked."""

    def __init__(self, barrier: threading.Barrier | None = None) -> None:
        self.priced = 0
        self.barrier = barrier

    @hookimpl
    def cmi_check_capacity(self, request: Request) -> Availability:
        return Availability(
            available=9,
            product=FlightProduct(
                origin="ATL",
                destination="CDG",
                date=request.wanted.date,  # type: ignore[union-attr]
                airline="Delta",
                flight="2231",
                fare_class="B",
            ),
        )

    @hookimpl
    def cmi_revenue_decision(self) -> RevenueDecision:
        return RevenueDecision(accept=True)

    @hookimpl
    def cmi_price(self) -> Quote:
        self.priced += 1
        if self.barrier is not None:
            self.barrier.wait(timeout=5)  # both requests are past their first look
        fare = Money(amount="451.89", currency="USD")
        return Quote(items=(LineItem(description="Seat", unit_price=fare, amount=fare),))


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC).timestamp()

    def __call__(self) -> float:
        return self.now


def a_request(request_id: str = "req-1", **changes: Any) -> Request:
    data: dict[str, Any] = {
        "id": request_id,
        "kind": "flight",
        "customer_ref": "cust-7f3a9c",
        "reply_to": "relay-1",
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "wanted": {"origin": "ATL", "destination": "CDG", "date": "2031-03-01"},
    }
    data.update(changes)
    return load_model(Request, data)


class Firm:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.seats = Seats()
        self.adapter = Adapter(
            plugins=[self.seats],
            database_url=f"sqlite:///{tmp_path}/firm.db",
            signer=signer(),
            clock=self.clock,
        )
        self.secrets: dict[str, str] = {}
        for name in ("relay", "other"):
            self.secrets[name] = generate_secret()
            self.adapter.store.add_intermediary(name, self.secrets[name], at=self.clock())
        self._server = serving(self.adapter.asgi_app())
        self.http = httpx.Client(base_url=self._server.__enter__(), timeout=10)
        self.sent = 0

    def send(self, request: Request, intermediary: str = "relay", msg_id: str | None = None) -> Any:
        body = self.adapter.render(request, standard="cmi", document_type="request")
        self.sent += 1
        headers = signed_headers(
            secret=self.secrets[intermediary],
            method="POST",
            target="/cmi/requests",
            body=body,
            intermediary=intermediary,
            msg_id=msg_id or f"msg_{self.sent}",
            timestamp=int(self.clock()),
        )
        headers["content-type"] = "application/xml"
        return self.http.post("/cmi/requests", content=body, headers=headers)

    def offer_ids(self, response: Any) -> list[str]:
        assert response.status_code == 200, response.text
        return [o.id for o in self.adapter.parse(response.content).offers]


@pytest.fixture
def firm(tmp_path: Path) -> Any:
    made = Firm(tmp_path)
    yield made
    made.http.close()
    made._server.__exit__(None, None, None)
    made.adapter.close()


def test_the_same_request_sent_again_gets_the_first_answer(firm: Firm) -> None:
    request = a_request()
    first = firm.send(request)
    again = firm.send(request)
    assert firm.offer_ids(first) == firm.offer_ids(again)
    assert again.content == first.content  # the first answer, signature and all
    assert firm.seats.priced == 1  # the firm's systems were asked once


def test_a_retry_may_carry_new_timestamps(firm: Firm) -> None:
    first = firm.send(a_request())
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
    retry = a_request(
        created_at=later.isoformat(), respond_by=(later + dt.timedelta(30)).isoformat()
    )
    assert firm.offer_ids(firm.send(retry)) == firm.offer_ids(first)


def test_the_same_id_for_another_request_is_a_conflict(firm: Firm) -> None:
    firm.offer_ids(firm.send(a_request()))
    other = a_request(wanted={"origin": "ATL", "destination": "CDG", "date": "2031-03-02"})
    refused = firm.send(other)
    assert refused.status_code == 409
    problem = refused.json()
    assert problem["type"] == "urn:cmi:problem:request-conflict"
    assert "req-1" in problem["detail"]
    assert "new id" in problem["detail"]
    assert firm.seats.priced == 1  # nothing asked of the firm's systems
    # Refused, the request left its message id free, and stored nothing.
    assert firm.send(a_request("req-2"), msg_id=f"msg_{firm.sent}").status_code == 200


def test_the_message_id_is_still_used_once(firm: Firm) -> None:
    request = a_request()
    firm.offer_ids(firm.send(request, msg_id="msg_once"))
    replayed = firm.send(request, msg_id="msg_once")
    assert replayed.status_code == 401
    assert replayed.json()["type"] == "urn:cmi:problem:replayed"


def test_another_intermediary_has_request_ids_of_its_own(firm: Firm) -> None:
    mine = firm.offer_ids(firm.send(a_request()))
    other = firm.send(a_request(), intermediary="other")
    theirs = firm.offer_ids(other)
    assert mine != theirs
    assert firm.seats.priced == 2
    # And one intermediary's different request under the same id is no conflict for the other.
    changed = a_request(wanted={"origin": "ATL", "destination": "CDG", "date": "2031-03-09"})
    assert firm.send(changed, intermediary="other").status_code == 409  # its own first answer
    assert firm.offer_ids(firm.send(a_request())) == mine


def test_once_the_offer_expired_the_id_asks_again(firm: Firm) -> None:
    first = firm.offer_ids(firm.send(a_request()))
    firm.clock.now += 16 * 60  # past the default 15 minutes of validity
    again = firm.offer_ids(firm.send(a_request(created_at=dt.datetime.now(dt.UTC).isoformat())))
    assert again != first
    assert again == [request_offer_id("relay", "req-1", 1)]
    assert firm.seats.priced == 2
    # Another request may take the id now: the first answer has lapsed.
    firm.clock.now += 16 * 60
    changed = a_request(wanted={"origin": "ATL", "destination": "CDG", "date": "2031-03-05"})
    assert firm.send(changed).status_code == 200


def test_an_id_is_not_used_without_end(firm: Firm) -> None:
    for _ in range(REQUEST_ID_GENERATIONS):
        firm.offer_ids(firm.send(a_request()))
        firm.clock.now += 16 * 60
    refused = firm.send(a_request())
    assert refused.status_code == 409
    assert f"used {REQUEST_ID_GENERATIONS} times" in refused.json()["detail"]


def test_a_declined_answer_is_not_kept(firm: Firm) -> None:
    # Declined, nothing is stored: the same id asks again (the firm may have seats now).
    too_dear = a_request(constraints={"max_price": {"amount": "100.00", "currency": "USD"}})
    assert firm.offer_ids(firm.send(too_dear)) == []
    assert firm.offer_ids(firm.send(a_request())) == [request_offer_id("relay", "req-1")]


def test_two_copies_racing_get_one_answer(tmp_path: Path) -> None:
    """Two processes answering the same request id at once: the second to commit finds
    the first's offer under the id it was to take, and answers with it."""
    barrier = threading.Barrier(2)
    seats = Seats(barrier)
    url = f"sqlite:///{tmp_path}/firm.db"
    adapters = [
        Adapter(plugins=[seats], database_url=url, signer=signer(), request_budget=20)
        for _ in range(2)
    ]
    answers: list[Any] = []
    errors: list[BaseException] = []

    def answer(adapter: Adapter) -> None:
        try:
            answers.append(adapter.answer_request(a_request(), intermediary="relay"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=answer, args=(a,)) for a in adapters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for adapter in adapters:
        adapter.close()
    assert errors == []
    assert seats.priced == 2
    assert {a.offers.offers[0].id for a in answers} == {request_offer_id("relay", "req-1")}
    assert answers[0].xml == answers[1].xml  # the one that was stored


def test_offer_ids_name_their_intermediary_and_request() -> None:
    ids = {
        request_offer_id(who, rid, gen)
        for who in ("relay", "other")
        for rid in ("req-1", "req-2")
        for gen in range(3)
    }
    assert len(ids) == 12
    assert all(json.dumps(i).strip('"').startswith("off_") and len(i) == 24 for i in ids)
