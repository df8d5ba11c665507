"""The stores tests run against, as fixtures any test folder imports: ``kind`` (each
store: SQLite, and PostgreSQL when ``CMI_TEST_POSTGRES_DSN`` is set, as CI sets it),
``location`` (a SQLite file, or a PostgreSQL schema of the test's own, dropped after),
``store`` (a fresh store, its tables made) and ``other`` (a second store on the same
tables: another process's).

A new store joins every suite that uses these by adding itself to ``KINDS`` and to
:func:`open_store`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmi_sdk.outbox import OutboxStore
from cmi_sdk.outbox.sqlite import SQLiteStore

DSN = os.environ.get("CMI_TEST_POSTGRES_DSN", "")
KINDS = ("sqlite", "postgres")


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """The store under test."""
    kind = str(request.param)
    if kind == "postgres" and not DSN:
        pytest.skip(
            "CMI_TEST_POSTGRES_DSN is not set: the PostgreSQL half of the store tests"
            " needs a server (e.g. postgresql://postgres@127.0.0.1:5432/test)"
        )
    return kind


@contextlib.contextmanager
def postgres_schema(prefix: str = "cmi_test") -> Iterator[str]:
    """A fresh PostgreSQL schema name (the store makes the schema), dropped on exit."""
    schema = f"{prefix}_{secrets.token_hex(5)}"
    try:
        yield schema
    finally:
        import psycopg

        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def location(kind: str, tmp_path: Path) -> Iterator[str]:
    """Where the store's tables live: a SQLite file, or a PostgreSQL schema (dropped)."""
    if kind == "sqlite":
        yield str(tmp_path / "cmi.db")
        return
    with postgres_schema() as schema:
        yield schema


def open_store(kind: str, location: str, *, migrate: bool = True) -> OutboxStore:
    """A store of ``kind`` on the tables at ``location``; ``migrate`` makes them."""
    if kind == "sqlite":
        store = SQLiteStore(location)
        if migrate:
            store.migrate()
        return store
    from cmi_sdk.outbox.postgres import PostgresStore

    return PostgresStore(DSN, schema=location, auto_migrate=migrate)


@pytest.fixture
def store(kind: str, location: str) -> Iterator[OutboxStore]:
    """A fresh store, its tables made."""
    opened = open_store(kind, location)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def other(kind: str, location: str, store: OutboxStore) -> Iterator[OutboxStore]:
    """A second store on ``store``'s tables: another process's."""
    opened = open_store(kind, location, migrate=False)
    try:
        yield opened
    finally:
        opened.close()
