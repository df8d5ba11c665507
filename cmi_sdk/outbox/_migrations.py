"""Numbered migrations, one version scheme for both bundled stores.

Each dialect has the files ``sql/<dialect>/migrations/NNNN_name.sql``; a number means
the same change in both dialects. A store records each migration it applied as a row
``(version, name, applied_at)`` of its migrations table (``cmi_migrations`` in SQLite,
``<schema>.migrations`` in PostgreSQL), and ``migrate()`` applies the missing ones in
order, in one transaction.

Stores made before migrations were numbered kept one row ``schema_version`` in a ``meta``
table (SQLite up to 7, PostgreSQL up to 6). Migrations 1 to 4 change nothing where their
change is there already, so such a store runs them all, and its ``meta`` table is dropped
in the same transaction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from cmi_sdk.outbox._queries import Dialect, QueryFileError, sql_file

__all__ = ["SCHEMA_VERSION", "Migration", "migrations", "pending", "statements"]

SCHEMA_VERSION = 8
"""The number of the last migration: the version of the tables this SDK makes."""

_FILE = re.compile(r"(\d{4})_([a-z][a-z0-9_]*)\.sql")


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered change of a store's tables."""

    version: int
    name: str
    script: str
    """The statements, ``;``-separated; PostgreSQL's name their schema ``{s}``."""


@cache
def migrations(dialect: Dialect) -> tuple[Migration, ...]:
    """The migrations of ``dialect``, in order (read once).

    :raises QueryFileError: the files are not numbered 1 to :data:`SCHEMA_VERSION`.
    """
    folder = files("cmi_sdk.outbox").joinpath("sql", dialect, "migrations")
    found: list[Migration] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        match = _FILE.fullmatch(entry.name)
        if match is None:
            continue
        number, name = match.groups()
        script = sql_file(dialect, "migrations", entry.name)
        found.append(Migration(int(number), name, script))
    if [m.version for m in found] != list(range(1, SCHEMA_VERSION + 1)):
        raise QueryFileError(
            f"the {dialect} migrations are numbered {[m.version for m in found]},"
            f" not 1 to {SCHEMA_VERSION}"
        )
    return tuple(found)


def pending(dialect: Dialect, current: int) -> tuple[Migration, ...]:
    """The migrations a store at version ``current`` lacks, in order."""
    return tuple(m for m in migrations(dialect) if m.version > current)


def statements(script: str) -> list[str]:
    """The statements of a migration, comment lines left out, one by one (for drivers
    that run a statement a call). A statement ends with ``;`` at the end of a line."""
    found: list[str] = []
    current: list[str] = []
    for line in script.splitlines():
        if line.strip().startswith("--") or not line.strip():
            continue
        current.append(line.rstrip())
        if line.rstrip().endswith(";"):
            found.append("\n".join(current).removesuffix(";"))
            current = []
    if current:
        found.append("\n".join(current))
    return found
