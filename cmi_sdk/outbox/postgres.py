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

import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

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
from cmi_sdk._models import ConsentRecord, Link, SharingTerms
from cmi_sdk._secrets import SecretsKeyring
from cmi_sdk.outbox import (
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
    StoredOffer,
)
from cmi_sdk.outbox import _intermediaries as intermediaries
from cmi_sdk.outbox._intermediaries import Intermediary
from cmi_sdk.outbox._migrations import SCHEMA_VERSION, pending
from cmi_sdk.outbox._params import CompletionParams, offer_row
from cmi_sdk.outbox._queries import filtered, queries
from cmi_sdk.outbox._rows import (
    ATTEMPT_OUTCOMES,
    attempt_of_row,
    claim_params,
    consent_params,
    digest_groups,
    intermediary_of_row,
    link_of_row,
    need_keyring,
    outbox_row,
    revoked_terms_json,
    row_fields,
    row_params,
    status_of,
    stored_offer_of_row,
    terms_of_row,
    terms_params,
)
from cmi_sdk.outbox.ddl import SCHEMA_NAME

__all__ = ["SCHEMA_VERSION", "DocumentRow", "PostgresStore", "decode_cursor", "encode_cursor"]

log = logging.getLogger("cmi_sdk.outbox.postgres")

_T = TypeVar("_T")
_Conn = psycopg.Connection[TupleRow]
_Cursor = psycopg.Cursor[TupleRow]

_SEQ_BITS = 63
_SEQ_MASK = (1 << _SEQ_BITS) - 1
_XID_LIMIT = 1 << 64

_QUERIES = queries("postgres")


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
    conn.execute(_QUERIES["jit_off"])


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
        if not SCHEMA_NAME.fullmatch(schema):
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
        # The statements with this store's schema and channel in place, made once.
        self._q = {
            name: text.replace("{s}", self._quoted).replace("{channel}", self.channel)
            for name, text in _QUERIES.items()
        }
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
                                cur.execute(self._q["commit_async"])
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

    def _read(self, what: str, name: str, params: Any = ()) -> list[TupleRow]:
        statement = self._q[name]
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
        """The last migration applied; 0 for a new schema, or one made before migrations
        were numbered."""
        table = f"{self._quoted}.migrations"
        found = cur.execute(self._q["table_exists"], (table,)).fetchone()
        if found is None or found[0] is None:
            return 0
        value = cur.execute(self._q["migration_version"]).fetchone()
        return 0 if value is None or value[0] is None else int(value[0])

    def migrate(self) -> None:
        """Apply the numbered migrations the schema lacks, in order (creating the schema
        and its tables when missing); idempotent.

        When the tables are current, nothing is written (one read). Otherwise the work
        runs in one transaction under an advisory lock, so processes that start together
        migrate once, and wait for each other instead of failing."""
        if self._run("reading the schema version", self._version) >= SCHEMA_VERSION:
            return

        def apply(cur: _Cursor) -> None:
            cur.execute(self._q["lock_migrations"], (self._migrate_key,))
            current = self._version(cur)  # another process may have migrated meanwhile
            if current >= SCHEMA_VERSION:
                return
            meta = cur.execute(self._q["table_exists"], (f"{self._quoted}.meta",)).fetchone()
            cur.execute(self._q["create_schema"])
            cur.execute(self._q["create_migrations_table"])
            now = time.time()
            for migration in pending("postgres", current):
                cur.execute(migration.script.replace("{s}", self._quoted).encode())
                cur.execute(self._q["record_migration"], (migration.version, migration.name, now))
            if current == 0 and meta is not None and meta[0] is not None:
                cur.execute(self._q["drop_legacy_version"])

        self._run(f"migrating the tables in schema {self.schema!r}", apply, write=True)

    # -- terms and consent ----------------------------------------------------------------

    def add_terms(self, terms: SharingTerms, consent: ConsentRecord, consent_xml: bytes) -> None:
        """Keep accepted terms and their consent record, in one transaction."""
        terms_row = terms_params(terms, self.keyring)
        consent_row = consent_params(consent, consent_xml)

        def body(cur: _Cursor) -> None:
            cur.execute(self._q["insert_terms"], terms_row)
            cur.execute(self._q["insert_consent"], consent_row)

        self._run("writing terms", body, write=True)

    def get_terms(self, terms_id: str) -> SharingTerms:
        """The terms with that id, revoked or not; raises TermsNotFoundError."""
        rows = self._read("reading terms", "get_terms", (terms_id,))
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
        statement, params = filtered(
            self._q["list_terms"],
            "%s",
            (("customer_ref", customer_ref), ("intermediary", intermediary)),
            include_revoked=include_revoked,
        )
        found = self._run("listing terms", lambda cur: cur.execute(statement, params).fetchall())
        return [terms_of_row(r, self.keyring) for r in found]

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
        statement = self._q["recipients"]
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
            found = cur.execute(self._q["terms_to_revoke"], (terms_id,)).fetchone()
            if found is None:
                raise TermsNotFoundError(f"no sharing terms with id {terms_id!r}")
            if found[0] is not None:
                raise TermsError(f"terms {terms_id} are already revoked")
            return self._revoke(cur, found[1], at, consent, consent_xml)

        return self._run("revoking terms", body, write=True)

    def _revoke(
        self, cur: _Cursor, text: str, at: float, consent: ConsentRecord, xml: bytes
    ) -> int:
        """Mark terms revoked, keep the record, and cancel their rows; how many were."""
        terms_json = revoked_terms_json(text, consent)
        cur.execute(self._q["revoke_terms"], (at, terms_json, consent.terms_id))
        cur.execute(self._q["insert_consent"], consent_params(consent, xml))
        cur.execute(self._q["cancel_terms_rows"], (consent.terms_id,))
        return cur.rowcount

    def consent_records(self, terms_id: str) -> list[tuple[ConsentRecord, bytes]]:
        """The consent records of the terms, oldest first, with their signed documents."""
        rows = self._read("reading consent records", "consent_records", (terms_id,))
        return [(ConsentRecord.model_validate_json(r[0]), bytes(r[1])) for r in rows]

    # -- service links --------------------------------------------------------------------

    def add_link_code(
        self, code_hash: str, account: str, *, created_at: float, expires_at: float
    ) -> None:
        """Keep a link code's hash; codes that expired unredeemed are dropped meanwhile."""

        def body(cur: _Cursor) -> None:
            cur.execute(self._q["drop_expired_link_codes"], (created_at,))
            cur.execute(self._q["insert_link_code"], (code_hash, account, created_at, expires_at))

        self._run("writing a link code", body, write=True)

    def redeem_link_code(
        self, code_hash: str, *, intermediary: str, link_id: str, customer_ref: str, now: float
    ) -> Link | None:
        """Mark the code used and make the link, in one transaction; None when the code
        is unknown, used or expired."""

        def body(cur: _Cursor) -> Link | None:
            found = cur.execute(self._q["use_link_code"], (now, link_id, code_hash, now)).fetchone()
            if found is None:
                return None
            values = (link_id, found[0], intermediary, customer_ref, now, None)
            cur.execute(self._q["insert_link"], values)
            return link_of_row(values)

        return self._run("redeeming a link code", body, write=True)

    def get_link(self, link_id: str) -> Link:
        """The link with that id, revoked or not; raises LinkNotFoundError."""
        found = self._read("reading a link", "get_link", (link_id,))
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
        statement, params = filtered(
            self._q["list_links"],
            "%s",
            (("account", account), ("intermediary", intermediary)),
            include_revoked=include_revoked,
        )
        found = self._run("listing links", lambda cur: cur.execute(statement, params).fetchall())
        return [link_of_row(r) for r in found]

    def revoke_link(
        self, link_id: str, at: float, revocations: Sequence[tuple[ConsentRecord, bytes]]
    ) -> tuple[int, list[str]]:
        """Revoke the link and its terms named by ``revocations``, in one transaction."""

        def body(cur: _Cursor) -> tuple[int, list[str]]:
            found = cur.execute(self._q["link_to_revoke"], (link_id,)).fetchone()
            if found is None:
                raise LinkNotFoundError(f"no link {link_id!r}")
            if found[0] is not None:
                raise LinkError(f"link {link_id} is already revoked")
            _, intermediary, customer_ref = found
            cur.execute(self._q["revoke_link"], (at, link_id))
            cancelled = 0
            for consent, xml in revocations:
                terms = cur.execute(
                    self._q["linked_terms_to_revoke"],
                    (consent.terms_id, intermediary, customer_ref),
                ).fetchone()
                if terms is not None:  # else revoked meanwhile, with its own record
                    cancelled += self._revoke(cur, terms[0], at, consent, xml)
            late = cur.execute(
                self._q["linked_terms_left"], (intermediary, customer_ref)
            ).fetchall()
            return cancelled, [r[0] for r in late]

        return self._run("revoking a link", body, write=True)

    # -- outbox ---------------------------------------------------------------------------

    def _ordering_key(self, row: NewRow) -> str | None:
        key: str | None = getattr(row, "ordering_key", None)
        if key is None and self.ordered_by_customer and row.state != "pull":
            key = f"{row.customer_ref}\x1f{row.destination or ''}"
        return key

    def _insert_params(self, r: NewRow) -> tuple[Any, ...]:
        return (*row_params(r), self._ordering_key(r))

    def insert(self, rows: Sequence[NewRow], *, connection: object | None = None) -> int:
        """Write rows (a row whose msg_id is already there is skipped) and wake the workers
        on commit; with ``connection``, inside the caller's open transaction, which the
        caller commits. Return how many were new."""
        params = [self._insert_params(r) for r in rows]
        if not params:
            return 0
        wake = self._notify and any(r.state == "pending" for r in rows)
        statement = self._q["insert_row"]

        def body(cur: _Cursor) -> int:
            cur.executemany(statement, params)
            count = cur.rowcount
            if wake and count > 0:
                cur.execute(self._q["notify_work"])
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
        q = self._q

        def body(cur: _Cursor) -> list[TupleRow]:
            cur.execute(q["release_expired"], params)
            if per_destination is None:
                return cur.execute(q["claim"], params).fetchall()
            found = cur.execute(q["lock_destinations"], params).fetchall()
            params["destinations"] = [d for (d,) in found]
            return cur.execute(q["claim_per_destination"], params).fetchall()

        rows = self._run("claiming rows", body, write=True, durable=False)
        return sorted((outbox_row(r) for r in rows), key=lambda r: r.seq)

    def heartbeat(self, *, owner: str, msg_ids: Sequence[str], lease_until: float) -> None:
        """Extend ``owner``'s leases on ``msg_ids``."""
        if not msg_ids:
            return
        statement = self._q["heartbeat"]
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
        statement = self._q["cancel_leased"]

        def body(cur: _Cursor) -> int:
            return cur.execute(statement, (reason, list(msg_ids), owner)).rowcount

        return self._run("cancelling rows", body, write=True)

    def complete(self, results: Sequence[AttemptResult]) -> None:
        """Record attempts and outcomes in one transaction (a group commit)."""
        if not results:
            return
        params = CompletionParams.of(results)
        q = self._q

        def body(cur: _Cursor) -> None:
            cur.executemany(q["insert_attempt"], params.attempts)
            for name, rows in (
                ("mark_delivered", params.delivered),
                ("mark_retry", params.retry),
                ("mark_dead", params.dead),
            ):
                if rows:
                    cur.executemany(q[name], rows)

        self._run("recording delivery outcomes", body, write=True, durable=False)

    def due_digests(self, now: float) -> list[DigestGroup]:
        """The ``digest`` rows whose window ended by ``now``, by terms and window."""
        return digest_groups(self._read("reading due digests", "due_digests", (now,)))

    def merge_digest(self, msg_ids: Sequence[str], row: NewRow | None) -> int:
        """Write the window's digest row and mark its sources merged (or release them);
        workers racing for one window write it once (the sources are locked first)."""
        ids = list(msg_ids)
        q = self._q

        def body(cur: _Cursor) -> int:
            if not cur.execute(q["lock_digest_rows"], (ids,)).fetchall():
                return 0  # another worker merged this window
            if row is None:
                return cur.execute(q["release_digest_rows"], (ids,)).rowcount
            cur.execute(q["insert_row"], self._insert_params(row))
            merged = cur.execute(q["merge_digest_rows"], (ids,)).rowcount
            # Counted before NOTIFY, which has no count of its own.
            if self._notify:
                cur.execute(q["notify_work"])
            return merged + 1

        return self._run("merging a digest", body, write=True)

    def next_due(self) -> float | None:
        """When the next pending or retrying row is due, or the next lease expires."""
        rows = self._read("reading the next due time", "next_due")
        value = rows[0][0] if rows else None
        return None if value is None else float(value)

    def status(self, now: float) -> OutboxStatus:
        """Counts by state and the oldest pending row's age."""
        counts = self._read("counting rows", "count_states")
        oldest = self._read("reading the oldest pending row", "oldest_waiting")[0][0]
        return status_of(counts, oldest, self.disabled_destinations(), now)

    def rows(self, *, state: str | None = None, limit: int = 100) -> list[OutboxRow]:
        """Rows, newest first, optionally in one state."""
        if state is None:
            found = self._read("listing rows", "rows", (max(limit, 0),))
        else:
            found = self._read("listing rows", "rows_in_state", (state, max(limit, 0)))
        return [outbox_row(r) for r in found]

    def get_row(self, msg_id: str) -> OutboxRow:
        """The row with that msg_id; raises OutboxRowNotFoundError."""
        found = self._read("reading a row", "get_row", (msg_id,))
        if not found:
            raise OutboxRowNotFoundError(f"no outbox row {msg_id!r}")
        return outbox_row(found[0])

    def attempt_counts(self) -> dict[str, int]:
        """Delivery attempts ever recorded, by outcome."""
        counts = dict.fromkeys(ATTEMPT_OUTCOMES, 0)
        rows = self._read("counting attempts", "attempt_counts")
        counts.update((outcome, int(n)) for outcome, n in rows)
        return counts

    def attempts(self, msg_id: str) -> list[AttemptResult]:
        """Every recorded attempt of a row, in order."""
        return [attempt_of_row(r) for r in self._read("reading attempts", "attempts", (msg_id,))]

    def redrive(self, *, msg_id: str | None = None, since: float | None = None, now: float) -> int:
        """Make dead rows pending again, due now (attempts start again from zero), and wake
        the workers on commit."""
        if (msg_id is None) == (since is None):
            raise ValueError("redrive takes a msg_id or a since time, not both")
        q = self._q

        def body(cur: _Cursor) -> int:
            if msg_id is not None:
                if cur.execute(q["row_state"], (msg_id,)).fetchone() is None:
                    raise OutboxRowNotFoundError(f"no outbox row {msg_id!r}")
                cur.execute(q["redrive_one"], (now, msg_id))
            else:
                cur.execute(q["redrive_since"], (now, since))
            count = cur.rowcount
            if self._notify and count > 0:
                cur.execute(q["notify_work"])
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
            "documents_since",
            {"terms": terms_id, "xid": str(xid), "seq": seq, "limit": limit},
        )
        return [DocumentRow(**row_fields(r), cursor=encode_cursor(int(r[-1]), r[0])) for r in found]

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
                    conn.execute(self._q["listen_for_work"])
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
        statement = self._q["disable_destination"]
        self._run(
            "disabling a destination",
            lambda cur: cur.execute(statement, (url, at, reason)),
            write=True,
        )

    def enable_destination(self, url: str) -> bool:
        """Deliver to ``url`` again; True if it was disabled."""
        statement = self._q["enable_destination"]
        return self._run(
            "enabling a destination",
            lambda cur: cur.execute(statement, (url,)).rowcount > 0,
            write=True,
        )

    def disabled_destinations(self) -> dict[str, str]:
        """Disabled destinations and why."""
        return dict(self._read("reading destinations", "disabled_destinations"))

    def add_intermediary(self, name: str, secret: str, *, at: float) -> None:
        """Register an intermediary, or add a secret to it (kept alongside the others, with
        no end). A revoked intermediary registered again starts afresh: its old secrets
        stay gone. The row is locked meanwhile, so two processes adding secrets at once
        both keep theirs."""

        def body(cur: _Cursor) -> None:
            cur.execute(self._q["add_intermediary"], (name, at))
            found = cur.execute(self._q["intermediary_secrets"], (name,)).fetchone()
            held = [] if found is None or found[1] is not None else self._secrets_of(found, name)
            self._put_intermediary(cur, name, intermediaries.with_secret(held, secret))

        self._run("registering an intermediary", body, write=True)

    def _secrets_of(
        self, found: Sequence[Any], name: str
    ) -> list[intermediaries.IntermediarySecret]:
        return intermediaries.decode(found[0], name, self.keyring)

    def _put_intermediary(
        self, cur: _Cursor, name: str, secrets: Sequence[intermediaries.IntermediarySecret]
    ) -> None:
        encoded = intermediaries.encode(secrets, name, self.keyring)
        cur.execute(self._q["put_intermediary"], (encoded, name))

    def rotate_intermediary(self, name: str, secret: str, *, at: float, grace_until: float) -> None:
        """Give an intermediary a new secret; its others work until ``grace_until``.

        :raises IntermediaryNotFoundError: no such intermediary, or it is revoked."""

        def body(cur: _Cursor) -> None:
            found = cur.execute(self._q["intermediary_secrets"], (name,)).fetchone()
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
            found = cur.execute(self._q["intermediary_secrets"], (name,)).fetchone()
            if found is None:
                raise IntermediaryNotFoundError(intermediaries.not_active(name, known=False))
            if found[1] is not None:
                return False
            cur.execute(self._q["revoke_intermediary"], (at, name))
            return True

        return self._run("revoking an intermediary", body, write=True)

    def intermediary(self, name: str) -> Intermediary | None:
        """The intermediary with its secrets (opened), or None when unknown."""
        found = self._read("reading an intermediary", "get_intermediary", (name,))
        return intermediary_of_row(found[0], self.keyring) if found else None

    def list_intermediaries(self) -> list[Intermediary]:
        """Every intermediary, revoked ones too, by name."""
        found = self._read("listing intermediaries", "list_intermediaries")
        return [intermediary_of_row(r, self.keyring) for r in found]

    def intermediary_generation(self, name: str) -> int | None:
        """How many times the intermediary's row has changed (None when unknown): one read
        of a key, without opening any secret, for the endpoint to check on every request."""
        found = self._read("reading an intermediary", "intermediary_generation", (name,))
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
        keyring = need_keyring(self.keyring)
        q = self._q

        def body(cur: _Cursor) -> int:
            changed = 0
            for terms_id, stored in cur.execute(q["all_terms_secrets"]).fetchall():
                if keyring.is_current(stored):
                    continue
                where = f"terms:{terms_id}"
                sealed = keyring.seal(keyring.open(stored, context=where), context=where)
                cur.execute(q["update_terms_secret"], (sealed, terms_id))
                changed += 1
            for name, text in cur.execute(q["all_intermediary_secrets"]).fetchall():
                resealed = intermediaries.reseal(text, name, keyring)
                if resealed is not None:
                    cur.execute(q["update_intermediary_secrets"], (resealed, name))
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
            cur.execute(self._q["purge_seen"], (message.now,))
        params = (message.party, message.msg_id, message.expires_at, message.now)
        return cur.execute(self._q["remember_message"], params).rowcount == 1

    def message_seen(self, party: str, msg_id: str, *, now: float) -> bool:
        """Whether a message id from ``party`` is remembered and not expired at ``now``."""
        statement = self._q["message_seen"]
        return self._run(
            "reading a message id",
            lambda cur: cur.execute(statement, (party, msg_id, now)).fetchone() is not None,
        )

    def forget_message(self, party: str, msg_id: str) -> None:
        """Drop a message id: the request it came with was refused, and stores nothing."""
        statement = self._q["forget_message"]
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
        statement = self._q["insert_offer"]

        def body(cur: _Cursor) -> None:
            if message is not None and not self._remember(cur, message):
                raise ReplayedMessageError(f"message id {message.msg_id} was already used")
            if params:
                cur.executemany(statement, params)

        if params or message is not None:
            self._run("writing offers", body, write=True, durable=False)

    def get_offer(self, offer_id: str) -> StoredOffer:
        """The offer with that id; raises OfferNotFoundError."""
        found = self._read("reading an offer", "get_offer", (offer_id,))
        if not found:
            raise OfferNotFoundError(f"no offer {offer_id!r}")
        return stored_offer_of_row(found[0])

    def begin_acceptance(self, claim: AcceptanceClaim, now: float) -> AcceptanceRecord | None:
        """Claim an acceptance; None when it is now ``processing`` under ``claim.owner``,
        else the record in the way (itself, or the acceptance that holds the offer).

        Safe across processes: the acceptance's row is locked (or its insert waits on a
        concurrent one), and the offer's ``accepted_by`` is set only while empty, so of
        concurrent claims of one offer the first to commit holds it, and the others wait
        for that commit and then read its record."""
        q = self._q
        retake = (
            now,
            claim.intermediary,
            claim.acceptance,
            claim.owner,
            claim.lease_until,
            claim.acceptance_id,
        )

        def body(cur: _Cursor) -> AcceptanceRecord | None:
            for _ in range(8):  # each round ends, or a concurrent change made it start over
                found = AcceptanceRecord.of_row(
                    cur.execute(q["lock_acceptance"], (claim.acceptance_id,)).fetchone()
                )
                if found is not None:
                    if found.offer_id != claim.offer_id:
                        raise AcceptanceConflictError(
                            f"acceptance {claim.acceptance_id} was given for another offer"
                        )
                    if found.state != "released":
                        return found
                taken = cur.execute(q["take_offer"], (claim.acceptance_id, claim.offer_id))
                if taken.rowcount == 0:
                    other = AcceptanceRecord.of_row(
                        cur.execute(q["offer_holder"], (claim.offer_id,)).fetchone()
                    )
                    if other is not None:
                        return other
                    if cur.execute(q["offer_exists"], (claim.offer_id,)).fetchone() is None:
                        raise OfferNotFoundError(f"no offer {claim.offer_id!r}")
                    continue  # its holder let it go meanwhile
                if found is not None:
                    cur.execute(q["reclaim_acceptance"], retake)
                    return None
                if cur.execute(q["claim_acceptance"], claim_params(claim, now)).rowcount == 1:
                    return None
                # The same id was claimed concurrently, and committed first: give the offer
                # back and read what that claim made.
                cur.execute(q["release_offer"], (claim.offer_id, claim.acceptance_id))
            raise StoreError(f"acceptance {claim.acceptance_id} kept changing while claimed")

        return self._run("claiming an acceptance", body, write=True)

    def renew_acceptance(
        self, acceptance_id: str, owner: str, lease_until: float, *, hold: str | None = None
    ) -> bool:
        """Extend ``owner``'s lease and record the hold; False when the lease was lost."""
        statement = self._q["renew_acceptance"]
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
        statement = self._q["take_over_acceptance"]
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
        params = [self._insert_params(r) for r in rows]
        wake = self._notify and any(r.state == "pending" for r in rows)
        q = self._q

        def body(cur: _Cursor) -> AcceptanceRecord | None:
            found = AcceptanceRecord.of_row(
                cur.execute(q["lock_acceptance"], (acceptance_id,)).fetchone()
            )
            if found is None:
                raise StoreError(f"acceptance {acceptance_id} is not in the store")
            ours = found.state == "processing" and found.lease_owner == owner
            late = state == "booked" and found.state == "released"
            if not (ours or late):
                return found
            if state == "booked":
                held = cur.execute(
                    q["hold_offer"], (acceptance_id, found.offer_id, acceptance_id)
                ).rowcount
                if held == 0:  # released, and another acceptance holds the offer now
                    return found
            else:
                cur.execute(q["release_offer"], (found.offer_id, acceptance_id))
            cur.execute(q["finish_acceptance"], (state, result, now, acceptance_id))
            if params:
                cur.executemany(q["insert_row"], params)
                if wake:
                    cur.execute(q["notify_work"])
            if problems:
                cur.executemany(q["insert_problem"], [p.row() for p in problems])
            return None

        return self._run("recording an acceptance", body, write=True)

    def get_acceptance(self, acceptance_id: str) -> AcceptanceRecord | None:
        """The acceptance with that id, or None."""
        found = self._read("reading an acceptance", "get_acceptance", (acceptance_id,))
        return AcceptanceRecord.of_row(found[0]) if found else None

    def stalled_acceptances(self, now: float, limit: int = 100) -> list[AcceptanceRecord]:
        """``processing`` acceptances whose lease expired before ``now``, oldest first."""
        found = self._read("reading stalled acceptances", "stalled_acceptances", (now, limit))
        return [a for a in map(AcceptanceRecord.of_row, found) if a is not None]

    def add_emission_problems(
        self, problems: Sequence[EmissionProblem], *, connection: object | None = None
    ) -> None:
        """Keep emission problems; with ``connection``, in the caller's transaction."""
        params = [p.row() for p in problems]
        if not params:
            return
        statement = self._q["insert_problem"]

        def body(cur: _Cursor) -> None:
            cur.executemany(statement, params)

        if connection is not None:
            self._in_caller(connection, "writing emission problems", body)
        else:
            self._run("writing emission problems", body, write=True)

    def emission_problems(self, *, limit: int = 100) -> list[EmissionProblem]:
        """Emission problems, newest first."""
        found = self._read("reading emission problems", "emission_problems", (limit,))
        return [EmissionProblem(*r) for r in found]

    def count_emission_problems(self) -> int:
        """How many emission problems are kept."""
        return int(self._read("counting emission problems", "count_emission_problems")[0][0])


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
