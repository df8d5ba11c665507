"""Resolving destinations' host names: a name server that never answers costs a failed
attempt within the connect timeout, not a slot for the resolver's own timeouts, and many
new destinations resolve side by side rather than a few at a time."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cmi_sdk import Adapter, EgressGuard, RetrySchedule
from cmi_sdk._delivery import DeliveryStats, Timeouts
from tests.support import emitting_adapter, register, ticket


def slow_name_server(
    seconds: float, gone: threading.Event, asked: list[str]
) -> Callable[[str, int], list[str]]:
    """Answers every name with 127.0.0.1 after ``seconds``, or never (until ``gone``)."""

    def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        gone.wait(seconds)
        return ["127.0.0.1"]  # where nothing listens on the port asked: refused at once

    return resolve


def attempt_once(
    adapter: Adapter, *, connect: float, total: float, batch: int = 64
) -> tuple[DeliveryStats, float]:
    """One claim (of up to ``batch`` rows), each document attempted once (a retry is an
    hour away); the stats and the seconds it took."""
    started = time.monotonic()
    with adapter.delivery_worker(
        timeout=Timeouts(connect=connect, read=1, total=total),
        schedule=RetrySchedule(delays=(3600,), jitter=0),
        batch=batch,
    ) as worker:
        stats = worker.run_once(max_rounds=1)
    return stats, time.monotonic() - started


def test_a_name_server_that_never_answers_fails_the_attempt_at_the_connect_timeout(
    tmp_path: Path,
) -> None:
    gone, asked = threading.Event(), []
    guard = EgressGuard(allowed_hosts={"store.example"}, resolver=slow_name_server(60, gone, asked))
    adapter = emitting_adapter(tmp_path, egress=guard)
    try:
        register(adapter, destination="https://store.example:9/inbox")
        emitted = adapter.emit(ticket())[0]
        stats, took = attempt_once(adapter, connect=0.5, total=2)
        row = adapter.store.get_row(emitted.msg_id)
        assert stats.retried == 1
        assert row.state == "retry"
        assert row.last_error == (
            "cannot resolve the destination: store.example did not resolve within 0.5 s"
        )
        assert took < 3  # the resolver's own wait is 60 s
    finally:
        gone.set()
        adapter.close()


def test_many_new_destinations_resolve_side_by_side(tmp_path: Path) -> None:
    # 48 names, each 0.5 s to resolve: a few at a time (the loop's default executor has
    # min(32, cores + 4) threads, 6 here) would take 4 s before the last could go.
    names = [f"store-{i}.example" for i in range(48)]
    gone, asked = threading.Event(), []
    guard = EgressGuard(allowed_hosts=set(names), resolver=slow_name_server(0.5, gone, asked))
    adapter = emitting_adapter(tmp_path, egress=guard)
    try:
        for i, name in enumerate(names):
            register(adapter, customer_ref=f"cust-dns{i:04d}", destination=f"https://{name}:9/")
        adapter.emit_many([ticket(id=f"D-{i}", customer_ref=f"cust-dns{i:04d}") for i in range(48)])
        stats, took = attempt_once(adapter, connect=2, total=3)
        assert stats.retried == 48
        assert sorted(asked) == sorted(names)
        # Every one resolved, then found nothing listening (not "did not resolve").
        rows = adapter.store.rows(state="retry", limit=100)
        assert len(rows) == 48
        assert all((r.last_error or "").startswith("ConnectError") for r in rows), rows[0]
        assert took < 3, took
    finally:
        gone.set()
        adapter.close()


@pytest.mark.slow
def test_a_stop_that_cuts_off_overrunning_sends_leaves_the_counts_at_zero(
    tmp_path: Path,
) -> None:
    # A send still resolving when the stop's wait (the total timeout and a second) ends
    # is cancelled; its count must go down before the worker resets the counts, or it
    # goes below zero afterwards and lets that destination take more than its share.
    gone, asked = threading.Event(), []
    guard = EgressGuard(allowed_hosts={"store.example"}, resolver=slow_name_server(60, gone, asked))
    adapter = emitting_adapter(tmp_path, egress=guard)
    worker = adapter.delivery_worker(timeout=Timeouts(connect=10, read=1, total=0.2))
    try:
        register(adapter, destination="https://store.example:9/inbox")
        adapter.emit(ticket())

        async def main() -> None:
            stop = asyncio.Event()
            running = asyncio.create_task(worker.deliver(stop=stop, poll_interval=0.05))
            for _ in range(100):  # until the send is resolving, 5 s at most
                if asked:
                    break
                await asyncio.sleep(0.05)
            stop.set()
            await running

        asyncio.run(main())
        assert asked == ["store.example"]
        assert worker._in_flight == 0
        assert all(origin.in_flight == 0 for origin in worker._origins.values())
    finally:
        gone.set()
        worker.close()
        adapter.close()


@pytest.mark.slow
def test_names_that_never_resolve_cannot_fail_another_stores_lookup(tmp_path: Path) -> None:
    # Destinations whose name servers never answer keep every resolver thread busy; a
    # healthy store's lookup waits for a thread, and that wait is not counted against it:
    # its attempt reaches the connection (nothing listens: refused), never "did not
    # resolve", so its circuit is not opened by others' name servers.
    from cmi_sdk._delivery import RESOLVER_THREADS

    hostile = [f"evil-{i}.example" for i in range(RESOLVER_THREADS)]
    gone = threading.Event()

    def resolve(host: str, port: int) -> list[str]:
        if host in hostile:
            gone.wait(3)  # past the connect timeout, then the system resolver gives up
        return ["127.0.0.1"]

    guard = EgressGuard(allowed_hosts={*hostile, "good.example"}, resolver=resolve)
    adapter = emitting_adapter(tmp_path, egress=guard)
    try:
        for i, name in enumerate(hostile):
            register(adapter, customer_ref=f"cust-e{i:03d}", destination=f"https://{name}:9/in")
        register(adapter, customer_ref="cust-good", destination="https://good.example:9/in")
        adapter.emit_many(
            [ticket(id=f"E-{i}", customer_ref=f"cust-e{i:03d}") for i in range(len(hostile))]
        )
        (good,) = adapter.emit(ticket(id="G-1", customer_ref="cust-good"))
        stats, took = attempt_once(adapter, connect=0.5, total=2, batch=len(hostile) + 1)
        assert stats.retried == len(hostile) + 1
        row = adapter.store.get_row(good.msg_id)
        assert (row.last_error or "").startswith("ConnectError"), row.last_error
        evil = adapter.store.rows(state="retry", limit=200)
        assert sum("did not resolve within 0.5 s" in (r.last_error or "") for r in evil) == len(
            hostile
        )
        assert took < 6, took
    finally:
        gone.set()
        adapter.close()


def test_a_lookup_left_running_by_one_run_does_not_trouble_the_next(tmp_path: Path) -> None:
    # run_once runs its own event loop: a lookup still hanging on its thread when the run
    # ends belongs to that loop; the next run starts its own and fails it the same way.
    gone, asked = threading.Event(), []
    guard = EgressGuard(allowed_hosts={"store.example"}, resolver=slow_name_server(60, gone, asked))
    adapter = emitting_adapter(tmp_path, egress=guard)
    try:
        register(adapter, destination="https://store.example:9/inbox")
        emitted = adapter.emit(ticket())[0]
        with adapter.delivery_worker(
            timeout=Timeouts(connect=0.3, read=1, total=1),
            schedule=RetrySchedule(delays=(0.01,) * 3, jitter=0),
        ) as worker:
            first = worker.run_once(max_rounds=1)
            time.sleep(0.05)  # the retry falls due; the first lookup still hangs
            second = worker.run_once(max_rounds=1)
        assert (first.retried, second.retried) == (1, 1)
        row = adapter.store.get_row(emitted.msg_id)
        assert row.last_error == (
            "cannot resolve the destination: store.example did not resolve within 0.3 s"
        )
        assert asked == ["store.example", "store.example"]
    finally:
        gone.set()
        adapter.close()
