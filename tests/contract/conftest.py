"""The stores the contract suite runs against: each test gets a fresh store and, as
``other``, a second instance on the same tables (another process's).

The fixtures are :mod:`tests.stores`'s: a new store passes the contract by adding itself
to ``KINDS`` and to :func:`~tests.stores.open_store` there. PostgreSQL runs when
``CMI_TEST_POSTGRES_DSN`` is set (CI sets it), each test in a schema of its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cmi_sdk import Adapter
from cmi_sdk.outbox import OutboxStore
from tests.contract.rows import NOW
from tests.fakes import Clock
from tests.support import emitting_adapter


@pytest.fixture
def store_adapter(store: OutboxStore, tmp_path: Path) -> Adapter:
    """An emitting adapter on ``store`` (the firm's side of it), its clock at ``NOW``."""
    return emitting_adapter(tmp_path, store=store, clock=Clock(NOW))
