"""The delivery engine under attack and under latency and failures: stores on loopback
that answer what no honest server would, answer late, hang, reset, or answer every
request with ``Connection: close``, checked against the engine's contract (at least once,
the same ``webhook-id`` on a redelivery, a 2xx that does not answer the document is no
delivery, connections within ``max_connections``, one at a time per destination, in
order, a circuit that always closes again).

Each store is a raw TCP listener on a loopback address whose script answers each request
(read whole, by its ``content-length``) with exactly the bytes the attack needs. Every
server loop is bounded in count and time, and every listener stops with its test. What
the existing harnesses cover (redirects, endless answers, slow drips, log forging, 410,
a reset after the request, workers killed) is not repeated here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cmi_sdk import Adapter, RetrySchedule
from cmi_sdk._delivery import Timeouts
from tests.support import accept_in_thread, emitting_adapter, register, ticket

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
QUICK = Timeouts(connect=1, read=1, total=2)
LATER = RetrySchedule(delays=(3600,), jitter=0)


@dataclass
class Request:
    """One request as a store read it: its index on its connection, its webhook-id."""

    index: int
    webhook_id: str


Reply = Callable[["Store", socket.socket, Request], bool]
"""Answers one request on a connection; False ends the connection."""


@dataclass
class Tally:
    """Connections open at once across stores, now and at their peak."""

    open: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int) -> None:
        with self.lock:
            self.open += n
            self.peak = max(self.peak, self.open)


@dataclass
class Store:
    """A keep-alive listener that reads each request whole and lets ``reply`` answer it;
    counts connections (open now, and at their peak) and the webhook-ids received, in
    order."""

    address: str
    reply: Reply
    tally: Tally = field(default_factory=Tally)
    port: int = 0
    received: list[str] = field(default_factory=list)
    connections: int = 0
    open: int = 0
    peak: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str = "/inbox") -> str:
        return f"http://{self.address}:{self.port}{path}"

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait(self, seconds: float) -> None:
        """Sleep, unless the store stops first."""
        self._stop.wait(seconds)


def read_one(conn: socket.socket, buffer: bytearray) -> str | None:
    """The next request on ``conn`` (head and body, its bytes taken from ``buffer``): its
    webhook-id, or None when the client hung up or sent nothing for 5 s."""
    conn.settimeout(5)
    try:
        while b"\r\n\r\n" not in buffer and len(buffer) < 1 << 20:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            buffer += chunk
        end = buffer.index(b"\r\n\r\n")
        length, webhook_id = 0, ""
        for line in bytes(buffer[:end]).split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"webhook-id":
                webhook_id = value.strip().decode()
        while len(buffer) < end + 4 + length:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            buffer += chunk
    except (OSError, ValueError):
        return None
    del buffer[: end + 4 + length]
    return webhook_id


@pytest.fixture
def stores() -> Iterator[Callable[..., Store]]:
    started: list[tuple[Store, socket.socket, list[threading.Thread]]] = []

    def start(address: str, reply: Reply, tally: Tally | None = None) -> Store:
        store = Store(address, reply, tally or Tally())
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, 0))
        listener.listen(64)
        store.port = listener.getsockname()[1]

        def handle(conn: socket.socket) -> None:
            store.tally.add(1)
            with store._lock:
                store.open += 1
                store.peak = max(store.peak, store.open)
            buffer = bytearray()
            try:
                with conn, contextlib.suppress(OSError):
                    for index in range(500):
                        if store.stopping:
                            return
                        webhook_id = read_one(conn, buffer)
                        if webhook_id is None:
                            return
                        with store._lock:
                            store.received.append(webhook_id)
                        if not store.reply(store, conn, Request(index, webhook_id)):
                            return
            finally:
                store.tally.add(-1)
                with store._lock:
                    store.open -= 1

        def accepted() -> None:
            store.connections += 1

        acceptor, threads = accept_in_thread(
            listener, handle, stopping=lambda: store.stopping, accepted=accepted
        )
        started.append((store, listener, [acceptor, *threads]))
        store._threads = threads  # type: ignore[attr-defined]
        return store

    yield start
    for store, _, _ in started:
        store._stop.set()
    for store, listener, (acceptor, *_) in started:
        acceptor.join(5)
        listener.close()
        for thread in store._threads:  # type: ignore[attr-defined]
            thread.join(6)


def answer(data: bytes, *, delay: float = 0.0) -> Reply:
    """A reply: ``data`` to every request, after ``delay`` seconds; keeps the connection."""

    def reply(store: Store, conn: socket.socket, _request: Request) -> bool:
        if delay:
            store.wait(delay)
        conn.sendall(data)
        return True

    return reply


def reset(conn: socket.socket) -> None:
    """Close with RST: SO_LINGER on, zero seconds."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def emit(adapter: Adapter, customer: str, count: int, prefix: str) -> list[str]:
    return [
        adapter.emit(ticket(id=f"{prefix}-{i}", customer_ref=customer))[0].msg_id
        for i in range(count)
    ]


def deliver_to(tmp_path: Path, store: Store, count: int, prefix: str) -> tuple[Adapter, list[str]]:
    """``count`` documents to ``store``, one run of the worker: the adapter and their ids."""
    adapter = emitting_adapter(tmp_path)
    register(adapter, destination=store.url())
    ids = emit(adapter, "cust-7f3a9c", count, prefix)
    with adapter.delivery_worker(timeout=QUICK, schedule=LATER) as worker:
        worker.run_once()
    return adapter, ids


def states(adapter: Adapter, msg_ids: list[str]) -> list[str]:
    return [adapter.store.get_row(m).state for m in msg_ids]


def run_for(
    adapter: Adapter, seconds: float, during: Callable[[], None], **options: object
) -> None:
    """Run a worker on an event loop for about ``seconds``, calling ``during`` (on a
    thread) once it runs."""
    worker = adapter.delivery_worker(**options)  # type: ignore[arg-type]

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.deliver(stop=stop, poll_interval=0.05))
        await asyncio.to_thread(during)
        await asyncio.sleep(seconds)
        stop.set()
        await task

    try:
        asyncio.run(main())
    finally:
        worker.close()


# -- answers that answer nothing ---------------------------------------------------------


def test_an_answer_pipelined_after_the_answer_is_no_delivery_of_the_next_document(
    tmp_path: Path, stores: Callable[..., Store]
) -> None:
    # Two answers in one write: the second one must not be taken as the next document's.
    def twice(_store: Store, conn: socket.socket, request: Request) -> bool:
        conn.sendall(OK + OK if request.index == 0 else OK)
        return True

    store = stores("127.0.0.2", twice)
    adapter, ids = deliver_to(tmp_path, store, 4, "PIPE")
    for msg_id in ids:
        if adapter.store.get_row(msg_id).state == "delivered":
            assert msg_id in store.received


def test_an_answer_sent_before_the_request_is_no_delivery(
    tmp_path: Path, stores: Callable[..., Store]
) -> None:
    # A store that answers its first request, then, idle, sends a 200 nobody asked for:
    # the next document on the kept connection must not take it as its answer (it was
    # never received: a lost document, recorded as delivered).
    def unasked(store: Store, conn: socket.socket, request: Request) -> bool:
        conn.sendall(OK)
        if request.index == 0:
            store.wait(0.2)
            conn.sendall(OK)
        return True

    store = stores("127.0.0.2", unasked)
    adapter = emitting_adapter(tmp_path)
    register(adapter, destination=store.url())
    first = emit(adapter, "cust-7f3a9c", 1, "EARLY")
    later: list[str] = []

    def then_more() -> None:
        deadline = time.monotonic() + 5
        while not store.received and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # the unasked answer has arrived on the idle connection
        later.extend(emit(adapter, "cust-7f3a9c", 2, "LATE"))

    run_for(adapter, 1.0, then_more, timeout=QUICK, schedule=LATER)
    assert states(adapter, first) == ["delivered"]
    for msg_id in later:
        row = adapter.store.get_row(msg_id)
        assert row.state != "delivered" or msg_id in store.received, row


# -- connections within max_connections ---------------------------------------------------


def many(stores: Callable[..., Store], count: int, reply: Reply) -> tuple[list[Store], Tally]:
    tally = Tally()
    return [stores(f"127.0.0.{i}", reply, tally) for i in range(2, 2 + count)], tally


def fill(adapter: Adapter, targets: list[Store], per_store: int) -> list[str]:
    for i, store in enumerate(targets):
        register(adapter, customer_ref=f"cust-rt{i:04d}", destination=store.url())
    return [
        msg_id
        for n in range(per_store)
        for i in range(len(targets))
        for msg_id in emit(adapter, f"cust-rt{i:04d}", 1, f"T{n}-{i}")
    ]


@pytest.mark.slow
def test_stores_answering_503_keep_no_more_connections_than_the_bound(
    tmp_path: Path, stores: Callable[..., Store]
) -> None:
    # A 503 is an answer: the connection it came on is kept alive like any other, so it
    # counts against the bound like any other (thousands of stores in maintenance behind
    # one CDN would otherwise keep a descriptor each).
    busy = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
    targets, tally = many(stores, 24, answer(busy))
    adapter = emitting_adapter(tmp_path)
    ids = fill(adapter, targets, per_store=1)
    with adapter.delivery_worker(
        concurrency=4, max_connections=6, timeout=QUICK, schedule=LATER
    ) as worker:
        worker.run_once()
    assert states(adapter, ids) == ["retry"] * len(ids)
    # A connection closed by the client may be seen a moment after the next one opens.
    assert tally.peak <= 6 + 2, tally


@pytest.mark.slow
@pytest.mark.parametrize("bound", [1, 2])
def test_connection_close_on_every_answer_with_a_tiny_bound_delivers_everything(
    tmp_path: Path, stores: Callable[..., Store], bound: int
) -> None:
    closing = b"HTTP/1.1 204 No Content\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

    def close_after(_store: Store, conn: socket.socket, _request: Request) -> bool:
        conn.sendall(closing)
        return False

    targets, tally = many(stores, 12, close_after)
    adapter = emitting_adapter(tmp_path)
    ids = fill(adapter, targets, per_store=3)
    began = time.monotonic()
    with adapter.delivery_worker(
        concurrency=64, max_connections=bound, timeout=QUICK, schedule=LATER
    ) as worker:
        stats = worker.run_once()
    assert stats.delivered == len(ids) == 36
    assert states(adapter, ids) == ["delivered"] * 36
    assert sorted(m for s in targets for m in s.received) == sorted(ids)  # each once
    assert tally.peak <= bound + 2, tally
    assert time.monotonic() - began < 10


# -- informational answers ----------------------------------------------------------------


def test_informational_answers_then_a_200_are_a_delivery(
    tmp_path: Path, stores: Callable[..., Store]
) -> None:
    early = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    store = stores("127.0.0.2", answer(early + OK))
    adapter, ids = deliver_to(tmp_path, store, 2, "INFO")
    assert states(adapter, ids) == ["delivered", "delivered"]
    assert store.received == ids


@pytest.mark.slow
def test_endless_informational_answers_are_no_delivery_and_end_at_the_total_timeout(
    tmp_path: Path, stores: Callable[..., Store]
) -> None:
    def continues(store: Store, conn: socket.socket, _request: Request) -> bool:
        deadline = time.monotonic() + 10
        while not store.stopping and time.monotonic() < deadline:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" * 100)
            store.wait(0.01)
        return False

    store = stores("127.0.0.2", continues)
    adapter = emitting_adapter(tmp_path)
    register(adapter, destination=store.url())
    (msg_id,) = emit(adapter, "cust-7f3a9c", 1, "CONT")
    began = time.monotonic()
    with adapter.delivery_worker(timeout=QUICK, schedule=LATER) as worker:
        worker.run_once()
    row = adapter.store.get_row(msg_id)
    assert (row.state, row.last_error) == ("retry", "timed out: TotalTimeout")
    assert time.monotonic() - began < 4


# -- order -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_customers_documents_arrive_in_order_over_many_claims(
    tmp_path: Path, stores: Callable[..., Store]
) -> None:
    store = stores("127.0.0.2", answer(OK, delay=0.01))
    adapter = emitting_adapter(tmp_path)
    register(adapter, destination=store.url())
    ids = emit(adapter, "cust-7f3a9c", 40, "ORD")
    # Small claims, many in flight: each claim's rows queue behind the last's.
    with adapter.delivery_worker(concurrency=64, batch=3, timeout=QUICK) as worker:
        worker.run_once()
    assert states(adapter, ids) == ["delivered"] * 40
    assert store.received == ids


def test_a_document_that_fails_arrives_after_those_behind_it(
    tmp_path: Path, stores: Callable[..., Store]
) -> None:
    # As docs/delivery.md says: in order while nothing fails; a document tried again
    # later arrives after the ones queued behind it (the receiver orders by its content).
    def third_fails_once(_store: Store, conn: socket.socket, request: Request) -> bool:
        if request.index == 2:
            conn.sendall(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
        else:
            conn.sendall(OK)
        return True

    store = stores("127.0.0.2", third_fails_once)
    adapter = emitting_adapter(tmp_path)
    register(adapter, destination=store.url())
    ids = emit(adapter, "cust-7f3a9c", 5, "FAIL")
    schedule = RetrySchedule(delays=(0,), jitter=0)
    with adapter.delivery_worker(timeout=QUICK, schedule=schedule) as worker:
        worker.run_once()
    assert states(adapter, ids) == ["delivered"] * 5
    assert store.received == [*ids[:3], ids[3], ids[4], ids[2]]


# -- latency, hangs, resets and a worker stopped -------------------------------------------


@pytest.mark.slow
def test_a_hanging_store_and_a_resetting_one_hold_up_no_store_at_100_ms(
    tmp_path: Path, stores: Callable[..., Store]
) -> None:
    def hang(store: Store, _conn: socket.socket, _request: Request) -> bool:
        store.wait(5)
        return False

    def rst(_store: Store, conn: socket.socket, _request: Request) -> bool:
        reset(conn)
        return False

    tally = Tally()
    good = [stores(f"127.0.0.{i}", answer(OK, delay=0.1), tally) for i in range(2, 10)]
    bad = [stores("127.0.0.10", hang, tally), stores("127.0.0.11", rst, tally)]
    adapter = emitting_adapter(tmp_path)
    fill(adapter, [*good, *bad], per_store=4)
    began = time.monotonic()
    with adapter.delivery_worker(
        timeout=Timeouts(connect=1, read=0.5, total=1),
        schedule=LATER,
        circuit_threshold=2,
        circuit_interval=3600,
    ) as worker:
        stats = worker.run_once()
    took = time.monotonic() - began
    # Four documents each, one at a time, 100 ms apart: the good stores are done in
    # about 0.4 s; the hanging one costs two timeouts (1 s each) of its own slot only.
    assert stats.delivered == 32
    assert sorted(m for s in good for m in s.received) == sorted(
        r.msg_id for r in adapter.store.rows(state="delivered")
    )
    assert bad[0].connections == 2
    assert bad[1].connections == 2
    assert took < 4


@pytest.mark.slow
def test_a_worker_stopped_mid_flight_loses_nothing_and_leaves_nothing_leased(
    tmp_path: Path, stores: Callable[..., Store]
) -> None:
    targets = [stores(f"127.0.0.{i}", answer(OK, delay=0.1)) for i in range(2, 8)]
    adapter = emitting_adapter(tmp_path)
    ids = fill(adapter, targets, per_store=6)
    worker = adapter.delivery_worker(timeout=QUICK, schedule=LATER).start(poll_interval=0.05)
    time.sleep(0.25)
    worker.stop()
    # What was in flight finished and is recorded (the last batch too: a stop once
    # cancelled the commit under way, and those rows were sent again a lease later);
    # what was queued went back at once.
    early = sum(len(s.received) for s in targets)
    assert 0 < early < len(ids)
    rows = [adapter.store.get_row(m) for m in ids]
    now = time.time()
    assert {r.state for r in rows} <= {"delivered", "leased", "pending"}
    held = [r.msg_id for r in rows if r.lease_until is not None and r.lease_until > now]
    assert held == []
    received = {m for s in targets for m in s.received}
    assert [r.msg_id for r in rows if r.msg_id in received and r.state != "delivered"] == []
    with adapter.delivery_worker(timeout=QUICK, schedule=LATER) as again:
        again.run_once()
    assert states(adapter, ids) == ["delivered"] * len(ids)
    arrived = [m for s in targets for m in s.received]
    assert set(arrived) == set(ids)
    assert len(arrived) == len(ids)  # stopped, not killed: none twice


# -- the circuit -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_store_that_hangs_then_answers_gets_everything_after_its_circuit_closes(
    tmp_path: Path, stores: Callable[..., Store]
) -> None:
    def flaky(store: Store, conn: socket.socket, _request: Request) -> bool:
        if len(store.received) <= 3:
            store.wait(2)  # past the read timeout
            return False
        conn.sendall(OK)
        return True

    store = stores("127.0.0.2", flaky)
    adapter = emitting_adapter(tmp_path)
    register(adapter, destination=store.url())
    ids = emit(adapter, "cust-7f3a9c", 6, "FLIP")
    schedule = RetrySchedule(delays=(0.1,) * 20, jitter=0)
    with adapter.delivery_worker(
        timeout=Timeouts(connect=1, read=0.3, total=1),
        schedule=schedule,
        circuit_threshold=2,
        circuit_interval=0.5,
    ) as worker:
        began = time.monotonic()
        while time.monotonic() - began < 8 and set(states(adapter, ids)) != {"delivered"}:
            worker.run_once()
            time.sleep(0.05)
        assert worker.metrics.open_circuits == 0
    assert states(adapter, ids) == ["delivered"] * 6
    assert set(ids) <= set(store.received)
    # Two timeouts, then one probe per interval: a handful of connections, not one a
    # document and retry.
    assert len(store.received) <= 6 + 4


# -- the pinned addresses ------------------------------------------------------------------


@pytest.mark.parametrize("host", ["LOCALHOST", "LocalHost", "localhost."])
def test_a_host_name_spelled_otherwise_still_connects_to_the_checked_address(
    tmp_path: Path, stores: Callable[..., Store], host: str
) -> None:
    # The guard checks the name as written; the client asks the pins for the name as it
    # normalises it: both must meet, or the destination never gets a document.
    store = stores("127.0.0.1", answer(OK))
    adapter = emitting_adapter(tmp_path)
    register(adapter, destination=f"http://{host}:{store.port}/inbox")
    ids = emit(adapter, "cust-7f3a9c", 1, "HOST")
    with adapter.delivery_worker(timeout=QUICK, schedule=LATER) as worker:
        worker.run_once()
    row = adapter.store.get_row(ids[0])
    assert (row.state, row.last_error) == ("delivered", None)
    assert store.received == ids


def test_an_http_1_0_answer_closing_the_connection_is_a_delivery_and_the_next_gets_its_own(
    tmp_path: Path, stores: Callable[..., Store]
) -> None:
    def old(_store: Store, conn: socket.socket, _request: Request) -> bool:
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n<ok/>")
        return False

    store = stores("127.0.0.2", old)
    adapter, ids = deliver_to(tmp_path, store, 3, "H10")
    assert states(adapter, ids) == ["delivered"] * 3
    assert store.received == ids
    assert store.connections == 3


def test_a_200_reset_mid_body_is_no_delivery(tmp_path: Path, stores: Callable[..., Store]) -> None:
    def cut(_store: Store, conn: socket.socket, _request: Request) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n<ok")
        reset(conn)
        return False

    store = stores("127.0.0.2", cut)
    adapter = emitting_adapter(tmp_path)
    register(adapter, destination=store.url())
    (msg_id,) = emit(adapter, "cust-7f3a9c", 1, "MID")
    with adapter.delivery_worker(timeout=QUICK, schedule=LATER) as worker:
        worker.run_once()
    row = adapter.store.get_row(msg_id)
    assert row.state == "retry"
    assert (row.last_error or "").startswith(("RemoteProtocolError", "NetworkError"))
