"""Attacks on the endpoint's link, terms and offer routes found by review.

Each test sends what an adversary with a registered intermediary's secret can send, on
both stores, and checks that the answer is a clear 4xx problem and that nothing changed:
never a 500 with a traceback in the firm's logs.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from cmi_sdk import Adapter, Link, SharingTerms
from cmi_sdk.client import signed_headers
from cmi_sdk.outbox import Intermediary, OutboxStore
from cmi_sdk.outbox.sqlite import SQLiteStore
from cmi_sdk.testing import link_customer
from cmi_sdk.webhooks import generate_secret
from tests.fakes import Clock
from tests.support import emitting_adapter, register, ticket

with warnings.catch_warnings():
    # Starlette 1.x would rather its test client ran on httpx2; the SDK depends on httpx.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

DSN = os.environ.get("CMI_TEST_POSTGRES_DSN", "")
SECRET = generate_secret()


@pytest.fixture(params=["sqlite", "postgres"])
def relay_adapter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Adapter]:
    store: OutboxStore
    schema = f"cmi_review_{secrets.token_hex(4)}"
    if request.param == "sqlite":
        store = SQLiteStore(tmp_path / "cmi.db")
    else:
        if not DSN:
            pytest.skip("CMI_TEST_POSTGRES_DSN is not set")
        from cmi_sdk.outbox.postgres import PostgresStore

        store = PostgresStore(DSN, schema=schema)
    adapter = emitting_adapter(tmp_path, store=store)
    adapter.add_intermediary("relay", SECRET)
    try:
        yield adapter
    finally:
        adapter.close()
        store.close()  # type: ignore[attr-defined]
        if request.param == "postgres":
            import psycopg

            with psycopg.connect(DSN, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _send(
    client: TestClient, method: str, target: str, body: bytes = b"", *, signed: str | None = None
) -> tuple[int, dict[str, object]]:
    """A request signed by the registered intermediary; ``signed`` is the target as the
    endpoint reads it (the decoded path), when it differs from what goes on the wire."""
    headers = signed_headers(
        secret=SECRET, method=method, target=signed or target, intermediary="relay", body=body
    )
    headers["content-type"] = "application/json"
    response = client.request(method, target, content=body, headers=headers)
    return response.status_code, response.json()


def test_a_link_code_nested_past_the_json_decoders_depth_gets_a_problem(
    relay_adapter: Adapter, caplog: pytest.LogCaptureFixture
) -> None:
    """``POST /cmi/links`` with ``[[[[...`` used to end in the JSON decoder's
    RecursionError: a 500 and a traceback for a 60 kB body."""
    with TestClient(relay_adapter.asgi_app(), raise_server_exceptions=False) as client:
        for body in (b"[" * 60_000, b'{"code": ' + b"[" * 60_000):
            status, problem = _send(client, "POST", "/cmi/links", body)
            assert (status, problem["type"]) == (422, "urn:cmi:problem:invalid-input")
    assert not [r for r in caplog.records if r.exc_info]
    assert relay_adapter.links(include_revoked=True) == []


# Ids as the endpoint reads them (percent-decoded): a NUL, which PostgreSQL cannot hold in
# text and used to make its driver fail; an id longer than any the firm hands out; spaces.
BAD_IDS = ["\x00", "terms_\x00", "x" * 300, "a b", "é"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_an_id_no_store_could_hold_is_answered_as_a_missing_one(
    relay_adapter: Adapter, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every route taking an id or a reference answers an impossible one as it answers
    a missing one (404), or as invalid input (the ``customer`` filter), never 500."""
    from urllib.parse import quote

    wire = quote(bad, safe="")
    routes = [
        ("GET", f"/cmi/terms/{wire}", f"/cmi/terms/{bad}", 404),
        ("DELETE", f"/cmi/terms/{wire}", f"/cmi/terms/{bad}", 404),
        ("DELETE", f"/cmi/links/{wire}", f"/cmi/links/{bad}", 404),
        ("GET", f"/cmi/offers/{wire}", f"/cmi/offers/{bad}", 404),
        ("POST", f"/cmi/offers/{wire}/acceptance", f"/cmi/offers/{bad}/acceptance", 404),
        ("GET", f"/cmi/documents?terms={wire}", None, 404),
        ("GET", f"/cmi/terms?customer={wire}", None, 422),
    ]
    with TestClient(relay_adapter.asgi_app(), raise_server_exceptions=False) as client:
        for method, target, signed, wanted in routes:
            status, problem = _send(client, method, target, signed=signed)
            assert status == wanted, (method, target, problem)
            assert str(problem["type"]).startswith("urn:cmi:problem:")
    assert not [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info]


def test_a_revoked_intermediary_cannot_pull_with_the_terms_secrets_it_chose(
    relay_adapter: Adapter,
) -> None:
    """An intermediary chooses the secret of the terms it registers, so it holds every
    one of them. Revoking it used to leave that door open: signing as ``cmi-terms`` with
    a terms secret, it kept pulling its linked customers' documents, and its push terms
    kept getting them. Its links and terms are now revoked with it (signed consent
    records), and stay so when it is registered anew."""
    account = "acct-alice-0001"
    link = link_customer(relay_adapter, account, "relay")
    terms_secret = generate_secret()
    pull_terms = register(
        relay_adapter,
        intermediary="relay",
        customer_ref=link.customer_ref,
        destination=None,
        when="pull",
        secret=terms_secret,
    )
    push_terms = register(relay_adapter, intermediary="relay", customer_ref=link.customer_ref)
    own_terms = register(relay_adapter, intermediary="relay", customer_ref="relay-pseudonym-1")
    relay_adapter.emit(ticket(id="DL-1", customer_ref=account))

    def pull(client: TestClient) -> tuple[int, dict[str, Any]]:
        headers = signed_headers(
            secret=terms_secret, method="GET", target="/cmi/documents", terms_id=pull_terms.id
        )
        response = client.get("/cmi/documents", headers=headers)
        return response.status_code, response.json()

    with TestClient(relay_adapter.asgi_app(), raise_server_exceptions=False) as client:
        status, answer = pull(client)
        assert status == 200
        assert len(answer["documents"]) == 1
        assert relay_adapter.revoke_intermediary("relay")
        status, answer = pull(client)
        assert (status, answer["type"]) == (403, "urn:cmi:problem:forbidden"), answer
        # Registered again (a new secret): what it registered before stays revoked.
        relay_adapter.add_intermediary("relay", generate_secret())
        status, answer = pull(client)
        assert status == 403, answer
    assert relay_adapter.links(intermediary="relay") == []
    assert relay_adapter.emit(ticket(id="DL-2", customer_ref=account)) == []
    for terms in (pull_terms, push_terms, own_terms):
        events = [r.event for r, _ in relay_adapter.store.consent_records(terms.id)]
        assert events == ["granted", "revoked"]
    assert {
        r.state for r in relay_adapter.store.rows(limit=100) if r.terms_id == push_terms.id
    } == {"cancelled"}


class _CountingStore(SQLiteStore):
    """An SQLite store that counts how often an intermediary's secrets are opened."""

    opened = 0

    def intermediary(self, name: str) -> Intermediary | None:
        self.opened += 1
        return super().intermediary(name)


def test_a_secret_past_its_grace_does_not_make_every_request_open_the_secrets(
    tmp_path: Path,
) -> None:
    """After a rotation's grace ended, the ended secret stays in the row until the next
    rotation; the endpoint used to take its end as the kept verifier's, so it read and
    opened (decrypted) the intermediary's secrets again on every request."""
    clock = Clock(dt.datetime.now(dt.UTC).timestamp())
    store = _CountingStore(tmp_path / "cmi.db")
    adapter = emitting_adapter(tmp_path, store=store, clock=clock)
    adapter.add_intermediary("relay", SECRET)
    new = adapter.rotate_intermediary("relay", grace=dt.timedelta(minutes=5))
    clock.now += 600  # the old secret ended
    with TestClient(adapter.asgi_app()) as client:

        def status(secret: str) -> int:
            headers = signed_headers(
                secret=secret,
                method="GET",
                target="/cmi/terms",
                intermediary="relay",
                timestamp=int(clock.now),
            )
            return client.get("/cmi/terms", headers=headers).status_code

        assert status(SECRET) == 401
        before = store.opened
        assert [status(new) for _ in range(5)] == [200] * 5
        assert store.opened - before <= 1
    adapter.close()
    store.close()


class _RacedStore(SQLiteStore):
    """An SQLite store whose next read of a link or terms is followed at once by another
    process revoking it: what two concurrent revocations look like to the slower one."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.path = path
        self.race: str | None = None

    def _revoke_meanwhile(self) -> None:
        kind, self.race = self.race, None
        if kind is None:
            return
        other = emitting_adapter(self.path.parent, store=SQLiteStore(self.path))
        try:
            if kind.startswith("link_"):
                other.revoke_link(kind)
            else:
                other.revoke_terms(kind)
        finally:
            other.close()
            other.store.close()  # type: ignore[attr-defined]

    def get_link(self, link_id: str) -> Link:
        found = super().get_link(link_id)
        self._revoke_meanwhile()
        return found

    def get_terms(self, terms_id: str) -> SharingTerms:
        found = super().get_terms(terms_id)
        self._revoke_meanwhile()
        return found


def test_a_revocation_that_loses_a_race_is_a_conflict(tmp_path: Path) -> None:
    """Two revocations of one link (or terms) at once: the slower one used to be answered
    with the link-code (or terms registration) refusal, a 422 whose title speaks of
    something else; it is the 409 conflict a revoked link or terms gets."""
    store = _RacedStore(tmp_path / "cmi.db")
    adapter = emitting_adapter(tmp_path, store=store)
    adapter.add_intermediary("relay", SECRET)
    link = link_customer(adapter, "acct-alice-0001", "relay")
    terms = register(adapter, intermediary="relay", customer_ref="relay-pseudonym-1")
    with TestClient(adapter.asgi_app()) as client:
        store.race = link.id
        status, problem = _send(client, "DELETE", f"/cmi/links/{link.id}")
        assert (status, problem["type"]) == (409, "urn:cmi:problem:conflict"), problem
        store.race = terms.id
        status, problem = _send(client, "DELETE", f"/cmi/terms/{terms.id}")
        assert (status, problem["type"]) == (409, "urn:cmi:problem:conflict"), problem
    [revoked] = [r for r, _ in adapter.store.consent_records(terms.id) if r.event == "revoked"]
    assert revoked.terms_id == terms.id
    adapter.close()
    store.close()
