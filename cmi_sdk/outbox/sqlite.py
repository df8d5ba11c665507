"""The embedded default store: one SQLite file, WAL, ``synchronous=FULL``.

A firm that keeps its own tables in the same file passes its ``sqlite3`` connection to
:meth:`~cmi_sdk.Adapter.emit`, and the outbox row is written inside its open transaction:
the row commits or rolls back with the firm's own write. Otherwise the SDK commits on its
own connection (one per thread), batching rows into one commit wherever it can.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

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
from cmi_sdk._files import create_private_file, private_directory, warn_if_shared
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
from cmi_sdk.outbox._migrations import SCHEMA_VERSION, pending, statements
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
    row_params,
    status_of,
    stored_offer_of_row,
    terms_of_row,
    terms_params,
)

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

_Q = queries("sqlite")

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


class SQLiteStore(OutboxStore):
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
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

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
            yield from self._transaction(conn)

    def _transaction(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
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

    # -- terms and consent ----------------------------------------------------------------

    def add_terms(self, terms: SharingTerms, consent: ConsentRecord, consent_xml: bytes) -> None:
        """Keep accepted terms and their consent record, in one transaction."""
        with self._write() as conn:
            conn.execute(_Q["insert_terms"], terms_params(terms, self.keyring))
            conn.execute(_Q["insert_consent"], consent_params(consent, consent_xml))

    def get_terms(self, terms_id: str) -> SharingTerms:
        """The terms with that id, revoked or not."""
        rows = self._read(_Q["get_terms"], (terms_id,))
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
        sql, params = filtered(
            _Q["list_terms"],
            "?",
            (("customer_ref", customer_ref), ("intermediary", intermediary)),
            include_revoked=include_revoked,
        )
        return [terms_of_row(r, self.keyring) for r in self._read(sql, params)]

    def active_terms(
        self,
        customer_ref: str,
        now: float,
        *,
        intermediary: str | None = None,
        connection: object | None = None,
    ) -> list[SharingTerms]:
        """The terms a document for the account ``customer_ref`` (or, with
        ``intermediary``, for that intermediary's reference) goes out under at ``now``."""
        params = {"ref": customer_ref, "intermediary": intermediary, "now": now}
        if connection is not None:
            rows = self._caller(connection).execute(_Q["recipients"], params).fetchall()
        else:
            rows = self._read(_Q["recipients"], params)
        return [terms_of_row(r, self.keyring) for r in rows]

    def revoke_terms(
        self, terms_id: str, at: float, consent: ConsentRecord, consent_xml: bytes
    ) -> int:
        """Revoke terms, keep the consent record, cancel their undelivered rows."""
        with self._write() as conn:
            found = conn.execute(_Q["terms_to_revoke"], (terms_id,)).fetchone()
            if found is None:
                raise TermsNotFoundError(f"no sharing terms with id {terms_id!r}")
            if found[0] is not None:
                raise TermsError(f"terms {terms_id} are already revoked")
            return self._revoke(conn, found[1], at, consent, consent_xml)

    @staticmethod
    def _revoke(
        conn: sqlite3.Connection, text: str, at: float, consent: ConsentRecord, xml: bytes
    ) -> int:
        """Mark terms revoked, keep the record, and cancel their rows; how many were."""
        terms_json = revoked_terms_json(text, consent)
        conn.execute(_Q["revoke_terms"], (at, terms_json, consent.terms_id))
        conn.execute(_Q["insert_consent"], consent_params(consent, xml))
        cancelled: int = conn.execute(_Q["cancel_terms_rows"], (consent.terms_id,)).rowcount
        return cancelled

    def consent_records(self, terms_id: str) -> list[tuple[ConsentRecord, bytes]]:
        """The consent records of the terms, oldest first, with their signed documents."""
        rows = self._read(_Q["consent_records"], (terms_id,))
        return [(ConsentRecord.model_validate_json(r[0]), bytes(r[1])) for r in rows]

    # -- service links --------------------------------------------------------------------

    def add_link_code(
        self, code_hash: str, account: str, *, created_at: float, expires_at: float
    ) -> None:
        """Keep a link code's hash; codes that expired unredeemed are dropped meanwhile."""
        with self._write() as conn:
            conn.execute(_Q["drop_expired_link_codes"], (created_at,))
            conn.execute(_Q["insert_link_code"], (code_hash, account, created_at, expires_at))

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

    def get_link(self, link_id: str) -> Link:
        """The link with that id, revoked or not."""
        found = self._read(_Q["get_link"], (link_id,))
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
        sql, params = filtered(
            _Q["list_links"],
            "?",
            (("account", account), ("intermediary", intermediary)),
            include_revoked=include_revoked,
        )
        return [link_of_row(r) for r in self._read(sql, params)]

    def revoke_link(
        self, link_id: str, at: float, revocations: Sequence[tuple[ConsentRecord, bytes]]
    ) -> tuple[int, list[str]]:
        """Revoke the link and its terms named by ``revocations``, in one transaction."""
        cancelled = 0
        with self._write() as conn:
            found = conn.execute(_Q["link_to_revoke"], (link_id,)).fetchone()
            if found is None:
                raise LinkNotFoundError(f"no link {link_id!r}")
            if found[0] is not None:
                raise LinkError(f"link {link_id} is already revoked")
            _, intermediary, customer_ref = found
            conn.execute(_Q["revoke_link"], (at, link_id))
            for consent, xml in revocations:
                terms = conn.execute(
                    _Q["linked_terms_to_revoke"], (consent.terms_id, intermediary, customer_ref)
                ).fetchone()
                if terms is not None:  # else revoked meanwhile, with its own record
                    cancelled += self._revoke(conn, terms[0], at, consent, xml)
            late = conn.execute(_Q["linked_terms_left"], (intermediary, customer_ref)).fetchall()
        return cancelled, [r[0] for r in late]

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

    def complete(self, results: Sequence[AttemptResult]) -> None:
        """Record attempts and outcomes in one transaction (a group commit)."""
        if not results:
            return
        params = CompletionParams.of(results)
        with self._write(durable=False) as conn:
            conn.executemany(_Q["insert_attempt"], params.attempts)
            conn.executemany(_Q["mark_delivered"], params.delivered)
            conn.executemany(_Q["mark_retry"], params.retry)
            conn.executemany(_Q["mark_dead"], params.dead)

    def due_digests(self, now: float) -> list[DigestGroup]:
        """The ``digest`` rows whose window ended by ``now``, by terms and window."""
        return digest_groups(self._read(_Q["due_digests"], (now,)))

    def merge_digest(self, msg_ids: Sequence[str], row: NewRow | None) -> int:
        """Write the window's digest row and mark its sources merged (or release them)."""
        marks = [(m,) for m in msg_ids]
        with self._write() as conn:
            before = conn.total_changes
            if row is None:
                conn.executemany(_Q["release_digest_row"], marks)
                return conn.total_changes - before  # those still in the window only
            conn.execute(_Q["insert_row"], row_params(row))
            conn.executemany(_Q["merge_digest_row"], marks)
            return conn.total_changes - before

    def next_due(self) -> float | None:
        """When the next pending or retrying row is due, or the next lease expires."""
        rows = self._read(_Q["next_due"])
        value = rows[0][0] if rows else None
        return None if value is None else float(value)

    def status(self, now: float) -> OutboxStatus:
        """Counts by state and the oldest pending row's age."""
        counts = self._read(_Q["count_states"])
        oldest = self._read(_Q["oldest_waiting"])[0][0]
        return status_of(counts, oldest, self.disabled_destinations(), now)

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

    def attempt_counts(self) -> dict[str, int]:
        """Delivery attempts ever recorded, by outcome."""
        counts = dict.fromkeys(ATTEMPT_OUTCOMES, 0)
        counts.update(self._read(_Q["attempt_counts"]))
        return counts

    def attempts(self, msg_id: str) -> list[AttemptResult]:
        """Every recorded attempt of a row, in order."""
        return [attempt_of_row(r) for r in self._read(_Q["attempts"], (msg_id,))]

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

    # -- destinations, intermediaries, replay ---------------------------------------------

    def disable_destination(self, url: str, *, reason: str, at: float) -> None:
        """Stop delivering to ``url``."""
        with self._write() as conn:
            conn.execute(_Q["disable_destination"], (url, at, reason))

    def enable_destination(self, url: str) -> bool:
        """Deliver to ``url`` again; True if it was disabled."""
        with self._write() as conn:
            return conn.execute(_Q["enable_destination"], (url,)).rowcount > 0

    def disabled_destinations(self) -> dict[str, str]:
        """Disabled destinations and why."""
        return dict(self._read(_Q["disabled_destinations"]))

    def add_intermediary(self, name: str, secret: str, *, at: float) -> None:
        """Register an intermediary, or add a secret to it (kept alongside the others, with
        no end). A revoked intermediary registered again starts afresh: its old secrets
        stay gone."""
        with self._write() as conn:
            found = conn.execute(_Q["intermediary_secrets"], (name,)).fetchone()
            held = [] if found is None or found[1] is not None else self._secrets_of(found, name)
            self._put_intermediary(conn, name, intermediaries.with_secret(held, secret), at)

    def _secrets_of(
        self, found: Sequence[Any], name: str
    ) -> list[intermediaries.IntermediarySecret]:
        return intermediaries.decode(found[0], name, self.keyring)

    def _put_intermediary(
        self,
        conn: sqlite3.Connection,
        name: str,
        secrets: Sequence[intermediaries.IntermediarySecret],
        at: float,
    ) -> None:
        encoded = intermediaries.encode(secrets, name, self.keyring)
        conn.execute(_Q["put_intermediary"], (name, encoded, at))

    def rotate_intermediary(self, name: str, secret: str, *, at: float, grace_until: float) -> None:
        """Give an intermediary a new secret; its others work until ``grace_until``.

        :raises IntermediaryNotFoundError: no such intermediary, or it is revoked."""
        with self._write() as conn:
            found = conn.execute(_Q["intermediary_secrets"], (name,)).fetchone()
            if found is None or found[1] is not None:
                raise IntermediaryNotFoundError(
                    intermediaries.not_active(name, known=found is not None)
                )
            secrets = intermediaries.rotated(
                self._secrets_of(found, name), secret, at=at, grace_until=grace_until
            )
            self._put_intermediary(conn, name, secrets, at)

    def revoke_intermediary(self, name: str, *, at: float) -> bool:
        """Refuse the intermediary's requests from now on, and forget its secrets; False
        when it was revoked already.

        :raises IntermediaryNotFoundError: no such intermediary."""
        with self._write() as conn:
            found = conn.execute(_Q["intermediary_revoked"], (name,)).fetchone()
            if found is None:
                raise IntermediaryNotFoundError(intermediaries.not_active(name, known=False))
            if found[0] is not None:
                return False
            conn.execute(_Q["revoke_intermediary"], (at, name))
            return True

    def intermediary(self, name: str) -> Intermediary | None:
        """The intermediary with its secrets (opened), or None when unknown."""
        found = self._read(_Q["get_intermediary"], (name,))
        return intermediary_of_row(found[0], self.keyring) if found else None

    def list_intermediaries(self) -> list[Intermediary]:
        """Every intermediary, revoked ones too, by name."""
        found = self._read(_Q["list_intermediaries"])
        return [intermediary_of_row(r, self.keyring) for r in found]

    def intermediary_generation(self, name: str) -> int | None:
        """How many times the intermediary's row has changed (None when unknown): one read
        of a key, without opening any secret, for the endpoint to check on every request."""
        found = self._read(_Q["intermediary_generation"], (name,))
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
        or sealed with an older key); return how many rows changed.

        :raises ConfigurationError: the store has no keyring, or a secret does not open."""
        keyring = need_keyring(self.keyring)
        changed = 0
        # The plain text a row held must not stay on disk in freed space: zero it, and
        # empty the WAL afterwards, so the file no longer holds any old copy.
        own = self._conn()
        secure = own.execute(_Q["secure_delete"]).fetchone()[0]
        own.execute("PRAGMA secure_delete=ON")
        try:
            changed = self._reseal(keyring)
        finally:
            own.execute(f"PRAGMA secure_delete={int(secure)}")
        own.execute(_Q["checkpoint_wal"])
        return changed

    def _reseal(self, keyring: SecretsKeyring) -> int:
        changed = 0
        with self._write() as conn:
            for terms_id, stored in conn.execute(_Q["all_terms_secrets"]).fetchall():
                if keyring.is_current(stored):
                    continue
                where = f"terms:{terms_id}"
                sealed = keyring.seal(keyring.open(stored, context=where), context=where)
                conn.execute(_Q["update_terms_secret"], (sealed, terms_id))
                changed += 1
            for name, text in conn.execute(_Q["all_intermediary_secrets"]).fetchall():
                resealed = intermediaries.reseal(text, name, keyring)
                if resealed is not None:
                    conn.execute(_Q["update_intermediary_secrets"], (resealed, name))
                    changed += 1
        return changed

    def remember_message(self, party: str, msg_id: str, *, expires_at: float, now: float) -> bool:
        """Record a message id accepted from ``party``; False when already seen.

        Committed without waiting for the disk (the ids live minutes; a power cut's loss
        reopens at most the last few, inside their timestamp window)."""
        with self._write(durable=False) as conn:
            return self._remember(conn, SeenMessage(party, msg_id, expires_at, now))

    def _remember(self, conn: sqlite3.Connection, message: SeenMessage) -> bool:
        # Expired ids are purged at most once a second, through their index: a purge per
        # request would cost more as traffic grows.
        if message.now - self._purged >= 1.0:
            conn.execute(_Q["purge_seen"], (message.now,))
            self._purged = message.now
        params = (message.party, message.msg_id, message.expires_at, message.now)
        inserted: int = conn.execute(_Q["remember_message"], params).rowcount
        return inserted == 1

    def message_seen(self, party: str, msg_id: str, *, now: float) -> bool:
        """Whether a message id from ``party`` is remembered and not expired at ``now``."""
        return bool(self._read(_Q["message_seen"], (party, msg_id, now)))

    def forget_message(self, party: str, msg_id: str) -> None:
        """Drop a message id: the request it came with was refused, and stores nothing."""
        with self._write(durable=False) as conn:
            conn.execute(_Q["forget_message"], (party, msg_id))

    # -- offers and acceptances -----------------------------------------------------------

    def add_offers(
        self, offers: Sequence[StoredOffer], *, message: SeenMessage | None = None
    ) -> None:
        """Keep offers, with the requests they answer and their signed documents; with
        ``message``, remember it in the same transaction (one commit a request).

        Committed without waiting for the disk: an offer lost in a power cut is a quote the
        customer asks for again, never a booking or a document.

        :raises ReplayedMessageError: ``message`` was already seen; nothing is stored."""
        rows = [offer_row(o) for o in offers]
        with self._write(durable=False) as conn:
            if message is not None and not self._remember(conn, message):
                raise ReplayedMessageError(f"message id {message.msg_id} was already used")
            conn.executemany(_Q["insert_offer"], rows)

    def get_offer(self, offer_id: str) -> StoredOffer:
        """The offer with that id; raises OfferNotFoundError."""
        found = self._read(_Q["get_offer"], (offer_id,))
        if not found:
            raise OfferNotFoundError(f"no offer {offer_id!r}")
        return stored_offer_of_row(found[0])

    def begin_acceptance(self, claim: AcceptanceClaim, now: float) -> AcceptanceRecord | None:
        """Claim an acceptance; None when it is now ``processing`` under ``claim.owner``,
        else the record in the way (itself, or the acceptance that holds the offer).

        One write transaction (SQLite has one writer at a time): the acceptance's row and
        the offer's ``accepted_by`` change together or not at all."""
        with self._write() as conn:
            found = AcceptanceRecord.of_row(
                conn.execute(_Q["get_acceptance"], (claim.acceptance_id,)).fetchone()
            )
            if found is not None:
                if found.offer_id != claim.offer_id:
                    raise AcceptanceConflictError(
                        f"acceptance {claim.acceptance_id} was given for another offer"
                    )
                if found.state != "released":
                    return found
            taken = conn.execute(_Q["take_offer"], (claim.acceptance_id, claim.offer_id))
            if taken.rowcount == 0:
                other = AcceptanceRecord.of_row(
                    conn.execute(_Q["offer_holder"], (claim.offer_id,)).fetchone()
                )
                if other is not None:
                    return other
                raise OfferNotFoundError(f"no offer {claim.offer_id!r}")
            conn.execute(_Q["claim_acceptance"], claim_params(claim, now))
        return None

    def renew_acceptance(
        self, acceptance_id: str, owner: str, lease_until: float, *, hold: str | None = None
    ) -> bool:
        """Extend ``owner``'s lease and record the hold; False when the lease was lost.

        Committed without waiting for the disk: a power cut's loss leaves the hold
        unrecorded (it expires by itself in the firm's system) and the lease shorter."""
        params = (lease_until, hold, acceptance_id, owner)
        with self._write(durable=False) as conn:
            return conn.execute(_Q["renew_acceptance"], params).rowcount == 1

    def take_over_acceptance(
        self, acceptance_id: str, owner: str, now: float, lease_until: float
    ) -> bool:
        """Take a ``processing`` acceptance whose lease expired over for ``owner``."""
        params = (owner, lease_until, acceptance_id, now)
        with self._write() as conn:
            return conn.execute(_Q["take_over_acceptance"], params).rowcount == 1

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
        """Record the outcome, and for a booking its documents and emission problems, in
        one transaction, while ``owner`` holds the lease; else return the record."""
        with self._write() as conn:
            found = AcceptanceRecord.of_row(
                conn.execute(_Q["get_acceptance"], (acceptance_id,)).fetchone()
            )
            if found is None:
                raise StoreError(f"acceptance {acceptance_id} is not in the store")
            ours = found.state == "processing" and found.lease_owner == owner
            late = state == "booked" and found.state == "released"
            if not (ours or late):
                return found
            if state == "booked":
                held = conn.execute(
                    _Q["hold_offer"], (acceptance_id, found.offer_id, acceptance_id)
                ).rowcount
                if held == 0:  # released, and another acceptance holds the offer now
                    return found
            else:
                conn.execute(_Q["release_offer"], (found.offer_id, acceptance_id))
            conn.execute(_Q["finish_acceptance"], (state, result, now, acceptance_id))
            conn.executemany(_Q["insert_row"], [row_params(r) for r in rows])
            conn.executemany(_Q["insert_problem"], [p.row() for p in problems])
        return None

    def get_acceptance(self, acceptance_id: str) -> AcceptanceRecord | None:
        """The acceptance with that id, or None."""
        found = self._read(_Q["get_acceptance"], (acceptance_id,))
        return AcceptanceRecord.of_row(found[0]) if found else None

    def stalled_acceptances(self, now: float, limit: int = 100) -> list[AcceptanceRecord]:
        """``processing`` acceptances whose lease expired before ``now``, oldest first."""
        found = self._read(_Q["stalled_acceptances"], (now, limit))
        return [a for a in map(AcceptanceRecord.of_row, found) if a is not None]

    def add_emission_problems(
        self, problems: Sequence[EmissionProblem], *, connection: object | None = None
    ) -> None:
        """Keep emission problems; with ``connection``, in the caller's transaction."""
        params = [p.row() for p in problems]
        if not params:
            return
        if connection is not None:
            self._caller(connection).executemany(_Q["insert_problem"], params)
            return
        with self._write() as conn:
            conn.executemany(_Q["insert_problem"], params)

    def emission_problems(self, *, limit: int = 100) -> list[EmissionProblem]:
        """Emission problems, newest first."""
        return [EmissionProblem(*r) for r in self._read(_Q["emission_problems"], (limit,))]

    def count_emission_problems(self) -> int:
        """How many emission problems are kept."""
        return int(self._read(_Q["count_emission_problems"])[0][0])
