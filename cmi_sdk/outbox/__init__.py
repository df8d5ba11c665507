"""The outbox: documents waiting to be delivered, and what the firm keeps about terms.

An :class:`OutboxStore` holds the sharing terms, their consent records, the outbox rows and
the delivery history. The embedded default is :class:`~cmi_sdk.outbox.sqlite.SQLiteStore`
(WAL, ``synchronous=FULL``); a row is written in the caller's own database transaction when
the caller passes its connection, so the document exists exactly when the firm's own write
does.

A row's life::

    pending ──claim──▶ leased (heartbeat) ──▶ delivered
       ▲                   │ ├──────────────▶ retry at T ──(due)──▶ leased ...
       │                   │ └──────────────▶ dead (kept; an operator can redrive it)
       └── redrive ◀───────┘
    pull       never pushed: the customer fetches it
    digest     held for its terms' digest window, to go out merged into one document
    merged     went out inside a digest document (a row of its own, pending as above)
    cancelled  its terms were revoked before it went out

A lease that is not renewed (the worker died) expires, and the row is claimed again: the
same ``webhook-id`` goes out again, and a receiver that keeps the ids stores it once.

This module is the contract for people who write a store: the protocol and the rows it
takes and returns (:class:`NewRow`, :class:`OutboxRow`, :class:`AttemptResult` ...). A firm
does not need it: the few of these types a firm meets (:class:`DeliveryReport`, which the
delivery hooks receive, :class:`StoredOffer` and :class:`Intermediary`) are also exported by
:mod:`cmi_sdk`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from cmi_sdk._models import ConsentRecord, Link, Offer, Request, SharingTerms
from cmi_sdk.outbox._intermediaries import Intermediary, IntermediarySecret

__all__ = [
    "ACCEPTANCE_STATES",
    "LIVE_ACCEPTANCE_STATES",
    "STATES",
    "AcceptanceClaim",
    "AcceptanceRecord",
    "AcceptanceState",
    "AttemptResult",
    "DeliveryReport",
    "DestinationStore",
    "DigestGroup",
    "EmissionProblem",
    "EmissionProblemStore",
    "Intermediary",
    "IntermediarySecret",
    "IntermediaryStore",
    "LinkStore",
    "NewRow",
    "OfferStore",
    "OutboxQueue",
    "OutboxRow",
    "OutboxStatus",
    "OutboxStore",
    "ReplayCache",
    "RetentionStore",
    "SeenMessage",
    "State",
    "StoredOffer",
    "TermsStore",
]

State = Literal[
    "pending", "leased", "retry", "delivered", "dead", "pull", "digest", "merged", "cancelled"
]
STATES: tuple[State, ...] = (
    "pending",
    "leased",
    "retry",
    "delivered",
    "dead",
    "pull",
    "digest",
    "merged",
    "cancelled",
)


@dataclass(frozen=True, slots=True)
class NewRow:
    """A document ready for the outbox: rendered, minimized and signed."""

    msg_id: str
    """The ``webhook-id``: stable across retries, derived from the terms, the transaction
    and the document's content, so emitting the same document twice stores it once."""
    terms_id: str
    customer_ref: str
    transaction_id: str
    standard: str
    document_type: str
    destination: str | None
    body: bytes
    created_at: float
    state: State
    """``pending`` (push), or ``pull`` for pull-only terms."""
    next_attempt_at: float
    """When the first attempt is due: now, or the end of the digest window."""
    model: str | None = None
    """For ``digest`` rows: the model as JSON, to render the window's digest from."""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A row as the store holds it."""

    seq: int
    msg_id: str
    terms_id: str
    customer_ref: str
    transaction_id: str
    standard: str
    document_type: str
    destination: str | None
    body: bytes
    created_at: float
    state: State
    attempts: int
    """Attempts recorded: a claim that never got to post (its worker died) is not one."""
    next_attempt_at: float | None
    lease_owner: str | None
    lease_until: float | None
    last_status: int | None
    last_error: str | None
    delivered_at: float | None

    def summary(self) -> dict[str, Any]:
        """The row without its body, as JSON-ready data (for ``cmi outbox list``)."""

        def when(value: float | None) -> str | None:
            if value is None:
                return None
            return dt.datetime.fromtimestamp(value, dt.UTC).isoformat().replace("+00:00", "Z")

        return {
            "id": self.msg_id,
            "state": self.state,
            "terms_id": self.terms_id,
            "customer_ref": self.customer_ref,
            "transaction_id": self.transaction_id,
            "standard": self.standard,
            "document_type": self.document_type,
            "destination": self.destination,
            "attempts": self.attempts,
            "created_at": when(self.created_at),
            "next_attempt_at": when(self.next_attempt_at),
            "delivered_at": when(self.delivered_at),
            "last_status": self.last_status,
            "last_error": self.last_error,
            "size": len(self.body),
        }


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one delivery attempt came to, to be recorded by :meth:`OutboxQueue.complete`."""

    msg_id: str
    owner: str
    attempt: int
    started_at: float
    finished_at: float
    outcome: Literal["delivered", "retry", "dead"]
    status: int | None = None
    """The receiver's HTTP status, when it answered."""
    error: str | None = None
    next_attempt_at: float | None = None
    """For ``retry``: when the next attempt is due."""


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What the delivery hooks (``cmi_on_delivered``, ``cmi_on_dead_letter``) are told about
    a document delivered or dead.

    :ivar msg_id: the document's ``webhook-id``.
    :ivar terms_id: the terms it went out under.
    :ivar customer_ref: the customer's reference in those terms.
    :ivar transaction_id: the transaction it records.
    :ivar destination: where it was pushed.
    :ivar attempts: the attempts made, this one included.
    :ivar status: the destination's last HTTP status, if it answered.
    :ivar error: why the last attempt failed, if it did.
    :ivar at: when the outcome was recorded (UTC).
    """

    msg_id: str
    terms_id: str
    customer_ref: str
    transaction_id: str
    destination: str | None
    attempts: int
    status: int | None
    error: str | None
    at: dt.datetime


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """Counts by state, and the age of the oldest row waiting to go out."""

    counts: dict[str, int]
    oldest_pending_age: float | None
    """Seconds since the oldest pending or retrying row was created; None when none."""
    disabled_destinations: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DigestGroup:
    """The ``digest`` rows of one set of terms whose window has ended."""

    terms_id: str
    due: float
    msg_ids: tuple[str, ...]
    models: tuple[str, ...]
    """The rows' models as JSON, in the order they were emitted."""


@dataclass(frozen=True, slots=True)
class StoredOffer:
    """An offer as kept: with the request it answers (acceptance checks capacity and price
    again against it), the signed answer (``offers`` document) it went out in, and the
    intermediary that asked."""

    offer: Offer
    request: Request
    xml: bytes
    intermediary: str | None


@dataclass(frozen=True, slots=True)
class SeenMessage:
    """A signed message's id for the replay cache, remembered in the transaction that
    stores what the message asked for (see :meth:`OfferStore.add_offers`)."""

    party: str
    """Who signed it (``intermediary:NAME`` or ``terms:ID``)."""
    msg_id: str
    """Its ``webhook-id``."""
    expires_at: float
    """When the id may be forgotten (POSIX seconds): beyond the timestamp window."""
    now: float
    """The time it was received."""


AcceptanceState = Literal["processing", "booked", "refused", "released"]
"""An acceptance's state: ``processing`` (a process holds its lease and is booking it),
``booked`` (its documents were queued in the same commit), ``refused`` (a final answer:
nothing was booked, and a retry of the same id gets the same refusal) or ``released``
(nothing was booked and the hold was let go after a failure or a crash: a retry books
afresh)."""

ACCEPTANCE_STATES: tuple[AcceptanceState, ...] = ("processing", "booked", "refused", "released")

LIVE_ACCEPTANCE_STATES: tuple[AcceptanceState, ...] = ("processing", "booked")
"""The states in which an acceptance holds its offer: an offer has at most one acceptance
in them, which the stores enforce with a unique index."""


@dataclass(frozen=True, slots=True)
class AcceptanceClaim:
    """What :meth:`OfferStore.begin_acceptance` records of an acceptance it claims."""

    acceptance_id: str
    offer_id: str
    intermediary: str | None
    """The intermediary the acceptance came through (None: the firm's own code)."""
    acceptance: str
    """The :class:`~cmi_sdk.Acceptance` as JSON, without the customer's identity: recovery
    hands it to ``cmi_find_booking``."""
    owner: str
    """Who books it: a token of the call, which must still hold the lease to finish."""
    lease_until: float
    """Until when the lease holds (POSIX seconds); past it, a retry or a recovery pass may
    take the acceptance over."""


@dataclass(frozen=True, slots=True)
class AcceptanceRecord:
    """An acceptance as the store keeps it."""

    acceptance_id: str
    offer_id: str
    state: AcceptanceState
    result: str | None
    """The answer as JSON (what a retry gets back); None while ``processing``."""
    intermediary: str | None
    acceptance: str | None
    """The acceptance as JSON (None for records made before schema version 5)."""
    hold: str | None
    """The hold taken for it as JSON, once the booking process recorded one."""
    lease_owner: str | None
    lease_until: float | None

    @classmethod
    def of_row(cls, values: Sequence[Any] | None) -> AcceptanceRecord | None:
        """The record from both stores' acceptance columns (id, offer id, state, result,
        intermediary, acceptance, hold, lease owner, lease until), or None for no row."""
        if values is None:
            return None
        return cls(*values[:9])


@dataclass(frozen=True, slots=True)
class EmissionProblem:
    """A document that could not be made for one of a customer's terms: kept for the
    operator (``cmi outbox problems``), never answered to the customer as a failure."""

    transaction_id: str
    terms_id: str
    customer_ref: str
    standard: str
    reason: str
    """What went wrong, in words (a mapping, render or validation error, a plugin bug)."""
    created_at: float
    transaction: str
    """The transaction as JSON, so that it can be emitted again once the cause is fixed."""

    def row(self) -> tuple[Any, ...]:
        """The problem as both stores' SQL takes it, in the columns' order."""
        return (
            self.transaction_id,
            self.terms_id,
            self.customer_ref,
            self.standard,
            self.reason,
            self.created_at,
            self.transaction,
        )


@runtime_checkable
class TermsStore(Protocol):
    """Sharing terms and their consent records."""

    def add_terms(self, terms: SharingTerms, consent: ConsentRecord, consent_xml: bytes) -> None:
        """Keep accepted terms and their consent record, in one transaction."""

    def get_terms(self, terms_id: str) -> SharingTerms:
        """The terms with that id, revoked or not; raises TermsNotFoundError."""

    def list_terms(
        self,
        *,
        customer_ref: str | None = None,
        intermediary: str | None = None,
        include_revoked: bool = False,
    ) -> list[SharingTerms]:
        """Terms, oldest first."""

    def active_terms(
        self,
        customer_ref: str,
        now: float,
        *,
        intermediary: str | None = None,
        connection: object | None = None,
    ) -> list[SharingTerms]:
        """The terms a document for a customer goes out under at ``now``, oldest first.

        With ``intermediary`` None, ``customer_ref`` is the firm's account id: the firm's
        direct terms for it (registered with no intermediary) and the terms of each of its
        active links. With an intermediary, ``customer_ref`` is that intermediary's
        reference: when it is an active link, what its account gets (as above); otherwise
        only the intermediary's own terms for that reference. Never anyone else's."""

    def revoke_terms(
        self, terms_id: str, at: float, consent: ConsentRecord, consent_xml: bytes
    ) -> int:
        """Revoke terms, keep the consent record, cancel their undelivered rows; return how
        many rows were cancelled. Raises TermsNotFoundError, or TermsError if revoked."""

    def consent_records(self, terms_id: str) -> list[tuple[ConsentRecord, bytes]]:
        """The consent records of the terms, oldest first, with their signed documents."""


@runtime_checkable
class LinkStore(Protocol):
    """Service links and the one-time codes that make them (see :mod:`cmi_sdk._links`)."""

    def add_link_code(
        self, code_hash: str, account: str, *, created_at: float, expires_at: float
    ) -> None:
        """Keep a link code's hash for ``account`` until ``expires_at``."""

    def redeem_link_code(
        self, code_hash: str, *, intermediary: str, link_id: str, customer_ref: str, now: float
    ) -> Link | None:
        """In one transaction: mark the code used and make the link; None (nothing
        written) when the code is unknown, used or expired. A code redeems once, however
        many redeem it at the same time."""

    def get_link(self, link_id: str) -> Link:
        """The link with that id, revoked or not; raises LinkNotFoundError."""

    def links(
        self,
        *,
        account: str | None = None,
        intermediary: str | None = None,
        include_revoked: bool = False,
    ) -> list[Link]:
        """Links, oldest first."""

    def revoke_link(
        self, link_id: str, at: float, revocations: Sequence[tuple[ConsentRecord, bytes]]
    ) -> tuple[int, list[str]]:
        """In one transaction: revoke the link and the terms each consent record names (of
        the link's reference), keep the records and cancel those terms' undelivered rows.
        Return how many rows were cancelled, and the ids of the reference's terms still
        active (registered after the caller read them). Raises LinkNotFoundError, or
        LinkError if revoked."""


@runtime_checkable
class OutboxQueue(Protocol):
    """The outbox rows and their delivery attempts."""

    limits_per_destination: ClassVar[bool] = False
    """Whether :meth:`claim` keeps ``per_destination`` across workers (a store without it
    raises ConfigurationError when asked)."""

    notifies_work: ClassVar[bool] = False
    """Whether :meth:`wait_for_work` wakes when a row commits; without it, workers poll
    and never call it."""

    def insert(self, rows: Sequence[NewRow], *, connection: object | None = None) -> int:
        """Write rows (a row whose msg_id is already there is skipped); with ``connection``,
        inside the caller's open transaction, which the caller commits. Return how many were
        new."""

    def claim(
        self,
        *,
        owner: str,
        now: float,
        lease_seconds: float,
        limit: int,
        per_destination: int | None = None,
    ) -> list[OutboxRow]:
        """Lease up to ``limit`` due rows (and rows whose lease expired) to ``owner``, and
        with ``per_destination`` at most that many leased rows per destination across
        workers (only where :attr:`limits_per_destination`). A claim is not an attempt:
        attempts are counted as their outcomes are recorded."""

    def heartbeat(self, *, owner: str, msg_ids: Sequence[str], lease_until: float) -> None:
        """Extend ``owner``'s leases on ``msg_ids``."""

    def cancel(self, *, owner: str, msg_ids: Sequence[str], reason: str) -> int:
        """Cancel the rows of ``msg_ids`` that ``owner`` leases (their terms were revoked
        after they were written), as ended when their terms were revoked (for the
        retention purge); return how many."""

    def complete(self, results: Sequence[AttemptResult]) -> None:
        """Record attempts and their outcomes, in one transaction."""

    def due_digests(self, now: float) -> list[DigestGroup]:
        """The ``digest`` rows whose window ended by ``now``, grouped by terms and window."""

    def merge_digest(self, msg_ids: Sequence[str], row: NewRow | None) -> int:
        """In one transaction: write ``row`` (the window's digest document) and mark the
        ``digest`` rows ``msg_ids`` merged, as ended at ``row.created_at`` (for the
        retention purge); with ``row`` None, make them ``pending`` to go out one by one.
        Return how many rows changed."""

    def next_due(self) -> float | None:
        """When the next pending or retrying row is due, or None."""

    def status(self, now: float) -> OutboxStatus:
        """Counts by state and the oldest pending row's age."""

    def rows(self, *, state: str | None = None, limit: int = 100) -> list[OutboxRow]:
        """Rows, newest first, optionally in one state."""

    def get_row(self, msg_id: str) -> OutboxRow:
        """The row with that msg_id; raises OutboxRowNotFoundError."""

    def attempts(self, msg_id: str) -> list[AttemptResult]:
        """Every recorded attempt of a row, in order."""

    def attempt_counts(self) -> dict[str, int]:
        """Delivery attempts ever recorded, by outcome (delivered, retry, dead)."""

    def redrive(self, *, msg_id: str | None = None, since: float | None = None, now: float) -> int:
        """Make dead rows (one, or all that died since ``since``) pending again, due now."""

    def documents_since(self, terms_id: str, after: int, limit: int) -> list[OutboxRow]:
        """Documents emitted under the terms after the cursor ``after``, in order."""

    def wait_for_work(self, timeout: float) -> bool:  # noqa: ARG002  (the contract's signature)
        """Wait up to ``timeout`` seconds for a row to commit: True when one may have.
        Called only where :attr:`notifies_work`; this default returns False at once."""
        return False


@runtime_checkable
class RetentionStore(Protocol):
    """What is finished goes after its window: delivered documents after the pull window,
    dead letters after theirs (a redriven row is pending again, and stays), pull-only
    documents, documents merged into a digest document and cancelled ones (their terms
    revoked) after theirs, offers no longer valid together with their finished
    acceptances, message ids past their time, the attempts of delivered documents
    before the documents go, and emission problems after their window. A time of 0 (the
    default) purges nothing of that kind.

    An offer and its acceptances go together, in one transaction, and only when the
    offer expired before ``offers_before`` and every acceptance of it finished before
    ``acceptances_before``: a retried acceptance then finds no offer and can book
    nothing, where a purged acceptance beside a kept offer would start afresh. A
    ``processing`` acceptance (its lease may be recovered) keeps its offer however old."""

    def purge(
        self,
        *,
        delivered_before: float = 0.0,
        dead_before: float = 0.0,
        pull_before: float = 0.0,
        merged_before: float = 0.0,
        cancelled_before: float = 0.0,
        offers_before: float = 0.0,
        acceptances_before: float = 0.0,
        seen_before: float = 0.0,
        attempts_before: float = 0.0,
        problems_before: float = 0.0,
        limit: int,
    ) -> dict[str, int]:
        """Delete up to ``limit`` of each kind, oldest first, in one transaction: delivered
        rows that finished before ``delivered_before``, dead rows that died before
        ``dead_before``, ``pull`` rows written before ``pull_before``, rows merged into a
        digest document before ``merged_before`` and rows cancelled before
        ``cancelled_before`` (each with its attempts), offers as above (with their
        acceptances), message ids that expired before ``seen_before``, attempts of
        delivered rows (still kept for pulling) that finished before ``attempts_before``,
        emission problems kept since before ``problems_before``. Return how many of each
        (``delivered``, ``dead``, ``pull``, ``merged``, ``cancelled``, ``offers``,
        ``acceptances``, ``seen``, ``attempts``, which counts only those, not the
        attempts of purged rows, and ``problems``)."""

    def purgeable(
        self,
        *,
        delivered_before: float = 0.0,
        dead_before: float = 0.0,
        pull_before: float = 0.0,
        merged_before: float = 0.0,
        cancelled_before: float = 0.0,
        offers_before: float = 0.0,
        acceptances_before: float = 0.0,
        seen_before: float = 0.0,
        attempts_before: float = 0.0,
        problems_before: float = 0.0,
    ) -> dict[str, int]:
        """How many :meth:`purge` would delete with no limit, of each kind."""


@runtime_checkable
class DestinationStore(Protocol):
    """Destinations taken out of delivery (they answered 410 Gone)."""

    def disable_destination(self, url: str, *, reason: str, at: float) -> None:
        """Stop delivering to ``url`` (it answered 410 Gone)."""

    def enable_destination(self, url: str) -> bool:
        """Deliver to ``url`` again; True if it was disabled."""

    def disabled_destinations(self) -> dict[str, str]:
        """Disabled destinations and why."""


@runtime_checkable
class IntermediaryStore(Protocol):
    """The intermediaries that may sign requests, and their secrets."""

    def add_intermediary(self, name: str, secret: str, *, at: float) -> None:
        """Register an intermediary, or add a secret to it with no end; a revoked one
        registered again keeps only the new secret."""

    def rotate_intermediary(self, name: str, secret: str, *, at: float, grace_until: float) -> None:
        """Add ``secret`` to an intermediary; its other secrets end at ``grace_until`` at
        the latest. Raises IntermediaryNotFoundError when unknown or revoked."""

    def revoke_intermediary(self, name: str, *, at: float) -> bool:
        """Refuse the intermediary from now on and drop its secrets; False when it was
        revoked already. Raises IntermediaryNotFoundError when unknown."""

    def intermediary(self, name: str) -> Intermediary | None:
        """The intermediary, its secrets opened; None when unknown."""

    def list_intermediaries(self) -> list[Intermediary]:
        """Every intermediary, revoked ones too, by name."""

    def intermediary_generation(self, name: str) -> int | None:
        """A number that changes with every change of the intermediary's row (None when
        unknown): cheap enough to read on every request."""

    def intermediary_secrets(self, name: str, *, now: float | None = None) -> tuple[str, ...]:
        """The secrets the intermediary may sign with at ``now``; empty when unknown or
        revoked."""

    def reseal_secrets(self) -> int:
        """Seal every stored secret with the store's keyring's first key; return how many
        rows changed. Raises ConfigurationError without a keyring."""


@runtime_checkable
class ReplayCache(Protocol):
    """The ids of signed messages already accepted, until they expire."""

    def remember_message(self, party: str, msg_id: str, *, expires_at: float, now: float) -> bool:
        """Record a message id accepted from ``party``; False when it was already seen."""

    def message_seen(self, party: str, msg_id: str, *, now: float) -> bool:
        """Whether a message id from ``party`` is remembered and not yet expired at ``now``
        (a read: nothing changes)."""

    def forget_message(self, party: str, msg_id: str) -> None:
        """Drop a message id whose request was refused (a refused request stores nothing)."""


@runtime_checkable
class OfferStore(Protocol):
    """Offers with the requests they answer, and their acceptances."""

    remembers_with_offers: ClassVar[bool] = True
    """Whether :meth:`add_offers` remembers the asking message's id in its own commit;
    without it, the endpoint remembers the id as it authenticates the request."""

    def add_offers(
        self, offers: Sequence[StoredOffer], *, message: SeenMessage | None = None
    ) -> None:
        """Keep offers with their requests and signed documents; with ``message``, also
        remember the id of the message that asked for them (as :meth:`remember_message`
        does), in the same transaction.

        :raises ReplayedMessageError: ``message`` was already seen; nothing is stored.
        """

    def get_offer(self, offer_id: str) -> StoredOffer:
        """The offer with that id; raises OfferNotFoundError."""

    def begin_acceptance(self, claim: AcceptanceClaim, now: float) -> AcceptanceRecord | None:
        """Claim an acceptance, in one transaction; None when it is now ``processing``
        under ``claim.owner``'s lease (new, or ``released`` before and retried).

        Otherwise the record that stands in the way: the acceptance itself (``processing``
        under another lease, ``booked`` or ``refused``), or another acceptance that holds
        the offer (``processing`` or ``booked``): an offer is accepted at most once, which
        a unique index on the offer's live acceptance enforces across processes.

        :raises AcceptanceConflictError: the acceptance id was given for another offer.
        """

    def renew_acceptance(
        self, acceptance_id: str, owner: str, lease_until: float, *, hold: str | None = None
    ) -> bool:
        """Extend ``owner``'s lease (and record the hold taken, as JSON); False when the
        lease was lost (it expired and another process took the acceptance over)."""

    def take_over_acceptance(
        self, acceptance_id: str, owner: str, now: float, lease_until: float
    ) -> bool:
        """Take a ``processing`` acceptance whose lease expired before ``now`` over for
        ``owner`` (to recover it); False when its lease is live or it is no longer
        ``processing``."""

    def finish_acceptance(
        self,
        acceptance_id: str,
        owner: str,
        state: AcceptanceState,
        result: str,
        now: float,
        *,
        rows: Sequence[NewRow] = (),
        problems: Sequence[EmissionProblem] = (),
    ) -> AcceptanceRecord | None:
        """Record an acceptance's outcome and answer, and for a booking its outbox ``rows``
        and emission ``problems``, in one transaction; None when done.

        Only while ``owner`` holds the lease; a ``booked`` outcome may also complete an
        acceptance that a recovery ``released`` meanwhile (the booking did happen). Else
        nothing is written and the record as it stands is returned.
        """

    def get_acceptance(self, acceptance_id: str) -> AcceptanceRecord | None:
        """The acceptance with that id, or None."""

    def stalled_acceptances(self, now: float, limit: int = 100) -> list[AcceptanceRecord]:
        """``processing`` acceptances whose lease expired before ``now``, oldest first."""


@runtime_checkable
class EmissionProblemStore(Protocol):
    """Documents that could not be made, kept for the operator."""

    def add_emission_problems(
        self, problems: Sequence[EmissionProblem], *, connection: object | None = None
    ) -> None:
        """Keep emission problems for the operator; with ``connection``, inside the
        caller's open transaction (as :meth:`insert`)."""

    def emission_problems(self, *, limit: int = 100) -> list[EmissionProblem]:
        """Emission problems, newest first."""

    def count_emission_problems(self) -> int:
        """How many emission problems are kept."""


@runtime_checkable
class OutboxStore(
    TermsStore,
    LinkStore,
    OutboxQueue,
    DestinationStore,
    IntermediaryStore,
    ReplayCache,
    OfferStore,
    EmissionProblemStore,
    Protocol,
):
    """Every role in one store: terms, consent records, links, the outbox, intermediaries,
    the replay cache, offers and emission problems.

    Every method is safe to call from several threads. Times are POSIX seconds (UTC). A
    store declares what it can do beyond the roles with class attributes (defaults here,
    inherited by a store that subclasses this protocol): :attr:`nonblocking`,
    :attr:`~OutboxQueue.limits_per_destination`, :attr:`~OutboxQueue.notifies_work`,
    :attr:`~OfferStore.remembers_with_offers`.
    """

    nonblocking: ClassVar[bool] = False
    """True when what a request for offers calls (``get_terms``,
    ``intermediary_generation``, ``intermediary``, ``message_seen``, ``add_offers``,
    ``forget_message``) never waits on a network: then a pipeline whose hooks are all
    :func:`~cmi_sdk.nonblocking` runs on the caller's thread, the endpoint's event loop
    included. Otherwise requests are answered on worker threads."""

    def migrate(self) -> None:
        """Create or upgrade the tables; idempotent."""

    def close(self) -> None:
        """Let go of the store's connections; it opens new ones if used again."""
