"""Stores as versions before numbered migrations left them: a ``meta`` table with one
``schema_version`` row instead of the migrations table."""

from __future__ import annotations

import sqlite3
from typing import Any


def as_legacy_sqlite(conn: sqlite3.Connection, version: int) -> None:
    """Turn a current SQLite store's version record into the old one, at ``version``."""
    conn.execute("DROP TABLE cmi_migrations")
    conn.execute("CREATE TABLE cmi_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO cmi_meta VALUES ('schema_version', ?)", (str(version),))


def as_legacy_postgres(conn: Any, schema: str, version: int) -> None:
    """Turn a current PostgreSQL store's version record into the old one, at ``version``."""
    conn.execute(f'DROP TABLE "{schema}".migrations')
    conn.execute(f'CREATE TABLE "{schema}".meta (key text PRIMARY KEY, value text NOT NULL)')
    conn.execute(
        f"INSERT INTO \"{schema}\".meta VALUES ('schema_version', %s)",  # noqa: S608
        (str(version),),
    )


def sqlite_versions(conn: sqlite3.Connection) -> list[int]:
    """The migrations recorded in a SQLite store, in order."""
    return [r[0] for r in conn.execute("SELECT version FROM cmi_migrations ORDER BY version")]


def postgres_versions(conn: Any, schema: str) -> list[int]:
    """The migrations recorded in a PostgreSQL store, in order."""
    rows = conn.execute(f'SELECT version FROM "{schema}".migrations ORDER BY version')  # noqa: S608
    return [r[0] for r in rows]
