"""The whole emission path on PostgreSQL: an adapter on the PostgreSQL store, the outbox row
in the firm's own psycopg transaction, delivery to a real store on loopback, the pull
cursor, and the endpoint with its terms and offers."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cmi_sdk import Adapter, RetrySchedule
from cmi_sdk.client import CMIClient
from cmi_sdk.receiver import CustomerStore
from cmi_sdk.webhooks import generate_secret
from tests.support import emitting_adapter, register, serve_app, ticket

DSN = os.environ.get("CMI_TEST_POSTGRES_DSN", "")
if not DSN:
    pytest.skip(
        "CMI_TEST_POSTGRES_DSN is not set: these tests need a PostgreSQL server"
        " (e.g. CMI_TEST_POSTGRES_DSN=postgresql://postgres@127.0.0.1:5432/test)",
        allow_module_level=True,
    )

import psycopg  # noqa: E402  (only with a server to talk to)

from cmi_sdk.outbox.postgres import PostgresStore  # noqa: E402


@pytest.fixture
def store() -> Iterator[PostgresStore]:
    schema = f"cmi_adapter_{secrets.token_hex(4)}"
    store = PostgresStore(DSN, schema=schema)
    try:
        yield store
    finally:
        store.close()
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def pg_adapter(tmp_path: Path, store: PostgresStore) -> Iterator[Adapter]:
    adapter = emitting_adapter(tmp_path, store=store)
    yield adapter
    adapter.close()


def test_emit_in_the_firms_psycopg_transaction_and_deliver(
    tmp_path: Path, pg_adapter: Adapter, store: PostgresStore
) -> None:
    secret = generate_secret()
    inbox = CustomerStore(directory=tmp_path / "inbox", secrets=[secret])
    with serve_app(inbox.app) as url:
        register(pg_adapter, destination=url + "inbox", secret=secret)
        with psycopg.connect(DSN) as conn:
            conn.execute(f'SET search_path TO "{store.schema}", public')
            conn.execute("CREATE TEMP TABLE sales (id text primary key)")
            conn.execute("INSERT INTO sales VALUES ('DL-1')")
            (emission,) = pg_adapter.emit(ticket(), connection=conn)
            assert pg_adapter.store.rows() == []  # not committed yet
            conn.rollback()
        assert pg_adapter.store.rows() == []  # rolled back with the firm's write
        with psycopg.connect(DSN) as conn:
            (emission,) = pg_adapter.emit(ticket(), connection=conn)
            conn.commit()
        with pg_adapter.delivery_worker(schedule=RetrySchedule(delays=(0,), jitter=0)) as worker:
            assert worker.run_once().delivered == 1
    assert inbox.documents() == [emission.msg_id]
    assert store.get_row(emission.msg_id).state == "delivered"


def test_the_endpoint_on_postgresql(pg_adapter: Adapter) -> None:
    secret = generate_secret()
    pg_adapter.store.add_intermediary("relay", secret, at=time.time())
    terms = register(pg_adapter, when="pull", destination=None)
    pg_adapter.emit_many([ticket(id=f"DL-{i}") for i in range(3)])
    with serve_app(pg_adapter.asgi_app()) as url:
        with CMIClient(url, secret=terms.secret, terms_id=terms.id) as client:
            first = client.documents(limit=2).json()
            assert len(first["documents"]) == 2
            assert first["more"] is True
            rest = client.documents(since=first["next"]).json()
            assert len(rest["documents"]) == 1
            assert rest["more"] is False
        with CMIClient(url, secret=secret, intermediary="relay") as client:
            answer = client.list_terms()
            assert answer.status_code == 200


def test_a_destination_lease_limit_holds_across_workers(pg_adapter: Adapter) -> None:
    register(pg_adapter, destination="http://127.0.0.1:9/inbox")
    pg_adapter.emit_many([ticket(id=f"DL-{i}") for i in range(10)])
    first = pg_adapter.delivery_worker(destination_lease_limit=2)
    second = pg_adapter.delivery_worker(destination_lease_limit=2)
    now = pg_adapter.clock()
    taken = first.store.claim(owner="a", now=now, lease_seconds=30, limit=64, per_destination=2)
    assert len(taken) == 2
    assert (
        second.store.claim(owner="b", now=now, lease_seconds=30, limit=64, per_destination=2) == []
    )
    first.close()
    second.close()
    # Through the worker: each round leases at most the limit for the destination.
    for_worker = httpx.MockTransport(lambda _request: httpx.Response(200))
    with pg_adapter.delivery_worker(destination_lease_limit=3, transport=for_worker) as worker:
        pg_adapter.clock = lambda: now + 60  # past the leases taken above
        worker._clock = pg_adapter.clock
        assert worker.run_round().delivered == 3


def test_a_destination_lease_limit_needs_postgresql(tmp_path: Path) -> None:
    from cmi_sdk import ConfigurationError

    sqlite_adapter = emitting_adapter(tmp_path)
    with pytest.raises(ConfigurationError, match="use the PostgreSQL store"):
        sqlite_adapter.delivery_worker(destination_lease_limit=2)


def test_the_url_selects_schema_and_ordering() -> None:
    from cmi_sdk._adapter import open_store

    schema = f"cmi_url_{secrets.token_hex(4)}"
    store = open_store(f"{DSN}?schema={schema}&ordered_by_customer=1")
    try:
        assert isinstance(store, PostgresStore)
        assert (store.schema, store.ordered_by_customer) == (schema, True)
    finally:
        store.close()  # type: ignore[attr-defined]
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
