"""Several processes opening one new SQLite file at once (``cmi serve --workers 2``, a
worker started beside the endpoint): each waits for the others' setup, none fails."""

from __future__ import annotations

import threading
from pathlib import Path

from cmi_sdk.outbox.sqlite import SQLiteStore


def _open_together(path: Path, count: int) -> tuple[list[SQLiteStore], list[BaseException]]:
    """Open ``count`` stores on ``path`` at once, each from its own thread (and so with its
    own connection, as a process has)."""
    start = threading.Barrier(count)
    errors: list[BaseException] = []
    stores: list[SQLiteStore] = []

    def open_store() -> None:
        start.wait(timeout=10)
        try:
            stores.append(SQLiteStore(path))
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return stores, errors


def test_stores_opening_one_new_file_at_once_all_open(tmp_path: Path) -> None:
    # A new file each round: each round races for the journal mode and the first migration.
    for round_ in range(30):
        stores, errors = _open_together(tmp_path / f"firm-{round_}.db", 4)
        for store in stores:
            store.close()
        assert errors == [], f"round {round_}: {errors!r}"
        assert len(stores) == 4
