"""The reference lender plugin, driven through a real adapter's hooks."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import sqlite3
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from cmi_sdk import (
    Acceptance,
    Adapter,
    Availability,
    ConfigurationError,
    Hold,
    LoanDetails,
    LoanProduct,
    Money,
    Offer,
    Quote,
    Request,
    RevenueDecision,
    Transaction,
    load_model,
)
from tests.fakes import CREDIT_KEY, CUSTOMER, Clock, band_claim, loan_request

ROOT = Path(__file__).resolve().parents[2]

try:
    import cmi_lender
except ImportError:  # not installed yet: use the source tree
    sys.path.insert(0, str(ROOT / "plugins"))
    import cmi_lender

ReferenceLender = cmi_lender.ReferenceLender
RiskTier = cmi_lender.RiskTier
LimitReached = cmi_lender.LimitReached
credit_evidence = cmi_lender.credit_evidence

T0 = dt.datetime(2026, 6, 1, 9, 0, tzinfo=dt.UTC)
LIMIT = "100000.00"


def usd(amount: str) -> Money:
    return Money(amount=Decimal(amount), currency="USD")


@pytest.fixture
def clock() -> Clock:
    return Clock(T0.timestamp())


@pytest.fixture
def lender(tmp_path: Path, clock: Clock) -> Iterator[Any]:
    with ReferenceLender(
        database=tmp_path / "lender.db", daily_limit=usd(LIMIT), credit_key=CREDIT_KEY, clock=clock
    ) as lender:
        yield lender


@pytest.fixture
def bank(lender: Any) -> Adapter:
    return Adapter(plugins=[lender])


def quote(bank: Adapter, request: Request) -> tuple[Availability, Any, Quote | None]:
    """Capacity, the revenue decision and the price, as the pipeline runs them."""
    hook = bank.plugin_manager.hook
    availability = hook.cmi_check_capacity(request=request)
    decision = hook.cmi_revenue_decision(request=request, availability=availability)
    price = hook.cmi_price(request=request, availability=availability, decision=decision)
    return availability, decision, price


def offer_for(bank: Adapter, request: Request, offer_id: str = "off-loan-1") -> Offer:
    _, decision, priced = quote(bank, request)
    assert decision.accept, decision.reason
    assert priced is not None
    assert priced.product is not None
    return load_model(
        Offer,
        {
            "id": offer_id,
            "request_id": request.id,
            "kind": "loan",
            "firm": "bank.example",
            "customer_ref": request.customer_ref,
            "reply_to": request.reply_to,
            "created_at": "2026-06-01T09:00:01Z",
            "valid_from": "2026-06-01T09:00:01Z",
            "valid_until": "2026-06-02T09:00:01Z",
            "product": priced.product.model_dump(mode="json"),
            "items": [item.model_dump(mode="json") for item in priced.items],
            "price": priced.total.model_dump(mode="json"),
        },
    )


def acceptance_of(offer: Offer, acceptance_id: str = "acc-1") -> Acceptance:
    return Acceptance(
        id=acceptance_id,
        offer_id=offer.id,
        customer_ref=offer.customer_ref,
        accepted_at=T0 + dt.timedelta(minutes=1),
    )


def take_loan(bank: Adapter, amount: str, acceptance_id: str) -> Transaction:
    hook = bank.plugin_manager.hook
    offer = offer_for(bank, loan_request(amount), offer_id=f"off-{acceptance_id}")
    acceptance = acceptance_of(offer, acceptance_id)
    held = hook.cmi_hold(offer=offer, acceptance=acceptance)
    tx: Transaction = hook.cmi_book(offer=offer, acceptance=acceptance, hold=held)
    return tx


# -- configuration --------------------------------------------------------------------------


def test_default_tiers_are_usd_a_to_d() -> None:
    tiers = cmi_lender.DEFAULT_RISK_TIERS
    assert [t.band for t in tiers] == ["A", "B", "C", "D"]
    assert [t.apr for t in tiers] == [Decimal(x) for x in ("6.95", "9.45", "13.90", "19.90")]
    assert {t.max_amount.currency for t in tiers if t.max_amount} == {"USD"}
    assert tiers[-1].max_amount == usd("10000.00")
    assert tiers[-1].max_term_months == 36


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tiers": ()}, "at least one risk tier"),
        ({"tiers": [RiskTier("A", Decimal(5)), RiskTier("A", Decimal(6))]}, "two risk tiers"),
        ({"default_band": "E"}, "default_band 'E'"),
        ({"daily_limit": usd("0.00")}, "daily_limit"),
        ({"daily_limit": Money(amount=Decimal(1000), currency="EUR")}, "lends in EUR"),
        ({"hold_seconds": 0}, "hold_seconds"),
        ({"credit_key": b""}, "credit_key"),
    ],
)
def test_contradictory_configuration_is_refused(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    config: dict[str, Any] = {"database": tmp_path / "l.db", "daily_limit": usd(LIMIT)}
    with pytest.raises(ConfigurationError, match=message):
        ReferenceLender(**{**config, **options})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("A", 6.95), "finite Decimal"),
        (("A", Decimal(101)), "0-100"),
        (("A", Decimal(5), usd("0.00")), "max_amount"),
        (("A", Decimal(5), None, 361), "max_term_months"),
        (("", Decimal(5)), "needs a band"),
    ],
)
def test_bad_risk_tiers_are_refused(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RiskTier(*args)


# -- stage 1: validation --------------------------------------------------------------------


def test_a_loan_in_the_lenders_currency_is_valid(bank: Adapter) -> None:
    assert bank.plugin_manager.hook.cmi_validate_request(request=loan_request()) == [[]]


@pytest.mark.parametrize(
    ("amount", "term", "currency", "problem"),
    [
        ("30000.00", 60, "EUR", "this lender lends in USD, not EUR"),
        ("30000.00", 361, "USD", "a term of 361 months is over this lender's maximum of 360"),
        ("0.00", 60, "USD", "the amount of a loan must be more than zero"),
        ("-5.00", 60, "USD", "the amount of a loan must be more than zero"),
    ],
)
def test_validation_names_the_problem(
    bank: Adapter, amount: str, term: int, currency: str, problem: str
) -> None:
    request = loan_request(amount, term, currency=currency)
    [problems] = bank.plugin_manager.hook.cmi_validate_request(request=request)
    assert len(problems) == 1
    assert problems[0].startswith(problem)


def test_validation_lists_every_problem(bank: Adapter) -> None:
    request = loan_request("-1.00", 480, currency="EUR")
    [problems] = bank.plugin_manager.hook.cmi_validate_request(request=request)
    assert len(problems) == 3


# -- stage 2: claims ------------------------------------------------------------------------


def test_a_credit_band_with_the_bureaus_evidence_is_verified(bank: Adapter) -> None:
    [[check]] = bank.plugin_manager.hook.cmi_verify_claims(request=loan_request(band="B"))
    assert check.verified
    assert check.claim.value == "B"
    assert check.reason is None


def test_evidence_is_the_hex_hmac_of_customer_and_band() -> None:
    evidence = credit_evidence(b"k", "cust-1", "A")
    assert evidence == hmac.new(b"k", b"cust-1:A", hashlib.sha256).hexdigest()
    assert evidence != credit_evidence(b"k", "cust-2", "A")
    assert evidence != credit_evidence(b"k", "cust-1", "B")


@pytest.mark.parametrize(
    ("claim", "reason"),
    [
        (band_claim("A", key=b"someone-elses-key"), "does not match"),
        (band_claim("A", customer="cust-other"), "does not match"),
        ({**band_claim("C"), "value": "A"}, "does not match"),
        ({"type": "credit-band", "value": "A", "evidence": "é" * 64}, "does not match"),
        ({"type": "credit-band", "value": "A"}, "needs evidence"),
        (band_claim("E"), "band 'E' is not one this lender prices (A, B, C, D)"),
    ],
    ids=["wrong-key", "other-customer", "upgraded-band", "non-ascii", "no-evidence", "band-E"],
)
def test_forged_or_unknown_credit_bands_are_not_verified(
    bank: Adapter, claim: dict[str, str], reason: str
) -> None:
    request = loan_request(claims=[claim])
    [[check]] = bank.plugin_manager.hook.cmi_verify_claims(request=request)
    assert not check.verified
    assert reason in check.reason
    # and a forged band is not priced: no band, no offer
    _, decision, priced = quote(bank, request)
    assert not decision.accept
    assert priced is None


def test_without_a_credit_key_no_band_is_verified(tmp_path: Path) -> None:
    with ReferenceLender(database=tmp_path / "l.db", daily_limit=usd(LIMIT)) as lender:
        [check] = lender.cmi_verify_claims(request=loan_request())
    assert not check.verified
    assert "no key" in check.reason


def test_other_claims_are_left_to_other_plugins(bank: Adapter) -> None:
    claims = [{"type": "loyalty-tier", "value": "gold"}, band_claim("A")]
    [checks] = bank.plugin_manager.hook.cmi_verify_claims(request=loan_request(claims=claims))
    assert [c.claim.type for c in checks] == ["credit-band"]


# -- stage 3: capacity ----------------------------------------------------------------------


def test_capacity_within_the_daily_limit(bank: Adapter) -> None:
    availability = bank.plugin_manager.hook.cmi_check_capacity(request=loan_request())
    assert availability.available == 1
    assert availability.reference == "lending-2026-06-01"
    assert availability.product == LoanProduct(
        principal=usd("30000.00"), term_months=60, apr=Decimal("6.95")
    )


@pytest.mark.parametrize(
    ("band", "apr"), [("A", "6.95"), ("B", "9.45"), ("C", "13.90"), ("D", "19.90")]
)
def test_the_apr_is_the_bands_tier(bank: Adapter, band: str, apr: str) -> None:
    availability, decision, priced = quote(bank, loan_request("5000.00", 24, band=band))
    assert availability.product.apr == Decimal(apr)
    assert decision.accept
    assert priced.product.apr == Decimal(apr)


def test_of_several_verified_bands_the_riskiest_counts(bank: Adapter) -> None:
    request = loan_request("5000.00", 24, claims=[band_claim("A"), band_claim("C")])
    _, _, priced = quote(bank, request)
    assert priced.product.apr == Decimal("13.90")


def test_without_a_band_capacity_shows_the_highest_apr(bank: Adapter) -> None:
    availability = bank.plugin_manager.hook.cmi_check_capacity(request=loan_request(band=None))
    assert availability.product.apr == Decimal("19.90")


def test_capacity_over_the_daily_limit(bank: Adapter) -> None:
    hook = bank.plugin_manager.hook
    over = hook.cmi_check_capacity(request=loan_request("100000.01"))
    assert over.available == 0
    exact = hook.cmi_check_capacity(request=loan_request("100000.00"))
    assert exact.available == 1
    take_loan(bank, "80000.00", "acc-1")
    assert hook.cmi_check_capacity(request=loan_request("20000.00")).available == 1
    assert hook.cmi_check_capacity(request=loan_request("20000.01")).available == 0


def test_the_limit_resets_the_next_utc_day(bank: Adapter, lender: Any, clock: Clock) -> None:
    hook = bank.plugin_manager.hook
    clock.now = dt.datetime(2026, 6, 1, 23, 59, tzinfo=dt.UTC).timestamp()
    take_loan(bank, "90000.00", "acc-1")
    assert hook.cmi_check_capacity(request=loan_request()).available == 0
    assert lender.remaining() == usd("10000.00")
    clock.advance(60)  # 2026-06-02 00:00 UTC
    availability = hook.cmi_check_capacity(request=loan_request())
    assert availability.available == 1
    assert availability.reference == "lending-2026-06-02"
    assert lender.remaining() == usd(LIMIT)


def test_a_loan_in_another_currency_is_not_the_lenders(bank: Adapter) -> None:
    request = loan_request(currency="EUR")
    assert bank.plugin_manager.hook.cmi_check_capacity(request=request) is None


# -- stage 4: revenue decision --------------------------------------------------------------


def test_the_decision_accepts_with_no_floor(bank: Adapter) -> None:
    _, decision, _ = quote(bank, loan_request())
    assert decision.accept
    assert decision.floor is None


@pytest.mark.parametrize(
    ("amount", "term", "band", "reason"),
    [
        ("10000.01", 36, "D", "amount over the D tier's maximum of 10000.00 USD"),
        ("10000.00", 37, "D", "term over the D tier's maximum of 36 months"),
        ("30000.00", 360, "B", "term over the B tier's maximum of 120 months"),
        ("30000.00", 60, None, "no verified credit band"),
        ("100000.01", 60, "A", "today's lending limit is reached"),
    ],
)
def test_the_decision_refuses_with_a_reason(
    bank: Adapter, amount: str, term: int, band: str | None, reason: str
) -> None:
    _, decision, priced = quote(bank, loan_request(amount, term, band=band))
    assert not decision.accept
    assert decision.reason.startswith(reason)
    assert priced is None


def test_the_decision_refuses_when_todays_limit_is_used(bank: Adapter) -> None:
    take_loan(bank, "90000.00", "acc-1")
    _, decision, _ = quote(bank, loan_request("10000.01"))
    assert decision.reason == "today's lending limit is reached"


def test_a_default_band_serves_customers_without_one(tmp_path: Path, clock: Clock) -> None:
    with ReferenceLender(
        database=tmp_path / "l.db", daily_limit=usd(LIMIT), default_band="C", clock=clock
    ) as lender:
        bank = Adapter(plugins=[lender])
        _, decision, priced = quote(bank, loan_request("5000.00", 24, band=None))
    assert decision.accept
    assert priced.product.apr == Decimal("13.90")


# -- stage 5 and 8: price and validity ------------------------------------------------------


def test_the_price_is_the_principal_at_the_bands_apr(bank: Adapter) -> None:
    _, _, priced = quote(bank, loan_request("30000.00", 60, band="B"))
    [item] = priced.items
    assert item.description == "Loan of 30000.00 USD over 60 months at 9.45 % APR"
    assert item.quantity == 1
    assert item.unit_price == item.amount == usd("30000.00")
    assert priced.total == usd("30000.00")
    assert priced.product == LoanProduct(
        principal=usd("30000.00"), term_months=60, apr=Decimal("9.45")
    )


def test_a_loan_offer_locks_its_rate_for_a_day(bank: Adapter) -> None:
    request = loan_request()
    offer = offer_for(bank, request)
    assert bank.plugin_manager.hook.cmi_offer_validity(request=request, offer=offer) == [
        dt.timedelta(hours=24)
    ]


# -- acceptance: hold, book, release --------------------------------------------------------


def test_hold_and_book_make_a_loan_transaction(bank: Adapter, lender: Any) -> None:
    hook = bank.plugin_manager.hook
    offer = offer_for(bank, loan_request("30000.00", 60, band="B"))
    acceptance = acceptance_of(offer)
    held = hook.cmi_hold(offer=offer, acceptance=acceptance)
    assert isinstance(held, Hold)
    assert held.expires_at == T0 + dt.timedelta(seconds=600)
    assert lender.remaining() == usd("70000.00")

    tx = hook.cmi_book(offer=offer, acceptance=acceptance, hold=held)
    assert tx.kind == "loan"
    assert tx.id.startswith("LN-")
    assert tx.occurred_at == T0
    assert tx.firm == "bank.example"
    assert tx.customer_ref == CUSTOMER
    assert tx.total == offer.price == usd("30000.00")
    assert tx.details == LoanDetails(
        principal=usd("30000.00"), term_months=60, apr=Decimal("9.45"), account="0000000001"
    )
    assert lender.remaining() == usd("70000.00")  # the hold became the loan

    xml = bank.render(tx, standard="cmi", document_type="transaction")
    assert tx.id.encode() in xml
    assert b"9.45" in xml
    assert b"0000000001" in xml

    with sqlite3.connect(lender.path) as db:
        assert db.execute("SELECT COUNT(*) FROM holds").fetchone() == (0,)
        row = db.execute(
            "SELECT acceptance_id, customer_ref, principal_minor, currency, term_months, apr,"
            " booked_on FROM loans"
        ).fetchone()
    db.close()
    assert row == ("acc-1", CUSTOMER, 3_000_000, "USD", 60, "9.45", "2026-06-01")


def test_booking_the_same_acceptance_again_returns_the_same_loan(bank: Adapter) -> None:
    hook = bank.plugin_manager.hook
    offer = offer_for(bank, loan_request())
    acceptance = acceptance_of(offer)
    held = hook.cmi_hold(offer=offer, acceptance=acceptance)
    assert hook.cmi_hold(offer=offer, acceptance=acceptance) == held
    first = hook.cmi_book(offer=offer, acceptance=acceptance, hold=held)
    again = hook.cmi_book(offer=offer, acceptance=acceptance, hold=held)
    assert again == first


def test_a_hold_over_the_limit_is_refused(bank: Adapter) -> None:
    hook = bank.plugin_manager.hook
    take_loan(bank, "80000.00", "acc-1")
    offer = offer_for(bank, loan_request("20000.00"))
    # another acceptance takes the room between the offer and this acceptance
    take_loan(bank, "10000.00", "acc-2")
    with pytest.raises(LimitReached, match="today's lending limit is reached") as caught:
        hook.cmi_hold(offer=offer, acceptance=acceptance_of(offer, "acc-3"))
    assert caught.value.requested == usd("20000.00")
    assert caught.value.remaining == usd("10000.00")


def test_concurrent_holds_never_exceed_the_limit(bank: Adapter, lender: Any) -> None:
    hook = bank.plugin_manager.hook
    offer = offer_for(bank, loan_request("30000.00"))
    start = threading.Barrier(8)

    def hold(n: int) -> Hold | None:
        start.wait()
        try:
            held: Hold = hook.cmi_hold(offer=offer, acceptance=acceptance_of(offer, f"acc-{n}"))
        except LimitReached:
            return None
        return held

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(hold, range(8)))
    assert sum(r is not None for r in results) == 3
    assert lender.remaining() == usd("10000.00")


def test_expired_holds_free_capacity(bank: Adapter, lender: Any, clock: Clock) -> None:
    hook = bank.plugin_manager.hook
    offer = offer_for(bank, loan_request("30000.00"))
    for n in range(3):
        hook.cmi_hold(offer=offer, acceptance=acceptance_of(offer, f"acc-{n}"))
    with pytest.raises(LimitReached):
        hook.cmi_hold(offer=offer, acceptance=acceptance_of(offer, "acc-3"))
    assert hook.cmi_check_capacity(request=loan_request()).available == 0
    clock.advance(600)  # the holds expire
    assert lender.remaining() == usd(LIMIT)
    assert hook.cmi_check_capacity(request=loan_request()).available == 1
    assert hook.cmi_hold(offer=offer, acceptance=acceptance_of(offer, "acc-3")) is not None


def test_booking_after_the_hold_expired_checks_the_limit_again(bank: Adapter, clock: Clock) -> None:
    hook = bank.plugin_manager.hook
    offer = offer_for(bank, loan_request("30000.00"))
    late = acceptance_of(offer, "acc-late")
    held = hook.cmi_hold(offer=offer, acceptance=late)
    clock.advance(601)
    for n in range(3):  # others take the whole day's room meanwhile
        hook.cmi_hold(offer=offer, acceptance=acceptance_of(offer, f"acc-{n}"))
    with pytest.raises(LimitReached):
        hook.cmi_book(offer=offer, acceptance=late, hold=held)


def test_release_frees_the_hold(bank: Adapter, lender: Any) -> None:
    hook = bank.plugin_manager.hook
    offer = offer_for(bank, loan_request("30000.00"))
    held = hook.cmi_hold(offer=offer, acceptance=acceptance_of(offer))
    assert lender.remaining() == usd("70000.00")
    assert hook.cmi_release(offer=offer, hold=held) == []
    assert lender.remaining() == usd(LIMIT)


def test_connections_of_finished_threads_are_closed(lender: Any) -> None:
    def use() -> Money:
        remaining: Money = lender.remaining()
        return remaining

    worker = threading.Thread(target=use)
    worker.start()
    worker.join()
    assert len(lender._open) == 1  # the worker's went with its thread; this thread's stays
    lender.close()
    assert len(lender._open) == 0
    assert lender.remaining() == usd(LIMIT)  # reopens after close


# -- not a loan -----------------------------------------------------------------------------


def test_every_hook_answers_none_for_what_is_not_a_loan(lender: Any, examples_dir: Path) -> None:
    request = load_model(Request, (examples_dir / "request.json").read_text(encoding="utf-8"))
    offer = load_model(Offer, json.loads((examples_dir / "offer.json").read_text("utf-8")))
    acceptance = acceptance_of(offer)
    availability = Availability(product=offer.product, available=9)
    held = Hold(id="hold-1", expires_at=T0)
    assert lender.cmi_validate_request(request=request) is None
    assert lender.cmi_verify_claims(request=request) is None
    assert lender.cmi_check_capacity(request=request) is None
    assert lender.cmi_revenue_decision(request=request, availability=availability) is None
    decision = RevenueDecision(accept=True)
    assert lender.cmi_price(request=request, decision=decision) is None
    assert lender.cmi_offer_validity(offer=offer) is None
    assert lender.cmi_hold(offer=offer, acceptance=acceptance) is None
    assert lender.cmi_book(offer=offer, acceptance=acceptance, hold=held) is None
    assert lender.cmi_release(offer=offer, hold=held) is None
