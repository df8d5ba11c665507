"""The fakes the tests share, so no test module imports another's.

A settable clock; an ASGI wrapper that fails as planned; a tiny airline written as plugins
(:class:`Shop`) with the flight requests it answers; the loan requests the reference lender
answers. Builders of real objects (a signer, an adapter on its own store, terms) are in
``tests/support.py``; hypothesis strategies in ``tests/strategies.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

from cmi_lender import credit_evidence
from cmi_sdk import (
    Acceptance,
    AcceptanceError,
    Advice,
    Availability,
    ClaimCheck,
    FlightProduct,
    FlightWanted,
    Hold,
    LineItem,
    Money,
    Offer,
    Quote,
    Request,
    RevenueDecision,
    Reward,
    Transaction,
    hookimpl,
    load_model,
)

CUSTOMER = "cust-7f3a9c"
# The key the reference lender and the credit bureau share in the tests.
CREDIT_KEY = b"bureau-and-lender-shared-key"


class Clock:
    """A settable clock in POSIX seconds, for adapters, stores and plugins."""

    def __init__(self, now: float = 1_900_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Plan = Callable[[int], "int | tuple[int, dict[str, str]] | None"]


class Faulty:
    """An ASGI wrapper that answers the n-th request (1-based) as ``plan(n)`` says: a
    status (with optional headers) instead of the wrapped app, or None to pass it on."""

    def __init__(self, inner: Any, plan: Plan) -> None:
        self.inner = inner
        self.plan = plan
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            answer = self.plan(self.requests)
            if answer is None:
                await self.inner(scope, receive, send)
                return
            status, headers = answer if isinstance(answer, tuple) else (answer, {})
            while (await receive()).get("more_body"):
                pass
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
                }
            )
            await send({"type": "http.response.body", "body": b""})
        finally:
            self.in_flight -= 1


# -- a tiny airline ------------------------------------------------------------------------


def usd(amount: str) -> Money:
    return Money(amount=amount, currency="USD")


def flight_request(**changes: Any) -> Request:
    created = dt.datetime.now(dt.UTC)
    data: dict[str, Any] = {
        "id": "req-1",
        "kind": "flight",
        "customer_ref": "cust-7f3a9c",
        "reply_to": "relay-1",
        "created_at": created.isoformat(),
        "wanted": {"origin": "ATL", "destination": "CDG", "date": "2026-12-01", "passengers": 1},
        "claims": [{"type": "loyalty-tier", "value": "gold"}],
    }
    data.update(changes)
    return load_model(Request, data)


def seat_on(request: Request) -> FlightProduct:
    """The shop's product for a flight request: a class B seat on Delta 2231."""
    wanted = request.wanted
    assert isinstance(wanted, FlightWanted)
    return FlightProduct(
        origin=wanted.origin,
        destination=wanted.destination,
        date=wanted.date,
        airline="Delta",
        flight="2231",
        fare_class="B",
    )


class Shop:
    """A tiny airline: a few seats of one flight, a fixed fare and floor."""

    def __init__(self, seats: int = 3, fare: str = "451.89", floor: str = "400.00") -> None:
        self.seats = seats
        self.fare = fare
        self.floor = floor
        self.lock = threading.Lock()
        self.held: dict[str, int] = {}
        self.booked: list[str] = []
        self.released: list[str] = []
        self.expired: list[str] = []
        self.calls: list[str] = []

    @hookimpl
    def cmi_validate_request(self, request: Request) -> list[str]:
        self.calls.append("validate")
        wanted = request.wanted
        if isinstance(wanted, FlightWanted) and wanted.origin != "ATL":
            return ["we only fly from ATL"]
        return []

    @hookimpl
    def cmi_verify_claims(self, request: Request) -> list[ClaimCheck]:
        self.calls.append("claims")
        return [ClaimCheck(claim=c, verified=c.value == "gold") for c in request.claims]

    @hookimpl
    def cmi_check_capacity(self, request: Request) -> Availability | None:
        self.calls.append("capacity")
        if request.kind != "flight":
            return None
        free = self.seats - len(self.booked) - sum(self.held.values())
        return Availability(product=seat_on(request), available=max(free, 0))

    @hookimpl
    def cmi_revenue_decision(self, availability: Availability) -> RevenueDecision:
        self.calls.append("revenue")
        return RevenueDecision(accept=availability.available > 0, floor=usd(self.floor))

    @hookimpl
    def cmi_price(self) -> Quote:
        self.calls.append("price")
        fare = usd(self.fare)
        return Quote(items=(LineItem(description="Seat ATL-CDG", unit_price=fare, amount=fare),))

    @hookimpl
    def cmi_rewards(self, claims: list[ClaimCheck]) -> list[Reward]:
        self.calls.append("rewards")
        if any(c.verified for c in claims):
            return [
                Reward(code="gold", description="Gold member", amount=usd("20.00")),
                Reward(code="anniversary", description="Our 100th year", amount=usd("50.00")),
            ]
        return []

    @hookimpl
    def cmi_advise(self) -> list[Advice]:
        self.calls.append("advice")
        return [Advice(code="alt-date", text="2026-12-02 is cheaper")]

    @hookimpl
    def cmi_offer_validity(self) -> dt.timedelta:
        self.calls.append("validity")
        return dt.timedelta(minutes=10)

    @hookimpl
    def cmi_hold(self, acceptance: Acceptance) -> Hold:
        with self.lock:
            if self.seats - len(self.booked) - sum(self.held.values()) < 1:
                # A refusal, as cmi_hold documents it; any other exception is an outage.
                raise AcceptanceError("sold out", problem="no-longer-available")
            self.held[acceptance.id] = 1
        return Hold(id=f"hold-{acceptance.id}", expires_at=dt.datetime.now(dt.UTC))

    @hookimpl
    def cmi_book(self, offer: Offer, acceptance: Acceptance) -> Transaction:
        with self.lock:
            self.held.pop(acceptance.id, None)
            self.booked.append(acceptance.id)
            number = str(1000 + len(self.booked))
        product = offer.product
        return Transaction.model_validate(
            {
                "id": f"DL-{number}",
                "kind": "flight",
                "occurred_at": dt.datetime.now(dt.UTC),
                "firm": "delta.com",
                "customer_ref": acceptance.customer_ref,
                "total": offer.price,
                "details": {**product.model_dump(), "ticket_number": number},
            }
        )

    @hookimpl
    def cmi_release(self, hold: Hold) -> None:
        self.released.append(hold.id)

    @hookimpl
    def cmi_on_offer_expired(self, offer: Offer) -> None:
        self.expired.append(offer.id)


# -- the reference lender's requests --------------------------------------------------------------


def band_claim(band: str, *, customer: str = CUSTOMER, key: bytes = CREDIT_KEY) -> dict[str, str]:
    return {"type": "credit-band", "value": band, "evidence": credit_evidence(key, customer, band)}


def loan_request(
    amount: str = "30000.00",
    term: int = 60,
    *,
    band: str | None = "A",
    currency: str = "USD",
    claims: list[dict[str, str]] | None = None,
    request_id: str = "req-loan-1",
) -> Request:
    if claims is None:
        claims = [] if band is None else [band_claim(band)]
    return load_model(
        Request,
        {
            "id": request_id,
            "kind": "loan",
            "customer_ref": CUSTOMER,
            "reply_to": "relay-8841",
            "created_at": "2026-06-01T09:00:00Z",
            "wanted": {"amount": {"amount": amount, "currency": currency}, "term_months": term},
            "claims": claims,
        },
    )
