"""A customer's store is a host on the internet and may be hostile: attacks on the delivery
engine from the store's side of the connection.

Each store here is a raw TCP listener on a loopback address that answers with exactly the
bytes an attack needs (no HTTP library would send most of them). Every server loop is
bounded in count and time, and every listener stops with its test.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cmi_sdk import RetrySchedule
from cmi_sdk._delivery import Timeouts, parse_retry_after
from tests.support import accept_in_thread, emitting_adapter, register, ticket

Script = Callable[[socket.socket], None]


@dataclass
class RawStore:
    """A listener that runs ``script`` on each connection, counting connections and the
    bytes it managed to send."""

    address: str
    script: Script
    port: int = 0
    connections: int = 0
    sent: int = 0
    poured: float = 0.0  # seconds pour() kept sending
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def url(self, path: str = "/inbox") -> str:
        return f"http://{self.address}:{self.port}{path}"

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()


def read_request(conn: socket.socket, limit: float = 5.0) -> bytes:
    """The request's head and body (by its content-length), within ``limit`` seconds."""
    conn.settimeout(limit)
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 1 << 20:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head


@pytest.fixture
def raw_store() -> Iterator[Callable[[str, Script], RawStore]]:
    stores: list[tuple[RawStore, socket.socket, threading.Thread]] = []

    def start(address: str, script: Script) -> RawStore:
        store = RawStore(address, script)
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, 0))
        listener.listen(16)
        store.port = listener.getsockname()[1]

        def handle(conn: socket.socket) -> None:
            # The client hanging up is what these attacks expect.
            with conn, contextlib.suppress(OSError):
                store.script(conn)

        def accepted() -> None:
            store.connections += 1

        thread, store._threads = accept_in_thread(
            listener, handle, stopping=lambda: store.stopping, accepted=accepted
        )
        stores.append((store, listener, thread))
        return store

    yield start
    for store, listener, thread in stores:
        store._stop.set()
        thread.join(5)
        listener.close()
        for worker in store._threads:
            worker.join(5)


def deliver_one(
    tmp_path: Path, url: str, *, timeout: Timeouts | None = None, **worker_options: object
) -> tuple[str, str | None, int | None, float]:
    """Emit one document to ``url`` and run one round: its state, error, status, seconds."""
    adapter = emitting_adapter(tmp_path)
    register(adapter, destination=url)
    emitted = adapter.emit(ticket())[0]
    began = time.monotonic()
    with adapter.delivery_worker(
        timeout=timeout or Timeouts(connect=2, read=2, total=3),
        schedule=RetrySchedule(delays=(3600,), jitter=0),
        **worker_options,
    ) as worker:
        worker.run_once(max_rounds=1)
    took = time.monotonic() - began
    row = adapter.store.get_row(emitted.msg_id)
    return row.state, row.last_error, row.last_status, took


# -- redirects ---------------------------------------------------------------------------


def test_a_redirect_to_an_internal_address_is_never_followed(
    tmp_path: Path, raw_store: Callable[[str, Script], RawStore]
) -> None:
    internal = raw_store("127.0.0.3", lambda _conn: None)

    def redirect(conn: socket.socket) -> None:
        read_request(conn)
        for status in (307,):
            location = internal.url("/admin").encode()
            store.send(
                conn,
                b"HTTP/1.1 %d Temporary Redirect\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n"
                % (status, location),
            )

    store = raw_store("127.0.0.2", redirect)
    state, error, status, _ = deliver_one(tmp_path, store.url())
    assert (state, status) == ("retry", 307)
    assert error == "HTTP 307: redirects are not followed"
    assert internal.connections == 0


# -- answers that never end, or end too slowly -------------------------------------------


def pour(store: RawStore, conn: socket.socket, head: bytes, piece: Callable[[int], bytes]) -> None:
    """Answer a request with ``head``, then ``piece(0)``, ``piece(1)``, ... for up to 10 s
    (or until the store stops)."""
    read_request(conn)
    store.send(conn, head)
    conn.settimeout(1.0)
    began = time.monotonic()
    n = 0
    try:
        while not store.stopping and time.monotonic() < began + 10:
            store.send(conn, piece(n))
            n += 1
    finally:
        store.poured = time.monotonic() - began


def test_an_endless_body_is_read_to_a_small_cap_and_the_connection_dropped(
    tmp_path: Path, raw_store: Callable[[str, Script], RawStore]
) -> None:
    def endless(conn: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
        pour(store, conn, head, lambda _: b"x" * 65536)

    store = raw_store("127.0.0.2", endless)
    state, _, status, took = deliver_one(tmp_path, store.url())
    # The status stands; the client stopped reading soon after its cap and hung up, so
    # the store could push no more than the cap, the client's buffer and the kernel's.
    assert (state, status) == ("delivered", 200)
    assert took < 3
    assert store.sent < 16 * 1024 * 1024


def test_endless_headers_are_refused_at_aiohttps_limits(
    tmp_path: Path, raw_store: Callable[[str, Script], RawStore]
) -> None:
    def headers(conn: socket.socket) -> None:
        pour(
            store, conn, b"HTTP/1.1 200 OK\r\n", lambda n: b"x-filler-%d: %s\r\n" % (n, b"y" * 1000)
        )

    store = raw_store("127.0.0.2", headers)
    state, error, status, took = deliver_one(tmp_path, store.url())
    assert (state, status) == ("retry", None)
    assert error is not None
    assert "Too many headers" in error
    assert took < 3
    assert store.sent < 16 * 1024 * 1024


def test_an_endless_chunk_extension_is_cut_off_like_an_endless_body(
    tmp_path: Path, raw_store: Callable[[str, Script], RawStore]
) -> None:
    # Bytes that are neither head nor body: the parser yields no body from them, so the
    # body's cap never comes; the count of what arrives after the head does.
    def extension(conn: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;"
        pour(store, conn, head, lambda _: b"a" * 65536)

    store = raw_store("127.0.0.2", extension)
    cpu = time.process_time()
    state, error, status, took = deliver_one(
        tmp_path, store.url(), timeout=Timeouts(connect=5, read=5, total=10)
    )
    cpu = time.process_time() - cpu
    assert (state, status) == ("retry", None)
    assert error is not None
    assert error.startswith("RemoteProtocolError: answer too large:"), error
    # Cut off after a bounded count of bytes, not at the total timeout (10 s here, all of
    # it spent parsing at a core's speed before the count).
    assert store.poured < 1
    assert took < 3
    assert cpu < 3
    # As for an endless body: what the engine read, plus the kernel's buffers.
    assert store.sent < 16 * 1024 * 1024


def test_a_chunked_answer_in_one_byte_chunks_is_read_to_its_end_on_one_connection(
    tmp_path: Path, raw_store: Callable[[str, Script], RawStore]
) -> None:
    # The most framing a legitimate answer near the body's cap brings: one byte a chunk,
    # each with an extension (about 8 bytes a byte of body), kept alive between answers.
    body = b"".join(b"1;x\r\n%c\r\n" % (97 + i % 26) for i in range(60 * 1024)) + b"0\r\n\r\n"
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body

    def chunked(conn: socket.socket) -> None:
        for _ in range(10):
            if not read_request(conn):
                return
            store.send(conn, answer)

    store = raw_store("127.0.0.2", chunked)
    adapter = emitting_adapter(tmp_path)
    register(adapter, destination=store.url())
    ids = [adapter.emit(ticket(id=f"CH-{i}"))[0].msg_id for i in range(3)]
    with adapter.delivery_worker(
        timeout=Timeouts(connect=2, read=2, total=5),
        schedule=RetrySchedule(delays=(3600,), jitter=0),
    ) as worker:
        worker.run_once(max_rounds=1)
    rows = [adapter.store.get_row(i) for i in ids]
    assert [(r.state, r.last_status) for r in rows] == [("delivered", 200)] * 3
    assert store.connections == 1


@pytest.mark.slow
@pytest.mark.parametrize("where", ["status line", "headers", "body"])
def test_a_slow_drip_holds_a_slot_no_longer_than_the_total_timeout(
    tmp_path: Path, raw_store: Callable[[str, Script], RawStore], where: str
) -> None:
    # One byte every 0.2 s: under the read timeout (between bytes), forever.
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000000
    start = {"status line": 0, "headers": 20, "body": answer.index(b"\r\n\r\n") + 8}[where]

    def drip(conn: socket.socket) -> None:
        read_request(conn)
        store.send(conn, answer[:start])
        for i in range(start, start + 100):
            if store.stopping:
                return
            store.send(conn, answer[i : i + 1])
            time.sleep(0.2)

    store = raw_store("127.0.0.2", drip)
    state, error, _, took = deliver_one(
        tmp_path, store.url(), timeout=Timeouts(connect=1, read=1, total=2)
    )
    assert state == "retry"
    assert error == "timed out: TotalTimeout"
    assert took < 4


# -- Retry-After -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("9" * 5000, None),  # clamped by the schedule: see below
        ("-5", None),
        ("Mon, 01 Jan 1900 00:00:00 GMT", 0.0),
        ("\u00b2", None),  # a superscript two: str.isdigit says yes, float says no
        ("\u0661\u0662", None),  # Arabic-Indic digits are not delta-seconds either
        ("1e9", None),
        ("12 ", 12.0),
    ],
)
def test_retry_after_is_ascii_delta_seconds_or_a_date(value: str, seconds: float | None) -> None:
    got = parse_retry_after(value, time.time())
    if value.startswith("9"):
        assert got is not None
        assert got > 1e100
        return
    assert got == seconds


def test_retry_after_never_postpones_beyond_the_schedules_bound() -> None:
    schedule = RetrySchedule(delays=(5,), jitter=0, max_retry_after=3600)
    rng = random.Random(0)  # noqa: S311  (jitter)
    for value in ("9" * 5000, "Fri, 31 Dec 9999 23:59:59 GMT"):
        after = parse_retry_after(value, time.time())
        assert schedule.next_delay(1, rng, after) == 3600
    assert schedule.next_delay(1, rng, parse_retry_after("-5", time.time())) == 5


def test_a_retry_after_that_is_no_number_still_counts_the_5xx_for_the_circuit(
    tmp_path: Path,
    raw_store: Callable[[str, Script], RawStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def unavailable(conn: socket.socket) -> None:
        for _ in range(20):
            if not read_request(conn):
                return
            store.send(
                conn,
                "HTTP/1.1 503 Service Unavailable\r\nRetry-After: \u00b2\r\n"
                "Content-Length: 0\r\n\r\n".encode(),
            )

    store = raw_store("127.0.0.2", unavailable)
    adapter = emitting_adapter(tmp_path)
    register(adapter, destination=store.url())
    ids = [adapter.emit(ticket(id=f"RA-{i}"))[0].msg_id for i in range(4)]
    caplog.set_level(logging.WARNING, logger="cmi_sdk.delivery")
    with adapter.delivery_worker(
        timeout=Timeouts(connect=2, read=2, total=3),
        schedule=RetrySchedule(delays=(3600,), jitter=0),
        circuit_threshold=2,
        circuit_interval=3600,
    ) as worker:
        worker.run_once(max_rounds=1)
    errors = [adapter.store.get_row(i).last_error or "" for i in ids]
    # Two 503s open the circuit: the other documents wait for the probe, unsent.
    assert errors[:2] == ["HTTP 503", "HTTP 503"]
    assert all(e.startswith("circuit open:") for e in errors[2:])
    assert not any("unexpectedly" in r.getMessage() for r in caplog.records)


# -- logs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 503 Busy\rWARNING forged line\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 503 Busy\nWARNING forged line\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 503 Busy\r\nRetry-After: 1\rWARNING forged\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 503 Busy\r\nX-A\r\n WARNING forged\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 503 Busy\r\n" + b"X-Long: \r\nWARNING forged" * 3000 + b"\r\n\r\n",
        b"HTTP/1.1 2\r\n00 OK\nWARNING forged\r\n\r\n",
    ],
)
def test_a_stores_answer_cannot_forge_a_log_line(
    tmp_path: Path,
    raw_store: Callable[[str, Script], RawStore],
    caplog: pytest.LogCaptureFixture,
    answer: bytes,
) -> None:
    def hostile(conn: socket.socket) -> None:
        read_request(conn)
        store.send(conn, answer)

    store = raw_store("127.0.0.2", hostile)
    caplog.set_level(logging.INFO, logger="cmi_sdk")
    state, error, _, _ = deliver_one(tmp_path, store.url())
    assert state == "retry"
    assert error is not None
    assert "\r" not in error
    assert "\n" not in error
    for record in caplog.records:
        message = record.getMessage()
        assert "\n" not in message, message
        assert "\r" not in message, message


# -- connections cut --------------------------------------------------------------------


def reset(conn: socket.socket) -> None:
    """Close with RST: SO_LINGER on, zero seconds."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_a_store_that_accepts_then_resets_counts_for_its_circuit(
    tmp_path: Path, raw_store: Callable[[str, Script], RawStore]
) -> None:
    def rst(conn: socket.socket) -> None:
        read_request(conn)
        reset(conn)

    store = raw_store("127.0.0.2", rst)
    adapter = emitting_adapter(tmp_path)
    register(adapter, destination=store.url())
    ids = [adapter.emit(ticket(id=f"RST-{i}"))[0].msg_id for i in range(4)]
    with adapter.delivery_worker(
        timeout=Timeouts(connect=2, read=2, total=3),
        schedule=RetrySchedule(delays=(3600,), jitter=0),
        circuit_threshold=2,
        circuit_interval=3600,
    ) as worker:
        worker.run_once(max_rounds=1)
    errors = [adapter.store.get_row(i).last_error or "" for i in ids]
    assert all(e.startswith(("RemoteProtocolError", "NetworkError")) for e in errors[:2]), errors
    assert all(e.startswith("circuit open:") for e in errors[2:]), errors
    assert store.connections <= 2


@pytest.mark.slow
def test_a_200_after_the_total_timeout_is_no_delivery(
    tmp_path: Path, raw_store: Callable[[str, Script], RawStore]
) -> None:
    def late(conn: socket.socket) -> None:
        read_request(conn)
        for _ in range(30):  # 3 s, past the 1.5 s total
            if store.stopping:
                return
            time.sleep(0.1)
        store.send(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    store = raw_store("127.0.0.2", late)
    state, error, _, took = deliver_one(
        tmp_path, store.url(), timeout=Timeouts(connect=1, read=5, total=1.5)
    )
    assert state == "retry"
    assert error == "timed out: TotalTimeout"
    assert took < 3


# -- 410 Gone ------------------------------------------------------------------------------


def test_a_410_disables_only_the_destination_that_answered_it(
    tmp_path: Path, raw_store: Callable[[str, Script], RawStore]
) -> None:
    # One store serves two customers at two paths; the hostile one answers 410 for the
    # other's path too, from a redirect it hopes the engine follows.
    def store_script(conn: socket.socket) -> None:
        for _ in range(20):
            head = read_request(conn)
            if not head:
                return
            if head.startswith(b"POST /gone "):
                store.send(conn, b"HTTP/1.1 410 Gone\r\nContent-Length: 0\r\n\r\n")
            else:
                location = store.url("/gone").encode()
                store.send(
                    conn,
                    b"HTTP/1.1 308 Permanent Redirect\r\nLocation: %s\r\n"
                    b"Content-Length: 0\r\n\r\n" % location,
                )

    store = raw_store("127.0.0.2", store_script)
    adapter = emitting_adapter(tmp_path)
    register(adapter, destination=store.url("/gone"))
    register(adapter, destination=store.url("/other"))
    emitted = adapter.emit(ticket())
    with adapter.delivery_worker(
        timeout=Timeouts(connect=2, read=2, total=3),
        schedule=RetrySchedule(delays=(3600,), jitter=0),
    ) as worker:
        worker.run_once(max_rounds=1)
    assert set(adapter.store.disabled_destinations()) == {store.url("/gone")}
    states = {
        adapter.store.get_row(e.msg_id).destination: adapter.store.get_row(e.msg_id).state
        for e in emitted
    }
    assert states == {store.url("/gone"): "dead", store.url("/other"): "retry"}
