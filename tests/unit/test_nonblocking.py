"""Hook implementations marked nonblocking: the pipeline runs on the caller's thread (the
event loop's included) only when every pipeline hook is marked and the store never waits
on a network; a late stage still makes no offer, and anything unmarked goes back to the
worker threads."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import threading
import time
from collections.abc import Coroutine, Generator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cmi_sdk import (
    Adapter,
    Advice,
    Availability,
    ClaimCheck,
    LineItem,
    Money,
    PluginFailedError,
    Quote,
    Request,
    RevenueDecision,
    Reward,
    StageTimeoutError,
    hookimpl,
    load_model,
    nonblocking,
)
from cmi_sdk.client import signed_headers
from cmi_sdk.outbox import SeenMessage
from cmi_sdk.outbox.postgres import PostgresStore
from cmi_sdk.outbox.sqlite import SQLiteStore
from cmi_sdk.webhooks import generate_secret
from tests.fakes import seat_on
from tests.support import emitting_adapter, serve_app

FARE = Money(amount="451.89", currency="USD")


def a_request(request_id: str = "req-1") -> Request:
    return load_model(
        Request,
        {
            "id": request_id,
            "kind": "flight",
            "customer_ref": "cust-7f3a9c",
            "reply_to": "relay-1",
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "wanted": {"origin": "ATL", "destination": "CDG", "date": "2026-12-01"},
        },
    )


class Quick:
    """A firm answering every pipeline hook from memory, each marked nonblocking; it
    records the thread each hook ran on."""

    def __init__(self, price_seconds: float = 0.0) -> None:
        self.threads: set[int] = set()
        self.names: set[str] = set()
        self.price_seconds = price_seconds

    def _seen(self) -> None:
        self.threads.add(threading.get_ident())
        self.names.add(threading.current_thread().name)

    @hookimpl
    @nonblocking
    def cmi_validate_request(self) -> list[str]:
        self._seen()
        return []

    @hookimpl
    @nonblocking
    def cmi_verify_claims(self) -> list[ClaimCheck]:
        self._seen()
        return []

    @hookimpl
    @nonblocking
    def cmi_check_capacity(self, request: Request) -> Availability:
        self._seen()
        return Availability(product=seat_on(request), available=3)

    @hookimpl
    @nonblocking
    def cmi_revenue_decision(self) -> RevenueDecision:
        self._seen()
        return RevenueDecision(accept=True, floor=None)

    @hookimpl
    @nonblocking
    def cmi_price(self) -> Quote:
        self._seen()
        time.sleep(self.price_seconds)
        return Quote(items=(LineItem(description="Seat ATL-CDG", unit_price=FARE, amount=FARE),))

    @hookimpl
    @nonblocking
    def cmi_rewards(self) -> list[Reward]:
        self._seen()
        return []

    @hookimpl
    @nonblocking
    def cmi_advise(self) -> list[Advice]:
        self._seen()
        return []

    @hookimpl
    @nonblocking
    def cmi_offer_validity(self) -> dt.timedelta:
        self._seen()
        return dt.timedelta(minutes=10)


class Audit:
    """An unmarked wrapper around pricing (timing, audit)."""

    @hookimpl(wrapper=True)
    def cmi_price(self) -> Generator[None, Quote, Quote]:
        quote = yield
        return quote


class AwaitableAdvice:
    """A plain function, marked, that returns a coroutine: it cannot run on a loop."""

    @hookimpl
    @nonblocking
    def cmi_advise(self) -> Coroutine[Any, Any, list[Advice]]:
        async def later() -> list[Advice]:
            return [Advice(code="later", text="from a coroutine")]

        return later()


class WaitingStore(SQLiteStore):
    """A store that says its calls may wait on a network."""

    nonblocking = False


@pytest.fixture
def quick() -> Quick:
    return Quick()


@pytest.fixture
def quick_adapter(tmp_path: Path, quick: Quick) -> Generator[Adapter, None, None]:
    adapter = emitting_adapter(tmp_path, plugins=[quick])
    yield adapter
    adapter.close()


def _offer_count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        (count,) = conn.execute("SELECT count(*) FROM cmi_offers").fetchone()
    return int(count)


def test_nonblocking_marks_a_plain_function_and_refuses_a_coroutine() -> None:
    def plain() -> None:
        return None

    assert nonblocking(plain) is plain
    assert plain.cmi_nonblocking is True  # type: ignore[attr-defined]

    async def coroutine() -> None:
        return None

    with pytest.raises(TypeError, match="only a plain function can be nonblocking"):
        nonblocking(coroutine)


def test_a_marked_pipeline_runs_on_the_callers_thread(
    quick_adapter: Adapter, quick: Quick, tmp_path: Path
) -> None:
    assert quick_adapter.answers_inline
    assert quick_adapter.threaded_by == []
    (offer,) = quick_adapter.answer_request(a_request()).offers.offers
    assert quick.threads == {threading.get_ident()}
    assert offer.price == FARE
    assert quick_adapter.get_offer(offer.id).offer == offer
    assert _offer_count(tmp_path / "cmi.db") == 1


def test_one_unmarked_implementation_sends_requests_to_a_worker_thread(
    quick_adapter: Adapter, quick: Quick
) -> None:
    quick_adapter.plugin_manager.register(Audit(), name="audit")
    assert not quick_adapter.answers_inline
    assert quick_adapter.threaded_by == ["audit.cmi_price"]
    quick_adapter.answer_request(a_request())
    assert threading.get_ident() not in quick.threads
    assert all(name.startswith("cmi-offers") for name in quick.names)
    # Unregistered, the fast path is back at the next request.
    quick_adapter.plugin_manager.unregister(name="audit")
    quick.threads.clear()
    quick_adapter.answer_request(a_request("req-2"))
    assert quick.threads == {threading.get_ident()}


def test_a_store_that_may_wait_sends_requests_to_a_worker_thread(
    tmp_path: Path, quick: Quick
) -> None:
    assert PostgresStore.nonblocking is False
    adapter = emitting_adapter(tmp_path, plugins=[quick], store=WaitingStore(tmp_path / "cmi.db"))
    assert adapter.threaded_by == ["store"]
    assert adapter.answer_request(a_request()).offers.offers
    assert threading.get_ident() not in quick.threads
    adapter.close()


def test_a_marked_stage_past_its_budget_makes_no_offer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    late = Quick(price_seconds=0.3)
    adapter = emitting_adapter(tmp_path, plugins=[late], request_budget=0.2)
    name = adapter.plugin_manager.get_name(late)
    with pytest.raises(StageTimeoutError) as info:
        adapter.answer_request(a_request())
    assert info.value.problem == "pricing-timeout"
    assert late.threads == {threading.get_ident()}
    assert "pricing missed its budget (40 ms of 200 ms); it ran on the caller's thread" in (
        caplog.text
    )
    assert f"(marked nonblocking: {name})" in caplog.text
    assert _offer_count(tmp_path / "cmi.db") == 0
    adapter.close()


def test_answer_request_async_runs_a_marked_pipeline_on_the_loop(
    quick_adapter: Adapter, quick: Quick
) -> None:
    now = time.time()
    message = SeenMessage("intermediary:relay", "msg_1", now + 600, now)

    async def main() -> tuple[int, int]:
        prepared: list[int] = []

        def prepare() -> tuple[Request, str | None, SeenMessage | None]:
            prepared.append(threading.get_ident())
            return a_request(), "relay", message

        answer = await quick_adapter.answer_request_async(prepare)
        assert answer.offers.offers[0].price == FARE
        return threading.get_ident(), prepared[0]

    loop_thread, prepared_on = asyncio.run(main())
    assert quick.threads == {loop_thread}
    assert prepared_on == loop_thread
    # Remembered in the commit that stored the offer: a replay is refused.
    assert quick_adapter.store.message_seen("intermediary:relay", "msg_1", now=now)


def test_a_marked_hook_returning_an_awaitable_is_refused_on_a_loop(
    quick_adapter: Adapter, caplog: pytest.LogCaptureFixture
) -> None:
    quick_adapter.plugin_manager.register(AwaitableAdvice(), name="awaitable")

    async def main() -> None:
        await quick_adapter.answer_request_async(lambda: (a_request(), None))

    with pytest.raises(PluginFailedError) as info:
        asyncio.run(main())
    assert info.value.problem == "plugin-failed"
    assert "marked nonblocking returned an awaitable" in caplog.text
    # Off a loop, the same plugin's coroutine is run to its end.
    (offer,) = quick_adapter.answer_request(a_request("req-2")).offers.offers
    assert [a.code for a in offer.advice] == ["later"]


def test_the_reference_firms_answer_inline(tmp_path: Path) -> None:
    from cmi_airline import ReferenceAirline
    from cmi_lender import ReferenceLender

    lender = ReferenceLender(
        database=tmp_path / "lender.db",
        daily_limit=Money(amount="1000000.00", currency="USD"),
        credit_key=b"k" * 32,
    )
    airline = ReferenceAirline(database=tmp_path / "airline.db")
    adapter = emitting_adapter(tmp_path, plugins=[airline, lender])
    assert adapter.threaded_by == []
    adapter.close()


def test_over_http_a_marked_pipeline_answers_refuses_replays_and_fails_closed(
    tmp_path: Path,
) -> None:
    quick = Quick()
    adapter = emitting_adapter(tmp_path, plugins=[quick], request_budget=0.2)
    secret = generate_secret()
    adapter.store.add_intermediary("relay", secret, at=time.time())
    first = adapter.render(a_request(), standard="cmi", document_type="request")
    # Another request (a request id sent again gets the first answer).
    other = adapter.render(a_request("req-2"), standard="cmi", document_type="request")

    def post(url: str, msg_id: str, body: bytes = first) -> httpx.Response:
        headers = signed_headers(
            secret=secret,
            method="POST",
            target="/cmi/requests",
            body=body,
            intermediary="relay",
            msg_id=msg_id,
        )
        headers["content-type"] = "application/xml"
        return httpx.post(url + "cmi/requests", content=body, headers=headers, timeout=10)

    with serve_app(adapter.asgi_app()) as url:
        ok = post(url, "msg_ok")
        assert ok.status_code == 200, ok.text
        # On the server's event loop, not on the pipeline's worker threads.
        assert len(quick.threads) == 1
        assert not any(name.startswith("cmi-offers") for name in quick.names)
        replay = post(url, "msg_ok")
        assert replay.status_code == 401
        assert replay.json()["type"] == "urn:cmi:problem:replayed"
        quick.price_seconds = 0.3  # past pricing's 40 ms
        late = post(url, "msg_late", other)
        assert late.status_code == 503
        assert late.json()["type"] == "urn:cmi:problem:pricing-timeout"
        assert _offer_count(tmp_path / "cmi.db") == 1
        # Refused, the request left its message id free.
        quick.price_seconds = 0.0
        assert post(url, "msg_late", other).status_code == 200
    adapter.close()
