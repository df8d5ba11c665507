"""The stores the contract suite runs against: each test gets a fresh store and, as
``other``, a second instance on the same tables (another process's).

A new store passes the contract by adding itself to ``KINDS`` and to :func:`_open`.
PostgreSQL runs when ``CMI_TEST_POSTGRES_DSN`` is set (CI sets it), each test in a schema
of its own.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmi_sdk import Adapter
from cmi_sdk.outbox import OutboxStore
from cmi_sdk.outbox.sqlite import SQLiteStore
from tests.contract.rows import NOW
from tests.fakes import Clock
from tests.support import emitting_adapter

DSN = os.environ.get("CMI_TEST_POSTGRES_DSN", "")
KINDS = ("sqlite", "postgres")


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """The store under test."""
    kind = str(request.param)
    if kind == "postgres" and not DSN:
        pytest.skip(
            "CMI_TEST_POSTGRES_DSN is not set: the PostgreSQL half of the store contract"
            " needs a server (e.g. postgresql://postgres@127.0.0.1:5432/test)"
        )
    return kind


@pytest.fixture
def location(kind: str, tmp_path: Path) -> Iterator[str]:
    """Where the store's tables live: a SQLite file, or a PostgreSQL schema (dropped)."""
    if kind == "sqlite":
        yield str(tmp_path / "cmi.db")
        return
    schema = f"cmi_contract_{secrets.token_hex(5)}"
    try:
        yield schema
    finally:
        import psycopg

        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _open(kind: str, location: str, *, migrate: bool) -> OutboxStore:
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
    opened = _open(kind, location, migrate=True)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def other(kind: str, location: str, store: OutboxStore) -> Iterator[OutboxStore]:
    """A second store on ``store``'s tables: another process's."""
    opened = _open(kind, location, migrate=False)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def store_adapter(store: OutboxStore, tmp_path: Path) -> Adapter:
    """An emitting adapter on ``store`` (the firm's side of it), its clock at ``NOW``."""
    return emitting_adapter(tmp_path, store=store, clock=Clock(NOW))
