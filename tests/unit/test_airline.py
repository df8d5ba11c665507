"""The reference airline: EMSR-b, and its pipeline hooks through a real adapter."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import sqlite3
import sys
import threading
from collections.abc import Iterator
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from statistics import NormalDist
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cmi_sdk import (
    Acceptance,
    Adapter,
    Availability,
    Claim,
    ClaimCheck,
    ConfigurationError,
    FlightDetails,
    FlightProduct,
    Hold,
    LineItem,
    Money,
    Offer,
    Quote,
    Request,
    RevenueDecision,
    Transaction,
    load_model,
)

try:
    import cmi_airline
except ImportError:  # not installed yet: the plugin's source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))
    import cmi_airline

from cmi_airline import (
    AirlineError,
    AirlineUnavailableError,
    HoldExpiredError,
    ReferenceAirline,
    SoldOutError,
    bid_price,
    booking_limits,
    marginal_seat_revenue,
    protection_levels,
)
from tests.fakes import Clock

ROOT = Path(__file__).resolve().parents[2]

# Talluri & van Ryzin, The Theory and Practice of Revenue Management, table 2.3.
FARES = [1050, 567, 534, 520]
MEANS = [17.3, 45.1, 39.6, 34.0]
SDS = [5.8, 15.0, 13.2, 11.3]

KEY = b"loyalty-programme-key"
START = dt.datetime(2026, 6, 1, 9, 0, tzinfo=dt.UTC).timestamp()
FLIGHT = "DL2231-2026-07-01"
SINGLE = (("Y", Decimal("300.00"), 5.0, 2.0),)

GOOD_FLIGHT: dict[str, Any] = {
    "origin": "ATL",
    "destination": "MIA",
    "date": dt.date(2026, 7, 1),
    "flight": "5",
    "capacity": 10,
    "fares": SINGLE,
}


# -- EMSR-b ---------------------------------------------------------------------------------


def test_talluri_van_ryzin_protection_levels() -> None:
    levels = protection_levels(FARES, MEANS, SDS)
    assert [round(y, 2) for y in levels] == [16.72, 50.94, 83.15]


def test_protection_levels_take_decimal_fares() -> None:
    fares = [Decimal(f) for f in FARES]
    assert protection_levels(fares, MEANS, SDS) == protection_levels(FARES, MEANS, SDS)


def test_one_class_needs_no_protection() -> None:
    assert protection_levels([100], [10.0], [3.0]) == []


def test_negative_protection_is_clamped_to_zero() -> None:
    # Fares so close that the top class would sell below its mean: no seat is kept.
    assert protection_levels([100, 99], [1.0, 50.0], [1.0, 10.0]) == [0.0]


def test_protection_levels_are_kept_nested_when_the_formula_dips() -> None:
    # Class 2 adds almost no demand but much variance, and class 3's fare is close to the
    # nest's: the formula alone would protect fewer seats for classes 1-2 than for class 1.
    fares, means, sds = [100, 99.99, 99.98], [10.0, 0.01, 1.0], [1.0, 100.0, 1.0]
    nest2 = 10.01 + math.sqrt(1 + 100**2) * NormalDist().inv_cdf(1 - 99.98 / 99.99999)
    assert nest2 < 0
    y1, y2 = protection_levels(fares, means, sds)
    assert y1 == pytest.approx(10 + NormalDist().inv_cdf(1 - 99.99 / 100))
    assert y2 == y1


@pytest.mark.parametrize(
    ("fares", "means", "sds", "message"),
    [
        ([100, 50], [1.0], [1.0, 1.0], "one entry per class"),
        ([], [], [], "at least one fare class"),
        ([100, 100], [1.0, 1.0], [1.0, 1.0], "strictly decreasing"),
        ([50, 100], [1.0, 1.0], [1.0, 1.0], "strictly decreasing"),
        ([100, 50], [1.0, 1.0], [1.0, 0.0], "sd of class 2 must be a positive number"),
        ([100, 50], [1.0, 1.0], [-1.0, 1.0], "sd of class 1 must be a positive number"),
        ([100, 50], [0.0, 1.0], [1.0, 1.0], "mean of class 1 must be a positive number"),
        ([100, -50], [1.0, 1.0], [1.0, 1.0], "fare of class 2 must be a positive number"),
        ([100, math.nan], [1.0, 1.0], [1.0, 1.0], "fare of class 2 must be a positive number"),
        ([100, 50], [1.0, math.inf], [1.0, 1.0], "mean of class 2 must be a positive number"),
    ],
)
def test_emsr_input_is_validated(
    fares: list[float], means: list[float], sds: list[float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        protection_levels(fares, means, sds)
    if fares:
        with pytest.raises(ValueError, match=message):
            bid_price(fares, means, sds, 1)


def test_talluri_van_ryzin_booking_limits() -> None:
    levels = protection_levels(FARES, MEANS, SDS)
    # Levels rounded up: 17, 51 and 84 seats kept for the classes above.
    assert booking_limits(100, levels) == [100, 83, 49, 16]
    assert booking_limits(60, levels) == [60, 43, 9, 0]
    assert booking_limits(0, levels) == [0, 0, 0, 0]


@pytest.mark.parametrize("capacity", [0, 1, 17, 18, 50, 84, 85, 100, 250])
def test_booking_limits_are_nested_and_monotone(capacity: int) -> None:
    limits = booking_limits(capacity, protection_levels(FARES, MEANS, SDS))
    assert limits[0] == capacity
    assert all(0 <= b <= capacity for b in limits)
    assert limits == sorted(limits, reverse=True)
    bigger = booking_limits(capacity + 1, protection_levels(FARES, MEANS, SDS))
    assert all(b <= c <= b + 1 for b, c in zip(limits, bigger, strict=True))


@pytest.mark.parametrize(
    ("capacity", "levels", "message"),
    [
        (-1, [1.0], "capacity must be a whole number"),
        (1.5, [1.0], "capacity must be a whole number"),
        (True, [1.0], "capacity must be a whole number"),
        (10, [-1.0], "protection level 1 must be 0 or more"),
        (10, [math.nan], "protection level 1 must be 0 or more"),
        (10, [5.0, 4.0], "must be nested"),
    ],
)
def test_booking_limits_input_is_validated(
    capacity: Any, levels: list[float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        booking_limits(capacity, levels)


def test_bid_price_decreases_as_remaining_capacity_grows() -> None:
    prices = [bid_price(FARES, MEANS, SDS, seats) for seats in range(1, 151)]
    assert all(a >= b for a, b in itertools.pairwise(prices))
    # Strictly, until the normal tails round to nothing.
    assert all(a > b for a, b in itertools.pairwise(prices[:121]))
    assert prices[0] == pytest.approx(1050, rel=1e-2)
    assert 0 < prices[-1] < 520


def test_bid_price_is_the_largest_nest_value() -> None:
    for seats in (1, 30, 60, 100):
        nests = [marginal_seat_revenue(FARES, MEANS, SDS, seats, nest=j) for j in (1, 2, 3)]
        assert bid_price(FARES, MEANS, SDS, seats) == max(nests)
    assert bid_price([100], [10.0], [3.0], 10) == pytest.approx(50)


@pytest.mark.parametrize("remaining", [0, -3, 2.5, True])
def test_bid_price_needs_a_seat(remaining: Any) -> None:
    with pytest.raises(ValueError, match="remaining must be a whole number"):
        bid_price(FARES, MEANS, SDS, remaining)


@pytest.mark.parametrize("nest", [0, 5, True])
def test_marginal_seat_revenue_needs_a_nest(nest: Any) -> None:
    with pytest.raises(ValueError, match="nest must be"):
        marginal_seat_revenue(FARES, MEANS, SDS, 10, nest=nest)


@st.composite
def ladders(draw: st.DrawFn) -> tuple[list[int], list[float], list[float]]:
    n = draw(st.integers(1, 6))
    fares = sorted(draw(st.lists(st.integers(10, 5000), min_size=n, max_size=n, unique=True)))
    positive = st.floats(0.1, 200, allow_nan=False, allow_infinity=False)
    means = draw(st.lists(positive, min_size=n, max_size=n))
    sds = draw(st.lists(positive, min_size=n, max_size=n))
    return fares[::-1], means, sds


@given(ladders())
def test_protection_levels_do_not_decrease_down_the_fare_ladder(
    ladder: tuple[list[int], list[float], list[float]],
) -> None:
    fares, means, sds = ladder
    levels = protection_levels(fares, means, sds)
    assert len(levels) == len(fares) - 1
    assert all(y >= 0 for y in levels)
    assert levels == sorted(levels)


@given(ladders(), st.integers(1, 400), st.integers(1, 9))
def test_floor_never_exceeds_the_fare_of_an_open_class(
    ladder: tuple[list[int], list[float], list[float]], remaining: int, seats: int
) -> None:
    # What the airline's revenue decision relies on: the displacement cost of the nest
    # above the cheapest open class stays below that class's fare, seat by seat.
    fares, means, sds = ladder
    limits = booking_limits(remaining, protection_levels(fares, means, sds))
    open_ = [i for i, limit in enumerate(limits) if limit >= seats]
    if not open_:
        return
    k = open_[-1]
    for left in range(remaining, remaining - seats, -1):
        # Up to float noise, which the plugin rounds away before it rounds up to cents.
        value = marginal_seat_revenue(fares, means, sds, left, nest=max(k, 1))
        assert value <= fares[k] * (1 + 1e-12)


# -- the airline through an adapter ---------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def airline(tmp_path: Path, clock: Clock) -> Iterator[ReferenceAirline]:
    with ReferenceAirline(database=tmp_path / "airline.db", loyalty_key=KEY, clock=clock) as a:
        a.seed_demo()
        yield a


@pytest.fixture
def airline_adapter(airline: ReferenceAirline, clock: Clock) -> Adapter:
    return Adapter(plugins=[airline], clock=clock)


@pytest.fixture
def hook(airline_adapter: Adapter) -> Any:
    return airline_adapter.plugin_manager.hook


def make_request(
    *,
    passengers: int = 1,
    date: str = "2026-07-01",
    origin: str = "ATL",
    destination: str = "CDG",
    claims: list[dict[str, str]] | None = None,
    **changes: Any,
) -> Request:
    data = json.loads((ROOT / "examples" / "request.json").read_text())
    data["wanted"].update(passengers=passengers, date=date, origin=origin, destination=destination)
    if claims is not None:
        data["claims"] = claims
    data.update(changes)
    return load_model(Request, data)


def priced(hook: Any, request: Request) -> tuple[Availability, RevenueDecision, Quote]:
    availability = hook.cmi_check_capacity(request=request)
    decision = hook.cmi_revenue_decision(request=request, availability=availability)
    quote = hook.cmi_price(request=request, availability=availability, decision=decision)
    return availability, decision, quote


def make_offer(request: Request, quote: Quote, *, offer_id: str = "off-1") -> Offer:
    created = dt.datetime.fromtimestamp(START, dt.UTC)
    assert quote.product is not None
    return Offer(
        id=offer_id,
        request_id=request.id,
        kind="flight",
        firm="delta.com",
        customer_ref=request.customer_ref,
        reply_to=request.reply_to,
        created_at=created,
        valid_from=created,
        valid_until=created + dt.timedelta(minutes=10),
        product=quote.product,
        items=quote.items,
        price=quote.total,
    )


def accept(offer: Offer, acceptance_id: str = "acc-1") -> Acceptance:
    return Acceptance(
        id=acceptance_id,
        offer_id=offer.id,
        customer_ref=offer.customer_ref,
        accepted_at=dt.datetime.fromtimestamp(START + 5, dt.UTC),
    )


def offer_for(hook: Any, **request: Any) -> Offer:
    req = make_request(**request)
    _, _, quote = priced(hook, req)
    return make_offer(req, quote)


def test_the_package_exports_its_api() -> None:
    assert set(cmi_airline.__all__) >= {"ReferenceAirline", "protection_levels", "bid_price"}
    assert cmi_airline.__all__ == sorted(cmi_airline.__all__)


def test_capacity_finds_the_cheapest_open_class(hook: Any) -> None:
    availability = hook.cmi_check_capacity(request=make_request())
    assert availability.product == FlightProduct(
        origin="ATL",
        destination="CDG",
        date=dt.date(2026, 7, 1),
        airline="Delta",
        flight="2231",
        fare_class="Q",
    )
    assert availability.available == 16  # 100 seats less the 84 kept for Y, B and M
    assert availability.reference == FLIGHT
    dates = [p.date.isoformat() for p in availability.alternatives]
    assert dates == [
        "2026-06-30",
        "2026-07-02",
        "2026-06-29",
        "2026-07-03",
        "2026-06-28",
        "2026-07-04",
    ]


def test_capacity_closes_classes_as_seats_go(airline: ReferenceAirline, hook: Any) -> None:
    airline.add_flight(
        origin="ATL",
        destination="LAX",
        date=dt.date(2026, 7, 1),
        flight="100",
        capacity=20,
        fares=[(c, Decimal(f), m, s) for c, f, m, s in zip("YBMQ", FARES, MEANS, SDS, strict=True)],
    )
    one = hook.cmi_check_capacity(request=make_request(destination="LAX"))
    assert (one.product.fare_class, one.available) == ("B", 3)  # 20 - ceil(16.72)
    four = hook.cmi_check_capacity(request=make_request(destination="LAX", passengers=4))
    assert (four.product.fare_class, four.available) == ("Y", 20)


@pytest.mark.parametrize(
    "changes",
    [
        {"date": "2026-08-15"},
        {"origin": "JFK"},
        {"destination": "ATL", "origin": "LHR"},
    ],
)
def test_capacity_ignores_what_it_does_not_fly(hook: Any, changes: dict[str, str]) -> None:
    assert hook.cmi_check_capacity(request=make_request(**changes)) is None


def test_capacity_ignores_other_cabins_and_kinds(airline: ReferenceAirline) -> None:
    business = make_request()
    business = business.model_copy(
        update={"wanted": business.wanted.model_copy(update={"cabin": "business"})}
    )
    assert airline.cmi_check_capacity(request=business) is None
    loan = load_model(
        Request,
        {
            **json.loads((ROOT / "examples" / "request.json").read_text()),
            "kind": "loan",
            "wanted": {"amount": {"amount": "1000.00", "currency": "USD"}, "term_months": 12},
        },
    )
    assert airline.cmi_check_capacity(request=loan) is None
    assert airline.cmi_advise(request=loan) is None
    assert airline.cmi_revenue_decision(request=loan, availability=None) is None


def test_sold_out_is_still_the_airlines_product(airline: ReferenceAirline, hook: Any) -> None:
    airline.add_flight(**{**GOOD_FLIGHT, "capacity": 1})
    offer = offer_for(hook, destination="MIA")
    hold = hook.cmi_hold(offer=offer, acceptance=accept(offer))
    hook.cmi_book(offer=offer, acceptance=accept(offer), hold=hold)
    request = make_request(destination="MIA")
    availability = hook.cmi_check_capacity(request=request)
    assert availability.available == 0
    assert availability.product.fare_class == "Y"
    assert availability.reference == "DL5-2026-07-01"
    decision = hook.cmi_revenue_decision(request=request, availability=availability)
    assert not decision.accept
    assert decision.floor is None
    assert decision.reason == "DL5 on 2026-07-01 has 0 seats for sale in class Y, not 1"
    assert hook.cmi_price(request=request, availability=availability, decision=decision) is None


def test_revenue_floor_is_the_displacement_cost_rounded_up(hook: Any) -> None:
    request = make_request(passengers=2)
    _, decision, quote = priced(hook, request)
    assert decision.accept
    # Two Q seats, the 100th and the 99th left, each worth what Y, B and M expect of it.
    exact = sum(
        Decimal(marginal_seat_revenue(FARES, MEANS, SDS, seats, nest=3)) for seats in (100, 99)
    )
    assert decision.floor == Money(
        amount=exact.quantize(Decimal("0.01"), rounding=ROUND_CEILING), currency="USD"
    )
    assert exact <= decision.floor.amount < exact + Decimal("0.01")
    assert decision.floor.amount <= quote.total.amount == Decimal("1040.00")


def test_the_top_class_floor_is_its_own_later_demand(airline: ReferenceAirline, hook: Any) -> None:
    airline.add_flight(**{**GOOD_FLIGHT, "capacity": 4})
    request = make_request(destination="MIA")
    _, decision, quote = priced(hook, request)
    exact = Decimal(marginal_seat_revenue([300], [5.0], [2.0], 4, nest=1))
    assert decision.floor.amount == exact.quantize(Decimal("0.01"), rounding=ROUND_CEILING)
    assert decision.floor.amount <= quote.total.amount


def test_revenue_decision_refuses_too_few_seats(hook: Any) -> None:
    request = make_request(passengers=2)
    availability = hook.cmi_check_capacity(request=request)
    short = availability.model_copy(update={"available": 1})
    decision = hook.cmi_revenue_decision(request=request, availability=short)
    assert not decision.accept
    assert "has 1 seat for sale in class Q, not 2" in decision.reason


def test_revenue_decision_and_price_leave_other_products_alone(airline: ReferenceAirline) -> None:
    request = make_request()
    foreign = Availability(
        product=FlightProduct(
            origin="ATL",
            destination="CDG",
            date=dt.date(2026, 7, 1),
            airline="Air France",
            flight="681",
            fare_class="Q",
        ),
        available=5,
        reference="AF681",
    )
    assert airline.cmi_revenue_decision(request=request, availability=foreign) is None
    decision = RevenueDecision(accept=True)
    assert airline.cmi_price(request=request, availability=foreign, decision=decision) is None


def test_price_is_the_fare_of_the_class_per_passenger(hook: Any) -> None:
    _, _, quote = priced(hook, make_request(passengers=3))
    assert quote.items == (
        LineItem(
            description="ATL-CDG DL2231 class Q",
            quantity=Decimal(3),
            unit_price=Money(amount=Decimal("520.00"), currency="USD"),
            amount=Money(amount=Decimal("1560.00"), currency="USD"),
            sku="DL2231-2026-07-01.Q",
        ),
    )
    assert quote.product is not None
    assert quote.product.fare_class == "Q"
    # max_price (600 USD in the example) is the customer's filter, not pricing's.
    assert quote.total.amount > Decimal(600)


def test_price_in_the_flights_currency(hook: Any) -> None:
    _, decision, quote = priced(hook, make_request(origin="CDG", destination="ATL"))
    assert quote.total == Money(amount=Decimal("470.00"), currency="EUR")
    assert decision.floor.currency == "EUR"


def test_no_price_when_revenue_management_refuses(hook: Any) -> None:
    request = make_request()
    availability = hook.cmi_check_capacity(request=request)
    refused = RevenueDecision(accept=False, reason="no")
    assert hook.cmi_price(request=request, availability=availability, decision=refused) is None


def gold(airline: ReferenceAirline, tier: str = "gold") -> list[dict[str, str]]:
    return [
        {
            "type": "loyalty-tier",
            "value": tier,
            "evidence": airline.loyalty_evidence("cust-7f3a9c", tier),
        }
    ]


def test_loyalty_claims_with_evidence_are_verified(airline: ReferenceAirline, hook: Any) -> None:
    claims = [*gold(airline), {"type": "credit-band", "value": "A"}]
    (checks,) = hook.cmi_verify_claims(request=make_request(claims=claims))
    assert checks == [ClaimCheck(claim=Claim(**gold(airline)[0]), verified=True)]


@pytest.mark.parametrize(
    ("claim", "reason"),
    [
        ({"type": "loyalty-tier", "value": "gold"}, "the claim carries no evidence"),
        (
            {"type": "loyalty-tier", "value": "gold", "evidence": "00" * 32},
            "the evidence does not match the tier",
        ),
    ],
)
def test_loyalty_claims_without_good_evidence_are_not(
    hook: Any, claim: dict[str, str], reason: str
) -> None:
    (checks,) = hook.cmi_verify_claims(request=make_request(claims=[claim]))
    assert [(c.verified, c.reason) for c in checks] == [(False, reason)]


def test_evidence_for_another_tier_or_customer_does_not_verify(
    airline: ReferenceAirline, hook: Any
) -> None:
    silver = airline.loyalty_evidence("cust-7f3a9c", "silver")
    other = airline.loyalty_evidence("cust-000000", "gold")
    claims = [
        {"type": "loyalty-tier", "value": "gold", "evidence": silver},
        {"type": "loyalty-tier", "value": "gold", "evidence": other},
    ]
    (checks,) = hook.cmi_verify_claims(request=make_request(claims=claims))
    assert [c.verified for c in checks] == [False, False]


def test_without_a_key_no_tier_is_verified(tmp_path: Path, airline: ReferenceAirline) -> None:
    claims = gold(airline)
    with ReferenceAirline(database=tmp_path / "keyless.db") as keyless:
        (check,) = keyless.cmi_verify_claims(request=make_request(claims=claims)) or []
        assert not check.verified
        assert check.reason == "the airline cannot check loyalty tiers (it has no key)"
        with pytest.raises(ConfigurationError, match="no loyalty key"):
            keyless.loyalty_evidence("cust-7f3a9c", "gold")


def test_no_loyalty_claims_no_checks(hook: Any) -> None:
    assert hook.cmi_verify_claims(request=make_request(claims=[])) == []


@pytest.mark.parametrize(
    ("tier", "amount"), [("gold", "26.00"), ("silver", "10.40"), ("bronze", None)]
)
def test_rewards_for_verified_tiers(
    airline: ReferenceAirline, hook: Any, tier: str, amount: str | None
) -> None:
    request = make_request(claims=gold(airline, tier))
    _, _, quote = priced(hook, request)
    (checks,) = hook.cmi_verify_claims(request=request)
    rewards = [
        r for group in hook.cmi_rewards(request=request, quote=quote, claims=checks) for r in group
    ]
    if amount is None:
        assert rewards == []
    else:
        (reward,) = rewards
        assert reward.code == f"loyalty-{tier}"
        assert reward.amount == Money(amount=Decimal(amount), currency="USD")


def test_rewards_round_down(airline: ReferenceAirline, hook: Any) -> None:
    airline.add_flight(**{**GOOD_FLIGHT, "fares": [("Y", Decimal("519.99"), 5.0, 2.0)]})
    request = make_request(destination="MIA", claims=gold(airline))
    _, _, quote = priced(hook, request)
    checks = [ClaimCheck(claim=Claim(**gold(airline)[0]), verified=True)]
    (reward,) = airline.cmi_rewards(quote=quote, claims=checks) or []
    assert reward.amount.amount == Decimal("25.99")  # 5 % of 519.99 is 25.9995
    assert reward.description == "Gold member: 5 % off"


def test_unverified_tiers_earn_nothing(airline: ReferenceAirline, hook: Any) -> None:
    _, _, quote = priced(hook, make_request())
    checks = [ClaimCheck(claim=Claim(type="loyalty-tier", value="gold"), verified=False)]
    assert airline.cmi_rewards(quote=quote, claims=checks) is None


def test_advice_names_other_dates_with_seats(airline: ReferenceAirline, hook: Any) -> None:
    (advice,) = hook.cmi_advise(request=make_request())
    assert [a.code for a in advice] == ["alternative-date"] * 3
    assert [a.text for a in advice] == [
        "DL2231 on 2026-06-30 has 16 seats in class Q at 520.00 USD a passenger.",
        "DL2231 on 2026-07-02 has 16 seats in class Q at 520.00 USD a passenger.",
        "DL2231 on 2026-06-29 has 16 seats in class Q at 520.00 USD a passenger.",
    ]


def test_advice_respects_the_customers_dates(hook: Any) -> None:
    request = make_request(constraints={"earliest_date": "2026-07-01", "latest_date": "2026-07-02"})
    (advice,) = hook.cmi_advise(request=request)
    assert [a.text.split(" on ")[1][:10] for a in advice] == ["2026-07-02"]


def test_offers_are_valid_for_ten_minutes(airline: ReferenceAirline, hook: Any) -> None:
    request = make_request()
    offer = offer_for(hook)
    assert hook.cmi_offer_validity(request=request, offer=offer) == [dt.timedelta(minutes=10)]
    other = offer.model_copy(
        update={"product": offer.product.model_copy(update={"airline": "KLM"})}
    )
    assert airline.cmi_offer_validity(offer=other) is None


def test_hold_and_book_issue_a_valid_ticket(
    airline: ReferenceAirline, airline_adapter: Adapter, hook: Any, clock: Clock
) -> None:
    offer = offer_for(hook, passengers=2)
    acceptance = accept(offer)
    hold = hook.cmi_hold(offer=offer, acceptance=acceptance)
    assert isinstance(hold, Hold)
    assert hold.expires_at == dt.datetime.fromtimestamp(START + 600, dt.UTC)
    # Held seats are not for sale: Q's 16 become 14.
    assert hook.cmi_check_capacity(request=make_request()).available == 14
    assert airline.sold(FLIGHT) == 0
    clock.now += 60
    tx = hook.cmi_book(offer=offer, acceptance=acceptance, hold=hold)
    assert tx == Transaction(
        id="DL-0060000000001",
        kind="flight",
        occurred_at=dt.datetime.fromtimestamp(START + 60, dt.UTC),
        firm="delta.com",
        customer_ref="cust-7f3a9c",
        total=Money(amount=Decimal("1040.00"), currency="USD"),
        details=FlightDetails(
            origin="ATL",
            destination="CDG",
            date=dt.date(2026, 7, 1),
            airline="Delta",
            flight="2231",
            fare_class="Q",
            ticket_number="0060000000001",
            row=10,
            seat="A",
        ),
    )
    assert airline.sold(FLIGHT) == 2
    assert hook.cmi_check_capacity(request=make_request()).available == 14
    xml = airline_adapter.render(tx, standard="cmi-ticket")
    assert b"<ticketnumber>0060000000001</ticketnumber>" in xml
    # A retried acceptance gets the same booking, not more seats.
    assert hook.cmi_book(offer=offer, acceptance=acceptance, hold=hold) == tx
    assert airline.sold(FLIGHT) == 2


def test_seats_go_in_order_and_tickets_count_up(airline: ReferenceAirline, hook: Any) -> None:
    seats = []
    for n in range(4):
        offer = offer_for(hook, passengers=2)
        acceptance = accept(offer, f"acc-{n}")
        hold = hook.cmi_hold(offer=offer, acceptance=acceptance)
        tx = hook.cmi_book(offer=offer, acceptance=acceptance, hold=hold)
        seats.append((tx.details.row, tx.details.seat, tx.details.ticket_number))
    assert seats == [
        (10, "A", "0060000000001"),
        (10, "C", "0060000000002"),
        (10, "E", "0060000000003"),
        (11, "A", "0060000000004"),
    ]


def test_a_retried_acceptance_gets_its_hold_back(hook: Any) -> None:
    offer = offer_for(hook)
    first = hook.cmi_hold(offer=offer, acceptance=accept(offer))
    assert hook.cmi_hold(offer=offer, acceptance=accept(offer)) == first
    assert hook.cmi_check_capacity(request=make_request()).available == 15


def test_release_frees_the_seats(hook: Any) -> None:
    offer = offer_for(hook, passengers=3)
    hold = hook.cmi_hold(offer=offer, acceptance=accept(offer))
    assert hook.cmi_check_capacity(request=make_request()).available == 13
    hook.cmi_release(offer=offer, hold=hold)
    assert hook.cmi_check_capacity(request=make_request()).available == 16
    with pytest.raises(HoldExpiredError, match="expired or was released"):
        hook.cmi_book(offer=offer, acceptance=accept(offer), hold=hold)


def test_a_closed_class_cannot_be_held(hook: Any) -> None:
    offer = offer_for(hook, passengers=9)
    taken = offer_for(hook, passengers=9)
    hook.cmi_hold(offer=taken, acceptance=accept(taken, "acc-first"))
    with pytest.raises(SoldOutError, match="class Q has 7 seats for sale, not 9"):
        hook.cmi_hold(offer=offer, acceptance=accept(offer, "acc-second"))


def test_booking_needs_a_hold(hook: Any) -> None:
    offer = offer_for(hook)
    with pytest.raises(HoldExpiredError, match="has no hold"):
        hook.cmi_book(offer=offer, acceptance=accept(offer), hold=None)


def test_hold_and_book_leave_other_offers_alone(airline: ReferenceAirline, hook: Any) -> None:
    offer = offer_for(hook)
    other = offer.model_copy(
        update={"product": offer.product.model_copy(update={"airline": "KLM"})}
    )
    assert airline.cmi_hold(offer=other, acceptance=accept(other)) is None
    assert airline.cmi_book(offer=other, acceptance=accept(other), hold=None) is None


def test_hold_refuses_an_unknown_flight_or_class(airline: ReferenceAirline, hook: Any) -> None:
    offer = offer_for(hook)
    nowhere = offer.model_copy(update={"product": offer.product.model_copy(update={"flight": "9"})})
    with pytest.raises(AirlineError, match="no flight 9"):
        airline.cmi_hold(offer=nowhere, acceptance=accept(nowhere))
    no_class = offer.model_copy(
        update={"product": offer.product.model_copy(update={"fare_class": "Z"})}
    )
    with pytest.raises(AirlineError, match="has no class Z"):
        airline.cmi_hold(offer=no_class, acceptance=accept(no_class))


def test_expired_holds_free_the_seat(airline: ReferenceAirline, hook: Any, clock: Clock) -> None:
    airline.add_flight(**{**GOOD_FLIGHT, "capacity": 1})
    first = offer_for(hook, destination="MIA")
    second = offer_for(hook, destination="MIA")  # two offers for one seat: quotes reserve nothing
    hold = hook.cmi_hold(offer=first, acceptance=accept(first, "acc-first"))
    with pytest.raises(SoldOutError):
        hook.cmi_hold(offer=second, acceptance=accept(second, "acc-second"))
    clock.now += 600  # the hold's last moment has passed
    assert hook.cmi_check_capacity(request=make_request(destination="MIA")).available == 1
    later = hook.cmi_hold(offer=second, acceptance=accept(second, "acc-second"))
    assert isinstance(later, Hold)
    with pytest.raises(HoldExpiredError):
        hook.cmi_book(offer=first, acceptance=accept(first, "acc-first"), hold=hold)
    tx = hook.cmi_book(offer=second, acceptance=accept(second, "acc-second"), hold=later)
    assert tx.details.seat == "A"


@pytest.mark.parametrize("separate", [False, True], ids=["shared-airline", "airline-per-thread"])
def test_only_one_of_eight_concurrent_holds_gets_the_last_seat(
    airline: ReferenceAirline, hook: Any, clock: Clock, separate: bool
) -> None:
    airline.add_flight(**{**GOOD_FLIGHT, "capacity": 1})
    offer = offer_for(hook, destination="MIA")
    barrier = threading.Barrier(8)
    results: list[Hold | Exception | None] = []
    lock = threading.Lock()

    def race(n: int) -> None:
        own = ReferenceAirline(database=airline.database, clock=clock) if separate else airline
        try:
            barrier.wait()
            result: Hold | Exception | None = own.cmi_hold(
                offer=offer, acceptance=accept(offer, f"acc-{n}")
            )
        except Exception as exc:  # collected and checked below
            result = exc
        finally:
            if separate:
                own.close()
        with lock:
            results.append(result)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    holds = [r for r in results if isinstance(r, Hold)]
    refused = [r for r in results if isinstance(r, SoldOutError)]
    assert (len(holds), len(refused)) == (1, 7), results


def test_each_thread_has_its_own_connection(airline: ReferenceAirline) -> None:
    seen: list[sqlite3.Connection] = []
    thread = threading.Thread(target=lambda: seen.append(airline._connection()))
    thread.start()
    thread.join()
    assert seen[0] is not airline._connection()


def test_the_database_is_in_wal_mode(airline: ReferenceAirline) -> None:
    with sqlite3.connect(airline.database) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_seed_demo_is_idempotent(airline: ReferenceAirline) -> None:
    ids = airline.seed_demo()
    assert len(ids) == 14
    assert FLIGHT in ids
    assert airline.sold(FLIGHT) == 0


def test_sold_needs_a_flight(airline: ReferenceAirline) -> None:
    with pytest.raises(KeyError):
        airline.sold("DL1-2026-01-01")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"origin": "atl"}, "three-letter IATA codes"),
        ({"destination": "ATL"}, "must differ"),
        ({"date": "2026-07-01"}, "must be a datetime.date"),
        ({"date": dt.datetime(2026, 7, 1, tzinfo=dt.UTC)}, "must be a datetime.date"),
        ({"flight": "DL5"}, "flight number"),
        ({"capacity": 0}, "from 1 to 5940"),
        ({"capacity": 6000}, "from 1 to 5940"),
        ({"capacity": 2.0}, "whole number"),
        ({"fares": ()}, "at least one fare class"),
        ({"fares": [("y", Decimal(300), 5.0, 2.0)]}, "one capital letter"),
        ({"fares": [("Y", 300.0, 5.0, 2.0)]}, "must be a Decimal"),
        ({"fares": [("Y", Decimal("300.001"), 5.0, 2.0)]}, "more decimal places than USD"),
        ({"fares": [("Y", Decimal(300), 5.0, 2.0)] * 2}, "must be unique"),
        (
            {"fares": [("Y", Decimal(300), 5.0, 2.0), ("B", Decimal(400), 5.0, 2.0)]},
            "strictly decreasing",
        ),
        ({"fares": [("Y", Decimal(300), 5.0, 0.0)]}, "sd of class 1"),
        ({"currency": "XYZ"}, "not an ISO 4217 currency code"),
    ],
)
def test_add_flight_is_validated(
    airline: ReferenceAirline, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        airline.add_flight(**{**GOOD_FLIGHT, **changes})


def test_a_flight_is_added_once(airline: ReferenceAirline) -> None:
    assert airline.add_flight(**GOOD_FLIGHT) == "DL5-2026-07-01"
    with pytest.raises(ValueError, match="exists already"):
        airline.add_flight(**GOOD_FLIGHT)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"database": ":memory:"}, "must be a file"),
        ({"airline_code": "Delta"}, "two-character IATA code"),
        ({"firm": "delta com"}, "identifier"),
        ({"hold_seconds": 0}, "positive"),
        ({"ticket_prefix": "06"}, "three digits"),
        ({"loyalty_key": b""}, "must not be empty"),
    ],
)
def test_constructor_options_are_validated(
    tmp_path: Path, option: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ReferenceAirline(**{"database": tmp_path / "a.db", **option})


def test_a_closed_airline_says_so(tmp_path: Path) -> None:
    airline = ReferenceAirline(database=tmp_path / "a.db")
    airline.close()
    with pytest.raises(AirlineUnavailableError, match="the airline's database is closed") as info:
        airline.sold(FLIGHT)
    # An outage of the firm's system, never a refusal of the caller's input.
    assert not isinstance(info.value, ValueError)
    assert info.value.problem.outage
    errors: list[BaseException] = []

    def use() -> None:
        try:
            airline.sold(FLIGHT)
        except AirlineUnavailableError as exc:
            errors.append(exc)

    thread = threading.Thread(target=use)
    thread.start()
    thread.join()
    assert [str(e) for e in errors] == ["the airline's database is closed"]


# -- the inventory snapshot -----------------------------------------------------------------
# Capacity, revenue management, pricing and advice answer from each thread's snapshot of
# the inventory; these tests fail if the snapshot outlives a change.


@pytest.fixture
def other(airline: ReferenceAirline, clock: Clock) -> Iterator[ReferenceAirline]:
    """A second airline on the same file: another connection, as another process has."""
    with ReferenceAirline(database=airline.database, loyalty_key=KEY, clock=clock) as a:
        yield a


Answers = tuple[Availability | None, RevenueDecision | None, Quote | None, list[Any] | None]


def answers(airline: ReferenceAirline, request: Request) -> Answers:
    """What the airline's capacity, revenue management, pricing and advice say."""
    availability = airline.cmi_check_capacity(request=request)
    if availability is None:
        return None, None, None, airline.cmi_advise(request=request)
    decision = airline.cmi_revenue_decision(request=request, availability=availability)
    assert decision is not None
    quote = airline.cmi_price(request=request, availability=availability, decision=decision)
    return availability, decision, quote, airline.cmi_advise(request=request)


def fresh_answers(airline: ReferenceAirline, request: Request) -> Answers:
    """The same answers from an airline that has read nothing yet."""
    with ReferenceAirline(database=airline.database, loyalty_key=KEY, clock=airline.clock) as fresh:
        return answers(fresh, request)


def take(
    airline: ReferenceAirline, n: int, *, book: bool = True, passengers: int = 1, **request: Any
) -> Hold:
    """Hold (and book) seats through ``airline``'s own hooks; the hold."""
    req = make_request(passengers=passengers, **request)
    _, _, quote, _ = answers(airline, req)
    assert quote is not None
    offer = make_offer(req, quote, offer_id=f"off-{n}")
    acceptance = accept(offer, f"acc-{n}")
    hold = airline.cmi_hold(offer=offer, acceptance=acceptance)
    assert hold is not None
    if book:
        airline.cmi_book(offer=offer, acceptance=acceptance, hold=hold)
    return hold


def q_seats(airline: ReferenceAirline, request: Request | None = None) -> int:
    availability = airline.cmi_check_capacity(request=request or make_request())
    assert availability is not None
    return availability.available


def test_a_booking_by_another_connection_is_seen_at_the_next_check(
    airline: ReferenceAirline, other: ReferenceAirline
) -> None:
    request = make_request()
    assert q_seats(airline, request) == 16
    take(other, 1, passengers=2)
    # The very same request object asks again: capacity always checks for changes.
    assert q_seats(airline, request) == 14
    availability, decision, quote, _ = answers(airline, make_request())
    assert availability is not None
    assert decision is not None
    assert (availability, decision, quote) == fresh_answers(airline, make_request())[:3]
    assert airline.sold(FLIGHT) == 2


def test_a_hold_and_a_release_by_another_connection_are_seen(
    airline: ReferenceAirline, other: ReferenceAirline
) -> None:
    assert q_seats(airline) == 16
    req = make_request(passengers=3)
    _, _, quote, _ = answers(other, req)
    assert quote is not None
    offer = make_offer(req, quote)
    hold = other.cmi_hold(offer=offer, acceptance=accept(offer))
    assert hold is not None
    assert q_seats(airline) == 13
    other.cmi_release(offer=offer, hold=hold)
    assert q_seats(airline) == 16


def test_a_booking_in_another_thread_is_seen(airline: ReferenceAirline) -> None:
    assert q_seats(airline) == 16
    thread = threading.Thread(target=take, args=(airline, 1), kwargs={"passengers": 4})
    thread.start()
    thread.join()
    assert airline.sold(FLIGHT) == 4
    assert q_seats(airline) == 12


def test_the_airlines_own_writes_are_seen_at_once(
    airline: ReferenceAirline, other: ReferenceAirline
) -> None:
    request = make_request(passengers=2)
    availability = airline.cmi_check_capacity(request=request)
    assert availability is not None
    take(airline, 1, passengers=3, book=False)
    # Even the rest of a request whose capacity check came before the hold sees it.
    decision = airline.cmi_revenue_decision(request=request, availability=availability)
    expected = sum(
        Decimal(marginal_seat_revenue(FARES, MEANS, SDS, seats, nest=3)) for seats in (97, 96)
    )
    assert decision is not None
    assert decision.floor is not None
    assert decision.floor.amount == expected.quantize(Decimal("0.01"), rounding=ROUND_CEILING)
    assert q_seats(airline) == 13
    take(airline, 2, passengers=2)
    assert q_seats(airline) == 11
    assert q_seats(other) == 11


def test_a_request_is_answered_from_one_reading_for_a_second_at_most(
    airline: ReferenceAirline, other: ReferenceAirline, clock: Clock
) -> None:
    def floor(request: Request, availability: Availability) -> Decimal:
        decision = airline.cmi_revenue_decision(request=request, availability=availability)
        assert decision is not None
        assert decision.floor is not None
        return decision.floor.amount

    def expected(remaining: int) -> Decimal:
        exact = sum(
            Decimal(marginal_seat_revenue(FARES, MEANS, SDS, seats, nest=3))
            for seats in (remaining, remaining - 1)
        )
        return exact.quantize(Decimal("0.01"), rounding=ROUND_CEILING)

    request = make_request(passengers=2)
    availability = airline.cmi_check_capacity(request=request)
    assert availability is not None
    take(other, 1, passengers=3)
    # Revenue management goes on from the reading its capacity check confirmed...
    assert floor(request, availability) == expected(100)
    clock.now += 1
    # ...for a second; then it asks again, and sees the other connection's booking.
    assert floor(request, availability) == expected(97)


def test_an_expiring_hold_frees_its_seats_without_a_write(
    airline: ReferenceAirline, other: ReferenceAirline, clock: Clock
) -> None:
    take(other, 1, passengers=2, book=False)  # expires at START + 600
    assert q_seats(airline) == 14
    clock.now += 599
    assert q_seats(airline) == 14
    probe = sqlite3.connect(airline.database)
    (version,) = probe.execute("PRAGMA data_version").fetchone()
    clock.now += 1  # the hold's last moment has passed
    assert q_seats(airline) == 16
    # Nobody wrote: the snapshot knew when the hold would stop counting.
    assert probe.execute("PRAGMA data_version").fetchone() == (version,)
    probe.close()
    request = make_request()
    assert answers(airline, request) == fresh_answers(airline, request)


def test_the_earliest_of_several_holds_ends_the_reading(
    airline: ReferenceAirline, clock: Clock
) -> None:
    take(airline, 1, book=False)  # expires at START + 600
    clock.now += 100
    take(airline, 2, passengers=2, book=False)  # expires at START + 700
    assert q_seats(airline) == 13
    clock.now = START + 600
    assert q_seats(airline) == 14
    clock.now = START + 700
    assert q_seats(airline) == 16


def test_a_clock_that_goes_back_sees_holds_again(airline: ReferenceAirline, clock: Clock) -> None:
    take(airline, 1, passengers=2, book=False)
    clock.now += 600
    assert q_seats(airline) == 16
    clock.now -= 1  # the hold has one more second: it counts again
    assert q_seats(airline) == 14


def test_flights_added_later_are_found(airline: ReferenceAirline, other: ReferenceAirline) -> None:
    miami = make_request(destination="MIA")
    assert airline.cmi_check_capacity(request=miami) is None
    assert airline.cmi_advise(request=miami) is None
    other.add_flight(**GOOD_FLIGHT)  # another connection
    found = airline.cmi_check_capacity(request=miami)
    assert found is not None
    assert found.reference == "DL5-2026-07-01"
    airline.add_flight(**{**GOOD_FLIGHT, "date": dt.date(2026, 7, 2)})  # its own
    (advice,) = airline.cmi_advise(request=miami) or []
    assert advice.text.startswith("DL5 on 2026-07-02 has 10 seats in class Y")
    found = airline.cmi_check_capacity(request=miami)
    assert found is not None
    assert [p.date for p in found.alternatives] == [dt.date(2026, 7, 2)]


def test_the_cached_answers_are_the_uncached_ones(
    airline: ReferenceAirline, other: ReferenceAirline, clock: Clock
) -> None:
    # A small flight whose classes close as it sells, among the demo flights.
    airline.add_flight(
        origin="ATL",
        destination="CDG",
        date=dt.date(2026, 7, 2),
        flight="77",
        capacity=12,
        fares=[("Y", Decimal("900.00"), 4.0, 2.0), ("K", Decimal("400.00"), 8.0, 3.0)],
    )
    shapes = [
        {"passengers": passengers, "date": date}
        for passengers in (1, 2, 5)
        for date in ("2026-07-01", "2026-07-02", "2026-07-03")
    ]
    shapes.append({"date": "2026-07-02", "constraints": {"latest_date": "2026-07-02"}})
    for n in range(16):
        for shape in shapes:
            request = make_request(**shape)
            assert answers(airline, request) == fresh_answers(airline, request), (n, shape)
        who = airline if n % 2 else other
        take(who, n, passengers=1 + n % 3, date="2026-07-02", book=n % 4 != 3)
        clock.now += 150  # holds (600 s) expire along the way
    assert airline.cmi_check_capacity(request=make_request(date="2026-07-02")) is not None


def test_a_repeated_check_runs_one_statement(airline: ReferenceAirline) -> None:
    statements: list[str] = []
    airline._connection().set_trace_callback(statements.append)
    request = make_request()
    answers(airline, request)  # reads the window of seven days: one query
    assert [s for s in statements if "FROM flights" in s] != []
    assert sum("FROM flights" in s for s in statements) == 1
    statements.clear()
    answers(airline, make_request())
    # Capacity asks whether anything changed; the rest of the request goes on from it.
    assert statements == ["PRAGMA data_version"]


def test_the_snapshot_is_bounded(
    airline: ReferenceAirline, other: ReferenceAirline, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cmi_airline.plugin, "_SNAPSHOT_LIMIT", 5)
    for day in range(1, 31):
        request = make_request(date=f"2026-06-{day:02d}")
        assert answers(airline, request) == fresh_answers(airline, request)
    snapshot = airline._local.snapshot
    # Started afresh once past the limit: what is left is one request's reading.
    assert len(snapshot.days) + len(snapshot.answers) <= 5 + 7 + 1


def test_concurrent_requests_and_bookings_never_oversell(
    airline: ReferenceAirline, clock: Clock
) -> None:
    airline.add_flight(**{**GOOD_FLIGHT, "capacity": 12})
    errors: list[BaseException] = []
    booked: list[int] = []
    lock = threading.Lock()

    def shop(worker: int) -> None:
        try:
            for n in range(8):
                request = make_request(passengers=1 + n % 2, destination="MIA")
                _, _, quote, _ = answers(airline, request)
                if quote is None:
                    continue  # sold out: no offer
                offer = make_offer(request, quote, offer_id=f"off-{worker}-{n}")
                acceptance = accept(offer, f"acc-{worker}-{n}")
                try:
                    hold = airline.cmi_hold(offer=offer, acceptance=acceptance)
                except SoldOutError:
                    continue  # another thread took the seats since the offer
                airline.cmi_book(offer=offer, acceptance=acceptance, hold=hold)
                with lock:
                    booked.append(request.wanted.passengers)
        except BaseException as exc:  # collected and checked below
            errors.append(exc)

    threads = [threading.Thread(target=shop, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sum(booked) == airline.sold("DL5-2026-07-01") == 12
    sold_out = airline.cmi_check_capacity(request=make_request(destination="MIA"))
    assert sold_out is not None
    assert sold_out.available == 0
