"""The delivery worker: from the outbox to the customers' destinations, reliably.

Each round claims a batch of due rows (a lease, kept alive by a heartbeat), posts each
document with the Standard Webhooks headers, and records every outcome of the batch in one
commit. Delivery is at-least-once: a worker killed after a POST but before recording it
leaves a lease that expires, and the row goes out again with the same ``webhook-id``.

Concurrency model, chosen by measurement: each batch is split into lanes, one per
destination by default (``per_destination`` lanes at most), each sent in order over its own
thread's keep-alive ``httpx.Client``; lanes of different destinations run in parallel on a
small thread pool, so a slow customer store does not hold up the others. Sequential
keep-alive posts beat both httpx's ``AsyncClient`` with many requests in flight and several
threads posting to one receiver, since the sender is CPU-bound and the GIL serializes it
(the figures, and the commands that measure them: ``docs/performance.md``).
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from cmi_sdk._exceptions import CMIError, ConfigurationError, DestinationNotAllowedError
from cmi_sdk._models import SharingTerms
from cmi_sdk._version import __version__ as _version
from cmi_sdk.egress import EgressGuard, EgressResolutionError
from cmi_sdk.outbox import AttemptResult, DeliveryReport, OutboxRow, OutboxStore
from cmi_sdk.webhooks import WebhookSigner

if TYPE_CHECKING:
    import pluggy

__all__ = ["DEFAULT_SCHEDULE", "DeliveryStats", "DeliveryWorker", "RetrySchedule"]

log = logging.getLogger("cmi_sdk.delivery")

DEFAULT_SCHEDULE: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
"""Seconds before each retry: the Standard Webhooks example schedule (immediately, then
5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h): eight attempts over about 27.6 hours."""


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


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class DeliveryWorker:
    """Delivers the outbox's due documents.

    :param store: the outbox.
    :param hook: the adapter's hook relay (for ``cmi_on_delivered`` and
        ``cmi_on_dead_letter``).
    :param egress: the egress guard every destination passes before each attempt.
    :param concurrency: documents in flight at once (threads), across destinations.
    :param per_destination: documents in flight at once to one destination (origin). One,
        the default, sends each destination's documents in order over one keep-alive
        connection: what a customer's small store can take, and the fastest for a single
        destination (see the module's notes).
    :param batch: rows claimed per round.
    :param lease_seconds: how long a claim holds without a heartbeat.
    :param timeout: the HTTP timeouts: connect, write, read and pool.
    :param schedule: the retry schedule.
    :param ed25519_key: a ``whsk_`` key: adds a ``v1a`` signature to every delivery.
    :param transport: an httpx transport (tests and benchmarks).
    :param clock: the scheduling clock (POSIX seconds); tests inject one to simulate
        days. The ``webhook-timestamp`` header always uses the real time, so receivers can
        judge it.
    :param seed: seeds the jitter (tests).
    :param digests: called before each round to turn ended digest windows into
        documents (the adapter's; see :meth:`~cmi_sdk.Adapter.delivery_worker`).
    :param destination_lease_limit: with a store that can enforce it (PostgreSQL), the
        most rows leased to one destination at once across *all* workers; None: no limit
        beyond each worker's own lanes. Rows are leased in batches and sent one after the
        other, so this bounds a destination's backlog in flight, not its parallel posts.
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
        concurrency: int = 4,
        per_destination: int = 1,
        batch: int = 64,
        lease_seconds: float = 60.0,
        timeout: httpx.Timeout | None = None,
        schedule: RetrySchedule | None = None,
        ed25519_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
        digests: Callable[[], int] | None = None,
        destination_lease_limit: int | None = None,
        document_headers: Callable[[OutboxRow], Mapping[str, str]] | None = None,
    ) -> None:
        if concurrency < 1 or per_destination < 1 or batch < 1:
            raise ConfigurationError("concurrency, per_destination and batch must be >= 1")
        if not 0 < lease_seconds < math.inf:
            raise ConfigurationError("lease_seconds must be positive and finite")
        self.store = store
        self._hook = hook
        self.egress = egress
        self.concurrency = concurrency
        self.per_destination = per_destination
        self.batch = batch
        self.lease_seconds = lease_seconds
        self.timeout = timeout or httpx.Timeout(10.0, connect=5.0)
        self.schedule = schedule or RetrySchedule()
        self._ed25519_key = ed25519_key
        self._transport = transport
        self._clock = clock
        self._rng = random.Random(seed)  # noqa: S311  (jitter, not a secret)
        self._digests = digests
        self._document_headers = document_headers
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
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._clients_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        # Destinations checked by the egress guard recently: resolving and checking once a
        # few seconds per destination, not once per document, still catches a name that
        # turns private (DNS rebinding) within that window.
        self._egress_checked: dict[str, float] = {}
        self.egress_ttl = 5.0
        self._signers: dict[str, WebhookSigner] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- running --------------------------------------------------------------------------

    def run_once(self, *, max_rounds: int | None = None) -> DeliveryStats:
        """Deliver every row due now, round after round, then return.

        Rows that fail are scheduled for later and are not waited for.
        """
        total = DeliveryStats()
        rounds = 0
        while max_rounds is None or rounds < max_rounds:
            stats = self.run_round()
            rounds += 1
            total.add(stats)
            if stats.attempts + stats.skipped == 0:
                break
        return total

    def run_round(self) -> DeliveryStats:
        """Claim one batch of due rows and deliver it (after merging ended digests)."""
        if self._digests is not None:
            try:
                self._digests()
            except CMIError:
                log.exception("merging digests failed; their documents wait for the next round")
        rows = self.store.claim(
            owner=self.owner,
            now=self._clock(),
            lease_seconds=self.lease_seconds,
            limit=self.batch,
            **self._claim_options,
        )
        if not rows:
            return DeliveryStats()
        done = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=([r.msg_id for r in rows], done), daemon=True
        )
        beat.start()
        try:
            return self._deliver_batch(rows)
        finally:
            done.set()
            beat.join()

    def run(self, *, poll_interval: float = 1.0, stop: threading.Event | None = None) -> None:
        """Deliver until ``stop`` (or :meth:`stop`) is set, sleeping while nothing is due."""
        stopper = stop or self._stop
        while not stopper.is_set():
            try:
                stats = self.run_once()
            except CMIError:
                log.exception("delivery round failed; trying again")
                stats = DeliveryStats()
            if stats.attempts:
                continue
            try:
                self._idle(stopper, poll_interval)
            except CMIError:
                # The store is away (a database restart): wait a poll, then try again; a
                # worker never ends because its store blinked.
                log.exception("waiting for work failed; trying again")
                stopper.wait(poll_interval)

    def _idle(self, stopper: threading.Event, poll_interval: float) -> None:
        due = self.store.next_due()
        wait = poll_interval if due is None else min(poll_interval, due - self._clock())
        if self.store.notifies_work and wait > 0.01:
            # LISTEN/NOTIFY (PostgreSQL) wakes the worker as soon as a row commits;
            # polling stays the fallback, in slices short enough to notice a stop.
            self.store.wait_for_work(min(wait, 1.0))
        else:
            stopper.wait(max(0.01, wait))

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
        """Stop the background thread after its current round, and close the clients."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.close()

    def close(self) -> None:
        """Close the HTTP clients and the thread pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    def __enter__(self) -> DeliveryWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one batch ------------------------------------------------------------------------

    def _heartbeat(self, msg_ids: list[str], done: threading.Event) -> None:
        interval = self.lease_seconds / 3
        while not done.wait(interval):
            try:
                self.store.heartbeat(
                    owner=self.owner,
                    msg_ids=msg_ids,
                    lease_until=self._clock() + self.lease_seconds,
                )
            except CMIError:
                log.exception("lease heartbeat failed")

    def _deliver_batch(self, rows: Sequence[OutboxRow]) -> DeliveryStats:
        stats = DeliveryStats()
        disabled = self.store.disabled_destinations()
        terms_by_id: dict[str, SharingTerms | None] = {}
        work: list[tuple[OutboxRow, SharingTerms]] = []
        results: list[AttemptResult] = []
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
                stats.skipped += 1
                revoked.append(row.msg_id)
                continue
            if row.destination is None:
                results.append(self._dead(row, now, None, "a pull-only row has no destination"))
                continue
            reason = disabled.get(row.destination)
            if reason is not None:
                results.append(self._dead(row, now, None, f"destination disabled: {reason}"))
                continue
            work.append((row, terms))
        self._cancel(revoked)
        if work:
            lanes = self._lanes(work)
            if len(lanes) == 1 or self.concurrency == 1:
                for lane in lanes:
                    results.extend(self._attempt(row, terms) for row, terms in lane)
            else:
                for done in self._executor().map(self._send_lane, lanes):
                    results.extend(done)
        self.store.complete(results)
        for result in results:
            self._count(stats, result)
        self._notify(rows, results)
        return stats

    def _cancel(self, msg_ids: Sequence[str]) -> None:
        """Cancel claimed rows whose terms were revoked (else each lease expiry would claim
        them again)."""
        if not msg_ids:
            return
        try:
            self.store.cancel(owner=self.owner, msg_ids=msg_ids, reason="terms revoked")
        except CMIError:
            log.exception("cancelling rows of revoked terms failed")

    def _lanes(
        self, work: Sequence[tuple[OutboxRow, SharingTerms]]
    ) -> list[list[tuple[OutboxRow, SharingTerms]]]:
        """Split the batch into sequential lanes: at most ``per_destination`` for one
        destination (origin), each sent over one keep-alive connection, in order."""
        by_origin: dict[str, list[tuple[OutboxRow, SharingTerms]]] = {}
        for item in work:
            by_origin.setdefault(_origin(item[0].destination or ""), []).append(item)
        lanes: list[list[tuple[OutboxRow, SharingTerms]]] = []
        for items in by_origin.values():
            count = min(self.per_destination, len(items))
            lanes.extend(items[i::count] for i in range(count))
        return lanes

    def _send_lane(self, lane: list[tuple[OutboxRow, SharingTerms]]) -> list[AttemptResult]:
        return [self._attempt(row, terms) for row, terms in lane]

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="cmi-deliver")
        return self._pool

    def _client(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(
                timeout=self.timeout,
                follow_redirects=False,  # a 3xx is a failure: never follow a redirect
                transport=self._transport,
                headers={"user-agent": f"cmi-sdk/{_version}"},
                trust_env=False,  # no proxy from the environment sees customers' data
            )
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _signer(self, terms: SharingTerms) -> WebhookSigner:
        signer = self._signers.get(terms.id)
        if signer is None:
            signer = WebhookSigner(secret=terms.secret, ed25519_key=self._ed25519_key)
            self._signers[terms.id] = signer
        return signer

    def _attempt(self, row: OutboxRow, terms: SharingTerms) -> AttemptResult:  # noqa: PLR0911
        url = row.destination or ""  # never empty here: pull-only rows are not attempted
        started = self._clock()
        checked = self._egress_checked.get(url)
        if checked is None or time.monotonic() - checked > self.egress_ttl:
            try:
                self.egress.resolve(url)
            except EgressResolutionError as exc:
                return self._failed(row, started, None, f"cannot resolve the destination: {exc}")
            except DestinationNotAllowedError as exc:
                return self._dead(row, started, None, f"egress guard: {exc}")
            self._egress_checked[url] = time.monotonic()
        signer = self._signer(terms)
        headers = signer.headers(row.msg_id, row.body, timestamp=int(time.time()))
        if self._document_headers is None:
            headers["content-type"] = "application/xml"
        else:
            headers.update(self._document_headers(row))
        try:
            response = self._client().post(url, content=row.body, headers=headers)
        except httpx.TimeoutException as exc:
            return self._failed(row, started, None, f"timed out: {type(exc).__name__}")
        except httpx.HTTPError as exc:
            return self._failed(row, started, None, f"{type(exc).__name__}: {exc}")
        status = response.status_code
        if 200 <= status < 300:
            return AttemptResult(
                msg_id=row.msg_id,
                owner=self.owner,
                attempt=row.attempts + 1,
                started_at=started,
                finished_at=self._clock(),
                outcome="delivered",
                status=status,
            )
        if status == 410:
            self.store.disable_destination(
                url, reason=f"410 Gone at message {row.msg_id}", at=self._clock()
            )
            log.warning("destination %s answered 410 Gone: disabled", url)
            return self._dead(row, started, status, "410 Gone: the destination is disabled")
        if 300 <= status < 400:
            error = f"HTTP {status}: redirects are not followed"
        else:
            error = f"HTTP {status}"
        retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
        return self._failed(row, started, status, error, retry_after)

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

    @staticmethod
    def _count(stats: DeliveryStats, result: AttemptResult) -> None:
        stats.outcomes.append(result)
        if result.outcome == "delivered":
            stats.delivered += 1
        elif result.outcome == "retry":
            stats.retried += 1
        else:
            stats.dead += 1

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
                at=_utc(result.finished_at),
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
                log.warning("document %s is a dead letter: %s", row.msg_id, result.error)


def _utc(timestamp: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
