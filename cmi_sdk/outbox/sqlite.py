"""The embedded default store: one SQLite file, WAL, ``synchronous=FULL``.

A firm that keeps its own tables in the same file passes its ``sqlite3`` connection to
:meth:`~cmi_sdk.Adapter.emit`, and the outbox row is written inside its open transaction:
the row commits or rolls back with the firm's own write. Otherwise the SDK commits on its
own connection (one per thread), batching rows into one commit wherever it can.

Its SQL is in ``sql/sqlite/queries.sql`` and ``sql/sqlite/migrations/``; the methods it
shares with the PostgreSQL store are in :mod:`cmi_sdk.outbox._base`.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from cmi_sdk._exceptions import (
    ConfigurationError,
    OutboxRowNotFoundError,
    StoreError,
)
from cmi_sdk._files import create_private_file, private_directory, warn_if_shared
from cmi_sdk._models import Link
from cmi_sdk._secrets import SecretsKeyring
from cmi_sdk.outbox import NewRow, OutboxRow, OutboxStore
from cmi_sdk.outbox._base import Run, SQLStore
from cmi_sdk.outbox._migrations import SCHEMA_VERSION, pending, statements
from cmi_sdk.outbox._queries import queries
from cmi_sdk.outbox._rows import link_of_row, need_keyring, outbox_row, row_params

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

_Q = queries("sqlite")
_T = TypeVar("_T")

_MAX_INTEGER = 2**63 - 1  # SQLite's largest integer: no seq is beyond it

# SQLite has no ADD COLUMN IF NOT EXISTS: the migrations' ADD COLUMN is skipped where the
# column is there already (a store made before migrations were numbered).
_ADD_COLUMN = re.compile(r"ALTER TABLE (\w+) ADD COLUMN (\w+) ", re.IGNORECASE)


def path_from_url(url: str) -> Path:
    """The file of a ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` URL."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ConfigurationError(
            f"not a SQLite URL: {url!r} (expected sqlite:///./cmi.db or sqlite:////abs/cmi.db)"
        )
    return Path(url[len(prefix) :])


class _Run:
    """Runs named statements on a connection inside its transaction."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __call__(self, name: str, params: Any = ()) -> sqlite3.Cursor:
        return self._conn.execute(_Q[name], params)

    def many(self, name: str, params: Sequence[Any]) -> None:
        self._conn.executemany(_Q[name], params)


class SQLiteStore(SQLStore, OutboxStore):
    """The embedded :class:`~cmi_sdk.outbox.OutboxStore`: one SQLite file.

    :param path: the database file (created with its tables when missing).
    :param synchronous: SQLite's ``synchronous`` setting: ``FULL`` (the default) makes each
        commit durable against power loss, at the cost of an fsync per commit.
    :param busy_timeout: how long, in seconds, to wait for another writer.
    :param keyring: seal the webhook and intermediary secrets the store keeps (encryption
        at rest); secrets stored before are read as they are until
        :meth:`reseal_secrets` seals them. Without it, sealed secrets cannot be read.

    The file (and its ``-wal`` and ``-shm``) is created readable by its owner only, and
    missing folders above it with mode 0700; an existing file that others may read is
    left as it is, with a warning in the log.
    """

    _MARKER = "?"

    nonblocking: ClassVar[bool] = True
    """What a request for offers calls here never waits on a network: reads in WAL mode
    do not wait for writers, and offers commit without waiting for the disk (they wait
    only for another writer's commit)."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 30.0,
        keyring: SecretsKeyring | None = None,
    ) -> None:
        if synchronous.upper() not in {"FULL", "NORMAL", "EXTRA"}:
            raise ConfigurationError("synchronous must be FULL, EXTRA or NORMAL")
        self.path = Path(path)
        self.keyring = keyring
        """What seals the secrets kept here, if anything."""
        self._synchronous = synchronous.upper()
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._purged = 0.0
        self._real = os.path.realpath(self.path)
        self.migrate()

    @classmethod
    def from_url(cls, url: str, *, keyring: SecretsKeyring | None = None) -> SQLiteStore:
        """A store for a ``sqlite:///...`` URL, such as ``CMI_DATABASE_URL``'s default."""
        return cls(path_from_url(url), keyring=keyring)

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    # -- connections ----------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        """A new connection to the store's file, configured as the store's own are (WAL,
        the store's ``synchronous``): what a firm uses for its own writes in the file."""
        try:
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout)
            self._use_wal(conn)
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        return conn

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        """Put the file in WAL mode, waiting for other connections' setup if need be.

        Changing the journal mode takes the file's exclusive lock, and SQLite answers
        "database is locked" at once, without its busy handler, while another process
        holds a lock on a new file (several processes opening it together): wait as a
        write would, up to the busy timeout. A file already in WAL needs no change."""
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
                if str(mode).lower() != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self.connect()
            conn.isolation_level = None  # explicit BEGIN IMMEDIATE for every write
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction. ``durable=False`` commits without waiting for the disk
        (``synchronous=NORMAL``; WAL keeps the file consistent): only for state changes
        whose loss in a power cut costs a resend, never a document: leases, heartbeats,
        delivery outcomes. A lost "delivered" mark sends the document again, with the same
        webhook-id, which the receiver stores once."""
        conn = self._conn()
        level = self._synchronous if durable else "NORMAL"
        if getattr(self._local, "level", None) != level:
            conn.execute(f"PRAGMA synchronous={level}")
            self._local.level = level
        # Threads of this process queue here, not in SQLite's busy handler, which sleeps
        # in growing steps (1, 2, 5, 10 ms ...) while another connection writes.
        with self._write_lock:
            yield from self._begin(conn)

    def _begin(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot start a write on {self.path}: {exc}") from exc
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            raise StoreError(f"commit failed on {self.path}: {exc}") from exc

    def _read(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"read failed on {self.path}: {exc}") from exc

    # What the shared methods (SQLStore) run on: named queries, this store's transactions.

    def _query(self, name: str) -> str:
        return _Q[name]

    def _id_list(self, ids: Sequence[str]) -> str:
        return json.dumps(list(ids))  # read by json_each()

    def _fetch(self, what: str, name: str, params: Any = ()) -> list[Any]:  # noqa: ARG002
        return self._read(_Q[name], params)

    def _text(self, what: str, statement: str, params: Any) -> list[Any]:  # noqa: ARG002
        return self._read(statement, params)

    def _transaction(self, what: str, body: Callable[[Run], _T], *, durable: bool = True) -> _T:  # noqa: ARG002
        with self._write(durable=durable) as conn:
            return body(_Run(conn))

    def _with_caller(self, connection: object, what: str, body: Callable[[Run], _T]) -> _T:  # noqa: ARG002
        return body(_Run(self._caller(connection)))

    def _insert_rows(self, run: Run, rows: Sequence[NewRow]) -> None:
        run.many("insert_row", [row_params(r) for r in rows])

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _caller(self, connection: object) -> sqlite3.Connection:
        if not isinstance(connection, sqlite3.Connection):
            raise ConfigurationError(
                f"the SQLite store takes a sqlite3 connection, not {type(connection).__name__};"
                " use the PostgreSQL store for psycopg or SQLAlchemy connections"
            )
        # Checked on every call (a few microseconds): connections cannot be weakly
        # referenced, and an id() could be reused by a connection to another file.
        rows = connection.execute(_Q["database_list"]).fetchall()
        main = next((r[2] for r in rows if r[1] == "main"), "")
        if os.path.realpath(main or ":memory:") != self._real:
            raise ConfigurationError(
                f"the connection is to {main or 'an in-memory database'}, not to the "
                f"store's {self.path}: the outbox row must be written in the same "
                "database as the firm's own write"
            )
        return connection

    def _create_file(self) -> None:
        """Make the file readable by its owner only before SQLite opens it: SQLite gives
        the ``-wal`` and ``-shm`` files the mode of the database file."""
        if str(self.path) in {"", ":memory:"} or self.path.exists():
            for suffix in ("", "-wal", "-shm"):
                warn_if_shared(f"{self.path}{suffix}", "the store's database file")
            return
        try:
            private_directory(self.path.parent)
            create_private_file(self.path)
        except OSError as exc:
            raise StoreError(f"cannot create {self.path}: {exc.strerror or exc}") from exc

    def migrate(self) -> None:
        """Apply the numbered migrations the file lacks, in order, in one transaction
        (creating the tables in a new file); idempotent.

        When the tables are current, nothing is written: a firm that opens the store with
        its own write transaction open on the same file (the first ``emit`` inside it) must
        not wait for itself.
        """
        self._create_file()
        conn = self._conn()
        if self._version(conn) >= SCHEMA_VERSION:
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            current = self._version(conn)  # another process may have migrated meanwhile
            legacy = current == 0 and self._legacy(conn)
            conn.execute(_Q["create_migrations_table"])
            now = time.time()
            for migration in pending("sqlite", current):
                for statement in statements(migration.script):
                    self._apply(conn, statement)
                conn.execute(_Q["record_migration"], (migration.version, migration.name, now))
            if legacy:
                conn.execute(_Q["drop_legacy_version"])
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"cannot create the tables in {self.path}: {exc}") from exc

    @staticmethod
    def _version(conn: sqlite3.Connection) -> int:
        try:
            found = conn.execute(_Q["migration_version"]).fetchone()
        except sqlite3.OperationalError:
            return 0  # no migrations table yet
        return int(found[0] or 0)

    @staticmethod
    def _legacy(conn: sqlite3.Connection) -> bool:
        try:
            return conn.execute(_Q["legacy_version"]).fetchone() is not None
        except sqlite3.OperationalError:
            return False  # a new file

    @staticmethod
    def _apply(conn: sqlite3.Connection, statement: str) -> None:
        added = _ADD_COLUMN.match(statement.strip())
        if added is not None:
            table, column = added.groups()
            if column in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
                return
        conn.execute(statement)

    # -- service links --------------------------------------------------------------------

    def redeem_link_code(
        self, code_hash: str, *, intermediary: str, link_id: str, customer_ref: str, now: float
    ) -> Link | None:
        """Mark the code used and make the link, in one transaction; None when the code
        is unknown, used or expired."""
        with self._write() as conn:
            # One writer at a time (BEGIN IMMEDIATE): of two redemptions, the second finds
            # the code used.
            found = conn.execute(_Q["use_link_code"], (now, link_id, code_hash, now)).fetchone()
            if found is None:
                return None
            values = (link_id, found[0], intermediary, customer_ref, now, None)
            try:
                conn.execute(_Q["insert_link"], values)
            except sqlite3.IntegrityError as exc:  # the code stays unused (rolled back)
                raise StoreError(f"cannot make link {link_id}: {exc}") from None
        return link_of_row(values)

    # -- outbox ---------------------------------------------------------------------------

    def insert(self, rows: Sequence[NewRow], *, connection: object | None = None) -> int:
        """Write rows; with ``connection``, inside the caller's transaction (not committed)."""
        params = [row_params(r) for r in rows]
        if connection is not None:
            conn = self._caller(connection)
            before = conn.total_changes
            conn.executemany(_Q["insert_row"], params)
            return conn.total_changes - before
        with self._write() as own:
            before = own.total_changes
            own.executemany(_Q["insert_row"], params)
            return own.total_changes - before

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

        :raises ConfigurationError: ``per_destination`` was given: one file's workers are
            one process's, and its delivery worker bounds them itself.
        """
        if per_destination is not None:
            raise ConfigurationError(
                "SQLiteStore cannot limit leases per destination across workers:"
                " use the PostgreSQL store"
            )
        with self._write(durable=False) as conn:
            rows = conn.execute(
                _Q["claim"], (owner, now + lease_seconds, now, now, limit)
            ).fetchall()
        return sorted((outbox_row(r) for r in rows), key=lambda r: r.seq)

    def heartbeat(self, *, owner: str, msg_ids: Sequence[str], lease_until: float) -> None:
        """Extend ``owner``'s leases on ``msg_ids``."""
        with self._write(durable=False) as conn:
            conn.executemany(_Q["heartbeat"], [(lease_until, m, owner) for m in msg_ids])

    def cancel(self, *, owner: str, msg_ids: Sequence[str], reason: str) -> int:
        """Cancel the rows of ``msg_ids`` that ``owner`` leases; return how many."""
        with self._write() as conn:
            return sum(
                conn.execute(_Q["cancel_leased"], (reason, m, owner)).rowcount for m in msg_ids
            )

    def merge_digest(self, msg_ids: Sequence[str], row: NewRow | None) -> int:
        """Write the window's digest row and mark its sources merged (or release them)."""
        with self._write() as conn:
            before = conn.total_changes
            if row is None:
                conn.executemany(_Q["release_digest_row"], [(m,) for m in msg_ids])
                return conn.total_changes - before  # those still in the window only
            conn.execute(_Q["insert_row"], row_params(row))
            # Merged when the digest document was made.
            conn.executemany(_Q["merge_digest_row"], [(row.created_at, m) for m in msg_ids])
            return conn.total_changes - before

    def rows(self, *, state: str | None = None, limit: int = 100) -> list[OutboxRow]:
        """Rows, newest first, optionally in one state."""
        if state is None:
            found = self._read(_Q["rows"], (limit,))
        else:
            found = self._read(_Q["rows_in_state"], (state, limit))
        return [outbox_row(r) for r in found]

    def get_row(self, msg_id: str) -> OutboxRow:
        """The row with that msg_id."""
        found = self._read(_Q["get_row"], (msg_id,))
        if not found:
            raise OutboxRowNotFoundError(f"no outbox row {msg_id!r}")
        return outbox_row(found[0])

    def redrive(self, *, msg_id: str | None = None, since: float | None = None, now: float) -> int:
        """Make dead rows pending again, due now; attempts start again from zero."""
        if (msg_id is None) == (since is None):
            raise ValueError("redrive takes a msg_id or a since time, not both")
        with self._write() as conn:
            if msg_id is None:
                return conn.execute(_Q["redrive_since"], (now, since)).rowcount
            if conn.execute(_Q["row_state"], (msg_id,)).fetchone() is None:
                raise OutboxRowNotFoundError(f"no outbox row {msg_id!r}")
            return conn.execute(_Q["redrive_one"], (now, msg_id)).rowcount

    def documents_since(self, terms_id: str, after: int, limit: int) -> list[OutboxRow]:
        """Documents emitted under the terms after the cursor ``after`` (a row's seq).

        SQLite has one writer at a time, so rows commit in ``seq`` order and a cursor on it
        never skips a row that commits late.
        """
        found = self._read(_Q["documents_since"], (terms_id, min(after, _MAX_INTEGER), limit))
        return [outbox_row(r) for r in found]

    # -- the stored secrets ---------------------------------------------------------------

    def reseal_secrets(self) -> int:
        """Seal every secret kept here with the keyring's first key (stored as plain text,
        or sealed with an older key); return how many rows changed.

        :raises ConfigurationError: the store has no keyring, or a secret does not open."""
        keyring = need_keyring(self.keyring)
        # The plain text a row held must not stay on disk in freed space: zero it, and
        # empty the WAL afterwards, so the file no longer holds any old copy.
        own = self._conn()
        secure = own.execute(_Q["secure_delete"]).fetchone()[0]
        own.execute("PRAGMA secure_delete=ON")
        try:
            changed = self._transaction(
                "sealing the stored secrets", lambda run: self._reseal(run, keyring)
            )
        finally:
            own.execute(f"PRAGMA secure_delete={int(secure)}")
        own.execute(_Q["checkpoint_wal"])
        return changed
