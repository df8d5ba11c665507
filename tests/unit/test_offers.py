"""The request-to-offer pipeline and acceptance, with a small firm written as plugins:
every hook, the floor, rewards, budgets that fail closed, failing and async plugins,
idempotent acceptance."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import sqlite3
import threading
import time
from collections.abc import Callable, Generator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from cmi_sdk import (
    Acceptance,
    AcceptanceError,
    Adapter,
    Advice,
    LineItem,
    Offer,
    OfferExpiredError,
    OfferNotFoundError,
    PluginFailedError,
    Quote,
    ReplayedMessageError,
    Request,
    RequestRefusedError,
    RevenueDecision,
    StageTimeoutError,
    Transaction,
    hookimpl,
)
from cmi_sdk._offers import Prepared
from cmi_sdk.outbox import SeenMessage
from cmi_sdk.signing import verify_document
from tests.fakes import Shop, flight_request, usd
from tests.support import emitting_adapter, register, signer

NOW = time.time()


@pytest.fixture
def shop() -> Shop:
    return Shop()


@pytest.fixture
def shop_adapter(tmp_path: Path, shop: Shop) -> Generator[Adapter, None, None]:
    adapter = emitting_adapter(tmp_path, plugins=[shop], request_budget=2.0)
    yield adapter
    adapter.close()


def _accept(offer: Offer, acceptance_id: str = "acc-1") -> Acceptance:
    return Acceptance(
        id=acceptance_id,
        offer_id=offer.id,
        customer_ref=offer.customer_ref,
        accepted_at=dt.datetime.now(dt.UTC),
    )


def test_the_pipeline_runs_every_stage_in_order(shop_adapter: Adapter, shop: Shop) -> None:
    answer = shop_adapter.answer_request(flight_request())
    (offer,) = answer.offers.offers
    assert shop.calls == [
        "validate", "claims", "capacity", "revenue", "price", "rewards", "advice", "validity",
    ]  # fmt: skip
    # Rewards largest first, cut to stop at the floor: 451.89 - 50.00 - 1.89 = 400.00.
    assert [(r.code, r.amount.amount) for r in offer.rewards] == [
        ("anniversary", Decimal("50.00")),
        ("gold", Decimal("1.89")),
    ]
    assert offer.price == usd("400.00")
    assert [i.amount.amount for i in offer.items] == [
        Decimal("451.89"),
        Decimal("-50.00"),
        Decimal("-1.89"),
    ]
    assert offer.advice[0].code == "alt-date"
    assert offer.valid_until - offer.valid_from == dt.timedelta(minutes=10)  # shortest wins
    # The answer and the offer are signed, and the offer is kept with its request.
    verify_document(answer.xml, signer().certificate)
    assert shop_adapter.parse(answer.xml) == answer.offers
    stored = shop_adapter.get_offer(offer.id)
    assert stored.offer == offer
    assert stored.request.id == "req-1"
    verify_document(stored.xml, signer().certificate)


def test_an_offer_reserves_nothing(shop_adapter: Adapter, shop: Shop) -> None:
    for i in range(5):  # more offers than seats
        assert shop_adapter.answer_request(flight_request(id=f"req-{i}")).offers.offers
    assert shop.booked == []
    assert shop.held == {}


def test_validation_problems_refuse_the_request(shop_adapter: Adapter, shop: Shop) -> None:
    request = flight_request(wanted={"origin": "JFK", "destination": "CDG", "date": "2026-12-01"})
    with pytest.raises(RequestRefusedError, match="we only fly from ATL") as info:
        shop_adapter.answer_request(request)
    assert info.value.problem == "invalid-request"
    assert "capacity" not in shop.calls


def test_sold_out_and_refused_by_revenue_management_decline(
    shop_adapter: Adapter, shop: Shop
) -> None:
    shop.seats = 0
    answer = shop_adapter.answer_request(flight_request())
    assert answer.offers.offers == ()
    assert answer.offers.declined == "sold out"
    verify_document(answer.xml, signer().certificate)


def test_not_the_firms_product_declines(shop_adapter: Adapter) -> None:
    loan = flight_request(
        kind="loan", wanted={"amount": {"amount": "1000.00", "currency": "USD"}, "term_months": 12}
    )
    answer = shop_adapter.answer_request(loan)
    assert answer.offers.declined == "the firm has nothing to offer for this request"


def test_the_customers_maximum_price_is_honoured(shop_adapter: Adapter) -> None:
    request = flight_request(
        claims=[], constraints={"max_price": {"amount": "300.00", "currency": "USD"}}
    )
    answer = shop_adapter.answer_request(request)
    assert answer.offers.declined == "the best price, 451.89 USD, is above 300.00 USD"


def test_a_price_below_the_floor_makes_no_offer(
    shop_adapter: Adapter, shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    shop.fare = "350.00"
    with pytest.raises(PluginFailedError, match="below the floor") as info:
        shop_adapter.answer_request(flight_request())
    assert info.value.problem == "price-below-floor"
    assert "priced 350.00 USD below the floor" in caplog.text


class SlowPricing:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.finished = threading.Event()

    @hookimpl(tryfirst=True)
    def cmi_price(self) -> Quote:
        time.sleep(self.seconds)
        self.finished.set()
        fare = usd("451.89")
        return Quote(items=(LineItem(description="late", unit_price=fare, amount=fare),))


def test_a_slow_pricing_plugin_fails_closed_within_its_budget(tmp_path: Path, shop: Shop) -> None:
    slow = SlowPricing(3.0)
    adapter = emitting_adapter(tmp_path, plugins=[shop, slow], request_budget=0.5)
    started = time.monotonic()
    with pytest.raises(StageTimeoutError) as info:
        adapter.answer_request(flight_request())
    elapsed = time.monotonic() - started
    assert info.value.problem == "pricing-timeout"
    # Pricing must be done by 80 % of the budget (the shares up to pricing): 0.4 s.
    assert elapsed < 0.5
    assert not slow.finished.is_set()
    adapter.close()


def test_the_deadline_comes_from_respond_by(tmp_path: Path, shop: Shop) -> None:
    slow = SlowPricing(0.5)
    adapter = emitting_adapter(tmp_path, plugins=[shop, slow], request_budget=10.0)
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(milliseconds=300)
    with pytest.raises(StageTimeoutError) as info:
        adapter.answer_request(flight_request(respond_by=soon.isoformat()))
    assert info.value.problem == "pricing-timeout"
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    with pytest.raises(RequestRefusedError) as info:
        adapter.answer_request(
            flight_request(
                created_at=(past - dt.timedelta(seconds=5)).isoformat(), respond_by=past.isoformat()
            )
        )
    assert info.value.problem == "deadline-passed"
    adapter.close()


class SlowCapacity:
    @hookimpl(tryfirst=True)
    def cmi_check_capacity(self) -> None:
        time.sleep(2)


def test_a_slow_capacity_system_fails_closed(tmp_path: Path, shop: Shop) -> None:
    adapter = emitting_adapter(tmp_path, plugins=[shop, SlowCapacity()], request_budget=0.4)
    with pytest.raises(StageTimeoutError) as info:
        adapter.answer_request(flight_request())
    assert info.value.problem == "capacity-timeout"
    adapter.close()


def test_a_slow_capacity_system_fails_closed_at_its_own_deadline_on_a_loop(
    tmp_path: Path, shop: Shop
) -> None:
    # The loop's wait began before the worker entered the capacity stage: it must still
    # refuse at the stage's deadline, not wait for the slow system or the longest budget.
    adapter = emitting_adapter(tmp_path, plugins=[shop, SlowCapacity()], request_budget=0.4)

    def prepare() -> tuple[Request, None]:
        time.sleep(0.05)  # parsing and authentication take a while on the worker
        return flight_request(), None

    started = time.monotonic()
    with pytest.raises(StageTimeoutError) as info:
        asyncio.run(adapter.answer_request_async(prepare))
    assert info.value.problem == "capacity-timeout"
    assert time.monotonic() - started < 1.5  # SlowCapacity takes 2 s
    adapter.close()


class Broken:
    @hookimpl(tryfirst=True)
    def cmi_revenue_decision(self) -> RevenueDecision:
        raise ZeroDivisionError("the revenue system divided by zero")


def test_a_failing_plugin_is_named_and_nothing_crashes(
    tmp_path: Path, shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    adapter = emitting_adapter(tmp_path, plugins=[shop, Broken()])
    name = adapter.plugin_manager.get_name(
        next(p for p in adapter.plugin_manager.get_plugins() if isinstance(p, Broken))
    )
    with pytest.raises(PluginFailedError) as info:
        adapter.answer_request(flight_request())
    assert info.value.problem == "plugin-failed"
    assert info.value.plugin == name
    assert f"cmi_revenue_decision failed in plugin {name}" in caplog.text
    assert "ZeroDivisionError" in caplog.text
    # The adapter still answers the next request once the plugin is gone.
    adapter.plugin_manager.unregister(name=name)
    assert adapter.answer_request(flight_request(id="req-2")).offers.offers
    adapter.close()


class AsyncFirm:
    """Hook implementations written as coroutines."""

    @hookimpl(tryfirst=True)
    async def cmi_price(self) -> Quote:
        fare = usd("480.00")
        return Quote(items=(LineItem(description="async fare", unit_price=fare, amount=fare),))

    @hookimpl
    async def cmi_advise(self) -> list[Advice]:
        return [Advice(code="async", text="from a coroutine")]


def test_async_hook_implementations_work(tmp_path: Path, shop: Shop) -> None:
    adapter = emitting_adapter(tmp_path, plugins=[shop, AsyncFirm()])
    (offer,) = adapter.answer_request(flight_request(claims=[])).offers.offers
    assert offer.price == usd("480.00")
    assert {a.code for a in offer.advice} == {"alt-date", "async"}
    adapter.close()


class PooledAsyncFirm:
    """An async plugin holding a loop-bound resource (as a database pool or an HTTP client
    is), made at its first call and used by every later one."""

    def __init__(self) -> None:
        # Each loop a call ran on (held, so no two share an id): a pool made on the first
        # works on the others only if they are the same loop.
        self.loops: set[asyncio.AbstractEventLoop] = set()

    @hookimpl
    async def cmi_advise(self) -> list[Advice]:
        self.loops.add(asyncio.get_running_loop())
        await asyncio.sleep(0.005)
        return [Advice(code="pooled", text="from a pooled client")]


def test_an_async_plugins_loop_bound_resources_outlive_one_request(
    tmp_path: Path, shop: Shop
) -> None:
    firm = PooledAsyncFirm()
    # A budget no busy machine misses: this test is about the loop, not the deadline.
    adapter = emitting_adapter(tmp_path, plugins=[shop, firm], request_budget=60.0)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(lambda _: adapter.answer_request(flight_request(claims=[])), range(8))
            )
        for answer in answers:
            (offer,) = answer.offers.offers
            assert "pooled" in {a.code for a in offer.advice}
        assert len(firm.loops) == 1
    finally:
        adapter.close()
    # Closing the adapter stops the loop.
    assert all(loop.is_closed() for loop in firm.loops)


class Timing:
    """A ``wrapper=True`` hook implementation: timing and audit around pricing."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float]] = []

    @hookimpl(wrapper=True)
    def cmi_price(self, request: Request) -> Generator[None, Quote, Quote]:
        started = time.perf_counter()
        quote = yield
        self.seen.append((request.id, time.perf_counter() - started))
        return quote


def test_wrappers_see_every_pricing_call(tmp_path: Path, shop: Shop) -> None:
    timing = Timing()
    adapter = emitting_adapter(tmp_path, plugins=[shop, timing])
    adapter.answer_request(flight_request())
    assert [request_id for request_id, _ in timing.seen] == ["req-1"]
    adapter.close()


def test_acceptance_books_once_and_emits(shop_adapter: Adapter, shop: Shop) -> None:
    register(shop_adapter, destination="http://127.0.0.1:9/inbox")
    (offer,) = shop_adapter.answer_request(flight_request()).offers.offers
    result = shop_adapter.accept_offer(offer.id, _accept(offer))
    assert result.outcome == "booked"
    assert result.transaction is not None
    assert result.transaction.total == offer.price
    assert len(result.documents) == 1  # the ticket, under the customer's terms
    assert shop_adapter.store.get_row(result.documents[0]).transaction_id == result.transaction_id
    again = shop_adapter.accept_offer(offer.id, _accept(offer))
    assert again.replayed
    assert again.transaction_id == result.transaction_id
    assert shop.booked == ["acc-1"]


def test_an_expired_offer_is_refused(tmp_path: Path, shop: Shop) -> None:
    clock = [time.time()]
    adapter = emitting_adapter(tmp_path, plugins=[shop], clock=lambda: clock[0])
    (offer,) = adapter.answer_request(flight_request()).offers.offers
    clock[0] += 11 * 60
    with pytest.raises(OfferExpiredError):
        adapter.accept_offer(offer.id, _accept(offer))
    assert shop.expired == [offer.id]
    assert shop.booked == []
    # The refusal is the answer to a retry too; nothing is booked then either.
    retry = adapter.accept_offer(offer.id, _accept(offer))
    assert (retry.outcome, retry.problem) == ("refused", "offer-expired")
    adapter.close()


def test_a_failed_hold_books_nothing(shop_adapter: Adapter, shop: Shop) -> None:
    first, second = (
        shop_adapter.answer_request(flight_request(id=f"req-{i}")).offers.offers[0]
        for i in range(2)
    )
    shop.seats = 1
    shop_adapter.accept_offer(first.id, _accept(first, "acc-a"))
    with pytest.raises(AcceptanceError) as info:
        shop_adapter.accept_offer(second.id, _accept(second, "acc-b"))
    assert info.value.problem == "no-longer-available"
    assert shop.booked == ["acc-a"]


class FailingBooking:
    @hookimpl(tryfirst=True)
    def cmi_book(self) -> Transaction:
        raise ConnectionError("the reservation system is down")


def test_a_failed_booking_releases_its_hold(tmp_path: Path, shop: Shop) -> None:
    adapter = emitting_adapter(tmp_path, plugins=[shop, FailingBooking()])
    (offer,) = adapter.answer_request(flight_request()).offers.offers
    with pytest.raises(PluginFailedError) as info:
        adapter.accept_offer(offer.id, _accept(offer))
    assert info.value.problem == "not-booked"
    assert shop.released == ["hold-acc-1"]
    adapter.close()


def test_acceptances_are_checked_against_the_offer(shop_adapter: Adapter) -> None:
    (offer,) = shop_adapter.answer_request(flight_request()).offers.offers
    with pytest.raises(OfferNotFoundError):
        shop_adapter.accept_offer("off_nope", _accept(offer))
    stranger = _accept(offer).model_copy(update={"customer_ref": "someone-else"})
    with pytest.raises(AcceptanceError, match="not from the customer"):
        shop_adapter.accept_offer(offer.id, stranger)
    shop_adapter.accept_offer(offer.id, _accept(offer, "acc-x"))
    (other,) = shop_adapter.answer_request(flight_request(id="req-2")).offers.offers
    with pytest.raises(AcceptanceError, match="was given for another offer") as info:
        shop_adapter.accept_offer(other.id, _accept(other, "acc-x"))  # the same id, another offer
    assert info.value.problem == "acceptance-conflict"


def test_concurrent_acceptances_of_the_last_seat_book_once(
    shop_adapter: Adapter, shop: Shop
) -> None:
    offers = [
        shop_adapter.answer_request(flight_request(id=f"req-{i}")).offers.offers[0]
        for i in range(6)
    ]
    shop.seats = 1
    outcomes: list[str] = []

    def accept(offer: Offer, n: int) -> None:
        try:
            outcomes.append(shop_adapter.accept_offer(offer.id, _accept(offer, f"acc-{n}")).outcome)
        except AcceptanceError as exc:
            outcomes.append(exc.problem)

    threads = [threading.Thread(target=accept, args=(o, n)) for n, o in enumerate(offers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert outcomes.count("booked") == 1
    assert len(shop.booked) == 1


def _asked(request: Request, message: SeenMessage) -> Callable[[], Prepared]:
    return lambda: Prepared(request, "relay", message)


def test_a_requests_message_id_is_kept_in_the_commit_of_its_offers(
    shop_adapter: Adapter, tmp_path: Path
) -> None:
    now = time.time()
    seen = SeenMessage("intermediary:relay", "msg_1", now + 600, now)
    answer = asyncio.run(shop_adapter.answer_request_async(_asked(flight_request(), seen)))
    (offer,) = answer.offers.offers
    assert shop_adapter.store.message_seen("intermediary:relay", "msg_1", now=now)
    assert shop_adapter.get_offer(offer.id).intermediary == "relay"
    # A replay that raced past the endpoint's check: refused at the commit, nothing kept.
    with sqlite3.connect(tmp_path / "cmi.db") as conn:
        before = conn.execute("SELECT COUNT(*) FROM cmi_offers").fetchone()[0]
    with pytest.raises(ReplayedMessageError):
        asyncio.run(shop_adapter.answer_request_async(_asked(flight_request(id="req-2"), seen)))
    with sqlite3.connect(tmp_path / "cmi.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM cmi_offers").fetchone()[0] == before


def test_a_declined_answer_remembers_its_message_id_too(shop_adapter: Adapter, shop: Shop) -> None:
    shop.seats = 0  # sold out: an answer without offers
    now = time.time()
    seen = SeenMessage("intermediary:relay", "msg_declined", now + 600, now)
    answer = asyncio.run(shop_adapter.answer_request_async(_asked(flight_request(), seen)))
    assert answer.offers.declined == "sold out"
    assert shop_adapter.store.message_seen("intermediary:relay", "msg_declined", now=now)
    with pytest.raises(ReplayedMessageError):
        asyncio.run(shop_adapter.answer_request_async(_asked(flight_request(), seen)))


def test_a_refused_request_remembers_nothing(shop_adapter: Adapter) -> None:
    now = time.time()
    seen = SeenMessage("intermediary:relay", "msg_refused", now + 600, now)
    request = flight_request(wanted={"origin": "JFK", "destination": "CDG", "date": "2026-12-01"})
    with pytest.raises(RequestRefusedError):
        asyncio.run(shop_adapter.answer_request_async(_asked(request, seen)))
    assert not shop_adapter.store.message_seen("intermediary:relay", "msg_refused", now=now)


def test_an_expired_message_id_counts_as_new(shop_adapter: Adapter) -> None:
    store = shop_adapter.store
    store.add_offers([], message=SeenMessage("intermediary:relay", "msg_old", NOW + 10, NOW))
    assert store.message_seen("intermediary:relay", "msg_old", now=NOW + 5)
    assert not store.message_seen("intermediary:relay", "msg_old", now=NOW + 11)
    # Not purged yet (purges run at most once a second), and still taken again.
    again = SeenMessage("intermediary:relay", "msg_old", NOW + 600, NOW + 11)
    store.add_offers([], message=again)
    assert store.message_seen("intermediary:relay", "msg_old", now=NOW + 12)
    with pytest.raises(ReplayedMessageError):
        store.add_offers([], message=again)


def test_a_request_late_in_its_last_stage_stores_nothing_and_leaves_its_id_free(
    tmp_path: Path, shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = emitting_adapter(tmp_path, plugins=[shop], request_budget=0.4)
    documents = adapter.documents
    render = documents.render_signed
    rendered = threading.Event()

    def slow(model: Any, **where: Any) -> bytes:
        time.sleep(0.5)  # past the offer stage's end: the caller is told offer-timeout
        try:
            return render(model, **where)
        finally:
            rendered.set()

    monkeypatch.setattr(documents, "render_signed", slow)
    now = time.time()
    seen = SeenMessage("intermediary:relay", "msg_late", now + 600, now)
    with pytest.raises(StageTimeoutError) as refused:
        asyncio.run(adapter.answer_request_async(_asked(flight_request(), seen)))
    assert refused.value.problem == "offer-timeout"
    assert rendered.wait(5)
    time.sleep(0.1)  # the worker's check before the commit follows the render
    with sqlite3.connect(tmp_path / "cmi.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM cmi_offers").fetchone()[0] == 0
    assert not adapter.store.message_seen("intermediary:relay", "msg_late", now=time.time())
    adapter.close()


def test_a_request_refused_during_its_commit_leaves_its_message_id_free(
    tmp_path: Path, shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = emitting_adapter(tmp_path, plugins=[shop], request_budget=0.4)
    store = adapter.store
    add_offers = store.add_offers

    def slow(*args: Any, **kwargs: Any) -> None:
        time.sleep(0.5)  # the caller is told offer-timeout while this commits
        add_offers(*args, **kwargs)

    monkeypatch.setattr(store, "add_offers", slow)
    now = time.time()
    seen = SeenMessage("intermediary:relay", "msg_late", now + 600, now)
    with pytest.raises(StageTimeoutError) as refused:
        asyncio.run(adapter.answer_request_async(_asked(flight_request(), seen)))
    assert refused.value.problem == "offer-timeout"
    with sqlite3.connect(tmp_path / "cmi.db") as conn:
        deadline = time.monotonic() + 5
        while not conn.execute("SELECT COUNT(*) FROM cmi_offers").fetchone()[0]:
            assert time.monotonic() < deadline, "the late stage never committed"
            time.sleep(0.02)
    time.sleep(0.1)  # the forget follows the commit
    assert not store.message_seen("intermediary:relay", "msg_late", now=time.time())
    adapter.close()
