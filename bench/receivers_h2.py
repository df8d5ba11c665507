"""The stores of :mod:`receivers`, speaking HTTP/2 as well as HTTP/1.1.

Each address (as :func:`receivers.store_addresses` lists them) is a distinct origin that
answers every request ``204`` after ``--delay`` seconds, in either protocol, on the same
port, so both clients of a comparison post to the very same stores:

- in clear text, a connection that opens with the HTTP/2 preface (``PRI * HTTP/2.0``) is
  HTTP/2 with prior knowledge ("h2c"), any other is HTTP/1.1;
- with ``--cert``/``--key``, every connection is TLS, and the client's ALPN offer decides:
  ``h2`` if offered, HTTP/1.1 otherwise, as a store that offers HTTP/2 on the internet does.

Run it as a process of its own (the benchmarks do) so its CPU is not the sender's::

    python bench/receivers_h2.py --port 18443 --stores 100 --delay 0.02 --cert c.pem --key k.pem

It prints ``ready`` once every address listens. HTTP/2 frames are read and written by the
``h2`` package's state machine (``pip install h2``, which ``httpx[http2]`` brings); HTTP/1.1
is :mod:`receivers`' own parser.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from receivers import _Store, run, serve_stores, store_addresses

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ANSWER_HEADERS = [(b":status", b"204"), (b"content-length", b"0")]


class _H2Store(asyncio.Protocol):
    """One HTTP/2 connection: each stream, once its request has ended, is answered after the
    delay. Any number of streams at once (the client's limit is its own)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.connection = h2.connection.H2Connection(config=config)
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  (a stream transport)
        self.connection.initiate_connection()
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.connection.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                # Gives the window back (h2 batches the WINDOW_UPDATE frames).
                self.connection.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
            elif isinstance(event, h2.events.StreamEnded):
                if self.delay:
                    asyncio.get_running_loop().call_later(self.delay, self._answer, event.stream_id)
                else:
                    self._answer(event.stream_id, flush=False)
            elif isinstance(event, h2.events.ConnectionTerminated) and self.transport:
                self.transport.close()
        self._flush()

    def _answer(self, stream_id: int, *, flush: bool = True) -> None:
        try:
            self.connection.send_headers(stream_id, ANSWER_HEADERS, end_stream=True)
        except h2.exceptions.StreamClosedError:
            return  # the client reset the stream meanwhile
        if flush:
            self._flush()

    def _flush(self) -> None:
        data = self.connection.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002
        self.transport = None


class _Either(asyncio.Protocol):
    """Hands the connection to the HTTP/2 or the HTTP/1.1 store: by ALPN under TLS, by the
    first bytes (the HTTP/2 preface or not) in clear text."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.first = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        tls = transport.get_extra_info("ssl_object")
        if tls is not None:
            self._choose(tls.selected_alpn_protocol() == "h2")

    def _choose(self, http2: bool) -> None:
        assert self.transport is not None
        self.inner = _H2Store(self.delay) if http2 else _Store(self.delay, hang=False)
        self.inner.connection_made(self.transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            self.first += data
            if len(self.first) < len(PREFACE) and PREFACE.startswith(self.first):
                return  # not enough yet to tell
            self._choose(self.first.startswith(PREFACE))
            data, self.first = self.first, b""
        assert self.inner is not None
        self.inner.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.inner.connection_lost(exc)


def server_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stores", type=int, default=100, help="addresses that answer")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--cert", help="PEM certificate chain: serve TLS (ALPN h2, http/1.1)")
    parser.add_argument("--key", help="PEM private key of --cert")
    args = parser.parse_args(argv)
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    tls = server_context(args.cert, args.key) if args.cert else None
    addresses = store_addresses(args.stores)
    run(serve_stores(args.port, addresses, lambda _address: _Either(args.delay), tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
