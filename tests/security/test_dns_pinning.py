"""DNS rebinding against delivery: a customer's host name answers a public address when the
egress guard checks it, and a private one (TTL 0) when the client would resolve it again.

The delivery engine connects to the address the guard checked and keeps the name for the
``Host`` header and TLS (SNI and certificate verification), so the private address is
never connected to. Here the customer's store listens with TLS on 127.0.0.2 (which the
test's guard counts as public) and the firm's "internal service" on 127.0.0.1, same port,
counting every connection it is offered.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from cmi_sdk import EgressGuard, RetrySchedule
from cmi_sdk.egress import _IPAddress
from tests.support import Certificate, certificate, emitting_adapter, register, ticket

HOST = "store.example"
STORE_ADDRESS = "127.0.0.2"  # "public" to the guard below
INTERNAL_ADDRESS = "127.0.0.1"  # the firm's own machine: refused by the guard


class PublicLoopbackGuard(EgressGuard):
    """The default guard, except that 127.0.0.2 stands for a public address."""

    def _refusal(self, addr: _IPAddress, *, trusted: bool = False) -> str | None:
        if addr == ipaddress.ip_address(STORE_ADDRESS):
            return None
        return super()._refusal(addr, trusted=trusted)


class RebindingResolver:
    """A name server for ``store.example`` with TTL 0: the first answer is the store's
    address, every later one the internal address."""

    def __init__(self) -> None:
        self.asked = 0

    def __call__(self, host: str, port: int) -> list[str]:  # noqa: ARG002
        self.asked += 1
        return [STORE_ADDRESS] if self.asked == 1 else [INTERNAL_ADDRESS]


@dataclass
class Seen:
    hosts: list[str]
    internal_connections: int = 0


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[int, Seen, Certificate]]:
    """The store (TLS, 127.0.0.2) and the internal listener (127.0.0.1) on one port."""
    tls = certificate(tmp_path, HOST)
    seen = Seen(hosts=[])

    async def store(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        seen.hosts.extend(v.decode() for k, v in scope["headers"] if k == b"host")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    config = uvicorn.Config(
        store,
        host=STORE_ADDRESS,
        port=0,
        ssl_certfile=str(tls.cert),
        ssl_keyfile=str(tls.key),
        log_level="warning",
        lifespan="off",
        log_config=None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    internal = socket.socket()
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "the store did not start"
            assert time.monotonic() < deadline, "the store did not start in time"
            time.sleep(0.01)
        port: int = server.servers[0].sockets[0].getsockname()[1]
        internal.bind((INTERNAL_ADDRESS, port))
        internal.listen()
        internal.settimeout(0.05)

        def count() -> None:
            while not stop.is_set():
                try:
                    conn, _ = internal.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return  # closed: the test is over
                seen.internal_connections += 1
                conn.close()

        counter = threading.Thread(target=count, daemon=True)
        counter.start()
        yield port, seen, tls
    finally:
        stop.set()
        internal.close()
        server.should_exit = True
        thread.join(10)


def test_the_engine_connects_to_the_address_the_guard_checked(
    tmp_path: Path, servers: tuple[int, Seen, Certificate], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, seen, tls = servers
    resolver = RebindingResolver()
    client_lookups: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def system_resolver(host: Any, *args: Any, **kwargs: Any) -> Any:
        # What a client resolving the name itself would be told: the rebinding answer.
        if host == HOST:
            client_lookups.append(host)
            return real_getaddrinfo(INTERNAL_ADDRESS, *args, **kwargs)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", system_resolver)
    guard = PublicLoopbackGuard(resolver=resolver)
    adapter = emitting_adapter(tmp_path, egress=guard)
    terms = register(adapter, destination=f"https://STORE.example.:{port}/inbox")
    # Stored as the guard normalized it: what was checked is what is delivered to.
    assert terms.destination == f"https://store.example:{port}/inbox"
    first, second = (adapter.emit(ticket(id=f"DL-{i}"))[0] for i in range(2))
    with adapter.delivery_worker(
        ssl_context=tls.trusted(), schedule=RetrySchedule(delays=(3600,), jitter=0)
    ) as worker:
        worker.egress_ttl = 0  # check before every document
        stats = worker.run_once(max_rounds=1)
    # The first document went to the checked address, by name (Host, SNI, certificate).
    assert adapter.store.get_row(first.msg_id).state == "delivered"
    assert seen.hosts == [f"{HOST}:{port}"]
    # The name then answered the internal address: the guard refused it, and nothing
    # connected there, not even for a TLS handshake.
    row = adapter.store.get_row(second.msg_id)
    assert row.state == "dead"
    assert (row.last_error or "").startswith("egress guard:")
    assert seen.internal_connections == 0
    assert client_lookups == []  # the client never resolved the name itself
    assert (stats.delivered, stats.dead) == (1, 1)


def test_the_guard_returns_the_normalized_destination_it_checked() -> None:
    guard = PublicLoopbackGuard(resolver=RebindingResolver())
    pinned = guard.pin("https://STORE.example.:443/inbox")
    assert pinned.url == "https://store.example/inbox"
    assert (pinned.host, pinned.port, pinned.addresses) == (HOST, 443, (STORE_ADDRESS,))
    with pytest.raises(Exception, match="resolves to a loopback address"):
        guard.pin("https://store.example/inbox")  # the second answer
