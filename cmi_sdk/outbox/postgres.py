"""The PostgreSQL store: for firms whose own data lives in PostgreSQL, and for several
delivery workers in several processes.

Its semantics are :class:`~cmi_sdk.outbox.sqlite.SQLiteStore`'s, method by method: the
methods whose logic is the same are written once (:mod:`cmi_sdk.outbox._base`), its SQL
is in ``sql/postgres/queries.sql`` and ``sql/postgres/migrations/``, and the contract
suite (``tests/contract``) runs both. What PostgreSQL adds:

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
    ConfigurationError,
    OutboxRowNotFoundError,
    StoreError,
)
from cmi_sdk._models import Link
from cmi_sdk._secrets import SecretsKeyring
from cmi_sdk.outbox import NewRow, OutboxRow, OutboxStore
from cmi_sdk.outbox._base import Run, SQLStore
from cmi_sdk.outbox._migrations import SCHEMA_VERSION, pending
from cmi_sdk.outbox._queries import queries
from cmi_sdk.outbox._rows import (
    link_of_row,
    need_keyring,
    outbox_row,
    row_fields,
    row_params,
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


class _Run:
    """Runs named statements on a cursor inside its transaction."""

    __slots__ = ("_cur", "_q")

    def __init__(self, cur: _Cursor, q: dict[str, str]) -> None:
        self._cur = cur
        self._q = q

    def __call__(self, name: str, params: Any = ()) -> _Cursor:
        return self._cur.execute(self._q[name], params)

    def many(self, name: str, params: Sequence[Any]) -> None:
        self._cur.executemany(self._q[name], params)


class PostgresStore(SQLStore, OutboxStore):
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

    _MARKER = "%s"

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

    # What the shared methods (SQLStore) run on: named queries, this store's transactions.

    def _query(self, name: str) -> str:
        return self._q[name]

    def _id_list(self, ids: Sequence[str]) -> list[str]:
        return list(ids)  # a text[] for = ANY(...)

    def _fetch(self, what: str, name: str, params: Any = ()) -> list[Any]:
        return self._read(what, name, params)

    def _text(self, what: str, statement: str, params: Any) -> list[Any]:
        return self._run(what, lambda cur: cur.execute(statement, params).fetchall())

    def _transaction(self, what: str, body: Callable[[Run], _T], *, durable: bool = True) -> _T:
        q = self._q
        return self._run(what, lambda cur: body(_Run(cur, q)), write=True, durable=durable)

    def _with_caller(self, connection: object, what: str, body: Callable[[Run], _T]) -> _T:
        q = self._q
        return self._in_caller(connection, what, lambda cur: body(_Run(cur, q)))

    def _insert_rows(self, run: Run, rows: Sequence[NewRow]) -> None:
        """Write rows and wake the workers on commit (when a row is pending)."""
        run.many("insert_row", [self._insert_params(r) for r in rows])
        if self._notify and any(r.state == "pending" for r in rows):
            run("notify_work")

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

    # -- service links --------------------------------------------------------------------

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
            merged = cur.execute(q["merge_digest_rows"], (row.created_at, ids)).rowcount
            # Counted before NOTIFY, which has no count of its own.
            if self._notify:
                cur.execute(q["notify_work"])
            return merged + 1

        return self._run("merging a digest", body, write=True)

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

    # -- the stored secrets ---------------------------------------------------------------

    def reseal_secrets(self) -> int:
        """Seal every secret kept here with the keyring's first key (stored as plain text,
        or sealed with an older key), in one transaction; return how many rows changed.

        :raises ConfigurationError: the store has no keyring, or a secret does not open."""
        keyring = need_keyring(self.keyring)
        return self._transaction(
            "sealing the stored secrets", lambda run: self._reseal(run, keyring)
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
