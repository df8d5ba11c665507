"""Numbered migrations: one version scheme for both stores, and stores made before it
(SQLite schema version 7, PostgreSQL 6, with their ``meta`` row) upgrade with their rows
kept. The old tables come from the DDL those versions ran (``data/``)."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from cmi_sdk import ConfigurationError
from cmi_sdk.outbox import OutboxStore, RetentionStore
from cmi_sdk.outbox._migrations import SCHEMA_VERSION, migrations, statements
from cmi_sdk.outbox._queries import QueryFileError, parse, queries
from cmi_sdk.outbox.sqlite import SQLiteStore
from cmi_sdk.webhooks import generate_secret
from tests.contract.legacy import postgres_versions, sqlite_versions
from tests.contract.rows import ACCOUNT, NOW, new_row, stored_offer
from tests.fakes import Clock
from tests.stores import DSN
from tests.support import emitting_adapter, register

DATA = Path(__file__).parent / "data"
ALL = list(range(1, SCHEMA_VERSION + 1))

Execute = Callable[[str, Sequence[Any]], None]


def test_both_dialects_number_the_same_migrations() -> None:
    sqlite = [(m.version, m.name) for m in migrations("sqlite")]
    assert sqlite == [(m.version, m.name) for m in migrations("postgres")]
    assert [v for v, _ in sqlite] == ALL


def test_the_query_files_read_whole_with_their_fragments_spliced_in() -> None:
    shared = {"insert_row", "get_row", "rows", "claim", "attempts", "recipients", "list_terms"}
    assert shared <= set(queries("sqlite")) & set(queries("postgres"))
    for text in [*queries("sqlite").values(), *queries("postgres").values()]:
        assert "{" not in text.replace("{s}", "").replace("{channel}", "")


def test_a_malformed_query_file_is_refused() -> None:
    with pytest.raises(QueryFileError, match="one-line comment"):
        parse("-- name: a\nSELECT 1;\n")
    with pytest.raises(QueryFileError, match="named twice"):
        parse("-- name: a\n-- A.\nSELECT 1;\n-- name: a\n-- A.\nSELECT 2;\n")
    with pytest.raises(QueryFileError, match="no fragment"):
        parse("-- name: a\n-- A.\nSELECT {columns} FROM t;\n")
    with pytest.raises(QueryFileError, match="before the first name"):
        parse("SELECT 1;\n")
    assert parse("-- fragment: c\n-- C.\nx, y\n-- name: a\n-- A.\nSELECT {c} FROM t;\n") == {
        "a": "SELECT x, y FROM t"
    }
    assert issubclass(QueryFileError, ValueError)
    assert not issubclass(QueryFileError, ConfigurationError)


def test_migration_statements_split_at_line_ends() -> None:
    script = "-- a comment; not a statement\nCREATE TABLE t (\n  a int\n);\nDROP TABLE t;\n"
    assert statements(script) == ["CREATE TABLE t (\n  a int\n)", "DROP TABLE t"]


@pytest.fixture
def old_store(kind: str, location: str) -> Iterator[tuple[Execute, Callable[[], list[int]]]]:
    """Tables as the last version before numbered migrations made them, and a way to
    write rows into them and read the migrations recorded later."""
    if kind == "sqlite":
        conn = sqlite3.connect(location, isolation_level=None)
        conn.executescript((DATA / "sqlite_v7.sql").read_text())

        def execute_sqlite(sql: str, params: Sequence[Any]) -> None:
            conn.execute(sql.replace("{t}", "cmi_"), params)

        with closing(conn):
            yield execute_sqlite, lambda: sqlite_versions(conn)
        return
    import psycopg

    with psycopg.connect(DSN, autocommit=True) as pg:
        quoted = f'"{location}"'
        pg.execute((DATA / "postgres_v6.sql").read_text().replace("{s}", quoted).encode())

        def execute_postgres(sql: str, params: Sequence[Any]) -> None:
            pg.execute(sql.replace("{t}", f"{quoted}.").replace("?", "%s").encode(), params)

        yield execute_postgres, lambda: postgres_versions(pg, location)


def test_a_store_made_before_numbered_migrations_upgrades_with_its_rows(
    kind: str,
    location: str,
    old_store: tuple[Execute, Callable[[], list[int]]],
    tmp_path: Path,
) -> None:
    execute, versions = old_store
    scratch = emitting_adapter(tmp_path / "scratch", clock=Clock(NOW))
    terms = register(scratch, customer_ref=ACCOUNT)
    [(record, xml)] = scratch.store.consent_records(terms.id)
    scratch.close()
    execute(
        "INSERT INTO {t}terms (id, customer_ref, intermediary, terms, secret, created_at)"
        " VALUES (?, ?, NULL, ?, ?, ?)",
        (
            terms.id,
            ACCOUNT,
            json.dumps(terms.public_dict()),
            terms.secret,
            terms.created_at.timestamp(),
        ),
    )
    execute(
        "INSERT INTO {t}consent (id, terms_id, event, issued_at, record, xml)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (record.id, terms.id, record.event, NOW, record.model_dump_json(), xml),
    )
    row = new_row(1, terms_id=terms.id)
    execute(
        "INSERT INTO {t}outbox (msg_id, terms_id, customer_ref, transaction_id, standard,"
        " document_type, destination, body, created_at, state, next_attempt_at, attempts,"
        " last_status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'retry', ?, 1, 503)",
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
            NOW + 60,
        ),
    )
    execute(
        "INSERT INTO {t}attempts (msg_id, attempt, owner, started_at, finished_at, outcome,"
        " status, next_attempt_at) VALUES (?, 1, 'w1', ?, ?, 'retry', 503, ?)",
        (row.msg_id, NOW, NOW + 1, NOW + 60),
    )
    execute(
        "INSERT INTO {t}links (id, account, intermediary, customer_ref, created_at)"
        " VALUES ('link_1', ?, 'acme', 'cus_1abc', ?)",
        (ACCOUNT, NOW),
    )
    secret = generate_secret()
    execute(
        "INSERT INTO {t}intermediaries (name, secrets, created_at, generation)"
        " VALUES ('acme', ?, ?, 1)",
        (json.dumps([secret]), NOW),
    )
    execute(
        "INSERT INTO {t}destinations (url, disabled_at, reason) VALUES (?, ?, 'gone')",
        ("https://gone.example/inbox", NOW),
    )
    offer = stored_offer()
    execute(
        "INSERT INTO {t}offers (id, request_id, customer_ref, intermediary, offer, request,"
        " xml, valid_until, created_at, accepted_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'acc_1')",
        (
            offer.offer.id,
            offer.offer.request_id,
            offer.offer.customer_ref,
            offer.intermediary,
            offer.offer.model_dump_json(),
            offer.request.model_dump_json(),
            offer.xml,
            NOW + 600,
            NOW,
        ),
    )
    execute(
        "INSERT INTO {t}acceptances (id, offer_id, state, result, created_at, updated_at)"
        " VALUES ('acc_1', ?, 'booked', '{}', ?, ?)",
        (offer.offer.id, NOW, NOW),
    )
    execute(
        "INSERT INTO {t}seen (party, msg_id, expires_at) VALUES ('acme', 'm-1', ?)",
        (NOW + 300,),
    )
    execute(
        "INSERT INTO {t}emission_problems (transaction_id, terms_id, customer_ref, standard,"
        " reason, created_at, transaction_json) VALUES ('tx-9', ?, ?, 'cmi', 'invalid', ?, '{}')",
        (terms.id, ACCOUNT, NOW),
    )

    store = _open(kind, location)
    try:
        assert versions() == ALL
        assert store.get_terms(terms.id) == terms
        assert store.consent_records(terms.id) == [(record, xml)]
        kept = store.get_row(row.msg_id)
        assert (kept.state, kept.attempts, kept.body) == ("retry", 1, row.body)
        assert [a.outcome for a in store.attempts(row.msg_id)] == ["retry"]
        assert store.get_link("link_1").account == ACCOUNT
        assert store.intermediary_secrets("acme", now=NOW) == (secret,)
        assert store.disabled_destinations() == {"https://gone.example/inbox": "gone"}
        assert store.get_offer(offer.offer.id) == offer
        acceptance = store.get_acceptance("acc_1")
        assert acceptance is not None
        assert acceptance.state == "booked"
        assert store.message_seen("acme", "m-1", now=NOW)
        assert [p.transaction_id for p in store.emission_problems()] == ["tx-9"]
        # The store works on as a new one would.
        assert store.insert([new_row(2, terms_id=terms.id)]) == 1
        store.migrate()  # current: nothing to do
        assert versions() == ALL
    finally:
        store.close()


def test_the_legacy_version_table_is_gone_after_the_upgrade(
    kind: str, location: str, old_store: tuple[Execute, Callable[[], list[int]]]
) -> None:
    execute, versions = old_store
    _open(kind, location).close()
    assert versions() == ALL
    with pytest.raises(Exception, match="meta"):
        execute("SELECT value FROM {t}meta", ())


def test_a_migration_that_fails_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "cmi.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.executescript((DATA / "sqlite_v7.sql").read_text())
        # A firm's own object in the way of migration 1's bookkeeping.
        conn.execute("CREATE VIEW cmi_migrations AS SELECT 1 AS version")
    with pytest.raises(Exception, match="cannot create the tables"):
        SQLiteStore(path)
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT value FROM cmi_meta").fetchone() == ("7",)


@pytest.fixture
def store_at_6(kind: str, location: str) -> Iterator[Execute]:
    """Tables as migrations 1 to 6 made them, and a way to write rows into them."""
    if kind == "sqlite":
        conn = sqlite3.connect(location, isolation_level=None)
        with closing(conn):
            conn.execute(queries("sqlite")["create_migrations_table"])
            for m in migrations("sqlite")[:6]:
                for statement in statements(m.script):
                    conn.execute(statement)
                conn.execute(queries("sqlite")["record_migration"], (m.version, m.name, NOW))

            def execute_sqlite(sql: str, params: Sequence[Any]) -> None:
                conn.execute(sql.replace("{t}", "cmi_"), params)

            yield execute_sqlite
        return
    import psycopg

    with psycopg.connect(DSN, autocommit=True) as pg:
        quoted = f'"{location}"'
        q = {name: text.replace("{s}", quoted) for name, text in queries("postgres").items()}
        pg.execute(q["create_schema"].encode())
        pg.execute(q["create_migrations_table"].encode())
        for m in migrations("postgres")[:6]:
            pg.execute(m.script.replace("{s}", quoted).encode())
            pg.execute(q["record_migration"].encode(), (m.version, m.name, NOW))

        def execute_postgres(sql: str, params: Sequence[Any]) -> None:
            pg.execute(sql.replace("{t}", f"{quoted}.").replace("?", "%s").encode(), params)

        yield execute_postgres


def test_rows_cancelled_or_merged_before_migration_7_go_after_their_window(
    kind: str, location: str, store_at_6: Execute
) -> None:
    # Until migration 7 a row did not record when it was cancelled or merged: a
    # cancelled row's time is its terms' revocation (else when it was written), a merged
    # row's the end of its digest window (it was merged as that window ended).
    execute = store_at_6
    execute(
        "INSERT INTO {t}terms (id, customer_ref, terms, secret, created_at, revoked_at)"
        " VALUES ('terms_r', ?, '{}', 's', ?, ?)",
        (ACCOUNT, NOW, NOW + 50),
    )
    for n, terms_id, state, created_at, due in (
        (1, "terms_r", "cancelled", NOW, NOW),
        (2, "terms_gone", "cancelled", NOW + 10, NOW + 10),
        (3, "terms_r", "merged", NOW, NOW + 60),
        (4, "terms_r", "pending", NOW, NOW),
    ):
        execute(
            "INSERT INTO {t}outbox (msg_id, terms_id, customer_ref, transaction_id, standard,"
            " document_type, body, created_at, state, next_attempt_at)"
            " VALUES (?, ?, ?, ?, 'cmi', 'transaction', ?, ?, ?, ?)",
            (f"msg_{n:04d}", terms_id, ACCOUNT, f"tx-{n}", b"<doc/>", created_at, state, due),
        )
    store = _open(kind, location)
    try:
        assert isinstance(store, RetentionStore)
        for before, cancelled in ((NOW + 10, 0), (NOW + 11, 1), (NOW + 50, 1), (NOW + 51, 2)):
            assert store.purgeable(cancelled_before=before)["cancelled"] == cancelled, before
        assert store.purgeable(merged_before=NOW + 60)["merged"] == 0
        assert store.purgeable(merged_before=NOW + 61)["merged"] == 1
        done = store.purge(cancelled_before=NOW + 51, merged_before=NOW + 61, limit=10)
        assert (done["cancelled"], done["merged"]) == (2, 1)
        assert [r.msg_id for r in store.rows()] == ["msg_0004"]
    finally:
        store.close()


def _open(kind: str, location: str) -> OutboxStore:
    if kind == "sqlite":
        return SQLiteStore(location)
    from cmi_sdk.outbox.postgres import PostgresStore

    return PostgresStore(DSN, schema=location)


def test_every_statement_the_stores_call_by_name_is_in_their_query_file() -> None:
    """A name misspelled in a path the other tests do not take fails here, not in a firm's
    process."""
    outbox = Path(__file__).resolve().parents[2] / "cmi_sdk" / "outbox"
    by_run = r'\brun(?:\.many)?\(\s*"(\w+)"'
    shared = _names(outbox / "_base.py", by_run)
    shared |= _names(outbox / "_base.py", r'_(?:fetch|filtered)\(\s*"[^"]+",\s*"(\w+)"')
    shared |= _names(outbox / "_base.py", r'\("(\w+)", params\.\w+\)')  # outcomes
    called = {
        "sqlite": _names(outbox / "sqlite.py", r'_Q\["(\w+)"\]')
        | _names(outbox / "sqlite.py", by_run),
        "postgres": _names(outbox / "postgres.py", r'\bq\["(\w+)"\]|_q\["(\w+)"\]')
        | _names(outbox / "postgres.py", by_run)
        | _names(outbox / "postgres.py", r'_read\(\s*"[^"]+",\s*"(\w+)"'),
    }
    assert {"mark_dead", "recipients", "list_links", "insert_offer"} <= shared
    assert {"claim", "insert_row"} <= called["sqlite"] & called["postgres"]
    for dialect, names in called.items():
        missing = (names | shared) - set(queries(dialect))
        assert not missing, f"{dialect}: {sorted(missing)}"


def _names(path: Path, pattern: str) -> set[str]:
    found = re.findall(pattern, path.read_text())
    return {n for match in found for n in ([match] if isinstance(match, str) else match) if n}
