"""The delivery engine against stores on loopback: a store that never answers opens its
circuit and holds up no one, a slow store holds no batch, an answer cut short is no
delivery, and the engine runs on a firm's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from cmi_sdk import Adapter, OutboxRowNotFoundError, RetrySchedule
from cmi_sdk._delivery import DeliveryProgress, Timeouts
from cmi_sdk.cli.outbox import open_circuits
from cmi_sdk.receiver import CustomerStore
from cmi_sdk.webhooks import generate_secret
from tests.fakes import Clock, Faulty
from tests.support import emitting_adapter, register, serve_app, signer, ticket

SHORT = Timeouts(connect=1.0, read=0.3, total=2.0)


class RawServer:
    """A loopback TCP server that reads requests and answers each with ``answer`` (bytes,
    then the connection is closed), or never answers when ``answer`` is None."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.requests = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/inbox"

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                self.requests += data.count(b"POST ")
                if self.answer is not None:
                    conn.sendall(self.answer)
                    return

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    @contextlib.contextmanager
    def running(self) -> Iterator[RawServer]:
        acceptor = threading.Thread(target=self._accept, daemon=True)
        acceptor.start()
        try:
            yield self
        finally:
            self._stop.set()
            acceptor.join(5)
            for thread in self._threads:
                thread.join(5)
            self._sock.close()


@contextlib.contextmanager
def customer_store(tmp_path: Path, secret: str, delay: float = 0.0) -> Iterator[tuple[str, Faulty]]:
    cert = signer().certificate.public_bytes(serialization.Encoding.PEM)
    store = CustomerStore(directory=tmp_path / "inbox", secrets=[secret], certificate=cert)
    faulty = Faulty(store.app, lambda _n: None)
    faulty.delay = delay
    with serve_app(faulty) as url:
        yield url + "inbox", faulty


def _emit(adapter: Adapter, customer: str, count: int, prefix: str) -> list[str]:
    return [
        adapter.emit(ticket(id=f"{prefix}-{i}", customer_ref=customer))[0].msg_id
        for i in range(count)
    ]


def test_a_store_that_never_answers_opens_its_circuit_and_holds_up_no_one(
    tmp_path: Path,
) -> None:
    clock = Clock(time.time())
    adapter = emitting_adapter(tmp_path, clock=clock)
    secret = generate_secret()
    with (
        RawServer(answer=None).running() as silent,
        customer_store(tmp_path, secret) as (good_url, good),
    ):
        register(adapter, customer_ref="cust-silent1", destination=silent.url)
        register(adapter, customer_ref="cust-good001", destination=good_url, secret=secret)
        waiting = _emit(adapter, "cust-silent1", 8, "S")
        delivered = _emit(adapter, "cust-good001", 5, "G")
        worker = adapter.delivery_worker(
            timeout=SHORT,
            circuit_threshold=3,
            circuit_interval=600,
            schedule=RetrySchedule(delays=(60,) * 10, jitter=0),
        )
        with worker:
            worker.run_once()
            assert all(adapter.store.get_row(m).state == "delivered" for m in delivered)
            assert good.requests == 5
            # Three timeouts opened the circuit: the other five took no slot and no time.
            assert silent.requests == 3
            assert worker.metrics.open_circuits == 1
            rows = [adapter.store.get_row(m) for m in waiting]
            assert [r.state for r in rows] == ["retry"] * 8
            assert [r.attempts for r in rows] == [1] * 8  # the schedule runs per document
            fast = [r for r in rows if (r.last_error or "").startswith("circuit open:")]
            assert len(fast) == 5
            # They wait for the next probe, not just for their own retry delay.
            assert all((r.next_attempt_at or 0) >= clock.now + 599 for r in fast)
            assert open_circuits(adapter.store.rows(state="retry")) == {silent.url: 5}

            # Past the interval: one probe; the others wait for its answer, then fail fast.
            clock.now += 700
            worker.run_once()
            assert silent.requests == 4
            assert [adapter.store.get_row(m).attempts for m in waiting] == [2] * 8


@pytest.mark.slow
def test_a_slow_store_holds_no_batch(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    adapter.clock = time.time
    slow_secret, fast_secret = generate_secret(), generate_secret()
    with (
        customer_store(tmp_path / "slow", slow_secret, delay=3.0) as (slow_url, slow),
        customer_store(tmp_path / "fast", fast_secret) as (fast_url, fast),
    ):
        register(adapter, customer_ref="cust-slow001", destination=slow_url, secret=slow_secret)
        register(adapter, customer_ref="cust-fast001", destination=fast_url, secret=fast_secret)
        _emit(adapter, "cust-slow001", 2, "S")
        _emit(adapter, "cust-fast001", 12, "F")
        # Claims of two rows: the old worker waited for the slowest lane of each round.
        worker = adapter.delivery_worker(batch=2, timeout=Timeouts(read=10, total=10))
        started = time.monotonic()
        worker.start(poll_interval=0.05)
        try:
            deadline = started + 10
            while fast.requests < 12 and time.monotonic() < deadline:
                time.sleep(0.02)
            took = time.monotonic() - started
            assert fast.requests == 12
            assert slow.requests == 1  # still in flight, in order, one at a time
            assert took < 2.5
        finally:
            worker.stop()


def test_an_answer_cut_short_is_not_a_delivery(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    cut = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n<ok/>"
    with RawServer(answer=cut).running() as server:
        register(adapter, destination=server.url)
        (msg_id,) = _emit(adapter, "cust-7f3a9c", 1, "C")
        with adapter.delivery_worker(schedule=RetrySchedule(delays=(60,), jitter=0)) as worker:
            stats = worker.run_once()
    row = adapter.store.get_row(msg_id)
    assert (stats.delivered, row.state) == (0, "retry")
    assert (row.last_error or "").startswith("RemoteProtocolError:")


def test_the_engine_runs_on_the_firms_event_loop(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    adapter.clock = time.time
    secret = generate_secret()
    with customer_store(tmp_path, secret) as (url, store):
        register(adapter, destination=url, secret=secret)
        _emit(adapter, "cust-7f3a9c", 3, "L")
        worker = adapter.delivery_worker()
        reports: list[DeliveryProgress] = []

        async def firm() -> int:
            due = await worker.deliver_due()
            _emit(adapter, "cust-7f3a9c", 2, "M")
            stop = asyncio.Event()
            running = asyncio.create_task(
                worker.deliver(stop=stop, poll_interval=0.05, progress=reports.append)
            )
            deadline = time.monotonic() + 10
            while store.requests < 5 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # the loop stays free while the engine works
            await asyncio.sleep(1.1)  # one progress report
            stop.set()
            later = await running
            return due.delivered + later.delivered

        try:
            assert asyncio.run(firm()) == 5
        finally:
            worker.close()
    assert reports
    assert reports[-1].delivered == 2
    assert "delivered/s" in reports[-1].line()


def test_each_failure_is_logged_once_per_destination_and_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adapter = emitting_adapter(tmp_path)
    secret = generate_secret()
    with customer_store(tmp_path, secret) as (url, store):
        store.plan = lambda _n: 503
        register(adapter, destination=url, secret=secret)
        _emit(adapter, "cust-7f3a9c", 4, "R")
        worker = adapter.delivery_worker(schedule=RetrySchedule(delays=(60,), jitter=0))
        with caplog.at_level(logging.WARNING, "cmi_sdk.delivery"), worker:
            stats = worker.run_once()
    assert stats.retried == 4
    lines = [r.getMessage() for r in caplog.records if "tried again later" in r.getMessage()]
    assert len(lines) == 1
    assert url in lines[0]
    assert "HTTP 503" in lines[0]
    assert stats.retry_reasons() == {"HTTP 503": 4}


def test_the_worker_purges_finished_documents_after_their_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cmi_sdk.cli import main

    clock = Clock(time.time())
    adapter = emitting_adapter(tmp_path, clock=clock)
    secret = generate_secret()
    with customer_store(tmp_path, secret) as (url, _store):
        register(adapter, destination=url, secret=secret)
        old, recent = _emit(adapter, "cust-7f3a9c", 2, "P")
        with adapter.delivery_worker() as worker:
            worker.run_once()  # both delivered now
            clock.now += 20 * 86400
            assert worker.run_once().attempts == 0
            assert adapter.store.get_row(old).state == "delivered"  # inside the window
    # The operator's view (the real clock): what would go with no window at all.
    monkeypatch.setenv("CMI_DATABASE_URL", f"sqlite:///{tmp_path}/cmi.db")
    assert main(["outbox", "purge", "--dry-run", "--keep-days", "0"]) == 0
    assert "would purge 2 delivered, 0 dead" in capsys.readouterr().out
    assert adapter.store.get_row(old).state == "delivered"  # a dry run deletes nothing
    # The worker's own purge, once the window (30 days) has passed.
    clock.now += 11 * 86400
    with adapter.delivery_worker() as worker:
        worker.run_once()
    for msg_id in (old, recent):
        with pytest.raises(OutboxRowNotFoundError):
            adapter.store.get_row(msg_id)
        assert adapter.store.attempts(msg_id) == []
    assert main(["outbox", "purge"]) == 0
    assert "purged 0 delivered, 0 dead" in capsys.readouterr().out
