"""Whose fault an error is: the caller's input (a ``ValueError``, 4xx over HTTP) or the
firm's systems (an outage, never a ``ValueError``, 5xx over HTTP)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cmi_sdk import (
    Acceptance,
    AcceptanceError,
    Adapter,
    Answer,
    Availability,
    CMIError,
    FlightProduct,
    FlightWanted,
    Hold,
    LineItem,
    Money,
    Offer,
    Quote,
    Request,
    RequestRefusedError,
    RevenueDecision,
    Transaction,
    hookimpl,
    load_model,
)
from tests.support import make_adapter


def _usd(amount: str) -> Money:
    return Money(amount=amount, currency="USD")


def _request(**changes: Any) -> Request:
    data: dict[str, Any] = {
        "id": "req-errors-1",
        "kind": "flight",
        "customer_ref": "cust-7f3a9c",
        "reply_to": "relay-1",
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "wanted": {"origin": "ATL", "destination": "CDG", "date": "2026-12-01", "passengers": 1},
    }
    data.update(changes)
    return load_model(Request, data)


class Seats:
    """A firm with one flight whose systems can be made slow or broken, one at a time."""

    def __init__(self) -> None:
        self.slow_capacity = 0.0
        self.broken: set[str] = set()
        self.booked: list[str] = []
        self.released: list[str] = []
        # Set when a slow capacity call is over: the test waits for it before closing.
        self.capacity_done = threading.Event()

    def _fail(self, hook: str) -> None:
        if hook in self.broken:
            raise ConnectionError(f"{hook}: the firm's system is down")

    @hookimpl
    def cmi_validate_request(self, request: Request) -> list[str]:
        wanted = request.wanted
        if isinstance(wanted, FlightWanted) and wanted.origin != "ATL":
            return ["we only fly from ATL"]
        return []

    @hookimpl
    def cmi_check_capacity(self, request: Request) -> Availability:
        self._fail("cmi_check_capacity")
        if self.slow_capacity:
            time.sleep(self.slow_capacity)
            self.capacity_done.set()
        wanted = request.wanted
        assert isinstance(wanted, FlightWanted)
        product = FlightProduct(
            origin=wanted.origin,
            destination=wanted.destination,
            date=wanted.date,
            airline="Delta",
            flight="2231",
            fare_class="B",
        )
        return Availability(product=product, available=3)

    @hookimpl
    def cmi_revenue_decision(self) -> RevenueDecision:
        self._fail("cmi_revenue_decision")
        return RevenueDecision(accept=True, floor=_usd("400.00"))

    @hookimpl
    def cmi_price(self) -> Quote:
        self._fail("cmi_price")
        fare = _usd("451.89")
        return Quote(items=(LineItem(description="Seat ATL-CDG", unit_price=fare, amount=fare),))

    @hookimpl
    def cmi_hold(self, acceptance: Acceptance) -> Hold:
        self._fail("cmi_hold")
        return Hold(id=f"hold-{acceptance.id}", expires_at=dt.datetime.now(dt.UTC))

    @hookimpl
    def cmi_book(self, offer: Offer, acceptance: Acceptance) -> Transaction:
        self._fail("cmi_book")
        self.booked.append(acceptance.id)
        return Transaction.model_validate(
            {
                "id": f"DL-{len(self.booked)}",
                "kind": "flight",
                "occurred_at": dt.datetime.now(dt.UTC),
                "firm": "delta.com",
                "customer_ref": acceptance.customer_ref,
                "total": offer.price,
                "details": {**offer.product.model_dump(), "ticket_number": "1"},
            }
        )

    @hookimpl
    def cmi_release(self, hold: Hold) -> None:
        self.released.append(hold.id)


@pytest.fixture
def seats() -> Seats:
    return Seats()


@pytest.fixture
def firm(tmp_path: Path, seats: Seats) -> Iterator[Adapter]:
    adapter = make_adapter(tmp_path, plugins=[seats], request_budget=0.4)
    yield adapter
    adapter.close()


def _acceptance(offer: Offer, acceptance_id: str = "acc-1") -> Acceptance:
    return Acceptance(
        id=acceptance_id,
        offer_id=offer.id,
        customer_ref=offer.customer_ref,
        accepted_at=dt.datetime.now(dt.UTC),
    )


def firms_own_code(adapter: Adapter, request: Request) -> Answer | None:
    """What a firm writes: bad input is the customer's problem, answered with nothing."""
    try:
        return adapter.answer_request(request)
    except ValueError:
        return None


# -- a firm's `except ValueError` catches input errors only -------------------------------


def test_except_value_error_does_not_swallow_a_capacity_timeout(
    firm: Adapter, seats: Seats
) -> None:
    seats.slow_capacity = 1.0
    with pytest.raises(CMIError) as info:
        firms_own_code(firm, _request())
    assert info.value.problem == "capacity-timeout"  # type: ignore[attr-defined]
    assert not isinstance(info.value, ValueError)
    assert seats.capacity_done.wait(5)


def test_except_value_error_does_not_swallow_a_plugin_failure(
    firm: Adapter, seats: Seats
) -> None:
    seats.broken.add("cmi_price")
    with pytest.raises(CMIError) as info:
        firms_own_code(firm, _request())
    assert info.value.problem == "plugin-failed"  # type: ignore[attr-defined]
    assert not isinstance(info.value, ValueError)


def test_except_value_error_still_catches_an_invalid_request(firm: Adapter) -> None:
    wanted = {"origin": "JFK", "destination": "CDG", "date": "2026-12-01"}
    assert firms_own_code(firm, _request(wanted=wanted)) is None
    with pytest.raises(RequestRefusedError) as info:
        firm.answer_request(_request(wanted=wanted))
    assert isinstance(info.value, ValueError)
    assert info.value.problem == "invalid-request"


def test_a_booking_outage_is_not_a_value_error(firm: Adapter, seats: Seats) -> None:
    (offer,) = firm.answer_request(_request()).offers.offers
    seats.broken.add("cmi_book")
    with pytest.raises(CMIError) as info:
        firm.accept_offer(offer.id, _acceptance(offer))
    assert not isinstance(info.value, ValueError)
    assert not isinstance(info.value, AcceptanceError)
    assert info.value.problem == "not-booked"  # type: ignore[attr-defined]
    assert seats.released == ["hold-acc-1"]
    # An outage books nothing and leaves the offer to a retry, which books.
    seats.broken.clear()
    assert firm.accept_offer(offer.id, _acceptance(offer)).outcome == "booked"


def test_a_hold_outage_is_not_a_refusal(firm: Adapter, seats: Seats) -> None:
    # Before, a crash of cmi_hold was answered "no longer available", and a retry got
    # that refusal forever.
    (offer,) = firm.answer_request(_request()).offers.offers
    seats.broken.add("cmi_hold")
    with pytest.raises(CMIError) as info:
        firm.accept_offer(offer.id, _acceptance(offer))
    assert not isinstance(info.value, ValueError)
    assert info.value.problem == "plugin-failed"  # type: ignore[attr-defined]
    seats.broken.clear()
    assert firm.accept_offer(offer.id, _acceptance(offer)).outcome == "booked"
