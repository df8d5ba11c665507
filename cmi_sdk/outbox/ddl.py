"""The statements that create a store's tables, for a firm that runs its own migration
tool (Alembic, Flyway, Liquibase ...) instead of letting the store create them.

The script is the store's numbered migrations (``sql/<dialect>/migrations/``), the ones
its ``migrate()`` applies, each followed by the row that records it in the migrations
table: a store opened on tables made this way finds them current and writes nothing.
Open the PostgreSQL store with ``auto_migrate=False`` where the application's role may
not create tables.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

from cmi_sdk._exceptions import ConfigurationError
from cmi_sdk.outbox._migrations import migrations, statements
from cmi_sdk.outbox._queries import queries

__all__ = ["DIALECTS", "SCHEMA_NAME", "schema_sql"]

Dialect = Literal["sqlite", "postgresql"]
DIALECTS: tuple[Dialect, ...] = ("sqlite", "postgresql")

SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,55}")
"""The PostgreSQL schema names a store takes: ``<schema>_outbox`` fits a channel name."""

# When a migration was recorded, in the printed script: the time it runs.
_NOW = {
    "sqlite": "(julianday('now') - 2440587.5) * 86400.0",
    "postgres": "extract(epoch FROM clock_timestamp())",
}


def schema_sql(dialect: str, *, schema: str = "cmi") -> str:
    """The DDL of the store for ``dialect`` at its current schema version, as one script.

    :param dialect: ``sqlite`` or ``postgresql``.
    :param schema: for PostgreSQL, the schema the tables go in (the store's ``schema``).
    :raises ConfigurationError: an unknown dialect, or a schema name the store refuses.
    """
    if dialect == "sqlite":
        return _script("sqlite", lambda text: text)
    if dialect == "postgresql":
        if not SCHEMA_NAME.fullmatch(schema):
            raise ConfigurationError(
                f"schema must be 1 to 56 lower-case letters, digits or _ (not starting with"
                f" a digit), not {schema!r}"
            )
        quoted = f'"{schema}"'
        return _script("postgres", lambda text: text.replace("{s}", quoted))
    raise ConfigurationError(f"unknown dialect {dialect!r}: expected one of {', '.join(DIALECTS)}")


def _script(dialect: Literal["sqlite", "postgres"], place: Callable[[str], str]) -> str:
    named = queries(dialect)
    setup = [named[q] for q in ("create_schema", "create_migrations_table") if q in named]
    out = [f"{place(statement)};\n" for statement in setup]
    table = "cmi_migrations" if dialect == "sqlite" else "{s}.migrations"
    for migration in migrations(dialect):
        out.append(f"-- migration {migration.version}: {migration.name}\n")
        out.extend(f"{place(statement)};\n" for statement in statements(migration.script))
        # Versions and names are the package's own constants (checked file names).
        record = (
            f"INSERT INTO {table} (version, name, applied_at)"  # noqa: S608
            f" VALUES ({migration.version}, '{migration.name}', {_NOW[dialect]})"
        )
        out.append(f"{place(record)};\n")
    return "".join(out)
