"""Named queries: the bundled stores' SQL, one file a dialect, looked up by name.

``sql/<dialect>/queries.sql`` holds every statement of a store, each under a line
``-- name: <name>`` and a one-line comment that says what it does. A block under
``-- fragment: <name>`` is a piece of SQL (a column list, a condition) that statements
include as ``{name}``; it is spliced in when the file is read, so every statement is
complete SQL afterwards. Placeholders the store fills in itself (the PostgreSQL schema,
``{s}``) stay as they are. Only constant SQL is spliced: values are always bound.

The files are read once a process, on first use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from importlib.resources import files
from typing import Literal

__all__ = ["QueryFileError", "filtered", "parse", "queries", "sql_file"]

Dialect = Literal["sqlite", "postgres"]

_HEADER = re.compile(r"--\s*(name|fragment):\s*(\S+)\s*$")
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_SPLICE = re.compile(r"\{([a-z][a-z0-9_]*)\}")


class QueryFileError(ValueError):
    """A query file is malformed: a statement without a name or comment, a name given
    twice, or a ``{part}`` that no fragment defines."""


def sql_file(dialect: Dialect, *parts: str) -> str:
    """The text of a file under ``sql/<dialect>/`` in the package."""
    return files("cmi_sdk.outbox").joinpath("sql", dialect, *parts).read_text("utf-8")


@cache
def queries(dialect: Dialect) -> Mapping[str, str]:
    """The statements of ``dialect`` by name (read once)."""
    placeholders = {"s", "channel"} if dialect == "postgres" else set()
    return parse(sql_file(dialect, "queries.sql"), keep=placeholders)


def parse(text: str, *, keep: Iterable[str] = ()) -> dict[str, str]:
    """The named statements of a query file, fragments spliced in.

    :param keep: ``{placeholders}`` left for the store to fill in.
    :raises QueryFileError: the file breaks one of the rules above.
    """
    blocks: list[tuple[str, str, list[str]]] = []  # kind, name, lines
    lines = text.splitlines()
    for number, line in enumerate(lines):
        header = _HEADER.fullmatch(line.strip())
        if header is not None:
            kind, name = header.groups()
            if not _NAME.fullmatch(name):
                raise QueryFileError(f"line {number + 1}: {name!r} is not a query name")
            following = lines[number + 1].strip() if number + 1 < len(lines) else ""
            if not following.startswith("--") or _HEADER.fullmatch(following):
                raise QueryFileError(f"line {number + 1}: {name} needs a one-line comment")
            blocks.append((kind, name, []))
        elif line.strip().startswith("--") or not line.strip():
            continue
        elif not blocks:
            raise QueryFileError(f"line {number + 1}: SQL before the first name")
        else:
            blocks[-1][2].append(line.rstrip())
    fragments: dict[str, str] = {}
    statements: dict[str, str] = {}
    for kind, name, body in blocks:
        text = "\n".join(body).strip().removesuffix(";").strip()
        if not text:
            raise QueryFileError(f"{name} has no SQL")
        if name in fragments or name in statements:
            raise QueryFileError(f"{name} is named twice")
        (fragments if kind == "fragment" else statements)[name] = text
    kept = frozenset(keep)
    return {name: _splice(text, fragments, kept, name) for name, text in statements.items()}


def _splice(text: str, fragments: Mapping[str, str], keep: frozenset[str], name: str) -> str:
    for _ in range(8):  # fragments may include fragments, a few levels deep at most
        missing = {m for m in _SPLICE.findall(text) if m not in fragments and m not in keep}
        if missing:
            raise QueryFileError(f"{name} includes {sorted(missing)}, which no fragment defines")
        spliced = _SPLICE.sub(
            lambda m: fragments.get(m.group(1), m.group(0)),
            text,
        )
        if spliced == text:
            return text
        text = spliced
    raise QueryFileError(f"{name}: fragments include each other in a loop")


def filtered(
    base: str,
    marker: str,
    equal: Sequence[tuple[str, object | None]],
    *,
    include_revoked: bool,
) -> tuple[str, list[object]]:
    """``base`` (a ``SELECT`` without ``WHERE``) with a condition a column for each
    ``(column, value)`` of ``equal`` whose value is given, the revoked rows left out
    unless asked for, oldest first; and its parameters.

    :param marker: the dialect's parameter marker (``?`` or ``%s``).
    """
    where: list[str] = []
    params: list[object] = []
    for column, value in equal:
        if value is not None:
            where.append(f"{column} = {marker}")  # a constant column name, never input
            params.append(value)
    if not include_revoked:
        where.append("revoked_at IS NULL")
    condition = f" WHERE {' AND '.join(where)}" if where else ""
    return f"{base}{condition} ORDER BY created_at, id", params
