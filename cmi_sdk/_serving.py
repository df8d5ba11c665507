"""Serving the SDK's ASGI apps with uvicorn, with limits that hold against slow and idle
clients: ``cmi serve``, ``cmi listen``, the demo's firm, tests and benchmarks.

uvicorn closes a connection that stays idle after a response (``timeout_keep_alive``) but
keeps one open for ever while it waits for a request's head: a client that connects and
sends nothing, or half a request line, holds a connection (a file descriptor) as long as it
likes, and enough of them stop the server accepting anyone. :class:`ServerLimits` adds:

- a deadline for a request's head, from the connection (or the end of the previous
  response) to the last header line; past it the connection is closed;
- a cap on open connections: a new connection over the cap closes the connection that has
  waited longest for its head (nginx does the same with idle keep-alive connections), or,
  when every connection is busy with a request, is itself closed at once;
- a cap on a request's head (request line and headers): uvicorn's httptools parser keeps
  every header line it is given, so a client sending headers fast would otherwise grow the
  process by hundreds of megabytes a second; past the cap the answer is 431;
- the keep-alive timeout.

The deadline for a request's body is the app's, so that it holds under any server: both
endpoints read bodies with :func:`read_body` under their ``body_timeout`` and answer 408.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import anyio
import uvicorn
from starlette.requests import ClientDisconnect, Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from cmi_sdk._exceptions import ConfigurationError
from cmi_sdk._limits import DEFAULT_BODY_TIMEOUT, ServerLimits

try:  # httptools is the faster parser; uvicorn falls back to h11 without it
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is a dependency of uvicorn[standard]
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "BodyTimeoutError",
    "ServerLimits",
    "read_body",
    "run_server",
    "serving",
]

log = logging.getLogger("cmi_sdk.serving")


class BodyTimeoutError(Exception):
    """A request's body did not arrive within the body deadline."""


class ClientGoneError(Exception):
    """The client closed the connection before its request's body arrived in full."""


async def read_body(request: Request, *, max_bytes: int, timeout: float) -> bytes:
    """The request's body, read within ``timeout`` seconds in all.

    :raises BodyTimeoutError: the body did not arrive in time.
    :raises ClientGoneError: the client went away before it was all there.
    :raises OverflowError: the body is over ``max_bytes`` (Content-Length is checked by the
        caller before this reads anything).
    """
    chunks: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(timeout):
            async with contextlib.aclosing(_stream(request)) as stream:
                async for chunk in stream:
                    size += len(chunk)
                    if size > max_bytes:
                        raise OverflowError(size)
                    chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeoutError(f"the body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:
        raise ClientGoneError("the client disconnected before the body was complete") from None
    return b"".join(chunks)


async def _stream(request: Request) -> AsyncGenerator[bytes, None]:
    async for chunk in request.stream():
        yield chunk


def client_text(request: Request) -> str:
    """``host:port`` of the client, for a log line."""
    client = request.client
    return f"{client.host}:{client.port}" if client is not None else "unknown client"


class _Guard:
    """The head deadline and the connection cap, mixed into uvicorn's HTTP protocols.

    The deadline is checked rather than cancelled: a timer armed when a connection starts
    waiting for a head closes it if, when it fires, no new request has begun since (the
    protocol's ``cycle`` is still the one it was armed with)."""

    # Set by uvicorn's protocol classes, which this is mixed into.
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    connections: set[Any]
    cycle: Any
    config: Any

    _head_timer: asyncio.TimerHandle | None = None
    _armed_with: Any = None
    _waiting_since: float = 0.0
    _head_bytes: int = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """A new connection: arm the head deadline and keep under the cap."""
        super().connection_made(transport)  # type: ignore[misc]
        self._guard_opened()

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: drop its timer."""
        self._guard_lost()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        """Parse, then count what is still a head."""
        super().data_received(data)  # type: ignore[misc]
        self._guard_received(len(data))

    def on_response_complete(self) -> None:
        """A response went out: the next request's head is due within the deadline."""
        super().on_response_complete()  # type: ignore[misc]
        self._guard_response_complete()

    def _limits(self) -> ServerLimits:
        limits = getattr(self.config, "cmi_limits", None)
        return limits if isinstance(limits, ServerLimits) else ServerLimits()

    def _cap(self) -> int:
        cap = getattr(self.config, "cmi_cap", None)
        return cap if isinstance(cap, int) else self._limits().connection_cap()

    def _arm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._waiting_since = time.monotonic()
        self._armed_with = self.cycle
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(
            self._limits().header_timeout, self._head_deadline, self.cycle
        )

    def _head_deadline(self, armed_with: Any) -> None:
        self._head_timer = None
        if self.cycle is armed_with and not self.transport.is_closing():
            self.transport.close()

    def _waiting_for_head(self) -> bool:
        # No request has begun since the deadline was armed: idle, or half a head in.
        return (
            self._head_timer is not None
            and self.cycle is self._armed_with
            and not self.transport.is_closing()
        )

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for its head; False if none is."""
        waiting = [c for c in self.connections if c is not self and c._waiting_for_head()]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c._waiting_since)
        oldest.transport.close()
        return True

    def _guard_opened(self) -> None:
        self._arm()
        cap = self._cap()
        if len(self.connections) <= cap:
            return
        # Connections closed a moment ago stay in the set until their connection_lost:
        # counted, they would make every newcomer in a burst close one more.
        open_now = sum(1 for c in self.connections if not c.transport.is_closing())
        for _ in range(max(0, open_now - cap)):
            if not self._make_room():
                log.warning("connection cap reached, every connection busy: closing a new one")
                self.transport.abort()
                return

    def _guard_received(self, size: int) -> None:
        """``size`` bytes were parsed: count them while they are still a head."""
        if self._head_timer is None or self.cycle is not self._armed_with:
            self._head_bytes = 0  # a request began: its head is complete
            return
        self._head_bytes += size
        limit = self._limits().max_header_bytes
        if self._head_bytes > limit and not self.transport.is_closing():
            # The parser keeps every header line it is given: without this cap, one client
            # can make the process hold gigabytes before the head deadline.
            self.transport.write(_head_too_large(limit))
            self.transport.close()

    def _guard_response_complete(self) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self._arm()  # waiting for the next head (the keep-alive timer also runs)

    def _guard_lost(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


def _head_too_large(limit: int) -> bytes:
    body = json.dumps(
        {
            "type": "urn:cmi:problem:header-too-large",
            "title": "The request's head is too large",
            "status": 431,
            "detail": f"the request line and headers are over {limit} bytes",
        }
    ).encode()
    head = (
        "HTTP/1.1 431 Request Header Fields Too Large\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedH11Protocol(_Guard, H11Protocol):
    """uvicorn's h11 protocol with :class:`ServerLimits`."""


if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):
        """uvicorn's httptools protocol with :class:`ServerLimits`."""

    _PROTOCOL = "cmi_sdk._serving:GuardedHttpToolsProtocol"
else:  # pragma: no cover
    _PROTOCOL = "cmi_sdk._serving:GuardedH11Protocol"


class _Config(uvicorn.Config):
    """uvicorn's configuration with the limits, which the protocols read from it (and which
    travel with it to ``--workers`` processes)."""

    def __init__(self, app: Any, *, limits: ServerLimits, **options: Any) -> None:
        options.setdefault("http", _PROTOCOL)
        options.setdefault("h11_max_incomplete_event_size", limits.max_header_bytes)
        super().__init__(app, timeout_keep_alive=limits.keep_alive_timeout, **options)  # type: ignore[arg-type]
        self.cmi_limits = limits
        self.cmi_cap = limits.connection_cap()


def server_config(
    app: Any, *, limits: ServerLimits | None = None, **options: Any
) -> uvicorn.Config:
    """A uvicorn configuration for ``app`` that enforces ``limits``."""
    limits = limits or ServerLimits()
    config = _Config(app, limits=limits, **options)
    if config.cmi_cap < limits.max_connections:
        log.warning(
            "at most %d connections (the descriptor limit), not %d",
            config.cmi_cap,
            limits.max_connections,
        )
    return config


def run_server(
    app: Any, *, limits: ServerLimits | None = None, workers: int = 1, **options: Any
) -> None:
    """Serve ``app`` (an app, or with ``workers`` > 1 an import string) until interrupted,
    as ``uvicorn.run`` does, with ``limits``."""
    from uvicorn.supervisors import Multiprocess  # noqa: PLC0415

    config = server_config(app, limits=limits, workers=workers, **options)
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        if workers > 1:
            sock = config.bind_socket()
            Multiprocess(config, sockets=[sock]).run()
        else:
            server.run()


@contextlib.contextmanager
def serving(
    app: Any,
    *,
    host: str = "127.0.0.1",
    timeout: float = 15.0,
    limits: ServerLimits | None = None,
    lifespan: bool = False,
) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread on a free port of ``host``; yield
    the base URL (``http://127.0.0.1:PORT``, no trailing slash); stop it on exit. With
    ``lifespan``, the app's lifespan runs (its startup before the URL is yielded).

    :raises ConfigurationError: the server did not start within ``timeout`` seconds.
    """
    config = server_config(
        app,
        limits=limits,
        host=host,
        port=0,
        log_level="warning",
        access_log=False,
        log_config=None,  # the host process keeps its own logging configuration
        lifespan="on" if lifespan else "off",
        ws="none",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="cmi-serving", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ConfigurationError(f"the server did not start on {host}")
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
