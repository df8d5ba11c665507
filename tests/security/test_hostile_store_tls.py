"""A hostile store or name server against the engine's TLS and address pinning.

The store listens with TLS on 127.0.0.2, which the test's guard counts as public; the
firm's "internal service" listens on 127.0.0.1 and counts every connection offered to it.
Every server loop is bounded in count and time, and every listener stops with its test.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cmi_sdk import EgressGuard, RetrySchedule
from cmi_sdk._delivery import Timeouts
from cmi_sdk.egress import _IPAddress
from tests.support import (
    Certificate,
    accept_in_thread,
    certificate,
    emitting_adapter,
    register,
    ticket,
)

HOST = "store.example"
STORE_ADDRESS = "127.0.0.2"
INTERNAL_ADDRESS = "127.0.0.1"


class PublicLoopbackGuard(EgressGuard):
    """The default guard (https only, public addresses only), except that 127.0.0.2
    stands for a public address."""

    def _refusal(self, addr: _IPAddress, *, trusted: bool = False) -> str | None:
        if addr == ipaddress.ip_address(STORE_ADDRESS):
            return None
        return super()._refusal(addr, trusted=trusted)


def answering(*addresses: str) -> Callable[[str, int], list[str]]:
    def resolver(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolver


@dataclass
class TlsStore:
    """A TLS listener answering 204 to each request; it records the SNI it was offered,
    the Host headers it read, and the connections made to it."""

    port: int
    server_names: list[str | None] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    connections: int = 0
    flood: bool = False
    """Answer with a chunk extension that never ends (16 MiB at most), not a 204."""
    poured: int = 0


@dataclass
class Listeners:
    store: TlsStore
    internal_connections: list[int]


@pytest.fixture
def listeners(tmp_path: Path) -> Iterator[Callable[[Certificate], Listeners]]:
    stop = threading.Event()
    threads: list[threading.Thread] = []
    handling: list[list[threading.Thread]] = []
    sockets: list[socket.socket] = []

    def start(cert: Certificate, *, flood: bool = False) -> Listeners:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert.cert, cert.key)
        store_socket = socket.socket()
        store_socket.bind((STORE_ADDRESS, 0))
        port = store_socket.getsockname()[1]
        store = TlsStore(port, flood=flood)

        def sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            store.server_names.append(name)

        context.sni_callback = sni
        internal = socket.socket()
        internal.bind((INTERNAL_ADDRESS, port))  # same port: only the address differs
        counted: list[int] = [0]

        def answer(conn: socket.socket) -> None:
            conn.settimeout(3)
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True) as tls:
                for _ in range(20):
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = tls.recv(65536)
                        if not chunk:
                            return
                        data += chunk
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                        if name.strip().lower() == b"host":
                            store.hosts.append(value.strip().decode())
                    while len(body) < length:
                        body += tls.recv(65536)
                    if store.flood:
                        tls.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;")
                        for _ in range(256):
                            if stop.is_set():
                                return
                            tls.sendall(b"a" * 65536)  # fails once the client drops it
                            store.poured += 65536
                        return
                    tls.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

        def accepted() -> None:
            store.connections += 1

        def refuse(conn: socket.socket) -> None:
            counted[0] += 1
            conn.close()

        for listener, handle, seen in (
            (store_socket, answer, accepted),
            (internal, refuse, lambda: None),
        ):
            sockets.append(listener)
            listener.listen(16)
            acceptor, handlers = accept_in_thread(
                listener, handle, stopping=stop.is_set, accepted=seen
            )
            threads.append(acceptor)
            handling.append(handlers)
        return Listeners(store, counted)

    yield start
    stop.set()
    for thread in [*threads, *(h for handlers in handling for h in handlers)]:
        thread.join(5)
    for listener in sockets:
        listener.close()


def deliver(
    tmp_path: Path, guard: EgressGuard, url: str, ssl_context: ssl.SSLContext | None
) -> tuple[str, str | None]:
    adapter = emitting_adapter(tmp_path, egress=guard)
    register(adapter, destination=url)
    emitted = adapter.emit(ticket())[0]
    options: dict[str, object] = {} if ssl_context is None else {"ssl_context": ssl_context}
    with adapter.delivery_worker(
        timeout=Timeouts(connect=2, read=2, total=3),
        schedule=RetrySchedule(delays=(3600,), jitter=0),
        **options,
    ) as worker:
        worker.run_once(max_rounds=1)
    row = adapter.store.get_row(emitted.msg_id)
    return row.state, row.last_error


def test_sni_and_host_are_the_destinations_name_and_its_certificate_is_verified(
    tmp_path: Path, listeners: Callable[[Certificate], Listeners]
) -> None:
    cert = certificate(tmp_path, HOST)
    seen = listeners(cert)
    guard = PublicLoopbackGuard(resolver=answering(STORE_ADDRESS))
    url = f"https://{HOST}:{seen.store.port}/inbox"
    assert deliver(tmp_path, guard, url, cert.trusted()) == ("delivered", None)
    assert seen.store.server_names == [HOST]
    assert seen.store.hosts == [f"{HOST}:{seen.store.port}"]


def test_a_self_signed_store_is_refused_unless_configured(
    tmp_path: Path, listeners: Callable[[Certificate], Listeners]
) -> None:
    seen = listeners(certificate(tmp_path, HOST))
    guard = PublicLoopbackGuard(resolver=answering(STORE_ADDRESS))
    url = f"https://{HOST}:{seen.store.port}/inbox"
    state, error = deliver(tmp_path, guard, url, None)  # the system's trusted roots
    assert state == "retry"
    assert (error or "").startswith("TLSError"), error
    assert seen.store.hosts == []  # nothing was sent


def test_a_certificate_for_another_name_is_refused(
    tmp_path: Path, listeners: Callable[[Certificate], Listeners]
) -> None:
    # Trusted as an authority, but issued to another name: a store may not present the
    # certificate of someone else's host it happens to hold.
    other = certificate(tmp_path, "other.example")
    seen = listeners(other)
    guard = PublicLoopbackGuard(resolver=answering(STORE_ADDRESS))
    url = f"https://{HOST}:{seen.store.port}/inbox"
    state, error = deliver(tmp_path, guard, url, other.trusted())
    assert state == "retry"
    assert (error or "").startswith("TLSError"), error
    assert seen.store.hosts == []


@pytest.mark.parametrize(
    "answers",
    [
        (STORE_ADDRESS, INTERNAL_ADDRESS),  # a public address and a private one
        (INTERNAL_ADDRESS, STORE_ADDRESS),
        ("::ffff:127.0.0.1",),
        (STORE_ADDRESS, "::ffff:127.0.0.1"),
        (STORE_ADDRESS, "0.0.0.0"),  # noqa: S104  (an answer, not a bind)
    ],
)
def test_a_name_answering_any_internal_address_gets_no_connection_at_all(
    tmp_path: Path, listeners: Callable[[Certificate], Listeners], answers: tuple[str, ...]
) -> None:
    cert = certificate(tmp_path, HOST)
    seen = listeners(cert)
    guard = PublicLoopbackGuard(resolver=answering(*answers))
    url = f"https://{HOST}:{seen.store.port}/inbox"
    adapter = emitting_adapter(tmp_path, egress=guard)
    register(adapter, destination=url)  # checked without DNS
    emitted = adapter.emit(ticket())[0]
    with adapter.delivery_worker(
        ssl_context=cert.trusted(), timeout=Timeouts(connect=2, read=2, total=3)
    ) as worker:
        worker.run_once(max_rounds=1)
    row = adapter.store.get_row(emitted.msg_id)
    assert row.state == "dead"
    assert (row.last_error or "").startswith("egress guard:")
    assert seen.internal_connections == [0]
    assert seen.store.connections == 0


def test_an_endless_chunk_extension_over_tls_is_cut_off(
    tmp_path: Path, listeners: Callable[..., Listeners]
) -> None:
    # The meter that bounds what an answer brings after its head sits on the TLS
    # transport (the engine's own event loop), not on the socket under it.
    cert = certificate(tmp_path, HOST)
    seen = listeners(cert, flood=True)
    guard = PublicLoopbackGuard(resolver=answering(STORE_ADDRESS))
    url = f"https://{HOST}:{seen.store.port}/inbox"
    started = time.monotonic()
    state, error = deliver(tmp_path, guard, url, cert.trusted())
    assert state == "retry"
    assert (error or "").startswith("RemoteProtocolError: answer too large"), error
    assert time.monotonic() - started < 2.5  # the total timeout is 3 s
    assert seen.store.poured < 16 * 1024 * 1024
