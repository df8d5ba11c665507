"""The delivery engine: from the outbox to the customers' destinations, reliably.

Customers' stores are many hosts across the internet, each tens to hundreds of
milliseconds away, some slow, some down for days, some that accept a connection and never
answer. The engine is one asyncio loop that keeps many documents in flight:

- **Claims continuously.** Rows are leased from the outbox as slots free, with no batch
  barrier: a slow store holds its own slot, never a round. Leases of every row held (in
  flight, queued behind its destination, or waiting for its outcome to commit) are renewed
  by a heartbeat; outcomes are recorded in group commits as they come.
- **One at a time per destination** (``per_destination``), so each customer's documents
  arrive in order and a small store is not flooded; many destinations at once
  (``concurrency``, sized for WAN latency: what is in flight, divided by the answer time,
  bounds the rate).
- **A circuit per destination.** After ``circuit_threshold`` consecutive failures
  (timeouts, refused or reset connections, 5xx) a destination's circuit opens: its
  documents no longer take a slot each; one probe goes out per ``circuit_interval``, and
  the others are recorded as failed attempts at once and wait for the next probe (the
  retry schedule still applies to each document). An answer closes the circuit.
- **Connects to what the egress guard checked** (:meth:`EgressGuard.pin`): the client's
  resolver answers only with the addresses the guard judged, so a name that answers a
  public address to the guard and a private one a moment later (DNS rebinding) never gets
  a connection to the private one. The host name stays in the URL, so the ``Host`` header,
  TLS SNI and certificate verification use it.
- **Explicit timeouts per attempt**: connect, read (between bytes) and total.
- **Connections within the open-files limit** (``max_connections``): those in flight
  and those kept alive for a destination's next document. aiohttp bounds neither the
  idle ones nor closes one on request, so the engine keeps the count: past its share for
  idle connections, a destination with none kept opens one that is closed after its
  answer (a second session, whose connections are never pooled).

Delivery is at-least-once: a worker killed after a POST but before recording it leaves a
lease that expires, and the row goes out again with the same ``webhook-id``.

The transport, chosen by measurement (``python bench/transports.py``; the figures are in
``docs/performance.md``): one ``aiohttp`` session whose connector keeps one keep-alive
connection per origin. httpx's ``AsyncClient`` collapsed with many requests in flight (its
pool scans every connection per request, encode/httpx#3215); httpx over the
``httpx-aiohttp`` transport kept the rate but cost several times aiohttp's CPU per
request; a session per origin cost as much CPU as one session, and more memory per store.
HTTP/2 (``bench/transports.py http2``: httpx's ``http2=True``, as aiohttp's client speaks
HTTP/1.1 only) cost several times aiohttp's CPU per request, in clear text and over TLS,
and ten streams per store on one connection were slower than ten HTTP/1.1 connections: with
one document at a time per destination it has nothing to multiplex. The engine speaks
HTTP/1.1, which a store that offers HTTP/2 still answers to a client that does not ask for
it. aiohttp also lets the engine give the connector its own resolver, which is how
addresses are pinned. An ``httpx`` transport can still be passed (``transport=``): tests use
``httpx.MockTransport`` to see exactly what is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import ipaddress
import logging
import math
import random
import socket
import ssl
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit

import aiohttp
import aiohttp.abc
import httpx
import yarl
from aiohttp.client_proto import ResponseHandler

from cmi_sdk._exceptions import CMIError, ConfigurationError, DestinationNotAllowedError
from cmi_sdk._limits import RESERVED_DESCRIPTORS, open_files_limit
from cmi_sdk._models import SharingTerms, utc_at
from cmi_sdk._retention import check_offer_windows, check_windows, purge_windows
from cmi_sdk._version import __version__ as _version
from cmi_sdk.egress import EgressGuard, EgressResolutionError, PinnedDestination
from cmi_sdk.outbox import (
    AttemptResult,
    DeliveryReport,
    OutboxRow,
    OutboxStore,
    RetentionStore,
)
from cmi_sdk.webhooks import WebhookSigner

if TYPE_CHECKING:
    import pluggy

__all__ = [
    "DEFAULT_SCHEDULE",
    "DeliveryMetrics",
    "DeliveryProgress",
    "DeliveryStats",
    "DeliveryWorker",
    "RetrySchedule",
    "Timeouts",
]

log = logging.getLogger("cmi_sdk.delivery")

_T = TypeVar("_T")

DEFAULT_SCHEDULE: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
"""Seconds before each retry: the Standard Webhooks example schedule (immediately, then
5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h): eight attempts over about 27.6 hours."""

DEFAULT_CONCURRENCY = 512
"""Documents in flight at once by default: with answers 100 ms away, the rate is at most
ten times this a second (with 300 ms, over 1,700); a slot costs a socket and a few
kilobytes."""
KEEPALIVE_SECONDS = 30.0
"""How long an idle connection to a destination is kept for its next document. aiohttp
closes idle connections at a cleanup it runs once a period (its first instant rounded up
to a second), so one may stay open for up to twice this and a second more: the engine
counts it that long."""

USER_AGENT = f"cmi-sdk/{_version}"
DEFAULT_KEEP_DELIVERED = 30 * 86400.0
"""Delivered documents are kept this long (the pull window), then purged; pull-only,
merged and cancelled ones too."""
DEFAULT_KEEP_DEAD = 90 * 86400.0
"""Dead letters not redriven are kept this long, then purged."""
DEFAULT_KEEP_OFFERS = 30 * 86400.0
"""Offers are kept this long after they stop being valid, then purged with their
acceptances (see :data:`DEFAULT_KEEP_ACCEPTANCES`)."""
DEFAULT_KEEP_ACCEPTANCES = 30 * 86400.0
"""Finished acceptances are kept this long, answering retries as they were; then they go
with their offer once it has expired (never a ``processing`` one)."""
DEFAULT_KEEP_ATTEMPTS = 7 * 86400.0
"""The attempts of a delivered document are kept this long; the document stays for the
pull window."""
EGRESS_TTL = 30.0
"""Seconds a destination stays checked by the egress guard before it is resolved and
checked again."""
RESOLVER_THREADS = 64
"""Threads resolving destinations' host names at once (the system resolver blocks)."""
PURGE_INTERVAL = 60.0  # seconds between two purge batches of a worker
PURGE_BATCH = 500
CIRCUIT_OPEN = "circuit open:"
"""How the error of an attempt not made for an open circuit begins (``cmi outbox status``
finds open circuits by it)."""
_MAX_ANSWER_BYTES = 64 * 1024  # read of an answer's body, for keep-alive; the rest is dropped
_MAX_AFTER_HEAD_BYTES = 1024 * 1024
"""What a connection may bring after an answer's head while its body is read: the body's
cap, with room for the framing of a legitimate chunked body (one-byte chunks with a short
extension take about eight bytes a byte) and for what the client buffers. Past it the
attempt fails and the connection is dropped."""


@dataclass(frozen=True)
class RetrySchedule:
    """When failed deliveries are tried again.

    :param delays: seconds before each retry; after the last, the row is dead.
    :param jitter: each delay is scaled by a random factor in [1 - jitter, 1 + jitter], so
        retries from many rows do not arrive together.
    :param max_retry_after: the longest ``Retry-After`` honoured, seconds.
    """

    delays: tuple[float, ...] = DEFAULT_SCHEDULE
    jitter: float = 0.1
    max_retry_after: float = 86400.0

    def __post_init__(self) -> None:
        # NaN compares false both ways: written as "not inside", it is refused too.
        if not all(0 <= d < math.inf for d in self.delays) or not 0 <= self.jitter < 1:
            raise ConfigurationError("retry delays must be finite and >= 0, jitter in [0, 1)")
        if not 0 <= self.max_retry_after < math.inf:
            raise ConfigurationError("max_retry_after must be finite and >= 0")

    @property
    def max_attempts(self) -> int:
        """The first attempt and one per delay."""
        return len(self.delays) + 1

    def next_delay(
        self, attempts: int, rng: random.Random, retry_after: float | None = None
    ) -> float | None:
        """Seconds until the next attempt after ``attempts`` failed ones; None when dead."""
        if attempts > len(self.delays):
            return None
        delay = self.delays[attempts - 1] * (1 + rng.uniform(-self.jitter, self.jitter))
        if retry_after is not None:
            # The receiver asked us not to come back sooner: never sooner, never absurdly late.
            delay = max(delay, min(retry_after, self.max_retry_after))
        return delay


@dataclass(frozen=True)
class Timeouts:
    """The limits of one delivery attempt, in seconds.

    :param connect: to open the connection (TCP and TLS); also the bound of the name
        lookup before it, counted from when a resolver thread takes it.
    :param read: between two reads of the answer (a store that stops talking).
    :param total: for the request, connection included (the name lookup comes before).
    """

    connect: float = 5.0
    read: float = 10.0
    total: float = 30.0

    def __post_init__(self) -> None:
        if not all(0 < t < math.inf for t in (self.connect, self.read, self.total)):
            raise ConfigurationError("timeouts must be positive and finite")

    @classmethod
    def of(cls, value: Timeouts | httpx.Timeout | float | None) -> Timeouts:
        """Timeouts from an ``httpx.Timeout`` (connect, read; the total is connect + write
        + read), a number (every limit), or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, Timeouts):
            return value
        if isinstance(value, int | float):
            return cls(connect=float(value), read=float(value), total=float(value))
        connect = value.connect or cls.connect
        read = value.read or cls.read
        return cls(connect=connect, read=read, total=connect + (value.write or read) + read)


@dataclass
class DeliveryStats:
    """What a worker did: counts of attempts by outcome."""

    delivered: int = 0
    retried: int = 0
    dead: int = 0
    skipped: int = 0
    """Rows claimed but not attempted: their terms were revoked meanwhile."""
    outcomes: list[AttemptResult] = field(default_factory=list, repr=False)

    @property
    def attempts(self) -> int:
        """Every attempt made."""
        return self.delivered + self.retried + self.dead

    def add(self, other: DeliveryStats) -> None:
        """Add ``other``'s counts to these."""
        self.delivered += other.delivered
        self.retried += other.retried
        self.dead += other.dead
        self.skipped += other.skipped
        self.outcomes.extend(other.outcomes)

    def retry_reasons(self) -> Counter[str]:
        """Why attempts failed and are tried again later, with how many each."""
        return Counter(r.error or "?" for r in self.outcomes if r.outcome == "retry")


@dataclass(frozen=True, slots=True)
class DeliveryProgress:
    """A running worker's figures, reported about once a second (``progress=``)."""

    delivered: int
    retried: int
    dead: int
    in_flight: int
    held: int
    """Rows leased by this worker: in flight, queued behind their destination, or waiting
    for their outcome to be recorded."""
    open_circuits: int
    delivered_per_second: float
    """Over the last interval."""
    oldest_pending_age: float | None
    """Seconds since the oldest row waiting to go out was created (from the store)."""

    def line(self) -> str:
        """One line for a terminal."""
        oldest = "-" if self.oldest_pending_age is None else f"{self.oldest_pending_age:,.0f} s"
        return (
            f"{self.delivered_per_second:,.0f} delivered/s  in flight {self.in_flight}"
            f"  delivered {self.delivered}  retries {self.retried}  dead {self.dead}"
            f"  open circuits {self.open_circuits}  oldest pending {oldest}"
        )


_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class DeliveryMetrics:
    """Delivery figures of this process's workers, for ``/metrics``: attempt latency by
    outcome (a histogram) and attempts by outcome and reason. Thread-safe; one per
    adapter, shared by the workers it makes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        self._counts: Counter[tuple[str, str]] = Counter()
        self.in_flight = 0
        self.open_circuits = 0

    def observe(self, outcome: str, reason: str, seconds: float | None) -> None:
        """Count one attempt; ``seconds`` is None for one that sent nothing."""
        with self._lock:
            self._counts[outcome, reason] += 1
            if seconds is None:
                return
            buckets = self._buckets.setdefault(outcome, [0] * (len(_BUCKETS) + 1))
            for i, bound in enumerate(_BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            buckets[-1] += 1
            self._sums[outcome] = self._sums.get(outcome, 0.0) + seconds

    def prometheus_lines(self) -> list[str]:
        """The figures in the Prometheus text exposition format."""
        with self._lock:
            lines = [
                "# HELP cmi_delivery_seconds Delivery attempts' duration, by outcome.",
                "# TYPE cmi_delivery_seconds histogram",
            ]
            for outcome, buckets in sorted(self._buckets.items()):
                for bound, count in zip(_BUCKETS, buckets, strict=False):
                    lines.append(
                        f'cmi_delivery_seconds_bucket{{outcome="{outcome}",le="{bound:g}"}} {count}'
                    )
                lines.append(
                    f'cmi_delivery_seconds_bucket{{outcome="{outcome}",le="+Inf"}} {buckets[-1]}'
                )
                lines.append(
                    f'cmi_delivery_seconds_sum{{outcome="{outcome}"}} {self._sums[outcome]:.6f}'
                )
                lines.append(f'cmi_delivery_seconds_count{{outcome="{outcome}"}} {buckets[-1]}')
            lines += [
                "# HELP cmi_delivery_results_total Delivery attempts by outcome and reason.",
                "# TYPE cmi_delivery_results_total counter",
                *(
                    f'cmi_delivery_results_total{{outcome="{o}",reason="{r}"}} {n}'
                    for (o, r), n in sorted(self._counts.items())
                ),
                "# HELP cmi_delivery_in_flight Documents being sent now.",
                "# TYPE cmi_delivery_in_flight gauge",
                f"cmi_delivery_in_flight {self.in_flight}",
                "# HELP cmi_delivery_open_circuits Destinations whose circuit is open.",
                "# TYPE cmi_delivery_open_circuits gauge",
                f"cmi_delivery_open_circuits {self.open_circuits}",
            ]
        return lines


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    # ASCII digits only: str.isdigit also says yes to "²" (which float refuses, and the
    # attempt failed as a bug, uncounted by the circuit) and to other scripts' digits.
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def _literal_address(url: str) -> bool:
    """Whether ``url``'s host is an IP address (which the guard judges without DNS)."""
    try:
        host = urlsplit(url).hostname
        ipaddress.ip_address(host or "")
    except ValueError:
        return False
    return True


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


# -- the transport ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    retry_after: str | None


class _SendError(Exception):
    """An attempt got no answer; the message says why."""

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class _Sender(Protocol):
    async def post(
        self, url: str, body: bytes, headers: dict[str, str], *, close: bool = False
    ) -> _Answer:
        """POST; with ``close``, the connection is closed after the answer, not kept
        (and ``Connection: close`` tells the store so)."""

    async def close(self) -> None: ...


class _PinnedResolver(aiohttp.abc.AbstractResolver):
    """Answers only with the addresses the egress guard checked for a host and port;
    never asks DNS. A host the guard has not checked gets no address at all."""

    def __init__(self, pins: dict[tuple[str, int], tuple[str, ...]]) -> None:
        self._pins = pins

    async def resolve(
        self,
        host: str,
        port: int = 0,
        family: socket.AddressFamily = socket.AF_INET,  # noqa: ARG002  (the pins decide)
    ) -> list[aiohttp.abc.ResolveResult]:
        addresses = self._pins.get((host, port))
        if not addresses:
            raise OSError(f"{host}:{port} has not been checked by the egress guard")
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in addresses
        ]

    async def close(self) -> None:
        return None


class _AnswerTooLarge(aiohttp.ClientPayloadError):
    """An answer brought more bytes after its head than its body's cap allows for."""

    def __init__(self) -> None:
        super().__init__(
            f"answer too large: more than {_MAX_AFTER_HEAD_BYTES >> 10} KiB after its head"
            f" for under {_MAX_ANSWER_BYTES >> 10} KiB of body"
        )


class _Meter(asyncio.Protocol):
    """Stands between a connection's transport and aiohttp's protocol and counts the bytes
    an answer brings after its head.

    The cap on the body bounds only what the parser yields as body. Bytes that are neither
    head nor body, such as an endless chunk extension (``1;aaaa...``), the parser consumes
    at a core's speed and yields nothing, so without a count of the raw bytes a store
    keeps the worker's CPU busy until the attempt's total timeout. Asyncio lets a
    transport's protocol be swapped (``set_protocol``), which needs nothing private of
    aiohttp; one meter stays on a connection for its life, armed only while an answer's
    body is read.
    """

    __slots__ = ("_inner", "_transport", "budget", "tripped")

    def __init__(self, inner: asyncio.Protocol, transport: asyncio.Transport) -> None:
        self._inner = inner
        self._transport = transport
        self.budget: int | None = None  # None: not counting (between answers)
        self.tripped = False

    def data_received(self, data: bytes) -> None:
        if self.budget is not None:
            self.budget -= len(data)
            if self.budget < 0:
                # Not parsed: the read waiting on the body fails as the connection drops.
                self.budget = None
                self.tripped = True
                self._transport.abort()
                return
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def _metered(response: aiohttp.ClientResponse) -> _Meter | None:
    """The meter of the connection an answer's body comes on, armed; None when the body
    came with the head (the connection has gone back to the pool)."""
    connection = response.connection
    transport = connection.transport if connection is not None else None
    if connection is None or transport is None or connection.protocol is None:
        return None
    meter = transport.get_protocol()
    if meter is connection.protocol:  # a new connection
        meter = _Meter(connection.protocol, transport)
        transport.set_protocol(meter)
    elif not isinstance(meter, _Meter):  # never seen: leave another layer alone
        return None
    meter.budget = _MAX_AFTER_HEAD_BYTES
    meter.tripped = False
    return meter


class _Handler(ResponseHandler):
    """aiohttp's protocol of a connection, never reused once something came on it while
    it was kept alive: an answer sent before the request is no answer to it. (A store that
    sends a 200 on an idle connection would otherwise have the next document on it taken
    for delivered without receiving it.) Only the pool asks a connection whether it is
    connected, to reuse it or let it expire."""

    def is_connected(self) -> bool:
        return super().is_connected() and not self.should_close


def _connector(**options: Any) -> aiohttp.TCPConnector:
    """aiohttp's connector, its connections with the protocol above (set where aiohttp
    3.10 to 3.14 keep their protocol factory; a release that moves it fails the red-team
    test of an unasked answer)."""
    connector = aiohttp.TCPConnector(**options)
    if not isinstance(getattr(connector, "_factory", None), functools.partial):
        log.warning(
            "aiohttp %s keeps no protocol factory where expected: a connection that"
            " received an answer nobody asked for may be reused",
            aiohttp.__version__,
        )
    handler: type[ResponseHandler] = _Handler
    connector._factory = functools.partial(handler, loop=connector._loop)
    return connector


class _AiohttpSender:
    """One aiohttp session: a keep-alive pool keyed by origin, the pinned resolver, no
    cookies, no proxy from the environment, no redirects. A second one, alike but closing
    each connection after its answer, sends what must not leave a connection open (the
    engine's bound on connections kept alive): asking the store to close is not enough,
    since a store that ignores it would leave the connection in the pool."""

    def __init__(
        self,
        *,
        pins: dict[tuple[str, int], tuple[str, ...]],
        per_destination: int,
        timeouts: Timeouts,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        def session(force_close: bool) -> aiohttp.ClientSession:
            connector = _connector(
                limit=0,  # the engine bounds what is in flight
                limit_per_host=per_destination,
                resolver=_PinnedResolver(pins),
                use_dns_cache=False,  # the pins are the cache: the guard's answers only
                ssl=ssl_context if ssl_context is not None else True,
                keepalive_timeout=None if force_close else KEEPALIVE_SECONDS,
                force_close=force_close,
            )
            return aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # a store's cookies never reach another
                trust_env=False,  # no proxy from the environment sees customers' data
                auto_decompress=False,
            )

        self._session = session(force_close=False)
        self._closing = session(force_close=True)
        self._timeout = aiohttp.ClientTimeout(
            total=timeouts.total, sock_connect=timeouts.connect, sock_read=timeouts.read
        )
        # Parsed once per destination: parsing a URL is a good part of a request's CPU.
        self._urls: dict[str, yarl.URL] = {}

    async def post(
        self, url: str, body: bytes, headers: dict[str, str], *, close: bool = False
    ) -> _Answer:
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) > 10_000:
                self._urls.clear()
            parsed = self._urls[url] = yarl.URL(url)
        headers["user-agent"] = USER_AGENT
        meter = None
        try:
            async with (self._closing if close else self._session).post(
                parsed, data=body, headers=headers, allow_redirects=False, timeout=self._timeout
            ) as response:
                # Read the answer to its end: one cut short raises here, and a 2xx that
                # never finished is not a delivery. Bounded: past the bound, the status
                # stands and the connection is dropped; past the meter's, it fails.
                meter = _metered(response)
                try:
                    remaining = _MAX_ANSWER_BYTES
                    while remaining > 0:
                        chunk = await response.content.read(remaining)
                        if not chunk:
                            break
                        remaining -= len(chunk)
                finally:
                    if meter is not None:
                        meter.budget = None
                if meter is not None and meter.tripped:
                    raise _AnswerTooLarge
                return _Answer(response.status, response.headers.get("retry-after"))
        except aiohttp.ConnectionTimeoutError:
            raise _SendError("timed out: ConnectTimeout", timed_out=True) from None
        except aiohttp.SocketTimeoutError:
            raise _SendError("timed out: ReadTimeout", timed_out=True) from None
        except TimeoutError:  # the attempt's total
            raise _SendError("timed out: TotalTimeout", timed_out=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            # Whatever the parser made of a connection the meter dropped, the meter says why.
            tripped = meter is not None and meter.tripped
            raise _SendError(_reason(_AnswerTooLarge() if tripped else exc)) from None

    async def close(self) -> None:
        await self._session.close()
        await self._closing.close()


def _reason(exc: BaseException) -> str:
    """Why a request got no answer, in words that do not depend on the client library
    (the names httpx uses, which operators and earlier records already know)."""
    if isinstance(exc, aiohttp.ClientSSLError):
        kind = "TLSError"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        kind = "ConnectError"
    elif isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        kind = "RemoteProtocolError"
    elif isinstance(exc, OSError):
        kind = "NetworkError"
    else:
        kind = type(exc).__name__
    return f"{kind}: {exc}"


class _HttpxSender:
    """An ``httpx`` transport (tests pass ``httpx.MockTransport``)."""

    def __init__(self, transport: httpx.AsyncBaseTransport, timeouts: Timeouts) -> None:
        self._client = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,  # a 3xx is a failure: never follow a redirect
            trust_env=False,
            headers={"user-agent": USER_AGENT},
            timeout=httpx.Timeout(timeouts.read, connect=timeouts.connect),
        )
        self._total = timeouts.total

    async def post(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        *,
        close: bool = False,
    ) -> _Answer:
        if close:
            headers["connection"] = "close"
        try:
            async with asyncio.timeout(self._total):  # httpx has no total of its own
                response = await self._client.post(url, content=body, headers=headers)
        except TimeoutError:
            raise _SendError("timed out: TotalTimeout", timed_out=True) from None
        except httpx.TimeoutException as exc:
            raise _SendError(f"timed out: {type(exc).__name__}", timed_out=True) from None
        except httpx.HTTPError as exc:
            raise _SendError(f"{type(exc).__name__}: {exc}") from None
        return _Answer(response.status_code, response.headers.get("retry-after"))

    async def close(self) -> None:
        await self._client.aclose()


# -- the engine's state -----------------------------------------------------------------


@dataclass(slots=True)
class _Job:
    row: OutboxRow
    terms: SharingTerms


@dataclass
class _Lookup:
    """A destination's name being resolved: when its thread took it, and the answer."""

    started: asyncio.Event
    started_at: float = 0.0
    answer: asyncio.Future[PinnedDestination] = field(init=False)


@dataclass
class _Origin:
    """One destination origin (scheme, host, port): its queue, its slots, its circuit."""

    key: str
    queue: deque[_Job] = field(default_factory=deque)
    in_flight: int = 0
    failures: int = 0
    """Consecutive attempts with no answer, or a 5xx."""
    probe_at: float | None = None
    """Circuit open: when the next probe may go; None while closed."""
    probing: bool = False
    logged_at: float = -math.inf
    unlogged: int = 0


@dataclass
class _Run:
    """What one run of the engine keeps: its stats and what it waits for."""

    stats: DeliveryStats
    keep_outcomes: bool
    wake: asyncio.Event
    sender: _Sender
    results: list[tuple[_Job, AttemptResult]] = field(default_factory=list)
    flushed: asyncio.Event = field(default_factory=asyncio.Event)
    committing: bool = False
    """The flusher is recording a batch taken from ``results``."""
    committed_since_claim: bool = False
    disable: list[tuple[str, str, float]] = field(default_factory=list)
    """Destinations that answered 410, to disable in the next commit."""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class DeliveryWorker:
    """Delivers the outbox's due documents (see the module's notes for how).

    :param store: the outbox.
    :param hook: the adapter's hook relay (for ``cmi_on_delivered`` and
        ``cmi_on_dead_letter``).
    :param egress: the egress guard every destination passes; the engine connects only to
        the addresses it checked.
    :param concurrency: documents in flight at once, across destinations (fewer when
        ``max_connections`` is lower).
    :param max_connections: the most connections open at once, in flight or kept alive
        for a destination's next document. By default, what the process's descriptor
        limit allows, less a reserve for the store and logs (``cmi deliver`` raises the
        soft limit toward four times ``concurrency`` first). Once those kept alive reach
        their share (the bound less one a document in flight), a destination with none
        kept opens a connection that is closed after its answer.
    :param per_destination: documents in flight at once to one destination (origin). One,
        the default, sends each destination's documents in order over one keep-alive
        connection.
    :param batch: the most rows claimed at once.
    :param lease_seconds: how long a claim holds without a heartbeat.
    :param timeout: the limits of each attempt: a :class:`Timeouts`, an ``httpx.Timeout``
        (its connect and read; the total is connect + write + read) or seconds.
    :param schedule: the retry schedule.
    :param ed25519_key: a ``whsk_`` key: adds a ``v1a`` signature to every delivery.
    :param transport: an ``httpx`` async transport to send with instead of the engine's
        own client (tests: ``httpx.MockTransport``). It connects as it likes: the egress
        guard still checks each destination, but addresses are pinned only without it.
    :param ssl_context: the TLS settings for destinations (default: the system's trusted
        certificates, hostnames verified).
    :param circuit_threshold: consecutive failures (no answer, or a 5xx) that open a
        destination's circuit.
    :param circuit_interval: seconds between probes of an open circuit.
    :param clock: the scheduling clock (POSIX seconds); tests inject one to simulate
        days. The ``webhook-timestamp`` header always uses the real time, so receivers can
        judge it.
    :param seed: seeds the jitter (tests).
    :param digests: called now and then to turn ended digest windows into documents (the
        adapter's; see :meth:`~cmi_sdk.Adapter.delivery_worker`).
    :param destination_lease_limit: with a store that can enforce it (PostgreSQL), the
        most rows leased to one destination at once across *all* workers.
    :param metrics: where to count attempts for ``/metrics`` (the adapter's).
    :param keep_delivered: seconds a delivered document is kept (the pull window: 30
        days); then the worker purges it, with its attempts, a batch a minute. The same
        window, from when each ended, holds pull-only, merged and cancelled documents
        (see :func:`cmi_sdk._retention.purge_windows`). None: kept.
    :param keep_dead: seconds a dead letter is kept unless redriven (90 days), and an
        emission problem. None: kept.
    :param keep_offers: seconds an offer is kept once no longer valid (30 days; at least
        a day), then purged with its acceptances. None: kept.
    :param keep_acceptances: seconds a finished acceptance is kept (30 days; at least a
        day); its offer (and it) go once both windows passed. None: kept.
    :param keep_attempts: seconds the attempts of a delivered document are kept (7 days;
        the document stays for the pull window). None: kept with the document.
    :param document_headers: the headers a row's document goes with, beside the webhook
        ones: its ``content-type``, and a detached signature for a standard with no place
        for one (the adapter's :meth:`~cmi_sdk.Documents.delivery_headers`); by default
        ``content-type: application/xml`` alone.
    """

    def __init__(
        self,
        *,
        store: OutboxStore,
        hook: pluggy.HookRelay,
        egress: EgressGuard,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_connections: int | None = None,
        per_destination: int = 1,
        batch: int = 64,
        lease_seconds: float = 60.0,
        timeout: Timeouts | httpx.Timeout | float | None = None,
        schedule: RetrySchedule | None = None,
        ed25519_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        ssl_context: ssl.SSLContext | None = None,
        circuit_threshold: int = 5,
        circuit_interval: float = 30.0,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
        digests: Callable[[], int] | None = None,
        destination_lease_limit: int | None = None,
        metrics: DeliveryMetrics | None = None,
        document_headers: Callable[[OutboxRow], Mapping[str, str]] | None = None,
        keep_delivered: float | None = DEFAULT_KEEP_DELIVERED,
        keep_dead: float | None = DEFAULT_KEEP_DEAD,
        keep_offers: float | None = DEFAULT_KEEP_OFFERS,
        keep_acceptances: float | None = DEFAULT_KEEP_ACCEPTANCES,
        keep_attempts: float | None = DEFAULT_KEEP_ATTEMPTS,
    ) -> None:
        if concurrency < 1 or per_destination < 1 or batch < 1 or circuit_threshold < 1:
            raise ConfigurationError(
                "concurrency, per_destination, batch and circuit_threshold must be >= 1"
            )
        if max_connections is not None and max_connections < 1:
            raise ConfigurationError("max_connections must be at least 1")
        if not 0 < lease_seconds < math.inf:
            raise ConfigurationError("lease_seconds must be positive and finite")
        if not 0 <= circuit_interval < math.inf:
            raise ConfigurationError("circuit_interval must be finite and >= 0")
        check_offer_windows(keep_offers, keep_acceptances)
        check_windows(keep_delivered, keep_dead, keep_attempts)
        if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
            raise ConfigurationError("transport must be an httpx async transport")
        self.store = store
        self._hook = hook
        self.egress = egress
        self.concurrency = concurrency
        self.max_connections = max_connections
        self.per_destination = per_destination
        self.batch = batch
        self.capacity = max(2 * concurrency, batch)
        """The most rows held at once (leased, in flight or queued)."""
        self.lease_seconds = lease_seconds
        self.timeouts = Timeouts.of(timeout)
        self.schedule = schedule or RetrySchedule()
        self.circuit_threshold = circuit_threshold
        self.circuit_interval = circuit_interval
        self.metrics = metrics or DeliveryMetrics()
        self._ed25519_key = ed25519_key
        self._transport = transport
        self._ssl_context = ssl_context
        self._clock = clock
        self._rng = random.Random(seed)  # noqa: S311  (jitter, not a secret)
        self._digests = digests
        self._document_headers = document_headers
        self.keep_delivered = keep_delivered
        self.keep_dead = keep_dead
        self.keep_offers = keep_offers
        self.keep_acceptances = keep_acceptances
        self.keep_attempts = keep_attempts
        self._purged_at = -math.inf
        self._digests_at = -math.inf
        self._claim_options: dict[str, Any] = {}
        if destination_lease_limit is not None:
            if destination_lease_limit < 1:
                raise ConfigurationError("destination_lease_limit must be at least 1")
            if not store.limits_per_destination:
                raise ConfigurationError(
                    f"{type(store).__name__} cannot limit leases per destination across"
                    " workers: use the PostgreSQL store"
                )
            self._claim_options["per_destination"] = destination_lease_limit
        self.owner = f"worker-{uuid.uuid4().hex[:12]}"
        self._init_state()

    def _init_state(self) -> None:
        """What the engine keeps between runs: checked destinations, signers, circuits."""
        # Destinations checked by the egress guard recently: resolved and checked once
        # every EGRESS_TTL per destination, not once per document. What is connected to is
        # always an address the guard checked (the pins), so the window decides only how
        # soon a store that moved (or turned private) is followed, never whether an
        # unchecked address gets a connection.
        self.egress_ttl = EGRESS_TTL
        self._resolvers: ThreadPoolExecutor | None = None
        self._lookups: dict[str, _Lookup] = {}
        """Names being resolved, by destination: their documents share one lookup."""
        self._checked: dict[str, tuple[PinnedDestination, float]] = {}
        self._pins: dict[tuple[str, int], tuple[str, ...]] = {}
        self._signers: dict[str, WebhookSigner] = {}
        self._origins: dict[str, _Origin] = {}
        self._waiting: dict[str, None] = {}
        """Destinations with documents waiting for a free slot, in order (a set)."""
        self._open: set[str] = set()
        """Destinations whose circuit is open."""
        self._gone_at: dict[str, tuple[str, float]] = {}
        """Destinations that answered 410 lately (why, when): rows claimed before the
        store recorded it are not sent either."""
        self._held: dict[str, _Job] = {}
        self._in_flight = 0
        self._slots = self.concurrency
        """Documents in flight at once: ``concurrency``, or fewer connections allowed."""
        self._kept_at_most = math.inf
        """The most connections kept alive while idle: the bound on connections open at
        once, less one a document in flight."""
        self._kept: dict[str, float] = {}
        """Destinations whose last answered connection was kept alive, when (monotonic),
        oldest first: the connections open but idle, give or take one a destination."""
        self._keeping = 0
        """Documents in flight on a connection that will be kept alive after."""
        self._pool: ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = threading.Lock()

    # -- running, from synchronous code ------------------------------------------------

    def run_once(self, *, max_rounds: int | None = None) -> DeliveryStats:
        """Deliver every row due now (and retries that fall due meanwhile), then return.

        :param max_rounds: claim at most this many times.
        """
        return self._run_sync(self.deliver_due(max_claims=max_rounds))

    def run_round(self) -> DeliveryStats:
        """Claim once, deliver what was claimed, and return."""
        return self._run_sync(self.deliver_due(max_claims=1))

    def run(
        self,
        *,
        poll_interval: float = 1.0,
        stop: threading.Event | None = None,
        progress: Callable[[DeliveryProgress], None] | None = None,
    ) -> None:
        """Deliver until ``stop`` (or :meth:`stop`) is set, waiting while nothing is due."""
        stopper = stop or self._stop

        async def main() -> None:
            halt = asyncio.Event()

            async def watch() -> None:
                while not stopper.is_set():
                    await asyncio.sleep(0.05)
                halt.set()

            watcher = asyncio.create_task(watch())
            try:
                await self.deliver(stop=halt, poll_interval=poll_interval, progress=progress)
            finally:
                watcher.cancel()

        self._run_sync(main())

    def start(self, *, poll_interval: float = 1.0) -> DeliveryWorker:
        """Run in a background thread (daemon) until :meth:`stop`; returns self."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("this worker is already running")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run,
            kwargs={"poll_interval": poll_interval},
            name=f"cmi-delivery-{self.owner}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the background thread (what is in flight finishes first), and close."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.close()

    def close(self) -> None:
        """Let go of the worker's threads; it makes new ones if used again."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._resolvers is not None:
            # A lookup that outlived its timeout finishes on its own: not waited for.
            self._resolvers.shutdown(wait=False, cancel_futures=True)
            self._resolvers = None

    def __enter__(self) -> DeliveryWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run_sync(self, coro: Awaitable[_T]) -> _T:
        async def main() -> _T:
            return await coro

        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(main())

    # -- running, on the caller's event loop -------------------------------------------

    async def deliver_due(self, *, max_claims: int | None = None) -> DeliveryStats:
        """Deliver every row due now (and retries that fall due meanwhile), then return:
        :meth:`run_once` on the caller's event loop."""
        return await self._serve(max_claims=max_claims, until_idle=True, keep_outcomes=True)

    async def deliver(
        self,
        *,
        stop: asyncio.Event | None = None,
        poll_interval: float = 1.0,
        progress: Callable[[DeliveryProgress], None] | None = None,
    ) -> DeliveryStats:
        """Deliver until ``stop`` is set: :meth:`run` on the caller's event loop.

        :param stop: set it to stop; what is in flight finishes (within the total
            timeout), and rows claimed but not started are let go at once.
        :param poll_interval: the longest wait before looking for due rows again.
        :param progress: called about once a second with the worker's figures.
        """
        return await self._serve(
            stop=stop,
            poll_interval=poll_interval,
            progress=progress,
            until_idle=False,
            keep_outcomes=False,
        )

    # -- the loop ----------------------------------------------------------------------

    async def _serve(
        self,
        *,
        until_idle: bool,
        keep_outcomes: bool,
        max_claims: int | None = None,
        stop: asyncio.Event | None = None,
        poll_interval: float = 1.0,
        progress: Callable[[DeliveryProgress], None] | None = None,
    ) -> DeliveryStats:
        if not self._running.acquire(blocking=False):
            raise RuntimeError("this worker is already running")
        self._size_connections()
        run = _Run(
            stats=DeliveryStats(),
            keep_outcomes=keep_outcomes,
            wake=asyncio.Event(),
            sender=self._sender(),
        )
        helpers = [
            asyncio.create_task(self._heartbeats()),
            asyncio.create_task(self._flusher(run)),
        ]
        if progress is not None:
            helpers.append(asyncio.create_task(self._progress(run, progress)))
        try:
            await self._loop(run, until_idle, max_claims, stop, poll_interval)
        finally:
            await self._wind_down(run, helpers)
            self._running.release()
        return run.stats

    async def _loop(
        self,
        run: _Run,
        until_idle: bool,
        max_claims: int | None,
        stop: asyncio.Event | None,
        poll_interval: float,
    ) -> None:
        claims = 0
        exhausted = False  # the last claim found fewer due rows than it asked for
        refill = max(1, min(self.batch, self.capacity // 8))
        while stop is None or not stop.is_set():
            room = self.capacity - len(self._held)
            may_claim = max_claims is None or claims < max_claims
            if (
                may_claim
                and room > 0
                and (not exhausted or run.committed_since_claim)
                and (room >= refill or not self._held or run.committed_since_claim)
            ):
                run.committed_since_claim = False
                limit = min(self.batch, room)
                try:
                    got = await self._claim(run, limit)
                except CMIError:
                    log.exception("claiming rows failed; trying again")
                    got = 0
                    await self._sleep(run, stop, poll_interval)
                claims += 1
                exhausted = got < limit
                if not exhausted:
                    continue
            # Outcomes recorded while the last claim ran (its rows were still leased then)
            # may have made retries due: claim again before deciding there is no work.
            if run.committed_since_claim and may_claim and self.capacity > len(self._held):
                continue
            if until_idle and not self._held and (exhausted or not may_claim):
                return
            run.wake.clear()
            if self._held or not exhausted:
                # Something will finish: a send, a commit.
                await self._wait(run, stop, poll_interval)
            else:
                await self._idle(run, stop, poll_interval)
                exhausted = False

    async def _wait(self, run: _Run, stop: asyncio.Event | None, timeout: float) -> None:
        waits = [asyncio.ensure_future(run.wake.wait())]
        if stop is not None:
            waits.append(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    async def _sleep(self, run: _Run, stop: asyncio.Event | None, seconds: float) -> None:
        await self._wait(run, stop, seconds)

    async def _idle(self, run: _Run, stop: asyncio.Event | None, poll_interval: float) -> None:
        """Nothing held and nothing due: wait for the next due row, a notification, or
        the poll interval."""
        try:
            due = await self._call(self.store.next_due)
        except CMIError:
            # The store is away (a database restart): wait a poll, then try again; a
            # worker never ends because its store blinked.
            log.exception("waiting for work failed; trying again")
            await self._wait(run, stop, poll_interval)
            return
        wait = poll_interval if due is None else min(poll_interval, due - self._clock())
        if wait <= 0.01:
            return
        if self.store.notifies_work:
            # LISTEN/NOTIFY (PostgreSQL) wakes the worker as soon as a row commits; polling
            # stays the fallback, in slices short enough to notice a stop.
            listen = asyncio.ensure_future(
                asyncio.get_running_loop().run_in_executor(
                    None, self.store.wait_for_work, min(wait, 1.0)
                )
            )
            waits: list[asyncio.Future[Any]] = [listen]
            if stop is not None:
                waits.append(asyncio.ensure_future(stop.wait()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits[1:]:
                    waiting.cancel()
                if listen.done() and not listen.cancelled() and listen.exception() is not None:
                    log.error("waiting for work failed: %s", listen.exception())
        else:
            await self._wait(run, stop, wait)

    async def _let_go_of_queued(self) -> None:
        """Rows claimed but not started go back at once: another worker may take them."""
        waiting = [job for origin in self._origins.values() for job in origin.queue]
        for origin in self._origins.values():
            origin.queue.clear()
        if not waiting:
            return
        for job in waiting:
            self._held.pop(job.row.msg_id, None)
        try:
            await self._call(
                self.store.heartbeat,
                owner=self.owner,
                msg_ids=[j.row.msg_id for j in waiting],
                lease_until=self._clock(),
            )
        except CMIError:
            log.exception("letting claimed rows go failed; their leases will run out")

    async def _wind_down(self, run: _Run, helpers: list[asyncio.Task[None]]) -> None:
        await self._let_go_of_queued()
        if run.tasks:
            await asyncio.wait(run.tasks, timeout=self.timeouts.total + 1)
        overran = list(run.tasks)
        for task in overran:
            task.cancel()
        if overran:
            # Their counts go down as they end: before the counts are reset below, not
            # after (below zero, they would let a destination take more than its share).
            await asyncio.wait(overran, timeout=5)
        # The last outcomes, and the batch being recorded: cancelled mid-commit, the
        # flusher would leave those rows leased, to be sent again once their lease ran out.
        while run.results or run.committing:
            run.flushed.clear()
            run.wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.flushed.wait(), timeout=30)
            if helpers[1].done():
                break
        for helper in helpers:
            helper.cancel()
        for helper in helpers:
            with contextlib.suppress(asyncio.CancelledError):
                await helper
        await run.sender.close()
        self._held.clear()
        self._waiting.clear()
        # Circuits (and failure counts) outlive a run: run_once after run_once, a
        # destination that failed keeps its record.
        for key, origin in list(self._origins.items()):
            origin.in_flight = 0
            origin.probing = False
            if not origin.failures:
                del self._origins[key]
        self._in_flight = 0
        self._kept.clear()  # the session closed them
        self._keeping = 0
        # A lookup still running belongs to this run's event loop; the next run, perhaps on
        # another loop, starts its own.
        self._lookups.clear()
        self.metrics.in_flight = 0

    def _size_connections(self) -> None:
        """How many documents go at once and how many connections stay open: within the
        descriptors the process may open, so that a connection to a store is never
        refused for want of one (``EMFILE``) and the store's own file can still open."""
        cap: float = math.inf
        if self.max_connections is not None:
            cap = self.max_connections
        elif self._transport is None:
            limit = open_files_limit()
            if limit is not None:
                cap = max(1, limit - RESERVED_DESCRIPTORS)
        # What is in flight holds a connection each; the rest may be kept alive. When the
        # limit is tight, a quarter stays for those: without any, every destination's
        # next document would open a connection anew.
        slots = self.concurrency if self.concurrency <= cap * 3 / 4 else max(1, int(cap) * 3 // 4)
        self._kept_at_most = cap - slots
        if slots < self.concurrency and slots != self._slots:
            log.warning(
                "%d documents in flight at once, not %d: at most %d connections may be open"
                " (raise the open-files limit, ulimit -n, or lower the concurrency)",
                slots,
                self.concurrency,
                int(cap),
            )
        self._slots = slots

    def _kept_full(self) -> bool:
        """Whether the connections kept alive, with those in flight that will be, have
        reached their bound: then a new connection is closed after its answer."""
        if self._kept_at_most == math.inf:
            return False
        expired = time.monotonic() - (2 * KEEPALIVE_SECONDS + 1)
        kept = self._kept
        while kept:  # the pool has closed those idle longer than its cleanup lets live
            oldest = next(iter(kept))
            if kept[oldest] > expired:
                break
            del kept[oldest]
        return len(kept) * self.per_destination + self._keeping >= self._kept_at_most

    def _sender(self) -> _Sender:
        if self._transport is not None:
            return _HttpxSender(self._transport, self.timeouts)
        return _AiohttpSender(
            pins=self._pins,
            per_destination=self.per_destination,
            timeouts=self.timeouts,
            ssl_context=self._ssl_context,
        )

    async def _call(self, func: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a store call (or a hook) on the worker's threads, off the event loop."""
        if self._pool is None:
            # Two: a claim and a commit can run at once.
            self._pool = ThreadPoolExecutor(2, thread_name_prefix="cmi-deliver-store")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: func(*args, **kwargs))

    # -- claiming ----------------------------------------------------------------------

    async def _claim(self, run: _Run, limit: int) -> int:
        """Lease up to ``limit`` due rows and queue them by destination; returns how many
        were claimed."""
        rows, results, revoked = await self._call(self._claim_sync, limit)
        run.stats.skipped += revoked
        touched: dict[str, _Origin] = {}
        for row, terms in rows:
            self._held[row.msg_id] = job = _Job(row, terms)
            gone = self._gone_at.get(row.destination or "")
            if gone is not None and time.monotonic() - gone[1] < 60.0:
                # Claimed before the store recorded the 410 it answered: not sent either.
                result = self._dead(row, self._clock(), None, f"destination disabled: {gone[0]}")
                self._record(run, job, result, reason="disabled", seconds=None)
                continue
            key = _origin(row.destination or "")
            origin = self._origins.get(key)
            if origin is None:
                origin = self._origins[key] = _Origin(key)
            origin.queue.append(job)
            touched[key] = origin
        for job, result in results:
            self._held[job.row.msg_id] = job
            self._record(run, job, result, reason="not sent", seconds=None)
        self._dispatch(run, touched.values())
        return len(rows) + len(results) + revoked

    def _claim_sync(
        self, limit: int
    ) -> tuple[list[tuple[OutboxRow, SharingTerms]], list[tuple[_Job, AttemptResult]], int]:
        """The store's part of a claim, on a worker thread: digests, the claim, the terms
        of each row; rows that must not be sent are settled here."""
        if self._digests is not None and time.monotonic() - self._digests_at >= 1.0:
            self._digests_at = time.monotonic()
            try:
                self._digests()
            except CMIError:
                log.exception("merging digests failed; their documents wait for the next claim")
        self._purge_sync()
        rows = self.store.claim(
            owner=self.owner,
            now=self._clock(),
            lease_seconds=self.lease_seconds,
            limit=limit,
            **self._claim_options,
        )
        if not rows:
            return [], [], 0
        disabled = self.store.disabled_destinations()
        terms_by_id: dict[str, SharingTerms | None] = {}
        work: list[tuple[OutboxRow, SharingTerms]] = []
        settled: list[tuple[_Job, AttemptResult]] = []
        revoked: list[str] = []
        now = self._clock()
        for row in rows:
            if row.terms_id not in terms_by_id:
                try:
                    terms_by_id[row.terms_id] = self.store.get_terms(row.terms_id)
                except CMIError:
                    terms_by_id[row.terms_id] = None
            terms = terms_by_id[row.terms_id]
            if terms is None or terms.revoked_at is not None:
                # Revoked meanwhile: the revocation cancelled the row, unless the row was
                # written just after it (from terms read just before); cancel it here.
                revoked.append(row.msg_id)
                continue
            if row.destination is None:
                result = self._dead(row, now, None, "a pull-only row has no destination")
                settled.append((_Job(row, terms), result))
                continue
            reason = disabled.get(row.destination)
            if reason is not None:
                result = self._dead(row, now, None, f"destination disabled: {reason}")
                settled.append((_Job(row, terms), result))
                continue
            work.append((row, terms))
        if revoked:
            # Else each lease expiry would claim them again.
            try:
                self.store.cancel(owner=self.owner, msg_ids=revoked, reason="terms revoked")
            except CMIError:
                log.exception("cancelling rows of revoked terms failed")
        return work, settled, len(revoked)

    def _purge_sync(self) -> None:
        """What is finished goes after its window, a small batch at a time, at most once
        a minute: claims stay quick, and every document holds customer data."""
        if time.monotonic() - self._purged_at < PURGE_INTERVAL:
            return
        if not isinstance(self.store, RetentionStore):
            return
        self._purged_at = time.monotonic()
        now = self._clock()
        try:
            done = self.store.purge(
                **purge_windows(
                    now,
                    delivered=self.keep_delivered,
                    dead=self.keep_dead,
                    offers=self.keep_offers,
                    acceptances=self.keep_acceptances,
                    attempts=self.keep_attempts,
                ),
                limit=PURGE_BATCH,
            )
        except CMIError:
            log.exception("purging finished rows failed; trying again later")
            return
        if any(done.values()):
            log.info("purged %s", ", ".join(f"{n} {kind}" for kind, n in done.items() if n))

    # -- sending -----------------------------------------------------------------------

    def _dispatch(self, run: _Run, origins: Iterable[_Origin] = ()) -> None:
        """Start what may start, for ``origins`` first, then for destinations that wait
        for a free slot: never a scan of every destination (there may be thousands)."""
        now = self._clock()
        for origin in origins:
            self._pump(run, origin, now)
        while self._waiting and self._in_flight < self._slots:
            key = next(iter(self._waiting))
            del self._waiting[key]
            waiting = self._origins.get(key)
            if waiting is not None:
                self._pump(run, waiting, now)
        self.metrics.in_flight = self._in_flight
        self.metrics.open_circuits = len(self._open)

    def _pump(self, run: _Run, origin: _Origin, now: float) -> None:
        """Start the documents of one destination that its limit, its circuit and the
        free slots allow."""
        while origin.queue:
            if origin.in_flight >= self.per_destination:
                break  # its next completion pumps it again
            if origin.probe_at is not None:  # the circuit is open
                if origin.probing:
                    break  # the probe's answer decides for the rest
                if now < origin.probe_at:
                    self._fail_fast(run, origin, now)
                    break
            if self._in_flight >= self._slots:
                self._waiting[origin.key] = None
                break
            if origin.probe_at is not None:
                origin.probing = True
            job = origin.queue.popleft()
            # A destination with a connection kept alive sends on it, and keeps it; one
            # without opens one, and closes it after when those kept would pass the bound.
            kept = self._kept.pop(origin.key, None) is not None
            close = not kept and self._kept_full()
            if not close:
                self._keeping += 1
            origin.in_flight += 1
            self._in_flight += 1
            task = asyncio.create_task(self._send(run, origin, job, close))
            run.tasks.add(task)
            task.add_done_callback(run.tasks.discard)
        if not (origin.queue or origin.in_flight or origin.failures):
            del self._origins[origin.key]  # forget idle, healthy destinations

    def _fail_fast(self, run: _Run, origin: _Origin, now: float) -> None:
        """An open circuit: its queued documents are failed attempts now, due again no
        sooner than the next probe."""
        wait = (origin.probe_at or now) - now
        reason = (
            f"{CIRCUIT_OPEN} {origin.failures} failures in a row at this destination;"
            f" next probe in {wait:.0f} s"
        )
        while origin.queue:
            job = origin.queue.popleft()
            result = self._failed(job.row, now, None, reason, retry_after=wait)
            self._record(run, job, result, reason="circuit open", seconds=None)

    async def _send(self, run: _Run, origin: _Origin, job: _Job, close: bool = False) -> None:
        row = job.row
        started = self._clock()
        began = time.monotonic()
        category = "answered"
        health: bool | None = None  # None: says nothing of the destination's health
        try:
            result, category, health = await self._attempt(run, row, job.terms, started, close)
        except Exception as exc:  # a bug must not lose the row: it is retried
            log.exception("delivering %s failed unexpectedly", row.msg_id)
            result = self._failed(row, started, None, f"{type(exc).__name__}: {exc}")
            category = "error"
        finally:
            origin.in_flight -= 1
            self._in_flight -= 1
            if not close:
                self._keeping -= 1
        if origin.probing:
            origin.probing = False
        if result.status is not None and not close:
            # Any answer, a 5xx too, leaves its connection kept alive.
            self._kept[origin.key] = time.monotonic()  # the newest, last in the order
        if health is True:
            if origin.probe_at is not None:
                log.info("%s answered again: its circuit is closed", origin.key)
            origin.failures = 0
            origin.probe_at = None
            self._open.discard(origin.key)
        elif health is False:
            origin.failures += 1
            if origin.failures >= self.circuit_threshold:
                if origin.probe_at is None:
                    log.warning(
                        "%s failed %d times in a row: its circuit is open, one probe every %g s",
                        origin.key,
                        origin.failures,
                        self.circuit_interval,
                    )
                origin.probe_at = self._clock() + self.circuit_interval
                self._open.add(origin.key)
        if result.outcome == "retry":  # a dead letter is logged as such, each one
            self._log_failure(origin, row, result)
        if result.outcome == "dead" and result.status == 410:
            self._gone(run, origin, row)
        self._record(run, job, result, reason=category, seconds=time.monotonic() - began)
        self._dispatch(run, (origin,))

    async def _attempt(
        self, run: _Run, row: OutboxRow, terms: SharingTerms, started: float, close: bool
    ) -> tuple[AttemptResult, str, bool | None]:
        """One attempt: the outcome, its reason for the metrics, and what it says of the
        destination's health (True: it answered; False: no answer or 5xx)."""
        url = row.destination or ""  # never empty here: pull-only rows are not attempted
        try:
            pinned = await self._pinned(url)
        except EgressResolutionError as exc:
            failed = self._failed(row, started, None, f"cannot resolve the destination: {exc}")
            return failed, "unresolved", False
        except DestinationNotAllowedError as exc:
            return self._dead(row, started, None, f"egress guard: {exc}"), "refused", None
        headers = self._request_headers(row, terms)
        try:
            answer = await run.sender.post(pinned.url, row.body, headers, close=close)
        except _SendError as exc:
            category = "timeout" if exc.timed_out else "connection"
            return self._failed(row, started, None, str(exc)), category, False
        status = answer.status
        if 200 <= status < 300:
            delivered = AttemptResult(
                msg_id=row.msg_id,
                owner=self.owner,
                attempt=row.attempts + 1,
                started_at=started,
                finished_at=self._clock(),
                outcome="delivered",
                status=status,
            )
            return delivered, "2xx", True
        if status == 410:
            return (
                self._dead(row, started, status, "410 Gone: the destination is disabled"),
                ("410"),
                True,
            )
        if 300 <= status < 400:
            error = f"HTTP {status}: redirects are not followed"
        else:
            error = f"HTTP {status}"
        retry_after = parse_retry_after(answer.retry_after, time.time())
        failed = self._failed(row, started, status, error, retry_after)
        return failed, f"{status // 100}xx", status < 500

    async def _pinned(self, url: str) -> PinnedDestination:
        """The destination as the guard checked it within :attr:`egress_ttl`; its
        addresses become the only ones the client may connect to for its host."""
        checked = self._checked.get(url)
        if checked is not None and time.monotonic() - checked[1] <= self.egress_ttl:
            return checked[0]
        try:
            if _literal_address(url):  # nothing to resolve: judged here, not on a thread
                pinned = self.egress.pin(url)
            else:
                pinned = await self._resolve(url)
        except DestinationNotAllowedError:
            if checked is not None:
                # What the host was pinned to before is no longer trusted either.
                del self._checked[url]
                self._pins.pop((checked[0].host, checked[0].port), None)
            raise
        self._checked[url] = (pinned, time.monotonic())
        self._pins[pinned.host, pinned.port] = pinned.addresses
        return pinned

    async def _resolve(self, url: str) -> PinnedDestination:
        """:meth:`EgressGuard.pin` on the engine's resolver threads, within the connect
        timeout counted from when the lookup starts.

        The system resolver blocks, for seconds when a name server is slow or gone: on
        threads of their own (many, as each mostly waits), thousands of new destinations
        resolve side by side, and a lookup that hangs fails its own attempt at the timeout
        while its thread finishes alone. Time spent waiting for a free thread is not the
        destination's fault and is not counted against it: destinations whose name
        servers never answer cannot make another's lookup fail by keeping the threads
        busy, only wait. One lookup a destination at a time: its documents share it.
        """
        lookup = self._lookups.get(url)
        if lookup is None:
            lookup = self._lookups[url] = self._start_lookup(url)
        await lookup.started.wait()  # a free thread: bounded by the resolvers' own timeouts
        left = self.timeouts.connect - (time.monotonic() - lookup.started_at)
        try:
            if left <= 0:
                raise TimeoutError
            # Shielded: one waiter's timeout must not cancel the lookup the others share.
            return await asyncio.wait_for(asyncio.shield(lookup.answer), left)
        except TimeoutError:
            host = urlsplit(url).hostname or url
            raise EgressResolutionError(
                f"{host} did not resolve within {self.timeouts.connect:g} s", url=url
            ) from None

    def _start_lookup(self, url: str) -> _Lookup:
        if self._resolvers is None:
            self._resolvers = ThreadPoolExecutor(
                RESOLVER_THREADS, thread_name_prefix="cmi-deliver-dns"
            )
        loop = asyncio.get_running_loop()
        lookup = _Lookup(started=asyncio.Event())

        def begun() -> None:
            lookup.started_at = time.monotonic()
            lookup.started.set()

        def pin() -> PinnedDestination:
            loop.call_soon_threadsafe(begun)
            return self.egress.pin(url)

        lookup.answer = loop.run_in_executor(self._resolvers, pin)

        def ended(_answer: object) -> None:
            if self._lookups.get(url) is lookup:
                del self._lookups[url]
            if not lookup.started.is_set():  # cancelled in the queue (the pool shut down)
                lookup.started_at = time.monotonic()
                lookup.started.set()

        lookup.answer.add_done_callback(ended)
        return lookup

    def _request_headers(self, row: OutboxRow, terms: SharingTerms) -> dict[str, str]:
        """The headers of a delivery request: the one place a header is added."""
        signer = self._signers.get(terms.id)
        if signer is None:
            signer = WebhookSigner(secret=terms.secret, ed25519_key=self._ed25519_key)
            self._signers[terms.id] = signer
        headers = signer.headers(row.msg_id, row.body, timestamp=int(time.time()))
        if self._document_headers is None:
            headers["content-type"] = "application/xml"
        else:
            headers.update(self._document_headers(row))
        return headers

    def _gone(self, run: _Run, origin: _Origin, row: OutboxRow) -> None:
        """410: the destination is disabled (by the flusher, before this outcome commits);
        its queued documents are dead letters now, unsent."""
        url = row.destination or ""
        reason = f"410 Gone at message {row.msg_id}"
        run.disable.append((url, reason, self._clock()))
        self._gone_at[url] = (reason, time.monotonic())
        log.warning("destination %s answered 410 Gone: disabled", url)
        keep: deque[_Job] = deque()
        now = self._clock()
        while origin.queue:
            job = origin.queue.popleft()
            if job.row.destination == url:
                result = self._dead(
                    job.row, now, None, f"destination disabled: 410 Gone at message {row.msg_id}"
                )
                self._record(run, job, result, reason="disabled", seconds=None)
            else:
                keep.append(job)
        origin.queue = keep

    def _log_failure(self, origin: _Origin, row: OutboxRow, result: AttemptResult) -> None:
        """Each failure once, with destination and reason; at most one line a minute per
        destination (the rest are counted in the next line)."""
        now = time.monotonic()
        if now - origin.logged_at < 60.0:
            origin.unlogged += 1
            return
        more = (
            f" ({origin.unlogged} more failures since the last report)" if origin.unlogged else ""
        )
        log.warning(
            "delivery of %s to %s failed, tried again later: %s%s",
            row.msg_id,
            row.destination,
            result.error,
            more,
        )
        origin.logged_at = now
        origin.unlogged = 0

    # -- outcomes ----------------------------------------------------------------------

    def _record(
        self, run: _Run, job: _Job, result: AttemptResult, *, reason: str, seconds: float | None
    ) -> None:
        run.results.append((job, result))
        self.metrics.observe(result.outcome, reason, seconds)
        run.wake.set()

    async def _flusher(self, run: _Run) -> None:
        """Commits outcomes as they come: whatever finished while the last commit ran goes
        in the next one (a group commit)."""
        while True:
            if not run.results:
                await run.wake.wait()
                await asyncio.sleep(0)  # let the outcomes of the same moment gather
                if not run.results:
                    run.flushed.set()
                    continue
            batch, run.results = run.results, []
            disable, run.disable = run.disable, []
            run.committing = True
            try:
                await self._call(self._commit, disable, batch)
            except CMIError:
                # Unrecorded: the leases run out and the rows go out again (same
                # webhook-id); at-least-once holds.
                log.exception("recording %d delivery outcomes failed", len(batch))
                committed = False
            else:
                committed = True
            for job, result in batch:
                self._held.pop(job.row.msg_id, None)
                if committed:
                    self._count(run, result)
            run.committed_since_claim = True
            run.committing = False
            run.flushed.set()
            run.wake.set()

    def _commit(
        self, disable: list[tuple[str, str, float]], batch: list[tuple[_Job, AttemptResult]]
    ) -> None:
        for url, reason, at in disable:
            self.store.disable_destination(url, reason=reason, at=at)
        self.store.complete([result for _, result in batch])
        self._notify([job.row for job, _ in batch], [result for _, result in batch])

    def _count(self, run: _Run, result: AttemptResult) -> None:
        stats = run.stats
        if run.keep_outcomes:
            stats.outcomes.append(result)
        if result.outcome == "delivered":
            stats.delivered += 1
        elif result.outcome == "retry":
            stats.retried += 1
        else:
            stats.dead += 1

    async def _heartbeats(self) -> None:
        interval = self.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            if not self._held:
                continue
            try:
                await self._call(
                    self.store.heartbeat,
                    owner=self.owner,
                    msg_ids=list(self._held),
                    lease_until=self._clock() + self.lease_seconds,
                )
            except CMIError:
                log.exception("lease heartbeat failed")

    async def _progress(self, run: _Run, report: Callable[[DeliveryProgress], None]) -> None:
        last, last_at = 0, time.monotonic()
        oldest: float | None = None
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            if tick % 5 == 0:
                with contextlib.suppress(CMIError):
                    status = await self._call(self.store.status, self._clock())
                    oldest = status.oldest_pending_age
            tick += 1
            now = time.monotonic()
            stats = run.stats
            rate = (stats.delivered - last) / max(1e-9, now - last_at)
            last, last_at = stats.delivered, now
            try:
                report(
                    DeliveryProgress(
                        delivered=stats.delivered,
                        retried=stats.retried,
                        dead=stats.dead,
                        in_flight=self._in_flight,
                        held=len(self._held),
                        open_circuits=self.metrics.open_circuits,
                        delivered_per_second=rate,
                        oldest_pending_age=oldest,
                    )
                )
            except Exception:
                log.exception("the progress callback failed")

    def _failed(
        self,
        row: OutboxRow,
        started: float,
        status: int | None,
        error: str,
        retry_after: float | None = None,
    ) -> AttemptResult:
        attempt = row.attempts + 1  # this one
        delay = self.schedule.next_delay(attempt, self._rng, retry_after)
        finished = self._clock()
        if delay is None:
            return self._dead(row, started, status, f"{error} (after {attempt} attempts)", finished)
        return AttemptResult(
            msg_id=row.msg_id,
            owner=self.owner,
            attempt=attempt,
            started_at=started,
            finished_at=finished,
            outcome="retry",
            status=status,
            error=error,
            next_attempt_at=finished + delay,
        )

    def _dead(
        self,
        row: OutboxRow,
        started: float,
        status: int | None,
        error: str,
        finished: float | None = None,
    ) -> AttemptResult:
        return AttemptResult(
            msg_id=row.msg_id,
            owner=self.owner,
            attempt=row.attempts + 1,
            started_at=started,
            finished_at=self._clock() if finished is None else finished,
            outcome="dead",
            status=status,
            error=error,
        )

    def _notify(self, rows: Iterable[OutboxRow], results: Sequence[AttemptResult]) -> None:
        by_id = {r.msg_id: r for r in rows}
        for result in results:
            if result.outcome == "retry":
                continue
            row = by_id[result.msg_id]
            report = DeliveryReport(
                msg_id=row.msg_id,
                terms_id=row.terms_id,
                customer_ref=row.customer_ref,
                transaction_id=row.transaction_id,
                destination=row.destination,
                attempts=result.attempt,
                status=result.status,
                error=result.error,
                at=utc_at(result.finished_at),
            )
            hook = (
                self._hook.cmi_on_delivered
                if result.outcome == "delivered"
                else self._hook.cmi_on_dead_letter
            )
            try:
                hook(report=report)
            except Exception:
                # A notification must not undo or repeat a recorded delivery.
                log.exception("a %s hook failed for %s", hook.name, row.msg_id)
            if result.outcome == "dead":
                log.warning(
                    "document %s to %s is a dead letter: %s",
                    row.msg_id,
                    row.destination,
                    result.error,
                )


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (uvicorn[standard] brings it): less CPU per request
    for loops the worker runs itself; a firm's own loop is the firm's choice."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard] on Linux
        return None
    return uvloop.new_event_loop
