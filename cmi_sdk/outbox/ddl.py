"""The statements that create a store's tables, for a firm that runs its own migration
tool (Alembic, Flyway, Liquibase ...) instead of letting the store create them.

The statements are the ones the store's ``migrate()`` runs, read from the store's module
(the one place each dialect's DDL lives), followed by the row that records the schema
version: a store opened on tables made this way finds them current and writes nothing.
Open the PostgreSQL store with ``auto_migrate=False`` where the application's role may
not create tables.
"""

from __future__ import annotations

from typing import Literal

from cmi_sdk._exceptions import ConfigurationError

__all__ = ["DIALECTS", "schema_sql"]

Dialect = Literal["sqlite", "postgresql"]
DIALECTS: tuple[Dialect, ...] = ("sqlite", "postgresql")


def schema_sql(dialect: str, *, schema: str = "cmi") -> str:
    """The DDL of the store for ``dialect`` at its current schema version, as one script.

    :param dialect: ``sqlite`` or ``postgresql``.
    :param schema: for PostgreSQL, the schema the tables go in (the store's ``schema``).
    :raises ConfigurationError: an unknown dialect, or a schema name the store refuses.
    """
    if dialect == "sqlite":
        from cmi_sdk.outbox import sqlite  # noqa: PLC0415

        body = sqlite._SCHEMA.strip().rstrip(";")
        # The version is the module's integer constant, not input: no value to bind.
        record = f"INSERT OR REPLACE INTO cmi_meta (key, value) VALUES ('schema_version', '{sqlite.SCHEMA_VERSION}')"  # noqa: E501, S608
        return f"{body};\n{record};\n"
    if dialect == "postgresql":
        # Imported here: the PostgreSQL store needs psycopg, an optional extra.
        from cmi_sdk.outbox import postgres  # noqa: PLC0415

        if not postgres._SCHEMA_NAME.fullmatch(schema):
            raise ConfigurationError(
                f"schema must be 1 to 56 lower-case letters, digits or _ (not starting with"
                f" a digit), not {schema!r}"
            )
        quoted = f'"{schema}"'
        body = postgres._DDL.strip().rstrip(";").replace("{s}", quoted)
        return (
            f"{body};\n"
            f"INSERT INTO {quoted}.meta (key, value)"
            f" VALUES ('schema_version', '{postgres.SCHEMA_VERSION}')"
            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;\n"
        )
    raise ConfigurationError(f"unknown dialect {dialect!r}: expected one of {', '.join(DIALECTS)}")
