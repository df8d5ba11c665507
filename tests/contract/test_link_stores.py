"""Service links in both stores: codes, links, the terms a document for an account or an
intermediary's reference goes out under, revocation, and the migration of a store made
before links existed.

The PostgreSQL half runs when ``CMI_TEST_POSTGRES_DSN`` is set, in a schema of its own.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cmi_sdk import Adapter, LinkError, LinkNotFoundError, StoreError
from cmi_sdk.outbox import OutboxStore
from cmi_sdk.outbox.sqlite import SCHEMA_VERSION, SQLiteStore
from tests.contract.legacy import (
    as_legacy_postgres,
    as_legacy_sqlite,
    postgres_versions,
    sqlite_versions,
)
from tests.support import link, register, ticket

DSN = os.environ.get("CMI_TEST_POSTGRES_DSN", "")
SCHEMA = f"cmi_links_{secrets.token_hex(4)}"
ACCOUNT = "acct-0001"
NOW = 1_900_000_000.0


def _drop(schema: str) -> None:
    import psycopg

    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OutboxStore]:
    if request.param == "sqlite":
        lite = SQLiteStore(tmp_path / "cmi.db")
        yield lite
        lite.close()
        return
    if not DSN:
        pytest.skip("CMI_TEST_POSTGRES_DSN is not set")
    from cmi_sdk.outbox.postgres import PostgresStore

    schema = f"{SCHEMA}_{secrets.token_hex(3)}"
    pg = PostgresStore(DSN, schema=schema)
    try:
        yield pg
    finally:
        pg.close()
        _drop(schema)


def _ids(terms: list[Any]) -> set[str]:
    return {t.id for t in terms}


def test_a_code_redeems_once_into_a_link(store: OutboxStore) -> None:
    store.add_link_code("h1", ACCOUNT, created_at=NOW, expires_at=NOW + 600)
    made = store.redeem_link_code(
        "h1", intermediary="acme", link_id="link_1", customer_ref="cus_1abc", now=NOW + 1
    )
    assert made is not None
    assert (made.account, made.intermediary, made.customer_ref) == (ACCOUNT, "acme", "cus_1abc")
    assert store.get_link("link_1") == made
    again = store.redeem_link_code(
        "h1", intermediary="beta", link_id="link_2", customer_ref="cus_2abc", now=NOW + 2
    )
    assert again is None
    store.add_link_code("h2", ACCOUNT, created_at=NOW, expires_at=NOW + 600)
    late = store.redeem_link_code(
        "h2", intermediary="beta", link_id="link_3", customer_ref="cus_3abc", now=NOW + 600
    )
    assert late is None
    unknown = store.redeem_link_code(
        "nope", intermediary="beta", link_id="link_4", customer_ref="cus_4abc", now=NOW
    )
    assert unknown is None
    assert [x.id for x in store.links(include_revoked=True)] == ["link_1"]
    with pytest.raises(LinkNotFoundError):
        store.get_link("link_2")


def test_a_reference_is_unique_per_intermediary_only(store: OutboxStore) -> None:
    for n, intermediary in enumerate(("acme", "beta", "acme")):
        store.add_link_code(f"h{n}", ACCOUNT, created_at=NOW, expires_at=NOW + 600)
        if n < 2:
            store.redeem_link_code(
                f"h{n}", intermediary=intermediary, link_id=f"link_{n}", customer_ref="cus_same",
                now=NOW,
            )  # fmt: skip
    with pytest.raises(StoreError):
        store.redeem_link_code(
            "h2", intermediary="acme", link_id="link_2", customer_ref="cus_same", now=NOW
        )
    # The failed redemption left its code unused: nothing of it was written.
    assert store.redeem_link_code(
        "h2", intermediary="acme", link_id="link_2", customer_ref="cus_other", now=NOW
    )
    assert [x.id for x in store.links(intermediary="acme")] == ["link_0", "link_2"]
    assert [x.id for x in store.links(account=ACCOUNT)] == ["link_0", "link_1", "link_2"]


def test_documents_for_an_account_go_to_its_direct_terms_and_its_links(
    store_adapter: Adapter, store: OutboxStore
) -> None:
    direct = register(store_adapter, customer_ref=ACCOUNT)
    acme = link(store_adapter, ACCOUNT, "acme")
    at_acme = register(store_adapter, customer_ref=acme.customer_ref, intermediary="acme")
    beta_guess = register(store_adapter, customer_ref=acme.customer_ref, intermediary="beta")
    beta_account = register(store_adapter, customer_ref=ACCOUNT, intermediary="beta")
    own = register(store_adapter, customer_ref="pseudo-123", intermediary="acme")
    everyone = {direct.id, at_acme.id}
    assert _ids(store.active_terms(ACCOUNT, NOW)) == everyone
    assert _ids(store.active_terms(acme.customer_ref, NOW, intermediary="acme")) == everyone
    # Unlinked references are their intermediary's own pseudonyms, and nothing more.
    assert _ids(store.active_terms(acme.customer_ref, NOW, intermediary="beta")) == {beta_guess.id}
    assert _ids(store.active_terms(ACCOUNT, NOW, intermediary="beta")) == {beta_account.id}
    assert _ids(store.active_terms("pseudo-123", NOW, intermediary="acme")) == {own.id}
    assert store.active_terms(acme.customer_ref, NOW) == []  # not an account
    store_adapter.revoke_link(acme.id)
    assert _ids(store.active_terms(ACCOUNT, NOW)) == {direct.id}
    assert _ids(store.active_terms(acme.customer_ref, NOW, intermediary="acme")) == set()


def test_revoking_a_link_revokes_its_terms_in_one_step(
    store_adapter: Adapter, store: OutboxStore
) -> None:
    acme = link(store_adapter, ACCOUNT, "acme")
    first = register(store_adapter, customer_ref=acme.customer_ref, intermediary="acme")
    second = register(store_adapter, customer_ref=acme.customer_ref, intermediary="acme")
    kept = register(store_adapter, customer_ref=acme.customer_ref, intermediary="beta")
    emitted = store_adapter.emit(ticket(customer_ref=ACCOUNT))
    assert {e.terms_id for e in emitted} == {first.id, second.id}
    consent = store_adapter._emitter.consent(first, "revoked", store_adapter.now())
    # A caller that read only the first terms: the second is named back as still active.
    cancelled, late = store.revoke_link(acme.id, NOW, [(consent.record, consent.xml)])
    assert (cancelled, late) == (1, [second.id])
    assert store.get_terms(first.id).revoked_at is not None
    assert store.get_terms(kept.id).revoked_at is None
    assert [r.event for r, _ in store.consent_records(first.id)] == ["granted", "revoked"]
    with pytest.raises(LinkError, match="already revoked"):
        store.revoke_link(acme.id, NOW, [])
    with pytest.raises(LinkNotFoundError):
        store.revoke_link("link_nope", NOW, [])


def test_an_sqlite_store_made_before_links_gains_their_tables(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    SQLiteStore(path).close()
    with sqlite3.connect(path) as conn:  # as version 4 left it
        conn.execute("DROP TABLE cmi_links")
        conn.execute("DROP TABLE cmi_link_codes")
        as_legacy_sqlite(conn, 4)
    reopened = SQLiteStore(path)
    reopened.add_link_code("h", ACCOUNT, created_at=NOW, expires_at=NOW + 60)
    assert reopened.redeem_link_code(
        "h", intermediary="acme", link_id="link_1", customer_ref="cus_1abc", now=NOW
    )
    with sqlite3.connect(path) as conn:
        assert sqlite_versions(conn) == list(range(1, SCHEMA_VERSION + 1))
    reopened.close()


@pytest.mark.skipif(not DSN, reason="CMI_TEST_POSTGRES_DSN is not set")
def test_a_postgres_store_made_before_links_gains_their_tables() -> None:
    import psycopg

    from cmi_sdk.outbox.postgres import PostgresStore

    schema = f"{SCHEMA}_old"
    PostgresStore(DSN, schema=schema).close()
    try:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'DROP TABLE "{schema}".links, "{schema}".link_codes')
            as_legacy_postgres(conn, schema, 3)
        pg = PostgresStore(DSN, schema=schema)
        pg.add_link_code("h", ACCOUNT, created_at=NOW, expires_at=NOW + 60)
        assert pg.redeem_link_code(
            "h", intermediary="acme", link_id="link_1", customer_ref="cus_1abc", now=NOW
        )
        with psycopg.connect(DSN, autocommit=True) as conn:
            versions = postgres_versions(conn, schema)
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        pg.close()
    finally:
        _drop(schema)
