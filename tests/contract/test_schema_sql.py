"""The DDL a firm prints for its own migration tool makes the tables each store expects:
a store opened on them finds them current, writes nothing, and works."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

import pytest

from cmi_sdk import ConfigurationError
from cmi_sdk.cli import main
from cmi_sdk.outbox.ddl import schema_sql
from cmi_sdk.outbox.sqlite import SQLiteStore
from tests.contract.rows import new_row
from tests.stores import DSN


def test_sqlite_tables_made_from_the_printed_ddl_are_current(tmp_path: Path) -> None:
    path = tmp_path / "cmi.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(schema_sql("sqlite"))
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    store = SQLiteStore(path)
    before = path.stat().st_mtime_ns
    store.migrate()  # one read: the version recorded is the store's
    assert path.stat().st_mtime_ns == before
    assert store.insert([new_row(1)]) == 1
    assert store.get_row("msg_0001").state == "pending"
    store.close()
    fresh = tmp_path / "fresh.db"
    SQLiteStore(fresh).migrate()
    with sqlite3.connect(fresh) as conn:
        assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master")} == tables
    conn.close()


def test_postgresql_tables_made_from_the_printed_ddl_are_current() -> None:
    if not DSN:
        pytest.skip("CMI_TEST_POSTGRES_DSN is not set: the PostgreSQL DDL needs a server")
    import psycopg

    from cmi_sdk.outbox.postgres import PostgresStore

    schema = f"cmi_ddl_{secrets.token_hex(5)}"
    try:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(schema_sql("postgresql", schema=schema).encode())
        store = PostgresStore(DSN, schema=schema, auto_migrate=False)
        store.migrate()  # finds the version current
        assert store.insert([new_row(1)]) == 1
        assert store.get_row("msg_0001").state == "pending"
        store.close()
    finally:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())


def test_unknown_dialects_and_bad_schema_names_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="unknown dialect"):
        schema_sql("oracle")
    with pytest.raises(ConfigurationError, match="schema must be"):
        schema_sql("postgresql", schema='x"; DROP TABLE y; --')


def test_cmi_db_sql_prints_the_ddl_of_the_configured_database(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CMI_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none?schema=x")
    assert main(["db", "sql", "--schema", "firm_cmi"]) == 0
    assert capsys.readouterr().out == schema_sql("postgresql", schema="firm_cmi")
    assert main(["db", "sql", "--dialect", "sqlite"]) == 0
    assert capsys.readouterr().out == schema_sql("sqlite")
    assert main(["db", "sql", "--dialect", "postgresql", "--schema", "Bad-Name"]) != 0
    assert "schema must be" in capsys.readouterr().err
