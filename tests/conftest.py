"""Shared fixtures, the hypothesis profiles (HYPOTHESIS_PROFILE=ci in CI), and the rule that
keeps the PostgreSQL tests on one worker process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from cmi_sdk import Adapter, Transaction, load_model

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
# Quick feedback on a developer's machine; CI draws 200 examples of each.
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

ROOT = Path(__file__).resolve().parent.parent

# The stores' fixtures (kind, location, store, other), for every folder.
pytest_plugins = ["tests.stores"]


@pytest.fixture(scope="session")
def default_adapter() -> Adapter:
    """The default adapter: default and entry-point plugins (immutable once built)."""
    return Adapter()


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return ROOT / "examples"


@pytest.fixture(scope="session")
def ticket_xml(default_adapter: Adapter, examples_dir: Path) -> bytes:
    """The seed's ticket (examples/ticket.json) as cmi-ticket XML, unsigned."""
    tx = load_model(Transaction, (examples_dir / "ticket.json").read_text())
    return default_adapter.render(tx, standard="cmi-ticket")


# The PostgreSQL store's pull cursor holds back rows newer than the oldest transaction open
# anywhere on the server, so a test that emits and then pulls would wait on another worker's
# open transaction. Under pytest-xdist the PostgreSQL tests therefore run one after another on
# one worker, beside the rest. A PostgreSQL test says so in its id (the store kinds are
# parameters named "postgres") or lives in one of these modules.
POSTGRES_MODULES = frozenset(
    {
        "test_postgres_store",
        "test_postgres_adapter",
        "test_schema_sql",
        "test_migrations",
        "test_fault_injection",
    }
)


def uses_postgres(nodeid: str) -> bool:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
    return "postgres" in nodeid.lower() or module in POSTGRES_MODULES


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's load scheduling, with every PostgreSQL test in one unit of work. (Its own
    ``--dist loadgroup`` renames the tests' ids, which this pytest no longer lets it do.)"""
    from xdist.scheduler import LoadScopeScheduling

    class PostgresTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "postgres" if uses_postgres(nodeid) else nodeid

    return PostgresTogether(config, log)
