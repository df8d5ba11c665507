"""The store contract's roles, its declared capabilities, and who closes a store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cmi_sdk import Adapter, ConfigurationError
from cmi_sdk.outbox import (
    DestinationStore,
    EmissionProblemStore,
    IntermediaryStore,
    LinkStore,
    OfferStore,
    OutboxQueue,
    OutboxStore,
    ReplayCache,
    TermsStore,
)
from cmi_sdk.outbox.sqlite import SQLiteStore

ROLES = (
    TermsStore,
    LinkStore,
    OutboxQueue,
    DestinationStore,
    IntermediaryStore,
    ReplayCache,
    OfferStore,
    EmissionProblemStore,
)


def _connection(store: OutboxStore) -> sqlite3.Connection | None:
    """The calling thread's open SQLite connection, if any."""
    assert isinstance(store, SQLiteStore)
    conn: sqlite3.Connection | None = getattr(store._local, "conn", None)
    return conn


def test_the_store_is_the_union_of_the_roles(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "cmi.db")
    for role in ROLES:
        assert role in OutboxStore.__mro__
        assert isinstance(store, role)
    # Every method of the union comes from one role, or is the store's own lifecycle.
    own = {"migrate", "close", "nonblocking"}
    members = {name for name in vars(OutboxStore) if not name.startswith("_")}
    assert members - {"__doc__"} <= own


def test_capabilities_are_declared_not_probed(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "cmi.db")
    assert store.nonblocking is True
    assert store.limits_per_destination is False
    assert store.notifies_work is False
    assert store.remembers_with_offers is True
    assert store.wait_for_work(5.0) is False  # the default: no waiting at all


def test_sqlite_refuses_a_per_destination_claim(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "cmi.db")
    store.migrate()
    with pytest.raises(ConfigurationError, match="per destination"):
        store.claim(owner="w", now=0.0, lease_seconds=30, limit=5, per_destination=2)
    adapter = Adapter(store=store, entry_points=False)
    with pytest.raises(ConfigurationError, match="per destination"):
        adapter.delivery_worker(destination_lease_limit=2)


def test_close_closes_the_store_the_adapter_opened(tmp_path: Path) -> None:
    adapter = Adapter(database_url=f"sqlite:///{tmp_path / 'cmi.db'}", entry_points=False)
    assert adapter.list_terms() == []  # opens the store and this thread's connection
    assert _connection(adapter.store) is not None
    adapter.close()
    assert _connection(adapter.store) is None


def test_close_leaves_a_store_the_caller_passed_open(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "cmi.db")
    adapter = Adapter(store=store, entry_points=False)
    assert adapter.list_terms() == []
    opened = _connection(store)
    assert opened is not None
    adapter.close()
    assert _connection(store) is opened
    assert opened.execute("SELECT 1").fetchone() == (1,)  # still usable: not closed
    store.close()
