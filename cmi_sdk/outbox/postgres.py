"""The PostgreSQL store: for firms whose own data lives in PostgreSQL, and for several
delivery workers in several processes.

Its semantics are :class:`~cmi_sdk.outbox.sqlite.SQLiteStore`'s, method by method. What
PostgreSQL adds:

- **The caller's transaction.** ``insert`` and ``active_terms`` take the firm's open
  psycopg ``Connection``, or a SQLAlchemy ``Connection`` or ``Session`` on the
  ``postgresql+psycopg`` dialect, and run inside its transaction without committing: the
  outbox row commits or rolls back with the firm's own write.
- **Many workers.** ``claim`` leases a batch with ``FOR UPDATE SKIP LOCKED``: workers
  never wait for each other and never claim the same row. ``per_destination`` caps the
  rows leased to one destination across all workers; rows with an ordering key go out one
  at a time, in order (see :class:`PostgresStore`).
- **Wake-ups.** ``insert`` and ``redrive`` send ``NOTIFY <schema>_outbox`` in their
  transaction (it fires on commit); :meth:`PostgresStore.wait_for_work` waits for it.
- **A pull cursor that never skips a late commit.** Rows do not commit in ``seq`` order
  here, so :meth:`PostgresStore.documents_since` orders by the inserting transaction's id
  and only returns rows of transactions older than every transaction still running.

Times are POSIX seconds in ``double precision`` columns, bodies ``bytea``, JSON ``jsonb``.
The store keeps at most ``pool_size`` connections of its own (opened on demand, reused),
plus one for ``LISTEN`` once :meth:`~PostgresStore.wait_for_work` is called.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, cast

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow, tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout

from cmi_sdk._exceptions import (
    AcceptanceConflictError,
    ConfigurationError,
    IntermediaryNotFoundError,
    LinkError,
    LinkNotFoundError,
    OfferNotFoundError,
    OutboxRowNotFoundError,
    ReplayedMessageError,
    StoreError,
    TermsError,
    TermsNotFoundError,
)
from cmi_sdk._models import ConsentRecord, Link, Offer, Request, SharingTerms
from cmi_sdk._secrets import SecretsKeyring, seal_secret
from cmi_sdk.outbox import (
    STATES,
    AcceptanceClaim,
    AcceptanceRecord,
    AcceptanceState,
    AttemptResult,
    DigestGroup,
    EmissionProblem,
    NewRow,
    OutboxRow,
    OutboxStatus,
    OutboxStore,
    SeenMessage,
    State,
    StoredOffer,
)
from cmi_sdk.outbox import _intermediaries as intermediaries
from cmi_sdk.outbox._intermediaries import Intermediary
from cmi_sdk.outbox._params import CompletionParams, offer_row
from cmi_sdk.outbox._rows import link_of_row, terms_of_row

__all__ = ["SCHEMA_VERSION", "DocumentRow", "PostgresStore", "decode_cursor", "encode_cursor"]

log = logging.getLogger("cmi_sdk.outbox.postgres")

SCHEMA_VERSION = 6
"""The version of the tables this module creates, recorded in ``<schema>.meta``."""

_T = TypeVar("_T")
_Conn = psycopg.Connection[TupleRow]
_Cursor = psycopg.Cursor[TupleRow]

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,55}")  # + "_outbox" fits a 63-byte channel name
_SEQ_BITS = 63
_SEQ_MASK = (1 << _SEQ_BITS) - 1
_XID_LIMIT = 1 << 64

# Statements name their tables "{s}.table"; the store replaces "{s}" with its schema, a
# checked identifier (see _SCHEMA_NAME), once per statement text. Values are always bound.
_DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.meta (
    key text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.terms (
    id text PRIMARY KEY,
    customer_ref text NOT NULL,
    intermediary text,
    terms jsonb NOT NULL,
    secret text NOT NULL,
    created_at double precision NOT NULL,
    until double precision,
    revoked_at double precision
);
CREATE INDEX IF NOT EXISTS terms_customer ON {s}.terms (customer_ref);
CREATE TABLE IF NOT EXISTS {s}.consent (
    pos bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    id text PRIMARY KEY,
    terms_id text NOT NULL REFERENCES {s}.terms (id),
    event text NOT NULL,
    issued_at double precision NOT NULL,
    record jsonb NOT NULL,
    xml bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS consent_terms ON {s}.consent (terms_id, issued_at, pos);
CREATE TABLE IF NOT EXISTS {s}.outbox (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    msg_id text NOT NULL UNIQUE,
    terms_id text NOT NULL,
    customer_ref text NOT NULL,
    transaction_id text NOT NULL,
    standard text NOT NULL,
    document_type text NOT NULL,
    destination text,
    body bytea NOT NULL,
    created_at double precision NOT NULL,
    state text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at double precision,
    lease_owner text,
    lease_until double precision,
    last_status integer,
    last_error text,
    delivered_at double precision,
    dead_at double precision,
    ordering_key text,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id()
);
-- Version 2: rows held for a digest carry their model; the states that come with it.
ALTER TABLE {s}.outbox ADD COLUMN IF NOT EXISTS model text;
ALTER TABLE {s}.outbox DROP CONSTRAINT IF EXISTS outbox_state_check;
ALTER TABLE {s}.outbox ADD CONSTRAINT outbox_state_check CHECK (state IN
    ('pending', 'leased', 'retry', 'delivered', 'dead', 'pull', 'digest', 'merged',
     'cancelled'));
CREATE INDEX IF NOT EXISTS outbox_queue ON {s}.outbox (next_attempt_at, seq)
    WHERE state IN ('pending', 'retry');
CREATE INDEX IF NOT EXISTS outbox_queue_destination
    ON {s}.outbox (destination, next_attempt_at, seq) WHERE state IN ('pending', 'retry');
CREATE INDEX IF NOT EXISTS outbox_leased ON {s}.outbox (destination, lease_until)
    WHERE state = 'leased';
CREATE INDEX IF NOT EXISTS outbox_state ON {s}.outbox (state, seq);
CREATE INDEX IF NOT EXISTS outbox_terms ON {s}.outbox (terms_id, xid, seq);
CREATE INDEX IF NOT EXISTS outbox_ordering ON {s}.outbox (ordering_key, seq)
    WHERE ordering_key IS NOT NULL AND state IN ('pending', 'leased', 'retry');
CREATE TABLE IF NOT EXISTS {s}.attempts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    msg_id text NOT NULL,
    attempt integer NOT NULL,
    owner text NOT NULL,
    started_at double precision NOT NULL,
    finished_at double precision NOT NULL,
    outcome text NOT NULL,
    status integer,
    error text,
    next_attempt_at double precision
);
CREATE INDEX IF NOT EXISTS attempts_msg ON {s}.attempts (msg_id, id);
CREATE TABLE IF NOT EXISTS {s}.destinations (
    url text PRIMARY KEY,
    disabled_at double precision NOT NULL,
    reason text NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.intermediaries (
    name text PRIMARY KEY,
    secrets jsonb NOT NULL,
    created_at double precision NOT NULL
);
-- Version 6: intermediaries can be revoked, and each change of their row counts.
ALTER TABLE {s}.intermediaries ADD COLUMN IF NOT EXISTS revoked_at double precision;
ALTER TABLE {s}.intermediaries ADD COLUMN IF NOT EXISTS generation bigint NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS {s}.offers (
    id text PRIMARY KEY,
    request_id text NOT NULL,
    customer_ref text NOT NULL,
    intermediary text,
    offer jsonb NOT NULL,
    request jsonb NOT NULL,
    xml bytea NOT NULL,
    valid_until double precision NOT NULL,
    created_at double precision NOT NULL
);
-- No reader looks offers up by request: an index would only slow every insert.
DROP INDEX IF EXISTS {s}.offers_request;
CREATE TABLE IF NOT EXISTS {s}.acceptances (
    id text PRIMARY KEY,
    offer_id text NOT NULL,
    state text NOT NULL,
    result text,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.seen (
    party text NOT NULL,
    msg_id text NOT NULL,
    expires_at double precision NOT NULL,
    PRIMARY KEY (party, msg_id)
);
CREATE INDEX IF NOT EXISTS seen_expiry ON {s}.seen (expires_at);
-- Version 4: service links. A reference is unique per intermediary, not across them.
CREATE TABLE IF NOT EXISTS {s}.links (
    id text PRIMARY KEY,
    account text NOT NULL,
    intermediary text NOT NULL,
    customer_ref text NOT NULL,
    created_at double precision NOT NULL,
    revoked_at double precision,
    UNIQUE (intermediary, customer_ref)
);
CREATE INDEX IF NOT EXISTS links_account ON {s}.links (account);
CREATE TABLE IF NOT EXISTS {s}.link_codes (
    hash text PRIMARY KEY,
    account text NOT NULL,
    created_at double precision NOT NULL,
    expires_at double precision NOT NULL,
    used_at double precision,
    link_id text
);
CREATE INDEX IF NOT EXISTS link_codes_expiry ON {s}.link_codes (expires_at);
-- Version 5: an acceptance carries its lease, the acceptance itself and its hold (for
-- recovery after a crash); an offer names the one acceptance that holds it (an offer
-- accepted more than once before is held by its first live acceptance); emission problems
-- are kept for the operator.
ALTER TABLE {s}.acceptances ADD COLUMN IF NOT EXISTS intermediary text;
ALTER TABLE {s}.acceptances ADD COLUMN IF NOT EXISTS acceptance text;
ALTER TABLE {s}.acceptances ADD COLUMN IF NOT EXISTS hold text;
ALTER TABLE {s}.acceptances ADD COLUMN IF NOT EXISTS lease_owner text;
ALTER TABLE {s}.acceptances ADD COLUMN IF NOT EXISTS lease_until double precision;
ALTER TABLE {s}.offers ADD COLUMN IF NOT EXISTS accepted_by text;
UPDATE {s}.offers o SET accepted_by = (SELECT a.id FROM {s}.acceptances a
    WHERE a.offer_id = o.id AND a.state IN ('processing', 'booked')
    ORDER BY a.created_at, a.id LIMIT 1)
WHERE o.accepted_by IS NULL AND EXISTS (SELECT 1 FROM {s}.acceptances a
    WHERE a.offer_id = o.id AND a.state IN ('processing', 'booked'));
CREATE INDEX IF NOT EXISTS acceptances_stalled ON {s}.acceptances (created_at)
    WHERE state = 'processing';
CREATE TABLE IF NOT EXISTS {s}.emission_problems (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id text NOT NULL,
    terms_id text NOT NULL,
    customer_ref text NOT NULL,
    standard text NOT NULL,
    reason text NOT NULL,
    created_at double precision NOT NULL,
    transaction_json text NOT NULL
);
"""

# What a document for an account goes out under: the firm's direct terms for the account,
# and the terms of each of its active links; for an intermediary's reference, what its
# linked account gets, or, unlinked, only that intermediary's own terms for it.
_RECIPIENTS = (
    "WITH account (id) AS (SELECT %(ref)s::text WHERE %(intermediary)s::text IS NULL"
    " UNION ALL SELECT account FROM {s}.links WHERE intermediary = %(intermediary)s"
    " AND customer_ref = %(ref)s AND revoked_at IS NULL)"
    " SELECT t.terms::text, t.secret, t.created_at, t.id FROM account a JOIN {s}.terms t"
    " ON t.customer_ref = a.id AND t.intermediary IS NULL WHERE {active}"
    " UNION ALL SELECT t.terms::text, t.secret, t.created_at, t.id FROM account a"
    " JOIN {s}.links l ON l.account = a.id AND l.revoked_at IS NULL JOIN {s}.terms t"
    " ON t.intermediary = l.intermediary AND t.customer_ref = l.customer_ref WHERE {active}"
    " UNION ALL SELECT t.terms::text, t.secret, t.created_at, t.id FROM {s}.terms t"
    " WHERE t.intermediary = %(intermediary)s AND t.customer_ref = %(ref)s AND {active}"
    " AND NOT EXISTS (SELECT 1 FROM account) ORDER BY 3, 4"
).replace("{active}", "t.revoked_at IS NULL AND (t.until IS NULL OR t.until > %(now)s)")

_LINKS_SQL = "SELECT id, account, intermediary, customer_ref, created_at, revoked_at FROM {s}.links"

_COLUMNS = (
    "seq",
    "msg_id",
    "terms_id",
    "customer_ref",
    "transaction_id",
    "standard",
    "document_type",
    "destination",
    "body",
    "created_at",
    "state",
    "attempts",
    "next_attempt_at",
    "lease_owner",
    "lease_until",
    "last_status",
    "last_error",
    "delivered_at",
)
_ROW = ", ".join(_COLUMNS)
_ROW_O = ", ".join("o." + c for c in _COLUMNS)
_ROW_T = ", ".join("t." + c for c in _COLUMNS)

_INSERT = (
    "INSERT INTO {s}.outbox (msg_id, terms_id, customer_ref, transaction_id, standard,"
    " document_type, destination, body, created_at, state, next_attempt_at, ordering_key,"
    " model) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (msg_id) DO NOTHING"
)

# A claim first turns expired leases (their worker died) back into rows due for a retry,
# due when they were first due: then every claim reads one ordered index of due rows.
_RELEASE = (
    "UPDATE {s}.outbox SET state = 'retry', lease_owner = NULL, lease_until = NULL"
    " WHERE seq IN (SELECT o.seq FROM {s}.outbox o WHERE o.state = 'leased'"
    " AND o.lease_until < %(now)s FOR UPDATE SKIP LOCKED)"
)

# A row is due when it is pending or retrying and its time has come. A row with an
# ordering key also waits while an older row with the same key has not gone out: pending
# (even if not yet due), leased or retrying.
_DUE = (
    "o.state IN ('pending', 'retry') AND o.next_attempt_at <= %(now)s"
    " AND (o.ordering_key IS NULL OR NOT EXISTS (SELECT 1 FROM {s}.outbox p"
    " WHERE p.ordering_key = o.ordering_key AND p.seq < o.seq"
    " AND p.state IN ('pending', 'leased', 'retry')))"
)

_LEASE = (
    "UPDATE {s}.outbox t SET state = 'leased', lease_owner = %(owner)s,"
    " lease_until = %(until)s"
    " FROM picked WHERE t.seq = picked.seq RETURNING {cols}"
)

_CLAIM = (
    "WITH picked AS MATERIALIZED (SELECT o.seq FROM {s}.outbox o WHERE {due}"
    " ORDER BY o.next_attempt_at, o.seq LIMIT %(limit)s FOR UPDATE OF o SKIP LOCKED) {lease}"
)

# Live leases to one destination.
_LEASED_TO = (
    "(SELECT count(*) FROM {s}.outbox l WHERE l.destination = {d}"
    " AND l.state = 'leased' AND l.lease_until >= %(now)s)"
)

# Second statement of a claim with a per-destination limit: the destinations with due rows
# and room, earliest first, each locked for this transaction (or skipped when another
# worker is claiming for it right now). The lock makes the count and the claim one step
# across workers; the count is read again, under the lock, by the third statement. The
# destinations are found by a skip scan of the index of waiting rows (one probe per
# destination), not by reading every due row.
_LOCK_DESTINATIONS = (
    "WITH RECURSIVE walk (destination) AS ((SELECT o.destination FROM {s}.outbox o"
    " WHERE o.state IN ('pending', 'retry') AND o.destination IS NOT NULL"
    " ORDER BY o.destination LIMIT 1) UNION ALL SELECT (SELECT o.destination"
    " FROM {s}.outbox o WHERE o.state IN ('pending', 'retry')"
    " AND o.destination > w.destination ORDER BY o.destination LIMIT 1)"
    " FROM walk w WHERE w.destination IS NOT NULL),"
    " waiting AS (SELECT w.destination, (SELECT min(o.next_attempt_at) FROM {s}.outbox o"
    " WHERE o.destination = w.destination AND o.state IN ('pending', 'retry')) AS first"
    " FROM walk w WHERE w.destination IS NOT NULL)"
    " SELECT d.destination FROM (SELECT destination FROM waiting"
    " WHERE first <= %(now)s AND {leased_to_waiting} < %(per)s"
    " ORDER BY first, destination LIMIT %(limit)s) d"
    " WHERE pg_try_advisory_xact_lock(%(lock_space)s::int4, hashtext(d.destination))"
)

_CLAIM_PER_DESTINATION = (
    "WITH room AS (SELECT d.destination, %(per)s - {leased_to_d} AS room"
    " FROM unnest(%(destinations)s::text[]) AS d (destination)),"
    " to_destinations AS MATERIALIZED (SELECT c.seq, c.next_attempt_at FROM room r"
    " CROSS JOIN LATERAL (SELECT o.seq, o.next_attempt_at FROM {s}.outbox o"
    " WHERE o.destination = r.destination AND {due} ORDER BY o.next_attempt_at, o.seq"
    " LIMIT greatest(r.room, 0) FOR UPDATE OF o SKIP LOCKED) c),"
    " to_nowhere AS MATERIALIZED (SELECT o.seq, o.next_attempt_at FROM {s}.outbox o"
    " WHERE o.destination IS NULL AND {due} ORDER BY o.next_attempt_at, o.seq"
    " LIMIT %(limit)s FOR UPDATE OF o SKIP LOCKED),"
    " picked AS (SELECT seq FROM (SELECT * FROM to_destinations UNION ALL"
    " SELECT * FROM to_nowhere) x ORDER BY next_attempt_at, seq LIMIT %(limit)s) {lease}"
)


# Rows of transactions older than every transaction still running are all there is below
# that line: a row committing later belongs to a younger transaction, so it sorts after
# any cursor handed out. (Aborted transactions' rows are never visible.)
_DOCUMENTS = (
    "SELECT {cols}, o.xid::text FROM {s}.outbox o WHERE o.terms_id = %(terms)s"
    " AND o.state NOT IN ('cancelled', 'digest', 'merged')"
    " AND (o.xid, o.seq) > (%(xid)s::xid8, %(seq)s)"
    " AND o.xid < pg_snapshot_xmin(pg_current_snapshot())"
    " ORDER BY o.xid, o.seq LIMIT %(limit)s"
)

_REDRIVE = (
    "UPDATE {s}.outbox SET state = 'pending', attempts = 0, next_attempt_at = %s,"
    " dead_at = NULL WHERE state = 'dead' AND {which}"
)


def _compose(template: str, **parts: str) -> str:
    """``template`` with its ``{name}`` parts replaced: constant SQL only, never values."""
    for name, part in parts.items():
        template = template.replace("{" + name + "}", part)
    return template


_CLAIM_SQL = _compose(_CLAIM, due=_DUE, lease=_compose(_LEASE, cols=_ROW_T))
_LOCK_DESTINATIONS_SQL = _compose(
    _LOCK_DESTINATIONS, leased_to_waiting=_compose(_LEASED_TO, d="waiting.destination")
)
_CLAIM_PER_DESTINATION_SQL = _compose(
    _CLAIM_PER_DESTINATION,
    leased_to_d=_compose(_LEASED_TO, d="d.destination"),
    due=_DUE,
    lease=_compose(_LEASE, cols=_ROW_T),
)
_REDRIVE_ONE = _compose(_REDRIVE, which="msg_id = %s")
_REDRIVE_SINCE = _compose(_REDRIVE, which="dead_at >= %s")
_DOCUMENTS_SQL = _compose(_DOCUMENTS, cols=_ROW_O)
_ROWS_SQL = _compose("SELECT {cols} FROM {s}.outbox ORDER BY seq DESC LIMIT %s", cols=_ROW)
_ROWS_IN_STATE_SQL = _compose(
    "SELECT {cols} FROM {s}.outbox WHERE state = %s ORDER BY seq DESC LIMIT %s", cols=_ROW
)
_ROW_SQL = _compose("SELECT {cols} FROM {s}.outbox WHERE msg_id = %s", cols=_ROW)


@dataclass(frozen=True, slots=True)
class DocumentRow(OutboxRow):
    """A row as :meth:`PostgresStore.documents_since` returns it: with its cursor."""

    cursor: int
    """Pass it back as ``after`` to get the documents that follow this one."""


def encode_cursor(xid: int, seq: int) -> int:
    """The opaque cursor after the row ``seq`` of the transaction ``xid``: one integer of
    at most 39 decimal digits (``xid`` is a 64-bit ``xid8``, ``seq`` a positive bigint)."""
    return (xid << _SEQ_BITS) | (seq & _SEQ_MASK)


def decode_cursor(cursor: int) -> tuple[int, int]:
    """``(xid, seq)`` from a cursor; any integer below ``2**63`` (``0`` and the SQLite
    store's cursors included) is the start."""
    cursor = max(cursor, 0)
    return cursor >> _SEQ_BITS, cursor & _SEQ_MASK


def _row(values: Sequence[Any], cursor: int | None = None) -> OutboxRow:
    fields: dict[str, Any] = {
        "seq": values[0],
        "msg_id": values[1],
        "terms_id": values[2],
        "customer_ref": values[3],
        "transaction_id": values[4],
        "standard": values[5],
        "document_type": values[6],
        "destination": values[7],
        "body": bytes(values[8]),
        "created_at": values[9],
        "state": cast(State, values[10]),
        "attempts": values[11],
        "next_attempt_at": values[12],
        "lease_owner": values[13],
        "lease_until": values[14],
        "last_status": values[15],
        "last_error": values[16],
        "delivered_at": values[17],
    }
    return OutboxRow(**fields) if cursor is None else DocumentRow(**fields, cursor=cursor)


def _lost(conn: _Conn) -> bool:
    return conn.closed or conn.broken


def _reason(exc: psycopg.Error) -> str:
    primary = exc.diag.message_primary if exc.diag is not None else None
    text = primary or str(exc).strip() or type(exc).__name__
    return f"{exc.sqlstate}: {text}" if exc.sqlstate else text


class _Pool:
    """The store's connections: a :class:`psycopg_pool.ConnectionPool` of at most ``size``
    autocommit connections, opened on first use, opened again after :meth:`close` and in
    a child process (which leaves the parent's connections alone)."""

    def __init__(self, conninfo: str, size: int, timeout: float, where: str) -> None:
        self.conninfo = conninfo
        self.where = where
        self._size = size
        self._timeout = timeout
        self._pool: ConnectionPool[_Conn] | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._orphans: list[object] = []

    def connect(self) -> _Conn:
        """A connection of the store's own, outside the pool (the ``LISTEN`` one)."""
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to PostgreSQL at {self.where}: {exc}") from exc
        try:
            _configure(conn)
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(f"cannot set up a connection to {self.where}: {exc}") from exc
        return conn

    def _current(self) -> ConnectionPool[_Conn]:
        self.check_fork()
        pool = self._pool
        if pool is not None:
            return pool
        with self._lock:
            if self._pool is None:
                # One connection first, in the caller's thread: an unreachable server is
                # reported at once, with libpq's reason, not after the pool's timeout of
                # retries in the background.
                self.connect().close()
                self._pool = ConnectionPool(
                    self.conninfo,
                    connection_class=psycopg.Connection[TupleRow],
                    kwargs={"autocommit": True},
                    min_size=0,  # opened on demand, as the calls need them
                    max_size=self._size,
                    timeout=self._timeout,
                    configure=_configure,
                    name=f"cmi-sdk {self.where}",
                    open=False,
                )
                self._pool.open(wait=False)
            return self._pool

    def check_fork(self) -> None:
        """In a child process that inherited the pool, leave the parent's connections
        alone: neither used nor closed (that would end the parent's sessions), and kept
        referenced so that they are never finalized here either."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid():
                if self._pool is not None:
                    self._orphans.append(self._pool)
                self._pool, self._pid = None, os.getpid()

    def orphan(self, conn: _Conn) -> None:
        """Keep a connection inherited from the parent process from being finalized."""
        self._orphans.append(conn)

    @contextmanager
    def connection(self) -> Iterator[_Conn]:
        """A connection of the pool, for one call; StoreError when none frees up in
        time. One left in a transaction or broken is rolled back or replaced on return."""
        pool = self._current()
        try:
            conn = pool.getconn()
        except PoolTimeout:
            raise StoreError(
                f"all {self._size} connections to PostgreSQL at {self.where} were"
                f" busy for {self._timeout:g} s: raise pool_size"
            ) from None
        try:
            yield conn
        finally:
            pool.putconn(conn)

    def discard_idle(self) -> None:
        """Replace the idle connections: after one was found dead, the others likely are
        too (a server restart, a failover)."""
        self.check_fork()
        pool = self._pool
        if pool is not None:
            pool.drain()

    def close(self) -> None:
        """Close the pool's connections (those in use as they come back); the next call
        opens a new pool."""
        self.check_fork()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()


def _configure(conn: _Conn) -> None:
    # The store's statements are short, indexed ones: compiling them (JIT, when the
    # planner's estimates are high on a large table) costs more than it saves.
    conn.execute("SET jit = off")


class PostgresStore(OutboxStore):
    """An :class:`~cmi_sdk.outbox.OutboxStore` in a PostgreSQL schema, for many processes.

    :param dsn: a libpq connection string or ``postgresql://`` URL.
    :param schema: the schema of the store's tables (created by :meth:`migrate`); lower
        case letters, digits and ``_``. ``NOTIFY`` goes out on ``<schema>_outbox``.
    :param pool_size: the most connections the store opens for its own work at once;
        threads beyond it wait (up to ``pool_timeout`` seconds, then StoreError).
    :param pool_timeout: how long to wait for a free connection.
    :param ordered_by_customer: rows get an ordering key, the customer ref and the
        destination: a customer's documents reach each destination one at a time, in the
        order they were emitted. A row is not claimed while an older row with its key is
        pending (due or not), leased or retrying; a dead row no longer holds the others up.
        Keys are per destination so that a destination that is down does not hold up the
        customer's other destinations. A row whose ``NewRow`` carries an ``ordering_key``
        attribute is ordered by it whatever this option says.
    :param notify: send ``NOTIFY`` when pending rows are written (turn off where commits of
        the firm's own transactions must not take PostgreSQL's global notify lock).
    :param auto_migrate: run :meth:`migrate` now (one read when the tables are there); turn
        off where the application's role may not create tables and ``cmi db migrate`` runs
        with another.
    :param keyring: seal the webhook and intermediary secrets the store keeps (encryption
        at rest); secrets stored before are read as they are until
        :meth:`reseal_secrets` seals them. Without it, sealed secrets cannot be read.

    All workers of one store must claim with the same ``per_destination``: the limit is
    kept by the workers that ask for it.
    """

    nonblocking: ClassVar[bool] = False
    """Every call is a round trip to the server: requests are answered on worker threads."""

    limits_per_destination: ClassVar[bool] = True
    """:meth:`claim` keeps ``per_destination`` across workers, with advisory locks."""

    notifies_work: ClassVar[bool] = True
    """:meth:`wait_for_work` wakes on the ``NOTIFY`` of ``insert`` and ``redrive``."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "cmi",
        pool_size: int = 4,
        pool_timeout: float = 30.0,
        ordered_by_customer: bool = False,
        notify: bool = True,
        auto_migrate: bool = True,
        keyring: SecretsKeyring | None = None,
    ) -> None:
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ConfigurationError(
                f"schema must be 1 to 56 lower-case letters, digits or _ (not starting with"
                f" a digit), not {schema!r}"
            )
        if pool_size < 1:
            raise ConfigurationError("pool_size must be at least 1")
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.Error as exc:
            raise ConfigurationError(f"not a PostgreSQL connection string: {exc}") from None
        params.setdefault("application_name", "cmi-sdk")
        params.setdefault("connect_timeout", 10)
        where = (
            f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"
            f"/{params.get('dbname') or params.get('user') or ''}"
        )
        self.schema = schema
        self.keyring = keyring
        """What seals the secrets kept here, if anything."""
        self.channel = f"{schema}_outbox"
        self.ordered_by_customer = ordered_by_customer
        self._notify = notify
        self._quoted = f'"{schema}"'
        self._statements: dict[str, str] = {}
        self._pool = _Pool(make_conninfo("", **params), pool_size, pool_timeout, where)
        # Advisory lock keys: one for migrations, one space for destinations' claims.
        self._migrate_key = f"cmi-sdk:{schema}:migrate"
        self._lock_space = zlib.crc32(f"cmi-sdk:{schema}:destinations".encode()) - (1 << 31)
        self._listener: _Conn | None = None
        self._listener_pid = 0
        self._listen_lock = threading.Lock()
        self._purged = 0.0
        if auto_migrate:
            self.migrate()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresStore:
        """A store for a ``postgresql://`` (or ``postgres://``, ``postgresql+psycopg://``)
        URL, such as ``CMI_DATABASE_URL``; ``options`` are the constructor's."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in {"postgresql", "postgres", "postgresql+psycopg"}:
            shown = url.rsplit("@", maxsplit=1)[-1]  # never a password
            raise ConfigurationError(
                f"not a PostgreSQL URL: {shown!r} (expected postgresql://user@host/db)"
            )
        return cls(f"postgresql://{rest}", **options)

    def __repr__(self) -> str:
        return f"PostgresStore({self._pool.where!r}, schema={self.schema!r})"

    def close(self) -> None:
        """Close the pool and the ``LISTEN`` connection; the store opens new ones
        when used again. Connections in use close when their call ends."""
        self._pool.close()
        with self._listen_lock:
            if self._listener is not None:
                if self._listener_pid == os.getpid():
                    self._listener.close()
                else:
                    self._pool.orphan(self._listener)
                self._listener = None

    # -- running statements ---------------------------------------------------------------

    def _sql(self, template: str) -> str:
        statement = self._statements.get(template)
        if statement is None:
            statement = self._statements[template] = template.replace("{s}", self._quoted)
        return statement

    def _run(
        self,
        what: str,
        body: Callable[[_Cursor], _T],
        *,
        write: bool = False,
        durable: bool = True,
    ) -> _T:
        """Run ``body`` on one of the store's connections: in a transaction when ``write``.

        A connection found dead (a server restart, ``pg_terminate_backend``) is replaced
        and the call run once more, unless it died while committing: then nobody knows
        whether the write happened, and the caller is told so."""
        for attempt in (1, 2):
            committing = False
            with self._pool.connection() as conn:
                try:
                    with conn.cursor() as cur:
                        if not write:
                            return body(cur)
                        with conn.transaction():
                            if not durable:
                                # Leases, heartbeats and outcomes: a power cut's loss
                                # costs a resend with the same webhook-id, never a document.
                                cur.execute("SET LOCAL synchronous_commit TO off")
                            result = body(cur)
                            committing = True
                        return result
                except psycopg.Error as exc:
                    lost = _lost(conn)
                    if lost:
                        self._pool.discard_idle()
                        if attempt == 1 and not committing:
                            log.warning(
                                "lost the connection to PostgreSQL while %s; trying again", what
                            )
                            continue
                    raise self._error(exc, what, lost=lost, committing=committing) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _read(self, what: str, template: str, params: Any = ()) -> list[TupleRow]:
        statement = self._sql(template)
        return self._run(what, lambda cur: cur.execute(statement, params).fetchall())

    def _error(self, exc: psycopg.Error, what: str, *, lost: bool, committing: bool) -> StoreError:
        if lost and committing:
            return StoreError(
                f"the connection to PostgreSQL at {self._pool.where} was lost while"
                f" committing ({what}): the write may or may not have been made"
            )
        if lost:
            return StoreError(
                f"the connection to PostgreSQL at {self._pool.where} was lost while {what}"
                f" (nothing was written): {_reason(exc)}"
            )
        if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
            return StoreError(
                f"{what}: the store's tables are missing from schema {self.schema!r} in"
                f" {self._pool.where}: run PostgresStore.migrate() (cmi db migrate)"
            )
        return StoreError(f"PostgreSQL failed while {what}: {_reason(exc)}")

    def _caller(self, connection: object) -> psycopg.Connection[Any]:
        """The psycopg connection behind the caller's object, checked to be inside a
        transaction the caller will commit."""
        conn = connection
        if type(connection).__module__.startswith("sqlalchemy"):
            conn = _sqlalchemy_driver(connection)
        if not isinstance(conn, psycopg.Connection):
            raise ConfigurationError(
                "the PostgreSQL store takes a psycopg Connection, or a SQLAlchemy Connection"
                f" or Session on the postgresql+psycopg dialect, not {type(conn).__name__};"
                " use the SQLite store for sqlite3 connections"
            )
        if conn.closed:
            raise ConfigurationError("the caller's psycopg connection is closed")
        status = conn.info.transaction_status
        if status == TransactionStatus.INERROR:
            raise StoreError(
                "the caller's transaction has already failed: roll it back before writing"
            )
        if conn.autocommit and status == TransactionStatus.IDLE:
            raise ConfigurationError(
                "the caller's connection is in autocommit mode outside a transaction: the"
                " outbox row would commit on its own; open one (with conn.transaction(): ...)"
            )
        return conn

    def _in_caller(self, connection: object, what: str, body: Callable[[_Cursor], _T]) -> _T:
        """Run ``body`` in the caller's transaction: never committed, never retried."""
        conn = self._caller(connection)
        try:
            with conn.cursor(row_factory=tuple_row) as cur:
                return body(cur)
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
                detail = (
                    f"the store's tables are missing from schema {self.schema!r} in the"
                    " caller's database (is it the store's database? run migrate() there)"
                )
            else:
                detail = _reason(exc)
            raise StoreError(
                f"{what} in the caller's transaction failed: {detail}; that transaction"
                " must be rolled back"
            ) from exc

    # -- schema ---------------------------------------------------------------------------

    def _version(self, cur: _Cursor) -> int:
        found = cur.execute("SELECT to_regclass(%s)", (f"{self._quoted}.meta",)).fetchone()
        if found is None or found[0] is None:
            return 0
        value = cur.execute(
            self._sql("SELECT value FROM {s}.meta WHERE key = 'schema_version'")
        ).fetchone()
        return 0 if value is None else int(value[0])

    def migrate(self) -> None:
        """Create the schema and its tables when missing, and record the version; idempotent.

        When the tables are there already, nothing is written (one read). Otherwise the
        work runs in one transaction under an advisory lock, so processes that start
        together create the tables once, and wait for each other instead of failing."""
        if self._run("reading the schema version", self._version) >= SCHEMA_VERSION:
            return

        def create(cur: _Cursor) -> None:
            cur.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (self._migrate_key,)
            )
            if self._version(cur) >= SCHEMA_VERSION:
                return  # another process did it while this one waited for the lock
            cur.execute(self._sql(_DDL))
            cur.execute(
                self._sql(
                    "INSERT INTO {s}.meta (key, value) VALUES ('schema_version', %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                ),
                (str(SCHEMA_VERSION),),
            )

        self._run(f"creating the tables in schema {self.schema!r}", create, write=True)

    # -- terms and consent ----------------------------------------------------------------

    def add_terms(self, terms: SharingTerms, consent: ConsentRecord, consent_xml: bytes) -> None:
        """Keep accepted terms and their consent record, in one transaction."""

        def body(cur: _Cursor) -> None:
            cur.execute(
                self._sql(
                    "INSERT INTO {s}.terms (id, customer_ref, intermediary, terms, secret,"
                    " created_at, until, revoked_at) VALUES (%s, %s, %s, %s::jsonb, %s, %s, %s,"
                    " NULL)"
                ),
                (
                    terms.id,
                    terms.customer_ref,
                    terms.intermediary,
                    json.dumps(terms.public_dict()),
                    seal_secret(self.keyring, terms.secret, context=f"terms:{terms.id}"),
                    terms.created_at.timestamp(),
                    None if terms.until is None else terms.until.timestamp(),
                ),
            )
            self._add_consent(cur, consent, consent_xml)

        self._run("writing terms", body, write=True)

    def _add_consent(self, cur: _Cursor, consent: ConsentRecord, xml: bytes) -> None:
        cur.execute(
            self._sql(
                "INSERT INTO {s}.consent (id, terms_id, event, issued_at, record, xml)"
                " VALUES (%s, %s, %s, %s, %s::jsonb, %s)"
            ),
            (
                consent.id,
                consent.terms_id,
                consent.event,
                consent.issued_at.timestamp(),
                consent.model_dump_json(),
                xml,
            ),
        )

    def get_terms(self, terms_id: str) -> SharingTerms:
        """The terms with that id, revoked or not; raises TermsNotFoundError."""
        rows = self._read(
            "reading terms", "SELECT terms::text, secret FROM {s}.terms WHERE id = %s", (terms_id,)
        )
        if not rows:
            raise TermsNotFoundError(f"no sharing terms with id {terms_id!r}")
        return terms_of_row(rows[0], self.keyring)

    def list_terms(
        self,
        *,
        customer_ref: str | None = None,
        intermediary: str | None = None,
        include_revoked: bool = False,
    ) -> list[SharingTerms]:
        """Terms, oldest first."""
        template = "SELECT terms::text, secret FROM {s}.terms WHERE true"
        params: list[Any] = []
        if customer_ref is not None:
            template += " AND customer_ref = %s"
            params.append(customer_ref)
        if intermediary is not None:
            template += " AND intermediary = %s"
            params.append(intermediary)
        if not include_revoked:
            template += " AND revoked_at IS NULL"
        template += " ORDER BY created_at, id"
        return [
            terms_of_row(r, self.keyring) for r in self._read("listing terms", template, params)
        ]

    def active_terms(
        self,
        customer_ref: str,
        now: float,
        *,
        intermediary: str | None = None,
        connection: object | None = None,
    ) -> list[SharingTerms]:
        """The terms a document for the account ``customer_ref`` (or, with
        ``intermediary``, for that intermediary's reference) goes out under at ``now``;
        with ``connection``, read in the caller's transaction (it sees the caller's own
        writes)."""
        statement = self._sql(_RECIPIENTS)
        params = {"ref": customer_ref, "intermediary": intermediary, "now": now}

        def body(cur: _Cursor) -> list[TupleRow]:
            return cur.execute(statement, params).fetchall()

        if connection is not None:
            rows = self._in_caller(connection, "reading the active terms", body)
        else:
            rows = self._run("reading the active terms", body)
        return [terms_of_row(r, self.keyring) for r in rows]

    def revoke_terms(
        self, terms_id: str, at: float, consent: ConsentRecord, consent_xml: bytes
    ) -> int:
        """Revoke terms, keep the consent record, cancel their undelivered rows; return how
        many rows were cancelled. Raises TermsNotFoundError, or TermsError if revoked."""

        def body(cur: _Cursor) -> int:
            found = cur.execute(
                self._sql("SELECT revoked_at, terms::text FROM {s}.terms WHERE id = %s FOR UPDATE"),
                (terms_id,),
            ).fetchone()
            if found is None:
                raise TermsNotFoundError(f"no sharing terms with id {terms_id!r}")
            if found[0] is not None:
                raise TermsError(f"terms {terms_id} are already revoked")
            data = json.loads(found[1])
            data["revoked_at"] = consent.issued_at.isoformat()
            cur.execute(
                self._sql("UPDATE {s}.terms SET revoked_at = %s, terms = %s::jsonb WHERE id = %s"),
                (at, json.dumps(data), terms_id),
            )
            self._add_consent(cur, consent, consent_xml)
            # Rows being sent right now are cancelled too: their result is then not recorded
            # over the cancellation (see complete()).
            cur.execute(
                self._sql(
                    "UPDATE {s}.outbox SET state = 'cancelled', last_error = 'terms revoked',"
                    " lease_owner = NULL, lease_until = NULL"
                    " WHERE terms_id = %s AND state IN ('pending', 'retry', 'leased', 'digest')"
                ),
                (terms_id,),
            )
            return cur.rowcount

        return self._run("revoking terms", body, write=True)

    def consent_records(self, terms_id: str) -> list[tuple[ConsentRecord, bytes]]:
        """The consent records of the terms, oldest first, with their signed documents."""
        rows = self._read(
            "reading consent records",
            "SELECT record::text, xml FROM {s}.consent WHERE terms_id = %s ORDER BY issued_at, pos",
            (terms_id,),
        )
        return [(ConsentRecord.model_validate_json(r[0]), bytes(r[1])) for r in rows]

    # -- service links --------------------------------------------------------------------

    def add_link_code(
        self, code_hash: str, account: str, *, created_at: float, expires_at: float
    ) -> None:
        """Keep a link code's hash; codes that expired unredeemed are dropped meanwhile."""

        def body(cur: _Cursor) -> None:
            cur.execute(
                self._sql("DELETE FROM {s}.link_codes WHERE expires_at < %s AND used_at IS NULL"),
                (created_at,),
            )
            cur.execute(
                self._sql(
                    "INSERT INTO {s}.link_codes (hash, account, created_at, expires_at)"
                    " VALUES (%s, %s, %s, %s)"
                ),
                (code_hash, account, created_at, expires_at),
            )

        self._run("writing a link code", body, write=True)

    def redeem_link_code(
        self, code_hash: str, *, intermediary: str, link_id: str, customer_ref: str, now: float
    ) -> Link | None:
        """Mark the code used and make the link, in one transaction; None when the code
        is unknown, used or expired."""

        def body(cur: _Cursor) -> Link | None:
            # The row lock makes a concurrent redemption wait, then find the code used.
            found = cur.execute(
                self._sql(
                    "UPDATE {s}.link_codes SET used_at = %s, link_id = %s WHERE hash = %s"
                    " AND used_at IS NULL AND expires_at > %s RETURNING account"
                ),
                (now, link_id, code_hash, now),
            ).fetchone()
            if found is None:
                return None
            values = (link_id, found[0], intermediary, customer_ref, now, None)
            cur.execute(
                self._sql(
                    "INSERT INTO {s}.links (id, account, intermediary, customer_ref,"
                    " created_at, revoked_at) VALUES (%s, %s, %s, %s, %s, %s)"
                ),
                values,
            )
            return link_of_row(values)

        return self._run("redeeming a link code", body, write=True)

    def get_link(self, link_id: str) -> Link:
        """The link with that id, revoked or not; raises LinkNotFoundError."""
        found = self._read(
            "reading a link",
            _LINKS_SQL + " WHERE id = %s",
            (link_id,),
        )
        if not found:
            raise LinkNotFoundError(f"no link {link_id!r}")
        return link_of_row(found[0])

    def links(
        self,
        *,
        account: str | None = None,
        intermediary: str | None = None,
        include_revoked: bool = False,
    ) -> list[Link]:
        """Links, oldest first."""
        template = _LINKS_SQL + " WHERE true"
        params: list[Any] = []
        if account is not None:
            template += " AND account = %s"
            params.append(account)
        if intermediary is not None:
            template += " AND intermediary = %s"
            params.append(intermediary)
        if not include_revoked:
            template += " AND revoked_at IS NULL"
        template += " ORDER BY created_at, id"
        return [link_of_row(r) for r in self._read("listing links", template, params)]

    def revoke_link(
        self, link_id: str, at: float, revocations: Sequence[tuple[ConsentRecord, bytes]]
    ) -> tuple[int, list[str]]:
        """Revoke the link and its terms named by ``revocations``, in one transaction."""

        def body(cur: _Cursor) -> tuple[int, list[str]]:
            found = cur.execute(
                self._sql(
                    "SELECT revoked_at, intermediary, customer_ref FROM {s}.links"
                    " WHERE id = %s FOR UPDATE"
                ),
                (link_id,),
            ).fetchone()
            if found is None:
                raise LinkNotFoundError(f"no link {link_id!r}")
            if found[0] is not None:
                raise LinkError(f"link {link_id} is already revoked")
            _, intermediary, customer_ref = found
            cur.execute(
                self._sql("UPDATE {s}.links SET revoked_at = %s WHERE id = %s"), (at, link_id)
            )
            cancelled = 0
            for consent, xml in revocations:
                terms = cur.execute(
                    self._sql(
                        "SELECT terms::text FROM {s}.terms WHERE id = %s AND intermediary = %s"
                        " AND customer_ref = %s AND revoked_at IS NULL FOR UPDATE"
                    ),
                    (consent.terms_id, intermediary, customer_ref),
                ).fetchone()
                if terms is None:
                    continue  # revoked meanwhile, with its own record
                data = json.loads(terms[0])
                data["revoked_at"] = consent.issued_at.isoformat()
                cur.execute(
                    self._sql(
                        "UPDATE {s}.terms SET revoked_at = %s, terms = %s::jsonb WHERE id = %s"
                    ),
                    (at, json.dumps(data), consent.terms_id),
                )
                self._add_consent(cur, consent, xml)
                cur.execute(
                    self._sql(
                        "UPDATE {s}.outbox SET state = 'cancelled', last_error = 'terms revoked',"
                        " lease_owner = NULL, lease_until = NULL WHERE terms_id = %s"
                        " AND state IN ('pending', 'retry', 'leased', 'digest')"
                    ),
                    (consent.terms_id,),
                )
                cancelled += cur.rowcount
            late = cur.execute(
                self._sql(
                    "SELECT id FROM {s}.terms WHERE intermediary = %s AND customer_ref = %s"
                    " AND revoked_at IS NULL ORDER BY created_at, id"
                ),
                (intermediary, customer_ref),
            ).fetchall()
            return cancelled, [r[0] for r in late]

        return self._run("revoking a link", body, write=True)

    # -- outbox ---------------------------------------------------------------------------

    def _ordering_key(self, row: NewRow) -> str | None:
        key: str | None = getattr(row, "ordering_key", None)
        if key is None and self.ordered_by_customer and row.state != "pull":
            key = f"{row.customer_ref}\x1f{row.destination or ''}"
        return key

    def insert(self, rows: Sequence[NewRow], *, connection: object | None = None) -> int:
        """Write rows (a row whose msg_id is already there is skipped) and wake the workers
        on commit; with ``connection``, inside the caller's open transaction, which the
        caller commits. Return how many were new."""
        params = [self._insert_params(r) for r in rows]
        if not params:
            return 0
        wake = self._notify and any(r.state == "pending" for r in rows)
        statement = self._sql(_INSERT)

        def body(cur: _Cursor) -> int:
            cur.executemany(statement, params)
            count = cur.rowcount
            if wake and count > 0:
                cur.execute(self._sql(f"NOTIFY {self.channel}"))
            return count

        if connection is not None:
            return self._in_caller(connection, "writing outbox rows", body)
        return self._run("writing outbox rows", body, write=True)

    def claim(
        self,
        *,
        owner: str,
        now: float,
        lease_seconds: float,
        limit: int,
        per_destination: int | None = None,
    ) -> list[OutboxRow]:
        """Lease up to ``limit`` due rows, and rows whose lease expired, to ``owner``.

        Expired leases are first released (to ``retry``, due when they were first due),
        then the earliest due rows are leased, skipping rows other workers are locking.

        :param per_destination: lease no row to a destination that already has this many
            rows leased (by any worker, lease not expired). Destinations another worker is
            claiming for at this very moment are skipped this round. The limit holds when
            every worker of the store passes it.
        """
        if limit < 1:
            return []
        if per_destination is not None and per_destination < 1:
            raise ConfigurationError("per_destination must be at least 1")
        params: dict[str, Any] = {
            "owner": owner,
            "now": now,
            "until": now + lease_seconds,
            "limit": limit,
            "per": per_destination,
            "lock_space": self._lock_space,
        }

        def body(cur: _Cursor) -> list[TupleRow]:
            cur.execute(self._sql(_RELEASE), params)
            if per_destination is None:
                return cur.execute(self._sql(_CLAIM_SQL), params).fetchall()
            found = cur.execute(self._sql(_LOCK_DESTINATIONS_SQL), params).fetchall()
            params["destinations"] = [d for (d,) in found]
            return cur.execute(self._sql(_CLAIM_PER_DESTINATION_SQL), params).fetchall()

        rows = self._run("claiming rows", body, write=True, durable=False)
        return sorted((_row(r) for r in rows), key=lambda r: r.seq)

    def heartbeat(self, *, owner: str, msg_ids: Sequence[str], lease_until: float) -> None:
        """Extend ``owner``'s leases on ``msg_ids``."""
        if not msg_ids:
            return
        statement = self._sql(
            "UPDATE {s}.outbox SET lease_until = %s WHERE msg_id = ANY(%s) AND lease_owner = %s"
            " AND state = 'leased'"
        )
        self._run(
            "extending leases",
            lambda cur: cur.execute(statement, (lease_until, list(msg_ids), owner)),
            write=True,
            durable=False,
        )

    def cancel(self, *, owner: str, msg_ids: Sequence[str], reason: str) -> int:
        """Cancel the rows of ``msg_ids`` that ``owner`` leases; return how many."""
        if not msg_ids:
            return 0
        statement = self._sql(
            "UPDATE {s}.outbox SET state = 'cancelled', last_error = %s, lease_owner = NULL,"
            " lease_until = NULL WHERE msg_id = ANY(%s) AND lease_owner = %s AND state = 'leased'"
        )

        def body(cur: _Cursor) -> int:
            return cur.execute(statement, (reason, list(msg_ids), owner)).rowcount

        return self._run("cancelling rows", body, write=True)

    def complete(self, results: Sequence[AttemptResult]) -> None:
        """Record attempts and outcomes in one transaction (a group commit)."""
        if not results:
            return
        params = CompletionParams.of(results)
        attempts, delivered, retry, dead = (
            params.attempts,
            params.delivered,
            params.retry,
            params.dead,
        )

        def body(cur: _Cursor) -> None:
            cur.executemany(
                self._sql(
                    "INSERT INTO {s}.attempts (msg_id, attempt, owner, started_at, finished_at,"
                    " outcome, status, error, next_attempt_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                ),
                attempts,
            )
            # A receiver's 2xx is a fact whoever holds the lease now; only a cancelled row
            # keeps its state (its terms were revoked meanwhile).
            if delivered:
                cur.executemany(
                    self._sql(
                        "UPDATE {s}.outbox SET state = 'delivered', delivered_at = %s,"
                        " attempts = %s, last_status = %s, last_error = NULL, lease_owner = NULL,"
                        " lease_until = NULL WHERE msg_id = %s AND state IN"
                        " ('leased', 'pending', 'retry', 'dead')"
                    ),
                    delivered,
                )
            # A failure is recorded only by the worker that still holds the lease.
            if retry:
                cur.executemany(
                    self._sql(
                        "UPDATE {s}.outbox SET state = 'retry', next_attempt_at = %s,"
                        " attempts = %s, last_status = %s, last_error = %s, lease_owner = NULL,"
                        " lease_until = NULL WHERE msg_id = %s AND lease_owner = %s"
                        " AND state = 'leased'"
                    ),
                    retry,
                )
            if dead:
                cur.executemany(
                    self._sql(
                        "UPDATE {s}.outbox SET state = 'dead', dead_at = %s, attempts = %s,"
                        " last_status = %s, last_error = %s, lease_owner = NULL,"
                        " lease_until = NULL, next_attempt_at = NULL WHERE msg_id = %s"
                        " AND lease_owner = %s"
                        " AND state = 'leased'"
                    ),
                    dead,
                )

        self._run("recording delivery outcomes", body, write=True, durable=False)

    def due_digests(self, now: float) -> list[DigestGroup]:
        """The ``digest`` rows whose window ended by ``now``, by terms and window."""
        found = self._read(
            "reading due digests",
            "SELECT terms_id, next_attempt_at, msg_id, model FROM {s}.outbox"
            " WHERE state = 'digest' AND next_attempt_at <= %s"
            " ORDER BY terms_id, next_attempt_at, seq",
            (now,),
        )
        groups: dict[tuple[str, float], list[tuple[str, str]]] = {}
        for terms_id, due, msg_id, model in found:
            groups.setdefault((terms_id, float(due)), []).append((msg_id, model))
        return [
            DigestGroup(
                terms_id=terms_id,
                due=due,
                msg_ids=tuple(m for m, _ in rows),
                models=tuple(d for _, d in rows),
            )
            for (terms_id, due), rows in groups.items()
        ]

    def merge_digest(self, msg_ids: Sequence[str], row: NewRow | None) -> int:
        """Write the window's digest row and mark its sources merged (or release them);
        workers racing for one window write it once (the sources are locked first)."""
        ids = list(msg_ids)

        def body(cur: _Cursor) -> int:
            locked = cur.execute(
                self._sql(
                    "SELECT msg_id FROM {s}.outbox WHERE msg_id = ANY(%s) AND state = 'digest'"
                    " FOR UPDATE"
                ),
                (ids,),
            ).fetchall()
            if not locked:
                return 0  # another worker merged this window
            if row is None:
                cur.execute(
                    self._sql(
                        "UPDATE {s}.outbox SET state = 'pending' WHERE msg_id = ANY(%s)"
                        " AND state = 'digest'"
                    ),
                    (ids,),
                )
                return cur.rowcount
            cur.execute(
                self._sql(_INSERT),
                (
                    row.msg_id,
                    row.terms_id,
                    row.customer_ref,
                    row.transaction_id,
                    row.standard,
                    row.document_type,
                    row.destination,
                    row.body,
                    row.created_at,
                    row.state,
                    row.next_attempt_at,
                    self._ordering_key(row),
                    row.model,
                ),
            )
            cur.execute(
                self._sql(
                    "UPDATE {s}.outbox SET state = 'merged' WHERE msg_id = ANY(%s)"
                    " AND state = 'digest'"
                ),
                (ids,),
            )
            merged = cur.rowcount  # read before NOTIFY, which has no count of its own
            if self._notify:
                cur.execute(self._sql(f"NOTIFY {self.channel}"))
            return merged + 1

        return self._run("merging a digest", body, write=True)

    def next_due(self) -> float | None:
        """When the next pending or retrying row is due, or the next lease expires."""
        rows = self._read(
            "reading the next due time",
            "SELECT least((SELECT min(next_attempt_at) FROM {s}.outbox"
            " WHERE state IN ('pending', 'retry')),"
            " (SELECT min(lease_until) FROM {s}.outbox WHERE state = 'leased'))",
        )
        value = rows[0][0] if rows else None
        return None if value is None else float(value)

    def status(self, now: float) -> OutboxStatus:
        """Counts by state and the oldest pending row's age."""
        counts: dict[str, int] = dict.fromkeys(STATES, 0)
        counts.update(
            (state, int(n))
            for state, n in self._read(
                "counting rows", "SELECT state, count(*) FROM {s}.outbox GROUP BY state"
            )
        )
        oldest = self._read(
            "reading the oldest pending row",
            "SELECT min(created_at) FROM {s}.outbox WHERE state IN ('pending', 'retry', 'leased')",
        )[0][0]
        disabled = tuple(sorted(self.disabled_destinations()))
        return OutboxStatus(
            counts=counts,
            oldest_pending_age=None if oldest is None else max(0.0, now - oldest),
            disabled_destinations=disabled,
        )

    def rows(self, *, state: str | None = None, limit: int = 100) -> list[OutboxRow]:
        """Rows, newest first, optionally in one state."""
        if state is None:
            found = self._read(
                "listing rows",
                _ROWS_SQL,
                (max(limit, 0),),
            )
        else:
            found = self._read(
                "listing rows",
                _ROWS_IN_STATE_SQL,
                (state, max(limit, 0)),
            )
        return [_row(r) for r in found]

    def get_row(self, msg_id: str) -> OutboxRow:
        """The row with that msg_id; raises OutboxRowNotFoundError."""
        found = self._read("reading a row", _ROW_SQL, (msg_id,))
        if not found:
            raise OutboxRowNotFoundError(f"no outbox row {msg_id!r}")
        return _row(found[0])

    def attempt_counts(self) -> dict[str, int]:
        """Delivery attempts ever recorded, by outcome."""
        counts = dict.fromkeys(("delivered", "retry", "dead"), 0)
        rows = self._read(
            "counting attempts", "SELECT outcome, count(*) FROM {s}.attempts GROUP BY outcome"
        )
        counts.update((outcome, int(n)) for outcome, n in rows)
        return counts

    def attempts(self, msg_id: str) -> list[AttemptResult]:
        """Every recorded attempt of a row, in order."""
        found = self._read(
            "reading attempts",
            "SELECT msg_id, owner, attempt, started_at, finished_at, outcome, status, error,"
            " next_attempt_at FROM {s}.attempts WHERE msg_id = %s ORDER BY id",
            (msg_id,),
        )
        return [
            AttemptResult(
                msg_id=r[0],
                owner=r[1],
                attempt=r[2],
                started_at=r[3],
                finished_at=r[4],
                outcome=r[5],
                status=r[6],
                error=r[7],
                next_attempt_at=r[8],
            )
            for r in found
        ]

    def redrive(self, *, msg_id: str | None = None, since: float | None = None, now: float) -> int:
        """Make dead rows pending again, due now (attempts start again from zero), and wake
        the workers on commit."""
        if (msg_id is None) == (since is None):
            raise ValueError("redrive takes a msg_id or a since time, not both")

        def body(cur: _Cursor) -> int:
            if msg_id is not None:
                found = cur.execute(
                    self._sql("SELECT state FROM {s}.outbox WHERE msg_id = %s"), (msg_id,)
                ).fetchone()
                if found is None:
                    raise OutboxRowNotFoundError(f"no outbox row {msg_id!r}")
                cur.execute(self._sql(_REDRIVE_ONE), (now, msg_id))
            else:
                cur.execute(self._sql(_REDRIVE_SINCE), (now, since))
            count = cur.rowcount
            if self._notify and count > 0:
                cur.execute(self._sql(f"NOTIFY {self.channel}"))
            return count

        return self._run("redriving dead rows", body, write=True)

    def documents_since(self, terms_id: str, after: int, limit: int) -> list[OutboxRow]:
        """Documents emitted under the terms after the cursor ``after``, in order; each is a
        :class:`DocumentRow` whose ``cursor`` continues after it (``0`` is the start).

        Rows do not commit in ``seq`` order, so the order is the inserting transaction's id,
        then ``seq``; only rows of transactions older than every transaction still running
        are returned, so a row that commits late is never behind a cursor already handed
        out. The cost: a transaction that stays open holds back every document newer than
        it (until it ends), here and for every terms.
        """
        xid, seq = decode_cursor(after)
        if xid >= _XID_LIMIT or limit < 1:
            return []
        found = self._read(
            "reading documents",
            _DOCUMENTS_SQL,
            {"terms": terms_id, "xid": str(xid), "seq": seq, "limit": limit},
        )
        return [_row(r, encode_cursor(int(r[-1]), r[0])) for r in found]

    # -- waking workers -------------------------------------------------------------------

    def wait_for_work(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a ``NOTIFY`` from ``insert`` or ``redrive``:
        True when one came (or may have been missed: the listening connection was lost and
        opened again), False at the timeout.

        Notifications that arrive between two calls are kept by the listening connection
        and wake the next call at once. A worker still polls: notifications are not sent
        for rows that become due later (retries, digests, expired leases). One thread per
        store waits at a time (others queue behind it): one waiter per worker process."""
        with self._listen_lock:
            conn = self._listener
            if conn is not None and self._listener_pid != os.getpid():
                self._pool.orphan(conn)  # the parent's: this process listens on its own
                conn = self._listener = None
            missed = conn is not None and _lost(conn)
            if conn is None or missed:
                if conn is not None:
                    conn.close()
                self._listener = None
                conn = self._pool.connect()
                try:
                    conn.execute(self._sql(f"LISTEN {self.channel}"))
                except psycopg.Error as exc:
                    conn.close()
                    raise self._error(exc, "listening", lost=False, committing=False) from exc
                self._listener, self._listener_pid = conn, os.getpid()
                if missed:
                    return True
            try:
                woken = any(True for _ in conn.notifies(timeout=max(timeout, 0.0), stop_after=1))
                if woken:
                    for _ in conn.notifies(timeout=0):
                        pass  # one wake-up for every notification already here
            except psycopg.Error:
                log.warning("lost the LISTEN connection to PostgreSQL; opening another")
                conn.close()
                self._listener = None
                return True
            return woken

    # -- destinations, intermediaries, replay ---------------------------------------------

    def disable_destination(self, url: str, *, reason: str, at: float) -> None:
        """Stop delivering to ``url`` (it answered 410 Gone)."""
        statement = self._sql(
            "INSERT INTO {s}.destinations (url, disabled_at, reason) VALUES (%s, %s, %s)"
            " ON CONFLICT (url) DO NOTHING"
        )
        self._run(
            "disabling a destination",
            lambda cur: cur.execute(statement, (url, at, reason)),
            write=True,
        )

    def enable_destination(self, url: str) -> bool:
        """Deliver to ``url`` again; True if it was disabled."""
        statement = self._sql("DELETE FROM {s}.destinations WHERE url = %s")
        return self._run(
            "enabling a destination",
            lambda cur: cur.execute(statement, (url,)).rowcount > 0,
            write=True,
        )

    def disabled_destinations(self) -> dict[str, str]:
        """Disabled destinations and why."""
        rows = self._read("reading destinations", "SELECT url, reason FROM {s}.destinations")
        return dict(rows)

    def add_intermediary(self, name: str, secret: str, *, at: float) -> None:
        """Register an intermediary, or add a secret to it (kept alongside the others, with
        no end). A revoked intermediary registered again starts afresh: its old secrets
        stay gone. The row is locked meanwhile, so two processes adding secrets at once
        both keep theirs."""

        def body(cur: _Cursor) -> None:
            found = self._lock_intermediary(cur, name, create_at=at)
            held = [] if found is None or found[1] is not None else self._secrets_of(found, name)
            self._put_intermediary(cur, name, intermediaries.with_secret(held, secret))

        self._run("registering an intermediary", body, write=True)

    def _lock_intermediary(
        self, cur: _Cursor, name: str, *, create_at: float | None = None
    ) -> TupleRow | None:
        if create_at is not None:
            cur.execute(
                self._sql(
                    "INSERT INTO {s}.intermediaries (name, secrets, created_at, generation)"
                    " VALUES (%s, '[]'::jsonb, %s, 0) ON CONFLICT (name) DO NOTHING"
                ),
                (name, create_at),
            )
        return cur.execute(
            self._sql(
                "SELECT secrets::text, revoked_at FROM {s}.intermediaries WHERE name = %s"
                " FOR UPDATE"
            ),
            (name,),
        ).fetchone()

    def _secrets_of(
        self, found: Sequence[Any], name: str
    ) -> list[intermediaries.IntermediarySecret]:
        return intermediaries.decode(found[0], name, self.keyring)

    def _put_intermediary(
        self, cur: _Cursor, name: str, secrets: Sequence[intermediaries.IntermediarySecret]
    ) -> None:
        cur.execute(
            self._sql(
                "UPDATE {s}.intermediaries SET secrets = %s::jsonb, revoked_at = NULL,"
                " generation = generation + 1 WHERE name = %s"
            ),
            (intermediaries.encode(secrets, name, self.keyring), name),
        )

    def rotate_intermediary(self, name: str, secret: str, *, at: float, grace_until: float) -> None:
        """Give an intermediary a new secret; its others work until ``grace_until``.

        :raises IntermediaryNotFoundError: no such intermediary, or it is revoked."""

        def body(cur: _Cursor) -> None:
            found = self._lock_intermediary(cur, name)
            if found is None or found[1] is not None:
                raise IntermediaryNotFoundError(
                    intermediaries.not_active(name, known=found is not None)
                )
            secrets = intermediaries.rotated(
                self._secrets_of(found, name), secret, at=at, grace_until=grace_until
            )
            self._put_intermediary(cur, name, secrets)

        self._run("rotating an intermediary's secret", body, write=True)

    def revoke_intermediary(self, name: str, *, at: float) -> bool:
        """Refuse the intermediary's requests from now on, and forget its secrets; False
        when it was revoked already.

        :raises IntermediaryNotFoundError: no such intermediary."""

        def body(cur: _Cursor) -> bool:
            found = self._lock_intermediary(cur, name)
            if found is None:
                raise IntermediaryNotFoundError(intermediaries.not_active(name, known=False))
            if found[1] is not None:
                return False
            cur.execute(
                self._sql(
                    "UPDATE {s}.intermediaries SET secrets = '[]'::jsonb, revoked_at = %s,"
                    " generation = generation + 1 WHERE name = %s"
                ),
                (at, name),
            )
            return True

        return self._run("revoking an intermediary", body, write=True)

    _INTERMEDIARY = (
        "SELECT name, created_at, secrets::text, revoked_at, generation FROM {s}.intermediaries"
    )

    def _intermediary(self, row: Sequence[Any]) -> Intermediary:
        return Intermediary(
            name=row[0],
            created_at=row[1],
            secrets=tuple(intermediaries.decode(row[2], row[0], self.keyring)),
            revoked_at=row[3],
            generation=row[4],
        )

    def intermediary(self, name: str) -> Intermediary | None:
        """The intermediary with its secrets (opened), or None when unknown."""
        found = self._read(
            "reading an intermediary", self._INTERMEDIARY + " WHERE name = %s", (name,)
        )
        return self._intermediary(found[0]) if found else None

    def list_intermediaries(self) -> list[Intermediary]:
        """Every intermediary, revoked ones too, by name."""
        found = self._read("listing intermediaries", self._INTERMEDIARY + " ORDER BY name")
        return [self._intermediary(r) for r in found]

    def intermediary_generation(self, name: str) -> int | None:
        """How many times the intermediary's row has changed (None when unknown): one read
        of a key, without opening any secret, for the endpoint to check on every request."""
        found = self._read(
            "reading an intermediary",
            "SELECT generation FROM {s}.intermediaries WHERE name = %s",
            (name,),
        )
        return int(found[0][0]) if found else None

    def intermediary_secrets(self, name: str, *, now: float | None = None) -> tuple[str, ...]:
        """The secrets the intermediary's requests may be signed with at ``now`` (the
        current time by default); empty when unknown or revoked."""
        found = self.intermediary(name)
        if found is None:
            return ()
        return found.valid_secrets(time.time() if now is None else now)

    def reseal_secrets(self) -> int:
        """Seal every secret kept here with the keyring's first key (stored as plain text,
        or sealed with an older key), in one transaction; return how many rows changed.

        :raises ConfigurationError: the store has no keyring, or a secret does not open."""
        if self.keyring is None:
            raise ConfigurationError(
                "no secrets key is configured: set CMI_SECRETS_KEY or CMI_SECRETS_KEY_FILE"
                " (make a key with `cmi secrets generate-key`)"
            )
        keyring = self.keyring

        def body(cur: _Cursor) -> int:
            changed = 0
            terms = cur.execute(self._sql("SELECT id, secret FROM {s}.terms FOR UPDATE")).fetchall()
            for terms_id, stored in terms:
                if keyring.is_current(stored):
                    continue
                where = f"terms:{terms_id}"
                sealed = keyring.seal(keyring.open(stored, context=where), context=where)
                cur.execute(
                    self._sql("UPDATE {s}.terms SET secret = %s WHERE id = %s"), (sealed, terms_id)
                )
                changed += 1
            rows = cur.execute(
                self._sql("SELECT name, secrets::text FROM {s}.intermediaries FOR UPDATE")
            ).fetchall()
            for name, text in rows:
                resealed = intermediaries.reseal(text, name, keyring)
                if resealed is not None:
                    cur.execute(
                        self._sql(
                            "UPDATE {s}.intermediaries SET secrets = %s::jsonb WHERE name = %s"
                        ),
                        (resealed, name),
                    )
                    changed += 1
            return changed

        return self._run("sealing the stored secrets", body, write=True)

    def remember_message(self, party: str, msg_id: str, *, expires_at: float, now: float) -> bool:
        """Record a message id accepted from ``party``; False when already seen (and not
        yet expired). Committed without waiting for the disk, like the SQLite store's."""
        message = SeenMessage(party, msg_id, expires_at, now)
        return self._run(
            "remembering a message id",
            lambda cur: self._remember(cur, message),
            write=True,
            durable=False,
        )

    def _remember(self, cur: _Cursor, message: SeenMessage) -> bool:
        # Expired ids are purged at most once a second (per process), through their index:
        # a purge per request would cost more as traffic grows.
        if message.now - self._purged >= 1.0:
            self._purged = message.now
            cur.execute(self._sql("DELETE FROM {s}.seen WHERE expires_at < %s"), (message.now,))
        statement = self._sql(
            "INSERT INTO {s}.seen AS s (party, msg_id, expires_at) VALUES (%s, %s, %s)"
            " ON CONFLICT (party, msg_id) DO UPDATE SET expires_at = EXCLUDED.expires_at"
            " WHERE s.expires_at < %s"
        )
        params = (message.party, message.msg_id, message.expires_at, message.now)
        return cur.execute(statement, params).rowcount == 1

    def message_seen(self, party: str, msg_id: str, *, now: float) -> bool:
        """Whether a message id from ``party`` is remembered and not expired at ``now``."""
        statement = self._sql(
            "SELECT 1 FROM {s}.seen WHERE party = %s AND msg_id = %s AND expires_at >= %s"
        )
        return self._run(
            "reading a message id",
            lambda cur: cur.execute(statement, (party, msg_id, now)).fetchone() is not None,
        )

    def forget_message(self, party: str, msg_id: str) -> None:
        """Drop a message id: the request it came with was refused, and stores nothing."""
        statement = self._sql("DELETE FROM {s}.seen WHERE party = %s AND msg_id = %s")
        self._run(
            "forgetting a message id",
            lambda cur: cur.execute(statement, (party, msg_id)),
            write=True,
            durable=False,
        )

    # -- offers and acceptances -----------------------------------------------------------

    def add_offers(
        self, offers: Sequence[StoredOffer], *, message: SeenMessage | None = None
    ) -> None:
        """Keep offers, with the requests they answer and their signed documents (committed
        without waiting for the disk: a lost offer is a quote asked for again); with
        ``message``, remember it in the same transaction.

        :raises ReplayedMessageError: ``message`` was already seen; nothing is stored."""
        params = [offer_row(o) for o in offers]
        statement = self._sql(
            "INSERT INTO {s}.offers (id, request_id, customer_ref, intermediary, offer,"
            " request, xml, valid_until, created_at)"
            " VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, %s)"
        )

        def body(cur: _Cursor) -> None:
            if message is not None and not self._remember(cur, message):
                raise ReplayedMessageError(f"message id {message.msg_id} was already used")
            if params:
                cur.executemany(statement, params)

        if params or message is not None:
            self._run("writing offers", body, write=True, durable=False)

    def get_offer(self, offer_id: str) -> StoredOffer:
        """The offer with that id; raises OfferNotFoundError."""
        found = self._read(
            "reading an offer",
            "SELECT offer::text, request::text, xml, intermediary FROM {s}.offers WHERE id = %s",
            (offer_id,),
        )
        if not found:
            raise OfferNotFoundError(f"no offer {offer_id!r}")
        offer, request, xml, intermediary = found[0]
        return StoredOffer(
            offer=Offer.model_validate_json(offer),
            request=Request.model_validate_json(request),
            xml=bytes(xml),
            intermediary=intermediary,
        )

    def begin_acceptance(self, claim: AcceptanceClaim, now: float) -> AcceptanceRecord | None:
        """Claim an acceptance; None when it is now ``processing`` under ``claim.owner``,
        else the record in the way (itself, or the acceptance that holds the offer).

        Safe across processes: the acceptance's row is locked (or its insert waits on a
        concurrent one), and the offer's ``accepted_by`` is set only while empty, so of
        concurrent claims of one offer the first to commit holds it, and the others wait
        for that commit and then read its record."""
        select = self._sql(_ACCEPTANCE + " WHERE id = %s")
        select_holder = self._sql(_ACCEPTANCE + _HELD_BY)
        take_offer = self._sql(
            "UPDATE {s}.offers SET accepted_by = %s WHERE id = %s AND accepted_by IS NULL"
        )
        insert = self._sql(
            "INSERT INTO {s}.acceptances (id, offer_id, state, result, created_at, updated_at,"
            " intermediary, acceptance, hold, lease_owner, lease_until)"
            " VALUES (%s, %s, 'processing', NULL, %s, %s, %s, %s, NULL, %s, %s)"
            " ON CONFLICT (id) DO NOTHING"
        )
        retake = self._sql(
            "UPDATE {s}.acceptances SET state = 'processing', result = NULL, updated_at = %s,"
            " intermediary = %s, acceptance = %s, hold = NULL, lease_owner = %s,"
            " lease_until = %s WHERE id = %s AND state = 'released'"
        )

        def body(cur: _Cursor) -> AcceptanceRecord | None:
            for _ in range(8):  # each round ends, or a concurrent change made it start over
                found = AcceptanceRecord.of_row(
                    cur.execute(select + " FOR UPDATE", (claim.acceptance_id,)).fetchone()
                )
                if found is not None:
                    if found.offer_id != claim.offer_id:
                        raise AcceptanceConflictError(
                            f"acceptance {claim.acceptance_id} was given for another offer"
                        )
                    if found.state != "released":
                        return found
                if cur.execute(take_offer, (claim.acceptance_id, claim.offer_id)).rowcount == 0:
                    other = AcceptanceRecord.of_row(
                        cur.execute(select_holder, (claim.offer_id,)).fetchone()
                    )
                    if other is not None:
                        return other
                    if (
                        cur.execute(
                            self._sql("SELECT 1 FROM {s}.offers WHERE id = %s"), (claim.offer_id,)
                        ).fetchone()
                        is None
                    ):
                        raise OfferNotFoundError(f"no offer {claim.offer_id!r}")
                    continue  # its holder let it go meanwhile
                if found is not None:
                    cur.execute(
                        retake,
                        (
                            now,
                            claim.intermediary,
                            claim.acceptance,
                            claim.owner,
                            claim.lease_until,
                            claim.acceptance_id,
                        ),
                    )
                    return None
                cur.execute(
                    insert,
                    (
                        claim.acceptance_id,
                        claim.offer_id,
                        now,
                        now,
                        claim.intermediary,
                        claim.acceptance,
                        claim.owner,
                        claim.lease_until,
                    ),
                )
                if cur.rowcount == 1:
                    return None
                # The same id was claimed concurrently, and committed first: give the offer
                # back and read what that claim made.
                cur.execute(
                    self._sql(
                        "UPDATE {s}.offers SET accepted_by = NULL WHERE id = %s"
                        " AND accepted_by = %s"
                    ),
                    (claim.offer_id, claim.acceptance_id),
                )
            raise StoreError(f"acceptance {claim.acceptance_id} kept changing while claimed")

        return self._run("claiming an acceptance", body, write=True)

    def renew_acceptance(
        self, acceptance_id: str, owner: str, lease_until: float, *, hold: str | None = None
    ) -> bool:
        """Extend ``owner``'s lease and record the hold; False when the lease was lost."""
        statement = self._sql(
            "UPDATE {s}.acceptances SET lease_until = %s, hold = COALESCE(%s, hold)"
            " WHERE id = %s AND state = 'processing' AND lease_owner = %s"
        )
        # Without waiting for the disk, as the SQLite store's: a lost hold expires by itself.
        return self._run(
            "renewing an acceptance's lease",
            lambda cur: (
                cur.execute(statement, (lease_until, hold, acceptance_id, owner)).rowcount == 1
            ),
            write=True,
            durable=False,
        )

    def take_over_acceptance(
        self, acceptance_id: str, owner: str, now: float, lease_until: float
    ) -> bool:
        """Take a ``processing`` acceptance whose lease expired over for ``owner``."""
        statement = self._sql(
            "UPDATE {s}.acceptances SET lease_owner = %s, lease_until = %s"
            " WHERE id = %s AND state = 'processing' AND (lease_until IS NULL OR lease_until < %s)"
        )
        return self._run(
            "taking an acceptance over",
            lambda cur: (
                cur.execute(statement, (owner, lease_until, acceptance_id, now)).rowcount == 1
            ),
            write=True,
        )

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
        """Record the outcome, and for a booking its documents (waking the workers on
        commit) and emission problems, in one transaction, while ``owner`` holds the lease;
        else return the record."""
        select = self._sql(_ACCEPTANCE + " WHERE id = %s FOR UPDATE")
        params = [self._insert_params(r) for r in rows]
        wake = self._notify and any(r.state == "pending" for r in rows)

        def body(cur: _Cursor) -> AcceptanceRecord | None:
            found = AcceptanceRecord.of_row(cur.execute(select, (acceptance_id,)).fetchone())
            if found is None:
                raise StoreError(f"acceptance {acceptance_id} is not in the store")
            ours = found.state == "processing" and found.lease_owner == owner
            late = state == "booked" and found.state == "released"
            if not (ours or late):
                return found
            if state == "booked":
                held = cur.execute(
                    self._sql(
                        "UPDATE {s}.offers SET accepted_by = %s WHERE id = %s"
                        " AND (accepted_by IS NULL OR accepted_by = %s)"
                    ),
                    (acceptance_id, found.offer_id, acceptance_id),
                ).rowcount
                if held == 0:  # released, and another acceptance holds the offer now
                    return found
            else:
                cur.execute(
                    self._sql(
                        "UPDATE {s}.offers SET accepted_by = NULL WHERE id = %s"
                        " AND accepted_by = %s"
                    ),
                    (found.offer_id, acceptance_id),
                )
            cur.execute(
                self._sql(
                    "UPDATE {s}.acceptances SET state = %s, result = %s, updated_at = %s,"
                    " lease_owner = NULL, lease_until = NULL WHERE id = %s"
                ),
                (state, result, now, acceptance_id),
            )
            if params:
                cur.executemany(self._sql(_INSERT), params)
                if wake:
                    cur.execute(self._sql(f"NOTIFY {self.channel}"))
            if problems:
                cur.executemany(self._sql(_INSERT_PROBLEM), [p.row() for p in problems])
            return None

        return self._run("recording an acceptance", body, write=True)

    def _insert_params(self, r: NewRow) -> tuple[Any, ...]:
        return (
            r.msg_id,
            r.terms_id,
            r.customer_ref,
            r.transaction_id,
            r.standard,
            r.document_type,
            r.destination,
            r.body,
            r.created_at,
            r.state,
            r.next_attempt_at,
            self._ordering_key(r),
            r.model,
        )

    def get_acceptance(self, acceptance_id: str) -> AcceptanceRecord | None:
        """The acceptance with that id, or None."""
        found = self._read(
            "reading an acceptance",
            _ACCEPTANCE + " WHERE id = %s",
            (acceptance_id,),
        )
        return AcceptanceRecord.of_row(found[0]) if found else None

    def stalled_acceptances(self, now: float, limit: int = 100) -> list[AcceptanceRecord]:
        """``processing`` acceptances whose lease expired before ``now``, oldest first."""
        found = self._read(
            "reading stalled acceptances",
            _ACCEPTANCE + " WHERE state = 'processing'"
            " AND (lease_until IS NULL OR lease_until < %s) ORDER BY created_at, id LIMIT %s",
            (now, limit),
        )
        return [a for a in map(AcceptanceRecord.of_row, found) if a is not None]

    def add_emission_problems(
        self, problems: Sequence[EmissionProblem], *, connection: object | None = None
    ) -> None:
        """Keep emission problems; with ``connection``, in the caller's transaction."""
        params = [p.row() for p in problems]
        if not params:
            return
        statement = self._sql(_INSERT_PROBLEM)

        def body(cur: _Cursor) -> None:
            cur.executemany(statement, params)

        if connection is not None:
            self._in_caller(connection, "writing emission problems", body)
        else:
            self._run("writing emission problems", body, write=True)

    def emission_problems(self, *, limit: int = 100) -> list[EmissionProblem]:
        """Emission problems, newest first."""
        found = self._read(
            "reading emission problems",
            "SELECT transaction_id, terms_id, customer_ref, standard, reason, created_at,"
            " transaction_json FROM {s}.emission_problems ORDER BY seq DESC LIMIT %s",
            (limit,),
        )
        return [EmissionProblem(*r) for r in found]

    def count_emission_problems(self) -> int:
        """How many emission problems are kept."""
        found = self._read(
            "counting emission problems", "SELECT count(*) FROM {s}.emission_problems"
        )
        return int(found[0][0])


_ACCEPTANCE = (
    "SELECT id, offer_id, state, result, intermediary, acceptance, hold, lease_owner,"
    " lease_until FROM {s}.acceptances"
)

_HELD_BY = " WHERE id = (SELECT o.accepted_by FROM {s}.offers o WHERE o.id = %s)"

_INSERT_PROBLEM = (
    "INSERT INTO {s}.emission_problems (transaction_id, terms_id, customer_ref, standard,"
    " reason, created_at, transaction_json) VALUES (%s, %s, %s, %s, %s, %s, %s)"
)


def _sqlalchemy_driver(connection: object) -> object:
    """The psycopg connection under a SQLAlchemy ``Session`` or ``Connection``, inside the
    SQLAlchemy transaction the caller will commit."""
    from sqlalchemy.engine import Connection  # noqa: PLC0415  (an optional dependency)
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415
    from sqlalchemy.orm import Session, scoped_session  # noqa: PLC0415

    try:
        if isinstance(connection, Session | scoped_session):
            # Begins the session's transaction when none is open, as a flush would.
            connection = connection.connection()
        if not isinstance(connection, Connection):
            return connection
        if not connection.in_transaction():
            # SQLAlchemy commits only a transaction it knows of: begin it, as the caller's
            # first statement would have, so that the caller's commit() commits the row.
            connection.begin()
        driver = connection.connection.driver_connection
    except SQLAlchemyError as exc:
        raise ConfigurationError(f"cannot use the caller's SQLAlchemy connection: {exc}") from exc
    if not isinstance(driver, psycopg.Connection):
        raise ConfigurationError(
            f"the SQLAlchemy engine's driver is {type(driver).__module__}, not psycopg 3:"
            " create it with a postgresql+psycopg:// URL"
        )
    return driver
