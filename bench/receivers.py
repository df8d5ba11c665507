"""Many customers' stores on one machine: a receiver listening on many loopback addresses.

Each address (127.0.0.2 upwards, then 127.0.1.0 and on) is a distinct origin to a client,
with its own connections, as thousands of stores across the internet are. Every request is
answered ``204`` after ``--delay`` seconds, except on the ``--hang`` addresses, which read
requests and never answer: a store that accepts a connection and then goes silent.

Run it as a process of its own (the benchmarks do) so its CPU is not the sender's::

    python bench/receivers.py --port 18080 --stores 100 --delay 0.1 --hang 1

It prints ``ready`` once every address listens, and serves until it is terminated. The
HTTP/1.1 parsing is the least that keep-alive POSTs with a ``content-length`` need: the
benchmark's sender is what is measured, so the receiver spends as little as it can.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

ANSWER = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (the receivers take it on every address)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def store_addresses(count: int) -> list[str]:
    """The loopback addresses of ``count`` stores: 127.0.0.2, 127.0.0.3, ... (skipping any
    address whose last byte is 0 or 255, which some tools treat as special)."""
    found: list[str] = []
    value = int(ipaddress.IPv4Address("127.0.0.2"))
    while len(found) < count:
        if value & 0xFF not in (0, 255):
            found.append(str(ipaddress.IPv4Address(value)))
        value += 1
    return found


class _Store(asyncio.Protocol):
    """One connection: answers each complete request after the delay, or never."""

    def __init__(self, delay: float, hang: bool) -> None:
        self.delay = delay
        self.hang = hang
        self.buffer = b""
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  (a stream transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            self.buffer = self.buffer[total:]
            if self.hang:
                continue  # read, and never answer
            if self.delay:
                asyncio.get_running_loop().call_later(self.delay, self._answer)
            else:
                self._answer()

    def _answer(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(ANSWER)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002
        self.transport = None


async def serve_stores(
    port: int,
    addresses: Sequence[str],
    store: Callable[[str], asyncio.Protocol],
    tls: ssl.SSLContext | None = None,
) -> None:
    """Listen on ``port`` of each address, a connection served by ``store(address)``;
    print ``ready`` once all listen, and serve until SIGTERM."""
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(lambda a=address: store(a), address, port, backlog=512, ssl=tls)
        for address in addresses
    ]
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop where it is installed: the receiver's own CPU is not what is
    measured."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main)
    else:
        uvloop.run(main)


async def serve(port: int, addresses: Sequence[str], delay: float, hang: set[str]) -> None:
    await serve_stores(port, addresses, lambda address: _Store(delay, address in hang))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stores", type=int, default=100, help="addresses that answer")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--hang", type=int, default=0, help="more addresses that never answer")
    args = parser.parse_args(argv)
    addresses = store_addresses(args.stores + args.hang)
    hang = set(addresses[args.stores :])
    run(serve(args.port, addresses, args.delay, hang))
    return 0


if __name__ == "__main__":
    sys.exit(main())
