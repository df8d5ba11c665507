"""The delivery engine's connections stay within what the process may open: with many
stores, connections kept alive for a store's next document give way before the process
runs out of descriptors, and the concurrency is lowered to what the limit allows."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cmi_sdk import Adapter
from tests.support import emitting_adapter, register, ticket

ANSWER = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"


class Stores:
    """Stores on loopback addresses 127.0.0.2 upwards (each a distinct origin, as stores
    across the internet are), one port, keep-alive: each request is answered ``204``, and
    a connection stays open until the client closes it or asks the store to
    (``Connection: close``). Counts the connections open at
    once, at their peak."""

    def __init__(self, count: int) -> None:
        self.addresses = [f"127.0.0.{i}" for i in range(2, 2 + count)]
        self.open = 0
        self.peak = 0
        self.requests = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.Server] = []
        self._connections: list[asyncio.BaseTransport] = []

    def urls(self) -> list[str]:
        return [f"http://{a}:{self.port}/inbox" for a in self.addresses]

    def _protocol(self) -> asyncio.Protocol:
        stores = self

        class Connection(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport
                self.buffer = b""
                stores._connections.append(transport)
                stores.open += 1
                stores.peak = max(stores.peak, stores.open)

            def data_received(self, data: bytes) -> None:
                self.buffer += data
                while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                    head = self.buffer[:end].lower()
                    length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
                    if len(self.buffer) < end + 4 + length:
                        return
                    self.buffer = self.buffer[end + 4 + length :]
                    stores.requests += 1
                    self.transport.write(ANSWER)  # type: ignore[attr-defined]
                    if b"\r\nconnection: close" in head:  # as RFC 9112 requires
                        self.transport.close()  # type: ignore[attr-defined]
                        return

            def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002
                stores.open -= 1

        return Connection()

    async def _serve(self) -> None:
        first = await self._loop.create_server(self._protocol, self.addresses[0], 0)
        self.port = first.sockets[0].getsockname()[1]
        self._servers.append(first)
        for address in self.addresses[1:]:
            self._servers.append(await self._loop.create_server(self._protocol, address, self.port))

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        for transport in self._connections:
            transport.close()
        for server in self._servers:
            await server.wait_closed()

    @contextlib.contextmanager
    def running(self) -> Iterator[Stores]:
        thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            thread.join(10)
            self._loop.close()


def _fill(adapter: Adapter, urls: list[str], per_store: int) -> int:
    for i, url in enumerate(urls):
        register(adapter, customer_ref=f"cust-many{i:04d}", destination=url)
    txs = [
        ticket(id=f"M-{n}-{i}", customer_ref=f"cust-many{i:04d}")
        for n in range(per_store)
        for i in range(len(urls))
    ]
    adapter.emit_many(txs)
    return len(txs)


@pytest.mark.slow
def test_connections_kept_alive_give_way_at_the_bound(tmp_path: Path) -> None:
    bounded, unbounded = {}, {}
    for name, options, seen in (
        ("bounded", {"max_connections": 12}, bounded),
        ("unbounded", {}, unbounded),
    ):
        with Stores(60).running() as stores:
            adapter = emitting_adapter(tmp_path / name)
            count = _fill(adapter, stores.urls(), per_store=3)
            with adapter.delivery_worker(concurrency=6, **options) as worker:
                stats = worker.run_once()
            adapter.close()
            seen.update(delivered=stats.delivered, peak=stores.peak, requests=stores.requests)
        assert seen["delivered"] == count == 180
        assert seen["requests"] == count  # each document once: closing lost none
    # A connection closed by the client may be seen a moment after the next one opens.
    assert bounded["peak"] <= 12 + 2, bounded
    # The control: the same run keeps a connection alive to every store.
    assert unbounded["peak"] >= 50, unbounded


def test_the_concurrency_is_lowered_to_what_the_open_files_limit_allows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("cmi_sdk._delivery.open_files_limit", lambda: 100)
    adapter = emitting_adapter(tmp_path)
    with (
        caplog.at_level(logging.WARNING, logger="cmi_sdk.delivery"),
        adapter.delivery_worker(concurrency=512) as worker,
    ):
        worker.run_once()
        # 100 less the 64 kept for the store, logs and threads: 36 connections, three
        # quarters of them for documents in flight, the rest kept alive.
        assert worker._slots == 27
    assert "27 documents in flight at once, not 512" in caplog.text
    assert "ulimit -n" in caplog.text
    adapter.close()


def test_max_connections_is_checked(tmp_path: Path) -> None:
    from cmi_sdk import ConfigurationError

    adapter = emitting_adapter(tmp_path)
    with pytest.raises(ConfigurationError, match="max_connections must be at least 1"):
        adapter.delivery_worker(max_connections=0)
    adapter.close()


def test_cmi_deliver_raises_the_soft_open_files_limit_within_the_hard_one() -> None:
    # In a process of its own: the limit is the process's.
    code = """
import resource
from cmi_sdk._limits import raise_open_files_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
got = raise_open_files_limit(2304)
want = 2304 if hard == resource.RLIM_INFINITY else min(2304, hard)
assert got == want == resource.getrlimit(resource.RLIMIT_NOFILE)[0], (got, want)
assert raise_open_files_limit(100) == want  # never lowered
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "ok", done.stderr


@pytest.mark.slow
def test_connections_the_pool_has_not_closed_yet_still_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiohttp closes idle connections at a cleanup it runs once a keep-alive period, not
    # as each one's period ends: one released just after a cleanup stays open until the
    # next but one, nearly two periods. Forgotten after one, it would leave room for as
    # many more kept alive as the bound allows. (A short keep-alive stands for 30 s.)
    monkeypatch.setattr("cmi_sdk._delivery.KEEPALIVE_SECONDS", 1.0)
    stores = Stores(40)

    def slow(protocol: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        def make() -> asyncio.Protocol:
            connection = protocol()
            receive = connection.data_received

            def later(data: bytes) -> None:  # each answer 0.1 s after its request
                stores._loop.call_later(0.1, receive, data)

            connection.data_received = later  # type: ignore[method-assign]
            return connection

        return make

    stores._protocol = slow(stores._protocol)  # type: ignore[method-assign]
    with stores.running():
        adapter = emitting_adapter(tmp_path)
        count = _fill(adapter, stores.urls(), per_store=1)
        with adapter.delivery_worker(concurrency=1, max_connections=6) as worker:
            stats = worker.run_once()
        adapter.close()
    assert stats.delivered == count == stores.requests == 40
    # A connection closed by the client may be seen a moment after the next one opens.
    assert stores.peak <= 6 + 2, stores.peak
