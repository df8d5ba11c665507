"""Whose fault an error is: the caller's input (a ``ValueError``, 4xx over HTTP) or the
firm's systems (an outage, never a ``ValueError``, 5xx over HTTP)."""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import cmi_sdk
from cmi_sdk import (
    Acceptance,
    AcceptanceConflictError,
    AcceptanceError,
    Adapter,
    Answer,
    Availability,
    CMIError,
    FirmSystemError,
    FlightProduct,
    FlightWanted,
    Hold,
    InvalidInputError,
    LineItem,
    Money,
    NoAnswerError,
    Offer,
    OfferExpiredError,
    PluginFailedError,
    Problem,
    Quote,
    Request,
    RequestRefusedError,
    RevenueDecision,
    StageTimeoutError,
    StoreError,
    Transaction,
    hookimpl,
    load_model,
)
from cmi_sdk._offers import _TIMEOUT_OF, DEFAULT_STAGE_SHARES
from cmi_sdk.asgi import PROBLEM_TYPES
from cmi_sdk.client import CMIClient
from cmi_sdk.webhooks import generate_secret
from tests.support import emitting_adapter, serve_app

ROOT = Path(__file__).resolve().parents[2]


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
    adapter = emitting_adapter(tmp_path, plugins=[seats], request_budget=0.4)
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
    assert isinstance(info.value, StageTimeoutError)
    assert info.value.stage == "capacity"
    assert seats.capacity_done.wait(5)


def test_except_value_error_does_not_swallow_a_plugin_failure(firm: Adapter, seats: Seats) -> None:
    seats.broken.add("cmi_price")
    with pytest.raises(CMIError) as info:
        firms_own_code(firm, _request())
    assert info.value.problem == "plugin-failed"  # type: ignore[attr-defined]
    assert not isinstance(info.value, ValueError)
    assert isinstance(info.value, PluginFailedError)
    assert info.value.plugin == firm.plugin_manager.get_name(seats)


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


def test_no_pricing_system_is_an_outage(tmp_path: Path, seats: Seats) -> None:
    class NoPrice(Seats):
        cmi_price = None  # type: ignore[assignment]

    # Refused when the adapter is built with it; registered later, it fails closed.
    adapter = emitting_adapter(tmp_path)
    adapter.plugin_manager.register(NoPrice())
    with pytest.raises(NoAnswerError) as info:
        firms_own_code(adapter, _request())
    assert (info.value.problem, info.value.hook) == (Problem.NO_PRICE, "cmi_price")
    adapter.close()


# -- problem types: one enum, one status each, on the side of the tree it belongs to ------


def test_every_problem_has_one_status_and_a_stable_type() -> None:
    slugs = [p.value for p in Problem]
    assert len(slugs) == len(set(slugs))
    for problem in Problem:
        assert 400 <= problem.status < 600, problem
        assert problem.outage == (problem.status >= 500)
        assert problem.type == f"urn:cmi:problem:{problem.value}"
        assert problem == problem.value  # clients' and tests' slugs still compare equal
        assert Problem.of(problem.value) is problem
        assert problem.summary
    assert Problem.of("no-such-problem") is None

    # The endpoint's table is the enum's, member for member.
    assert {slug: status for slug, (status, _) in PROBLEM_TYPES.items()} == {
        p.value: p.status for p in Problem
    }


# Every slug the endpoint answered with before the enum, with its status then: none is
# gone, none renamed. One status changed, deliberately: not-booked (the booking system
# failed) was 409 and is an outage.
BEFORE = {
    **dict.fromkeys(
        ("unauthorized", "bad-signature", "stale-timestamp", "unknown-party", "replayed"), 401
    ),
    "metrics-unauthorized": 401,
    "forbidden": 403,
    "not-found": 404,
    "method-not-allowed": 405,
    "request-timeout": 408,
    "header-too-large": 431,
    "too-large": 413,
    "unsupported-media-type": 415,
    **dict.fromkeys(
        ("invalid-input", "terms-refused", "link-refused", "destination-not-allowed"), 422
    ),
    "conflict": 409,
    "request-conflict": 409,
    "unsupported-standard": 422,
    **dict.fromkeys(("bad-request", "malformed-xml", "forbidden-xml", "too-deep"), 400),
    **dict.fromkeys(("invalid-document", "invalid-request", "declined", "deadline-passed"), 422),
    **{f"{stage}-timeout": 503 for stage in DEFAULT_STAGE_SHARES},
    "no-revenue-decision": 503,
    "no-price": 503,
    "price-below-floor": 502,
    "plugin-failed": 502,
    "offer-expired": 410,
    **dict.fromkeys(
        (
            "no-longer-available",
            "price-changed",
            "not-booked",
            "acceptance-refused",
            "acceptance-in-progress",
            "acceptance-conflict",
            "already-accepted",
        ),
        409,
    ),
    "acceptance-failed": 500,
    "store-unavailable": 503,
    "internal": 500,
}


def test_the_slugs_clients_know_stay() -> None:
    now = {p.value: p.status for p in Problem}
    assert set(now) == set(BEFORE)
    changed = {slug: (BEFORE[slug], now[slug]) for slug in now if now[slug] != BEFORE[slug]}
    assert changed == {"not-booked": (409, 503)}


def test_outages_answer_5xx_and_input_errors_4xx() -> None:
    outages = {
        Problem.CAPACITY_TIMEOUT: 503,
        Problem.NO_PRICE: 503,
        Problem.NO_REVENUE_DECISION: 503,
        Problem.NOT_BOOKED: 503,
        Problem.PLUGIN_FAILED: 502,
        Problem.PRICE_BELOW_FLOOR: 502,
        Problem.ACCEPTANCE_FAILED: 500,
    }
    for problem, status in outages.items():
        assert problem.status == status
    for problem in (
        Problem.INVALID_REQUEST,
        Problem.DEADLINE_PASSED,
        Problem.OFFER_EXPIRED,
        Problem.NO_LONGER_AVAILABLE,
        Problem.PRICE_CHANGED,
        Problem.ALREADY_ACCEPTED,
        Problem.ACCEPTANCE_IN_PROGRESS,
        Problem.ACCEPTANCE_CONFLICT,
        Problem.ACCEPTANCE_REFUSED,
    ):
        assert 400 <= problem.status < 500, problem


def test_every_stage_times_out_with_its_own_problem() -> None:
    assert list(_TIMEOUT_OF) == list(DEFAULT_STAGE_SHARES)
    for stage, problem in _TIMEOUT_OF.items():
        assert problem.value == f"{stage}-timeout"  # the slugs clients already know
        assert problem.status == 503


def test_an_error_carries_a_problem_of_its_own_side_only() -> None:
    assert RequestRefusedError("x").problem is Problem.INVALID_REQUEST
    assert AcceptanceError("x").problem is Problem.ACCEPTANCE_REFUSED
    assert AcceptanceError("x", problem="price-changed").problem is Problem.PRICE_CHANGED
    assert OfferExpiredError("x").problem is Problem.OFFER_EXPIRED
    assert AcceptanceConflictError("x").problem is Problem.ACCEPTANCE_CONFLICT
    assert PluginFailedError("x", plugin="p").problem is Problem.PLUGIN_FAILED
    with pytest.raises(ValueError, match="the caller's input"):
        AcceptanceError("x", problem=Problem.NOT_BOOKED)
    with pytest.raises(ValueError, match="the caller's input"):
        RequestRefusedError("x", problem="capacity-timeout")
    with pytest.raises(ValueError, match="the firm's systems"):
        FirmSystemError("x", problem=Problem.INVALID_REQUEST)
    with pytest.raises(ValueError, match="no problem type"):
        AcceptanceError("x", problem="sold-out")


def test_the_two_branches_do_not_meet() -> None:
    errors = [
        getattr(cmi_sdk, name)
        for name in cmi_sdk.__all__
        if isinstance(getattr(cmi_sdk, name), type) and issubclass(getattr(cmi_sdk, name), CMIError)
    ]
    outages = [e for e in errors if issubclass(e, FirmSystemError)]
    assert {e.__name__ for e in outages} == {
        "FirmSystemError",
        "NoAnswerError",
        "PluginFailedError",
        "StageTimeoutError",
    }
    for error in outages:
        assert not issubclass(error, ValueError | LookupError), error
    for error in errors:
        if issubclass(error, ValueError):
            assert issubclass(error, InvalidInputError), error


def test_the_errors_page_lists_every_problem_with_its_status() -> None:
    page = (ROOT / "docs" / "errors.md").read_text()
    listed = dict(re.findall(r"^\| `([a-z-]+)` \| (\d{3}) \|", page, flags=re.MULTILINE))
    assert listed == {p.value: str(p.status) for p in Problem}


# -- over HTTP: an outage is a 5xx problem, a refusal a 4xx --------------------------------


@pytest.fixture
def served(tmp_path: Path, seats: Seats) -> Iterator[tuple[Adapter, CMIClient]]:
    adapter = emitting_adapter(tmp_path, plugins=[seats], request_budget=0.4)
    secret = generate_secret()
    adapter.store.add_intermediary("relay", secret, at=time.time())
    with (
        serve_app(adapter.asgi_app()) as url,
        CMIClient(url.rstrip("/"), secret=secret, intermediary="relay") as client,
    ):
        yield adapter, client
    adapter.close()


def _request_xml(adapter: Adapter, **changes: Any) -> bytes:
    return adapter.render(_request(**changes), standard="cmi", document_type="request")


def _problem(response: httpx.Response, status: int, problem: Problem) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["type"] == problem.type
    assert (body["status"], body["title"]) == (status, problem.summary)
    return body


def test_the_endpoint_answers_a_plugin_failure_with_a_5xx_problem(
    served: tuple[Adapter, CMIClient], seats: Seats
) -> None:
    adapter, client = served
    seats.broken.add("cmi_revenue_decision")
    _problem(client.post_request(_request_xml(adapter)), 502, Problem.PLUGIN_FAILED)
    seats.broken.clear()
    # The caller's own mistake is still a 4xx.
    wanted = {"origin": "JFK", "destination": "CDG", "date": "2026-12-01"}
    _problem(
        client.post_request(_request_xml(adapter, id="req-errors-3", wanted=wanted)),
        422,
        Problem.INVALID_REQUEST,
    )


def test_the_endpoint_answers_a_booking_outage_with_503_and_a_retry_books(
    served: tuple[Adapter, CMIClient], seats: Seats
) -> None:
    adapter, client = served
    answer = client.post_request(_request_xml(adapter))
    assert answer.status_code == 200, answer.text
    offers = adapter.parse(answer.content, standard="cmi", document_type="offers")
    (offer,) = offers.offers
    acceptance = adapter.render(_acceptance(offer), standard="cmi", document_type="acceptance")
    seats.broken.add("cmi_book")
    _problem(client.accept(offer.id, acceptance), 503, Problem.NOT_BOOKED)
    seats.broken.clear()
    booked = client.accept(offer.id, acceptance)
    assert booked.status_code == 201, booked.text
    assert booked.json()["outcome"] == "booked"
    # The outage was not recorded as the answer: the booking is, for every retry.
    again = client.accept(offer.id, acceptance)
    assert (again.status_code, again.json()["transaction_id"]) == (
        201,
        booked.json()["transaction_id"],
    )
    assert seats.booked == ["acc-1"]


def test_a_store_outage_is_answered_as_the_firms_outage() -> None:
    from cmi_sdk.asgi import _problem_for

    answer = _problem_for(StoreError("cannot connect to PostgreSQL at db:5432"))
    assert answer.problem is Problem.STORE_UNAVAILABLE
    assert answer.problem.status == 503
    assert answer.problem.outage
