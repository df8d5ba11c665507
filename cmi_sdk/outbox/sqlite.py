"""The embedded default store: one SQLite file, WAL, ``synchronous=FULL``.

A firm that keeps its own tables in the same file passes its ``sqlite3`` connection to
:meth:`~cmi_sdk.Adapter.emit`, and the outbox row is written inside its open transaction:
the row commits or rolls back with the firm's own write. Otherwise the SDK commits on its
own connection (one per thread), batching rows into one commit wherever it can.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, cast

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

__all__ = ["SQLiteStore"]

SCHEMA_VERSION = 7

_MAX_INTEGER = 2**63 - 1  # SQLite's largest integer: no seq is beyond it

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cmi_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cmi_terms (
    id TEXT PRIMARY KEY,
    customer_ref TEXT NOT NULL,
    intermediary TEXT,
    terms TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at REAL NOT NULL,
    until REAL,
    revoked_at REAL
);
CREATE INDEX IF NOT EXISTS cmi_terms_customer ON cmi_terms (customer_ref);
CREATE TABLE IF NOT EXISTS cmi_consent (
    id TEXT PRIMARY KEY,
    terms_id TEXT NOT NULL REFERENCES cmi_terms (id),
    event TEXT NOT NULL,
    issued_at REAL NOT NULL,
    record TEXT NOT NULL,
    xml BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS cmi_consent_terms ON cmi_consent (terms_id, issued_at);
CREATE TABLE IF NOT EXISTS cmi_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id TEXT NOT NULL UNIQUE,
    terms_id TEXT NOT NULL,
    customer_ref TEXT NOT NULL,
    transaction_id TEXT NOT NULL,
    standard TEXT NOT NULL,
    document_type TEXT NOT NULL,
    destination TEXT,
    body BLOB NOT NULL,
    created_at REAL NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    lease_owner TEXT,
    lease_until REAL,
    last_status INTEGER,
    last_error TEXT,
    delivered_at REAL,
    dead_at REAL,
    model TEXT
);
CREATE INDEX IF NOT EXISTS cmi_outbox_due ON cmi_outbox (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS cmi_outbox_terms ON cmi_outbox (terms_id, seq);
CREATE TABLE IF NOT EXISTS cmi_attempts (
    msg_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    owner TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER,
    error TEXT,
    next_attempt_at REAL
);
CREATE INDEX IF NOT EXISTS cmi_attempts_msg ON cmi_attempts (msg_id);
CREATE TABLE IF NOT EXISTS cmi_destinations (
    url TEXT PRIMARY KEY,
    disabled_at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cmi_intermediaries (
    name TEXT PRIMARY KEY,
    secrets TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL,
    generation INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS cmi_offers (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    customer_ref TEXT NOT NULL,
    intermediary TEXT,
    offer TEXT NOT NULL,
    request TEXT NOT NULL,
    xml BLOB NOT NULL,
    valid_until REAL NOT NULL,
    created_at REAL NOT NULL
);
-- No reader looks offers up by request: an index would only slow every insert.
DROP INDEX IF EXISTS cmi_offers_request;
CREATE TABLE IF NOT EXISTS cmi_acceptances (
    id TEXT PRIMARY KEY,
    offer_id TEXT NOT NULL,
    state TEXT NOT NULL,
    result TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cmi_seen (
    party TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (party, msg_id)
);
CREATE INDEX IF NOT EXISTS cmi_seen_expiry ON cmi_seen (expires_at);
-- Version 5: service links. A reference is unique per intermediary, not across them.
CREATE TABLE IF NOT EXISTS cmi_links (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    intermediary TEXT NOT NULL,
    customer_ref TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL,
    UNIQUE (intermediary, customer_ref)
);
CREATE INDEX IF NOT EXISTS cmi_links_account ON cmi_links (account);
CREATE TABLE IF NOT EXISTS cmi_link_codes (
    hash TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL,
    link_id TEXT
);
CREATE INDEX IF NOT EXISTS cmi_link_codes_expiry ON cmi_link_codes (expires_at);
-- Version 6: documents that could not be made, kept for the operator.
CREATE TABLE IF NOT EXISTS cmi_emission_problems (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    transaction_id TEXT NOT NULL,
    terms_id TEXT NOT NULL,
    customer_ref TEXT NOT NULL,
    standard TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    transaction_json TEXT NOT NULL
);
"""

# What a document for an account goes out under: the firm's direct terms for the account,
# and the terms of each of its active links; for an intermediary's reference, what its
# linked account gets, or, unlinked, only that intermediary's own terms for it.
_RECIPIENTS = (
    "WITH account (id) AS (SELECT :ref WHERE :intermediary IS NULL UNION ALL"
    " SELECT account FROM cmi_links WHERE intermediary = :intermediary"
    " AND customer_ref = :ref AND revoked_at IS NULL)"
    " SELECT t.terms, t.secret, t.created_at, t.id FROM account a JOIN cmi_terms t"
    " ON t.customer_ref = a.id AND t.intermediary IS NULL WHERE {active}"
    " UNION ALL SELECT t.terms, t.secret, t.created_at, t.id FROM account a"
    " JOIN cmi_links l ON l.account = a.id AND l.revoked_at IS NULL JOIN cmi_terms t"
    " ON t.intermediary = l.intermediary AND t.customer_ref = l.customer_ref WHERE {active}"
    " UNION ALL SELECT t.terms, t.secret, t.created_at, t.id FROM cmi_terms t"
    " WHERE t.intermediary = :intermediary AND t.customer_ref = :ref AND {active}"
    " AND NOT EXISTS (SELECT 1 FROM account) ORDER BY 3, 4"
).replace("{active}", "t.revoked_at IS NULL AND (t.until IS NULL OR t.until > :now)")

_LINK_COLUMNS = "id, account, intermediary, customer_ref, created_at, revoked_at"

# Version 6: an acceptance carries its lease, the acceptance itself and its hold (for
# recovery after a crash), and an offer names the one acceptance that holds it.
_ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("cmi_outbox", "model", "TEXT"),
    ("cmi_acceptances", "intermediary", "TEXT"),
    ("cmi_acceptances", "acceptance", "TEXT"),
    ("cmi_acceptances", "hold", "TEXT"),
    ("cmi_acceptances", "lease_owner", "TEXT"),
    ("cmi_acceptances", "lease_until", "REAL"),
    ("cmi_offers", "accepted_by", "TEXT"),
    # Version 7: intermediaries can be revoked, and each change of their row counts.
    ("cmi_intermediaries", "revoked_at", "REAL"),
    ("cmi_intermediaries", "generation", "INTEGER NOT NULL DEFAULT 0"),
)

# An offer accepted more than once before version 6 is held by its first live acceptance;
# the others keep their answers (a retry of theirs still gets them).
_BACKFILL_ACCEPTED_BY = """
UPDATE cmi_offers SET accepted_by = (SELECT a.id FROM cmi_acceptances a
    WHERE a.offer_id = cmi_offers.id AND a.state IN ('processing', 'booked')
    ORDER BY a.created_at, a.id LIMIT 1)
WHERE accepted_by IS NULL
"""

_ACCEPTANCE_COLUMNS = (
    "id, offer_id, state, result, intermediary, acceptance, hold, lease_owner, lease_until"
)

_ROW_COLUMNS = (
    "seq, msg_id, terms_id, customer_ref, transaction_id, standard, document_type,"
    " destination, body, created_at, state, attempts, next_attempt_at, lease_owner,"
    " lease_until, last_status, last_error, delivered_at"
)

_INSERT = (
    "INSERT OR IGNORE INTO cmi_outbox (msg_id, terms_id, customer_ref, transaction_id,"
    " standard, document_type, destination, body, created_at, state, next_attempt_at, model)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _row(values: Sequence[Any]) -> OutboxRow:
    return OutboxRow(
        seq=values[0],
        msg_id=values[1],
        terms_id=values[2],
        customer_ref=values[3],
        transaction_id=values[4],
        standard=values[5],
        document_type=values[6],
        destination=values[7],
        body=bytes(values[8]),
        created_at=values[9],
        state=cast(State, values[10]),
        attempts=values[11],
        next_attempt_at=values[12],
        lease_owner=values[13],
        lease_until=values[14],
        last_status=values[15],
        last_error=values[16],
        delivered_at=values[17],
    )


def _params(r: NewRow) -> tuple[Any, ...]:
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
        r.model,
    )


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
        rows = connection.execute("PRAGMA database_list").fetchall()
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
        """Create the tables when missing; idempotent.

        When they are there already, nothing is written: a firm that opens the store with
        its own write transaction open on the same file (the first ``emit`` inside it) must
        not wait for itself.
        """
        self._create_file()
        conn = self._conn()
        try:
            found = conn.execute(
                "SELECT value FROM sqlite_master JOIN cmi_meta ON key = 'schema_version'"
                " WHERE type = 'table' AND name = 'cmi_outbox'"
            ).fetchone()
        except sqlite3.OperationalError:
            found = None  # no cmi_meta table yet
        if found is not None and int(found[0]) >= SCHEMA_VERSION:
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            for table, column, kind in _ADDED_COLUMNS:  # a store made by an earlier version
                columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                if column not in columns:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            conn.execute(_BACKFILL_ACCEPTED_BY)
            conn.execute(
                "INSERT OR REPLACE INTO cmi_meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"cannot create the tables in {self.path}: {exc}") from exc

    # -- terms and consent ----------------------------------------------------------------

    def add_terms(self, terms: SharingTerms, consent: ConsentRecord, consent_xml: bytes) -> None:
        """Keep accepted terms and their consent record, in one transaction."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO cmi_terms (id, customer_ref, intermediary, terms, secret,"
                " created_at, until, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
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
            self._add_consent(conn, consent, consent_xml)

    @staticmethod
    def _add_consent(conn: sqlite3.Connection, consent: ConsentRecord, xml: bytes) -> None:
        conn.execute(
            "INSERT INTO cmi_consent (id, terms_id, event, issued_at, record, xml)"
            " VALUES (?, ?, ?, ?, ?, ?)",
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
        """The terms with that id, revoked or not."""
        rows = self._read("SELECT terms, secret FROM cmi_terms WHERE id = ?", (terms_id,))
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
        sql = "SELECT terms, secret FROM cmi_terms WHERE 1 = 1"
        params: list[Any] = []
        if customer_ref is not None:
            sql += " AND customer_ref = ?"
            params.append(customer_ref)
        if intermediary is not None:
            sql += " AND intermediary = ?"
            params.append(intermediary)
        if not include_revoked:
            sql += " AND revoked_at IS NULL"
        return [
            terms_of_row(r, self.keyring)
            for r in self._read(sql + " ORDER BY created_at, id", params)
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
        ``intermediary``, for that intermediary's reference) goes out under at ``now``."""
        params = {"ref": customer_ref, "intermediary": intermediary, "now": now}
        if connection is not None:
            rows = self._caller(connection).execute(_RECIPIENTS, params).fetchall()
        else:
            rows = self._read(_RECIPIENTS, params)
        return [terms_of_row(r, self.keyring) for r in rows]

    def revoke_terms(
        self, terms_id: str, at: float, consent: ConsentRecord, consent_xml: bytes
    ) -> int:
        """Revoke terms, keep the consent record, cancel their undelivered rows."""
        with self._write() as conn:
            found = conn.execute(
                "SELECT revoked_at, terms FROM cmi_terms WHERE id = ?", (terms_id,)
            ).fetchone()
            if found is None:
                raise TermsNotFoundError(f"no sharing terms with id {terms_id!r}")
            if found[0] is not None:
                raise TermsError(f"terms {terms_id} are already revoked")
            data = json.loads(found[1])
            data["revoked_at"] = consent.issued_at.isoformat()
            conn.execute(
                "UPDATE cmi_terms SET revoked_at = ?, terms = ? WHERE id = ?",
                (at, json.dumps(data), terms_id),
            )
            self._add_consent(conn, consent, consent_xml)
            # Rows being sent right now are cancelled too: their result is then not recorded
            # over the cancellation (see complete()).
            return conn.execute(
                "UPDATE cmi_outbox SET state = 'cancelled', last_error = 'terms revoked',"
                " lease_owner = NULL, lease_until = NULL"
                " WHERE terms_id = ? AND state IN ('pending', 'retry', 'leased', 'digest')",
                (terms_id,),
            ).rowcount

    def consent_records(self, terms_id: str) -> list[tuple[ConsentRecord, bytes]]:
        """The consent records of the terms, oldest first, with their signed documents."""
        rows = self._read(
            "SELECT record, xml FROM cmi_consent WHERE terms_id = ? ORDER BY issued_at, rowid",
            (terms_id,),
        )
        return [(ConsentRecord.model_validate_json(r[0]), bytes(r[1])) for r in rows]

    # -- service links --------------------------------------------------------------------

    def add_link_code(
        self, code_hash: str, account: str, *, created_at: float, expires_at: float
    ) -> None:
        """Keep a link code's hash; codes that expired unredeemed are dropped meanwhile."""
        with self._write() as conn:
            conn.execute(
                "DELETE FROM cmi_link_codes WHERE expires_at < ? AND used_at IS NULL",
                (created_at,),
            )
            conn.execute(
                "INSERT INTO cmi_link_codes (hash, account, created_at, expires_at)"
                " VALUES (?, ?, ?, ?)",
                (code_hash, account, created_at, expires_at),
            )

    def redeem_link_code(
        self, code_hash: str, *, intermediary: str, link_id: str, customer_ref: str, now: float
    ) -> Link | None:
        """Mark the code used and make the link, in one transaction; None when the code
        is unknown, used or expired."""
        with self._write() as conn:
            # One writer at a time (BEGIN IMMEDIATE): of two redemptions, the second finds
            # the code used.
            found = conn.execute(
                "UPDATE cmi_link_codes SET used_at = ?, link_id = ? WHERE hash = ?"
                " AND used_at IS NULL AND expires_at > ? RETURNING account",
                (now, link_id, code_hash, now),
            ).fetchone()
            if found is None:
                return None
            try:
                conn.execute(
                    f"INSERT INTO cmi_links ({_LINK_COLUMNS}) VALUES (?, ?, ?, ?, ?, NULL)",
                    (link_id, found[0], intermediary, customer_ref, now),
                )
            except sqlite3.IntegrityError as exc:  # the code stays unused (rolled back)
                raise StoreError(f"cannot make link {link_id}: {exc}") from None
        return link_of_row((link_id, found[0], intermediary, customer_ref, now, None))

    def get_link(self, link_id: str) -> Link:
        """The link with that id, revoked or not."""
        found = self._read(f"SELECT {_LINK_COLUMNS} FROM cmi_links WHERE id = ?", (link_id,))
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
        sql = f"SELECT {_LINK_COLUMNS} FROM cmi_links WHERE 1 = 1"
        params: list[Any] = []
        if account is not None:
            sql += " AND account = ?"
            params.append(account)
        if intermediary is not None:
            sql += " AND intermediary = ?"
            params.append(intermediary)
        if not include_revoked:
            sql += " AND revoked_at IS NULL"
        return [link_of_row(r) for r in self._read(sql + " ORDER BY created_at, id", params)]

    def revoke_link(
        self, link_id: str, at: float, revocations: Sequence[tuple[ConsentRecord, bytes]]
    ) -> tuple[int, list[str]]:
        """Revoke the link and its terms named by ``revocations``, in one transaction."""
        cancelled = 0
        with self._write() as conn:
            found = conn.execute(
                "SELECT revoked_at, intermediary, customer_ref FROM cmi_links WHERE id = ?",
                (link_id,),
            ).fetchone()
            if found is None:
                raise LinkNotFoundError(f"no link {link_id!r}")
            if found[0] is not None:
                raise LinkError(f"link {link_id} is already revoked")
            _, intermediary, customer_ref = found
            conn.execute("UPDATE cmi_links SET revoked_at = ? WHERE id = ?", (at, link_id))
            for consent, xml in revocations:
                terms = conn.execute(
                    "SELECT terms FROM cmi_terms WHERE id = ? AND intermediary = ?"
                    " AND customer_ref = ? AND revoked_at IS NULL",
                    (consent.terms_id, intermediary, customer_ref),
                ).fetchone()
                if terms is None:
                    continue  # revoked meanwhile, with its own record
                data = json.loads(terms[0])
                data["revoked_at"] = consent.issued_at.isoformat()
                conn.execute(
                    "UPDATE cmi_terms SET revoked_at = ?, terms = ? WHERE id = ?",
                    (at, json.dumps(data), consent.terms_id),
                )
                self._add_consent(conn, consent, xml)
                cancelled += conn.execute(
                    "UPDATE cmi_outbox SET state = 'cancelled', last_error = 'terms revoked',"
                    " lease_owner = NULL, lease_until = NULL"
                    " WHERE terms_id = ? AND state IN ('pending', 'retry', 'leased', 'digest')",
                    (consent.terms_id,),
                ).rowcount
            late = conn.execute(
                "SELECT id FROM cmi_terms WHERE intermediary = ? AND customer_ref = ?"
                " AND revoked_at IS NULL ORDER BY created_at, id",
                (intermediary, customer_ref),
            ).fetchall()
        return cancelled, [r[0] for r in late]

    # -- outbox ---------------------------------------------------------------------------

    def insert(self, rows: Sequence[NewRow], *, connection: object | None = None) -> int:
        """Write rows; with ``connection``, inside the caller's transaction (not committed)."""
        params = [_params(r) for r in rows]
        if connection is not None:
            conn = self._caller(connection)
            before = conn.total_changes
            conn.executemany(_INSERT, params)
            return conn.total_changes - before
        with self._write() as own:
            before = own.total_changes
            own.executemany(_INSERT, params)
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
                f"UPDATE cmi_outbox SET state = 'leased', lease_owner = ?, lease_until = ?"
                f" WHERE seq IN (SELECT seq FROM cmi_outbox"
                f" WHERE (state IN ('pending', 'retry') AND next_attempt_at <= ?)"
                f" OR (state = 'leased' AND lease_until < ?)"
                f" ORDER BY next_attempt_at, seq LIMIT ?) RETURNING {_ROW_COLUMNS}",
                (owner, now + lease_seconds, now, now, limit),
            ).fetchall()
        return sorted((_row(r) for r in rows), key=lambda r: r.seq)

    def heartbeat(self, *, owner: str, msg_ids: Sequence[str], lease_until: float) -> None:
        """Extend ``owner``'s leases on ``msg_ids``."""
        with self._write(durable=False) as conn:
            conn.executemany(
                "UPDATE cmi_outbox SET lease_until = ? WHERE msg_id = ? AND lease_owner = ?"
                " AND state = 'leased'",
                [(lease_until, m, owner) for m in msg_ids],
            )

    def cancel(self, *, owner: str, msg_ids: Sequence[str], reason: str) -> int:
        """Cancel the rows of ``msg_ids`` that ``owner`` leases; return how many."""
        with self._write() as conn:
            return sum(
                conn.execute(
                    "UPDATE cmi_outbox SET state = 'cancelled', last_error = ?,"
                    " lease_owner = NULL, lease_until = NULL"
                    " WHERE msg_id = ? AND lease_owner = ? AND state = 'leased'",
                    (reason, m, owner),
                ).rowcount
                for m in msg_ids
            )

    def complete(self, results: Sequence[AttemptResult]) -> None:
        """Record attempts and outcomes in one transaction (a group commit)."""
        if not results:
            return
        params = CompletionParams.of(results)
        delivered, retry, dead = params.delivered, params.retry, params.dead
        with self._write(durable=False) as conn:
            conn.executemany(
                "INSERT INTO cmi_attempts (msg_id, attempt, owner, started_at, finished_at,"
                " outcome, status, error, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                params.attempts,
            )
            # A receiver's 2xx is a fact whoever holds the lease now; only a cancelled row
            # keeps its state (its terms were revoked meanwhile).
            conn.executemany(
                "UPDATE cmi_outbox SET state = 'delivered', delivered_at = ?, attempts = ?,"
                " last_status = ?, last_error = NULL, lease_owner = NULL,"
                " lease_until = NULL WHERE msg_id = ? AND state IN"
                " ('leased', 'pending', 'retry', 'dead')",
                delivered,
            )
            # A failure is recorded only by the worker that still holds the lease.
            conn.executemany(
                "UPDATE cmi_outbox SET state = 'retry', next_attempt_at = ?, attempts = ?,"
                " last_status = ?, last_error = ?, lease_owner = NULL,"
                " lease_until = NULL WHERE msg_id = ? AND lease_owner = ?"
                " AND state = 'leased'",
                retry,
            )
            conn.executemany(
                "UPDATE cmi_outbox SET state = 'dead', dead_at = ?, attempts = ?, last_status = ?,"
                " last_error = ?, lease_owner = NULL, lease_until = NULL,"
                " next_attempt_at = NULL WHERE msg_id = ? AND lease_owner = ?"
                " AND state = 'leased'",
                dead,
            )

    def due_digests(self, now: float) -> list[DigestGroup]:
        """The ``digest`` rows whose window ended by ``now``, by terms and window."""
        found = self._read(
            "SELECT terms_id, next_attempt_at, msg_id, model FROM cmi_outbox"
            " WHERE state = 'digest' AND next_attempt_at <= ? ORDER BY terms_id,"
            " next_attempt_at, seq",
            (now,),
        )
        groups: dict[tuple[str, float], list[tuple[str, str]]] = {}
        for terms_id, due, msg_id, model in found:
            groups.setdefault((terms_id, due), []).append((msg_id, model))
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
        """Write the window's digest row and mark its sources merged (or release them)."""
        marks = [(m,) for m in msg_ids]
        with self._write() as conn:
            before = conn.total_changes
            if row is None:
                conn.executemany(
                    "UPDATE cmi_outbox SET state = 'pending' WHERE msg_id = ? AND state = 'digest'",
                    marks,
                )
                return conn.total_changes - before  # those still in the window only
            conn.execute(_INSERT, _params(row))
            conn.executemany(
                "UPDATE cmi_outbox SET state = 'merged' WHERE msg_id = ? AND state = 'digest'",
                marks,
            )
            return conn.total_changes - before

    def next_due(self) -> float | None:
        """When the next pending or retrying row is due, or the next lease expires."""
        rows = self._read(
            "SELECT MIN(t) FROM (SELECT MIN(next_attempt_at) AS t FROM cmi_outbox"
            " WHERE state IN ('pending', 'retry') UNION ALL SELECT MIN(lease_until)"
            " FROM cmi_outbox WHERE state = 'leased')"
        )
        value = rows[0][0] if rows else None
        return None if value is None else float(value)

    def status(self, now: float) -> OutboxStatus:
        """Counts by state and the oldest pending row's age."""
        counts: dict[str, int] = dict.fromkeys(STATES, 0)
        counts.update(self._read("SELECT state, COUNT(*) FROM cmi_outbox GROUP BY state"))
        oldest = self._read(
            "SELECT MIN(created_at) FROM cmi_outbox WHERE state IN ('pending', 'retry', 'leased')"
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
                f"SELECT {_ROW_COLUMNS} FROM cmi_outbox ORDER BY seq DESC LIMIT ?", (limit,)
            )
        else:
            found = self._read(
                f"SELECT {_ROW_COLUMNS} FROM cmi_outbox WHERE state = ? ORDER BY seq DESC LIMIT ?",
                (state, limit),
            )
        return [_row(r) for r in found]

    def get_row(self, msg_id: str) -> OutboxRow:
        """The row with that msg_id."""
        found = self._read(f"SELECT {_ROW_COLUMNS} FROM cmi_outbox WHERE msg_id = ?", (msg_id,))
        if not found:
            raise OutboxRowNotFoundError(f"no outbox row {msg_id!r}")
        return _row(found[0])

    def attempt_counts(self) -> dict[str, int]:
        """Delivery attempts ever recorded, by outcome."""
        counts = dict.fromkeys(("delivered", "retry", "dead"), 0)
        counts.update(self._read("SELECT outcome, COUNT(*) FROM cmi_attempts GROUP BY outcome"))
        return counts

    def attempts(self, msg_id: str) -> list[AttemptResult]:
        """Every recorded attempt of a row, in order."""
        found = self._read(
            "SELECT msg_id, owner, attempt, started_at, finished_at, outcome, status, error,"
            " next_attempt_at FROM cmi_attempts WHERE msg_id = ? ORDER BY rowid",
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
        """Make dead rows pending again, due now; attempts start again from zero."""
        if (msg_id is None) == (since is None):
            raise ValueError("redrive takes a msg_id or a since time, not both")
        param: str | float | None
        with self._write() as conn:
            if msg_id is not None:
                state = conn.execute(
                    "SELECT state FROM cmi_outbox WHERE msg_id = ?", (msg_id,)
                ).fetchone()
                if state is None:
                    raise OutboxRowNotFoundError(f"no outbox row {msg_id!r}")
                where, param = "msg_id = ? AND state = 'dead'", msg_id
            else:
                where, param = "state = 'dead' AND dead_at >= ?", since
            return conn.execute(
                "UPDATE cmi_outbox SET state = 'pending', attempts = 0, next_attempt_at = ?,"
                f" dead_at = NULL WHERE {where}",
                (now, param),
            ).rowcount

    def documents_since(self, terms_id: str, after: int, limit: int) -> list[OutboxRow]:
        """Documents emitted under the terms after the cursor ``after`` (a row's seq).

        SQLite has one writer at a time, so rows commit in ``seq`` order and a cursor on it
        never skips a row that commits late.
        """
        found = self._read(
            f"SELECT {_ROW_COLUMNS} FROM cmi_outbox WHERE terms_id = ? AND seq > ?"
            " AND state NOT IN ('cancelled', 'digest', 'merged') ORDER BY seq LIMIT ?",
            (terms_id, min(after, _MAX_INTEGER), limit),
        )
        return [_row(r) for r in found]

    # -- destinations, intermediaries, replay ---------------------------------------------

    def disable_destination(self, url: str, *, reason: str, at: float) -> None:
        """Stop delivering to ``url``."""
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO cmi_destinations (url, disabled_at, reason)"
                " VALUES (?, ?, ?)",
                (url, at, reason),
            )

    def enable_destination(self, url: str) -> bool:
        """Deliver to ``url`` again; True if it was disabled."""
        with self._write() as conn:
            return conn.execute("DELETE FROM cmi_destinations WHERE url = ?", (url,)).rowcount > 0

    def disabled_destinations(self) -> dict[str, str]:
        """Disabled destinations and why."""
        return dict(self._read("SELECT url, reason FROM cmi_destinations"))

    def add_intermediary(self, name: str, secret: str, *, at: float) -> None:
        """Register an intermediary, or add a secret to it (kept alongside the others, with
        no end). A revoked intermediary registered again starts afresh: its old secrets
        stay gone."""
        with self._write() as conn:
            found = conn.execute(
                "SELECT secrets, revoked_at FROM cmi_intermediaries WHERE name = ?", (name,)
            ).fetchone()
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
        conn.execute(
            "INSERT INTO cmi_intermediaries (name, secrets, created_at, revoked_at, generation)"
            " VALUES (?, ?, ?, NULL, 1) ON CONFLICT (name) DO UPDATE SET"
            " secrets = excluded.secrets, revoked_at = NULL,"
            " generation = cmi_intermediaries.generation + 1",
            (name, intermediaries.encode(secrets, name, self.keyring), at),
        )

    def rotate_intermediary(self, name: str, secret: str, *, at: float, grace_until: float) -> None:
        """Give an intermediary a new secret; its others work until ``grace_until``.

        :raises IntermediaryNotFoundError: no such intermediary, or it is revoked."""
        with self._write() as conn:
            found = conn.execute(
                "SELECT secrets, revoked_at FROM cmi_intermediaries WHERE name = ?", (name,)
            ).fetchone()
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
            found = conn.execute(
                "SELECT revoked_at FROM cmi_intermediaries WHERE name = ?", (name,)
            ).fetchone()
            if found is None:
                raise IntermediaryNotFoundError(intermediaries.not_active(name, known=False))
            if found[0] is not None:
                return False
            conn.execute(
                "UPDATE cmi_intermediaries SET secrets = '[]', revoked_at = ?,"
                " generation = generation + 1 WHERE name = ?",
                (at, name),
            )
            return True

    def intermediary(self, name: str) -> Intermediary | None:
        """The intermediary with its secrets (opened), or None when unknown."""
        found = self._read(
            "SELECT name, created_at, secrets, revoked_at, generation FROM cmi_intermediaries"
            " WHERE name = ?",
            (name,),
        )
        return self._intermediary(found[0]) if found else None

    def _intermediary(self, row: Sequence[Any]) -> Intermediary:
        return Intermediary(
            name=row[0],
            created_at=row[1],
            secrets=tuple(intermediaries.decode(row[2], row[0], self.keyring)),
            revoked_at=row[3],
            generation=row[4],
        )

    def list_intermediaries(self) -> list[Intermediary]:
        """Every intermediary, revoked ones too, by name."""
        found = self._read(
            "SELECT name, created_at, secrets, revoked_at, generation FROM cmi_intermediaries"
            " ORDER BY name"
        )
        return [self._intermediary(r) for r in found]

    def intermediary_generation(self, name: str) -> int | None:
        """How many times the intermediary's row has changed (None when unknown): one read
        of a key, without opening any secret, for the endpoint to check on every request."""
        found = self._read("SELECT generation FROM cmi_intermediaries WHERE name = ?", (name,))
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
        keyring = self._need_keyring()
        changed = 0
        # The plain text a row held must not stay on disk in freed space: zero it, and
        # empty the WAL afterwards, so the file no longer holds any old copy.
        own = self._conn()
        secure = own.execute("PRAGMA secure_delete").fetchone()[0]
        own.execute("PRAGMA secure_delete=ON")
        try:
            changed = self._reseal(keyring)
        finally:
            own.execute(f"PRAGMA secure_delete={int(secure)}")
        own.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return changed

    def _reseal(self, keyring: SecretsKeyring) -> int:
        changed = 0
        with self._write() as conn:
            for terms_id, stored in conn.execute("SELECT id, secret FROM cmi_terms").fetchall():
                if keyring.is_current(stored):
                    continue
                where = f"terms:{terms_id}"
                sealed = keyring.seal(keyring.open(stored, context=where), context=where)
                conn.execute("UPDATE cmi_terms SET secret = ? WHERE id = ?", (sealed, terms_id))
                changed += 1
            for name, text in conn.execute(
                "SELECT name, secrets FROM cmi_intermediaries"
            ).fetchall():
                resealed = intermediaries.reseal(text, name, keyring)
                if resealed is not None:
                    conn.execute(
                        "UPDATE cmi_intermediaries SET secrets = ? WHERE name = ?",
                        (resealed, name),
                    )
                    changed += 1
        return changed

    def _need_keyring(self) -> SecretsKeyring:
        if self.keyring is None:
            raise ConfigurationError(
                "no secrets key is configured: set CMI_SECRETS_KEY or CMI_SECRETS_KEY_FILE"
                " (make a key with `cmi secrets generate-key`)"
            )
        return self.keyring

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
            conn.execute("DELETE FROM cmi_seen WHERE expires_at < ?", (message.now,))
            self._purged = message.now
        # An id whose time is up counts as new, purged or not (as message_seen reads it).
        inserted: int = conn.execute(
            "INSERT INTO cmi_seen (party, msg_id, expires_at) VALUES (?, ?, ?)"
            " ON CONFLICT (party, msg_id) DO UPDATE SET expires_at = excluded.expires_at"
            " WHERE cmi_seen.expires_at < ?",
            (message.party, message.msg_id, message.expires_at, message.now),
        ).rowcount
        return inserted == 1

    def message_seen(self, party: str, msg_id: str, *, now: float) -> bool:
        """Whether a message id from ``party`` is remembered and not expired at ``now``."""
        return bool(
            self._read(
                "SELECT 1 FROM cmi_seen WHERE party = ? AND msg_id = ? AND expires_at >= ?",
                (party, msg_id, now),
            )
        )

    def forget_message(self, party: str, msg_id: str) -> None:
        """Drop a message id: the request it came with was refused, and stores nothing."""
        with self._write(durable=False) as conn:
            conn.execute("DELETE FROM cmi_seen WHERE party = ? AND msg_id = ?", (party, msg_id))

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
            conn.executemany(
                "INSERT INTO cmi_offers (id, request_id, customer_ref, intermediary, offer,"
                " request, xml, valid_until, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def get_offer(self, offer_id: str) -> StoredOffer:
        """The offer with that id; raises OfferNotFoundError."""
        found = self._read(
            "SELECT offer, request, xml, intermediary FROM cmi_offers WHERE id = ?", (offer_id,)
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

        One write transaction (SQLite has one writer at a time): the acceptance's row and
        the offer's ``accepted_by`` change together or not at all."""
        with self._write() as conn:
            found = AcceptanceRecord.of_row(
                conn.execute(
                    f"SELECT {_ACCEPTANCE_COLUMNS} FROM cmi_acceptances WHERE id = ?",
                    (claim.acceptance_id,),
                ).fetchone()
            )
            if found is not None:
                if found.offer_id != claim.offer_id:
                    raise AcceptanceConflictError(
                        f"acceptance {claim.acceptance_id} was given for another offer"
                    )
                if found.state != "released":
                    return found
            holder = conn.execute(
                "UPDATE cmi_offers SET accepted_by = ? WHERE id = ? AND accepted_by IS NULL",
                (claim.acceptance_id, claim.offer_id),
            ).rowcount
            if holder == 0:
                other = AcceptanceRecord.of_row(
                    conn.execute(
                        f"SELECT {_ACCEPTANCE_COLUMNS} FROM cmi_acceptances WHERE id ="
                        " (SELECT accepted_by FROM cmi_offers WHERE id = ?)",
                        (claim.offer_id,),
                    ).fetchone()
                )
                if other is not None:
                    return other
                raise OfferNotFoundError(f"no offer {claim.offer_id!r}")
            conn.execute(
                "INSERT INTO cmi_acceptances (id, offer_id, state, result, created_at,"
                " updated_at, intermediary, acceptance, hold, lease_owner, lease_until)"
                " VALUES (?, ?, 'processing', NULL, ?, ?, ?, ?, NULL, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET state = 'processing', result = NULL,"
                " updated_at = excluded.updated_at, intermediary = excluded.intermediary,"
                " acceptance = excluded.acceptance, hold = NULL,"
                " lease_owner = excluded.lease_owner, lease_until = excluded.lease_until",
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
        return None

    def renew_acceptance(
        self, acceptance_id: str, owner: str, lease_until: float, *, hold: str | None = None
    ) -> bool:
        """Extend ``owner``'s lease and record the hold; False when the lease was lost.

        Committed without waiting for the disk: a power cut's loss leaves the hold
        unrecorded (it expires by itself in the firm's system) and the lease shorter."""
        with self._write(durable=False) as conn:
            return (
                conn.execute(
                    "UPDATE cmi_acceptances SET lease_until = ?, hold = COALESCE(?, hold)"
                    " WHERE id = ? AND state = 'processing' AND lease_owner = ?",
                    (lease_until, hold, acceptance_id, owner),
                ).rowcount
                == 1
            )

    def take_over_acceptance(
        self, acceptance_id: str, owner: str, now: float, lease_until: float
    ) -> bool:
        """Take a ``processing`` acceptance whose lease expired over for ``owner``."""
        with self._write() as conn:
            return (
                conn.execute(
                    "UPDATE cmi_acceptances SET lease_owner = ?, lease_until = ?"
                    " WHERE id = ? AND state = 'processing'"
                    " AND (lease_until IS NULL OR lease_until < ?)",
                    (owner, lease_until, acceptance_id, now),
                ).rowcount
                == 1
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
        """Record the outcome, and for a booking its documents and emission problems, in
        one transaction, while ``owner`` holds the lease; else return the record."""
        with self._write() as conn:
            found = AcceptanceRecord.of_row(
                conn.execute(
                    f"SELECT {_ACCEPTANCE_COLUMNS} FROM cmi_acceptances WHERE id = ?",
                    (acceptance_id,),
                ).fetchone()
            )
            if found is None:
                raise StoreError(f"acceptance {acceptance_id} is not in the store")
            ours = found.state == "processing" and found.lease_owner == owner
            late = state == "booked" and found.state == "released"
            if not (ours or late):
                return found
            if state == "booked":
                holder = conn.execute(
                    "UPDATE cmi_offers SET accepted_by = ? WHERE id = ?"
                    " AND (accepted_by IS NULL OR accepted_by = ?)",
                    (acceptance_id, found.offer_id, acceptance_id),
                ).rowcount
                if holder == 0:  # released, and another acceptance holds the offer now
                    return found
            else:
                conn.execute(
                    "UPDATE cmi_offers SET accepted_by = NULL WHERE id = ? AND accepted_by = ?",
                    (found.offer_id, acceptance_id),
                )
            conn.execute(
                "UPDATE cmi_acceptances SET state = ?, result = ?, updated_at = ?,"
                " lease_owner = NULL, lease_until = NULL WHERE id = ?",
                (state, result, now, acceptance_id),
            )
            conn.executemany(_INSERT, [_params(r) for r in rows])
            conn.executemany(_INSERT_PROBLEM, [p.row() for p in problems])
        return None

    def get_acceptance(self, acceptance_id: str) -> AcceptanceRecord | None:
        """The acceptance with that id, or None."""
        found = self._read(
            f"SELECT {_ACCEPTANCE_COLUMNS} FROM cmi_acceptances WHERE id = ?", (acceptance_id,)
        )
        return AcceptanceRecord.of_row(found[0]) if found else None

    def stalled_acceptances(self, now: float, limit: int = 100) -> list[AcceptanceRecord]:
        """``processing`` acceptances whose lease expired before ``now``, oldest first."""
        found = self._read(
            f"SELECT {_ACCEPTANCE_COLUMNS} FROM cmi_acceptances WHERE state = 'processing'"
            " AND (lease_until IS NULL OR lease_until < ?) ORDER BY created_at, id LIMIT ?",
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
        if connection is not None:
            self._caller(connection).executemany(_INSERT_PROBLEM, params)
            return
        with self._write() as conn:
            conn.executemany(_INSERT_PROBLEM, params)

    def emission_problems(self, *, limit: int = 100) -> list[EmissionProblem]:
        """Emission problems, newest first."""
        found = self._read(
            "SELECT transaction_id, terms_id, customer_ref, standard, reason, created_at,"
            " transaction_json FROM cmi_emission_problems ORDER BY seq DESC LIMIT ?",
            (limit,),
        )
        return [EmissionProblem(*r) for r in found]

    def count_emission_problems(self) -> int:
        """How many emission problems are kept."""
        return int(self._read("SELECT COUNT(*) FROM cmi_emission_problems")[0][0])


_INSERT_PROBLEM = (
    "INSERT INTO cmi_emission_problems (transaction_id, terms_id, customer_ref, standard,"
    " reason, created_at, transaction_json) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
