"""Only the customer's own intermediary acts for them.

The attack: any registered intermediary could register terms for any ``customer_ref`` and
then receive every document for that customer, pushed or pulled. Customers now link an
intermediary with a single-use code and each link has its own pairwise reference; a
reference names a customer only under the intermediary it was issued to.

Each test runs the whole path a real adversary would: signed HTTP requests to the firm's
endpoint on loopback, the firm's own emission, and the delivery worker posting to the
customers' destinations.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.routing import Route

from cmi_sdk import (
    Acceptance,
    Adapter,
    LinkError,
    LinkNotFoundError,
    OfferSet,
    Request,
    TermsError,
    load_model,
)
from cmi_sdk.client import CMIClient
from cmi_sdk.webhooks import generate_secret
from tests.fakes import Clock, Shop
from tests.support import emitting_adapter, link, register, serve_app, ticket

ACCOUNT = "acct-alice-0001"


class Inboxes:
    """Every customer's destination on one loopback server: ``/NAME`` records what the
    firm delivers there."""

    def __init__(self) -> None:
        self.received: dict[str, list[bytes]] = {}
        self.lock = threading.Lock()

    async def deliver(self, request: HttpRequest) -> Response:
        body = await request.body()
        with self.lock:
            self.received.setdefault(request.path_params["name"], []).append(body)
        return Response(status_code=204)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{name}", self.deliver, methods=["POST"])])

    def at(self, name: str) -> list[bytes]:
        with self.lock:
            return list(self.received.get(name, []))


@dataclass
class Firm:
    adapter: Adapter
    url: str
    inboxes: Inboxes
    inbox_url: str
    shop: Shop
    secrets: dict[str, str] = field(default_factory=dict)

    def intermediary(self, name: str) -> CMIClient:
        if name not in self.secrets:
            self.secrets[name] = generate_secret()
            self.adapter.store.add_intermediary(name, self.secrets[name], at=time.time())
        return CMIClient(self.url, secret=self.secrets[name], intermediary=name)

    def destination(self, name: str) -> str:
        return f"{self.inbox_url}{name}"

    def deliver(self) -> None:
        with self.adapter.delivery_worker() as worker:
            worker.run_once()


@pytest.fixture
def firm(tmp_path: Path) -> Iterator[Firm]:
    shop = Shop(seats=10)
    adapter = emitting_adapter(tmp_path, plugins=[shop])
    inboxes = Inboxes()
    with serve_app(inboxes.app()) as inbox_url, serve_app(adapter.asgi_app()) as url:
        yield Firm(adapter, url.rstrip("/"), inboxes, inbox_url, shop)
    adapter.close()


def _redeem(client: CMIClient, adapter: Adapter, account: str = ACCOUNT) -> dict[str, Any]:
    """The firm makes a code for its signed-in customer; the intermediary redeems it."""
    code = adapter.create_link_code(account)
    response = client.redeem_link(code.code)
    assert response.status_code == 201, response.text
    answer: dict[str, Any] = response.json()
    return answer


def _terms(client: CMIClient, ref: str, **changes: Any) -> str:
    body: dict[str, Any] = {
        "customer_ref": ref,
        "secret": generate_secret(),
        "standard": "cmi-ticket",
        "purpose": {"code": "records", "text": "my records"},
        **changes,
    }
    response = client.propose_terms(body)
    assert response.status_code == 201, response.text
    terms_id: str = response.json()["terms"]["id"]
    return terms_id


def _request(ref: str, request_id: str = "req-1") -> Request:
    data = {
        "id": request_id,
        "kind": "flight",
        "customer_ref": ref,
        "reply_to": "relay-1",
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "wanted": {"origin": "ATL", "destination": "CDG", "date": "2026-12-01"},
    }
    return load_model(Request, data)


def _request_xml(adapter: Adapter, ref: str, request_id: str = "req-1") -> bytes:
    return adapter.render(_request(ref, request_id), standard="cmi", document_type="request")


def _offer(client: CMIClient, adapter: Adapter, ref: str, request_id: str = "req-1") -> str:
    response = client.post_request(_request_xml(adapter, ref, request_id))
    assert response.status_code == 200, response.text
    answer = adapter.parse(response.content)
    assert isinstance(answer, OfferSet)
    return answer.offers[0].id


def _acceptance(adapter: Adapter, offer_id: str, ref: str, acceptance_id: str) -> bytes:
    acceptance = Acceptance(
        id=acceptance_id,
        offer_id=offer_id,
        customer_ref=ref,
        accepted_at=dt.datetime.now(dt.UTC),
    )
    return adapter.render(acceptance, standard="cmi", document_type="acceptance")


def _pulled(client: CMIClient, terms_id: str) -> list[dict[str, Any]]:
    response = client.request("GET", "/cmi/documents", params={"terms": terms_id})
    assert response.status_code == 200, response.text
    documents: list[dict[str, Any]] = response.json()["documents"]
    return documents


# -- the attack ---------------------------------------------------------------------------


def test_a_stranger_registering_terms_for_anothers_customer_receives_nothing(
    firm: Firm,
) -> None:
    """Push and pull: beta registers terms under acme's reference for Alice, and gets none
    of Alice's documents, neither what the firm emits for her account nor what acme books
    for her."""
    adapter = firm.adapter
    with firm.intermediary("acme") as acme, firm.intermediary("beta") as beta:
        ref = _redeem(acme, adapter)["customer_ref"]
        _terms(acme, ref, destination=firm.destination("alice"))
        beta_push = _terms(beta, ref, destination=firm.destination("beta"))
        beta_pull = _terms(beta, ref, when="pull")
        # Beta also tries the account id itself, should it ever learn it.
        beta_account = _terms(beta, ACCOUNT, destination=firm.destination("beta-account"))

        adapter.emit(ticket(id="DL-1", customer_ref=ACCOUNT))  # the firm's own transaction
        offer_id = _offer(acme, adapter, ref)
        booked = acme.accept(offer_id, _acceptance(adapter, offer_id, ref, "acc-1"))
        assert booked.status_code == 201, booked.text
        firm.deliver()

        alice = firm.inboxes.at("alice")
        assert len(alice) == 2
        assert all(f'customer="{ref}"'.encode() in body for body in alice)
        assert all(ACCOUNT.encode() not in body for body in alice)
        assert firm.inboxes.at("beta") == []
        assert firm.inboxes.at("beta-account") == []
        assert _pulled(beta, beta_pull) == []
        stored = {r.terms_id for r in adapter.store.rows(limit=1000)}
        assert stored.isdisjoint({beta_push, beta_pull, beta_account})


def test_a_pull_signed_by_the_strangers_own_terms_gets_nothing(firm: Firm) -> None:
    adapter = firm.adapter
    with firm.intermediary("acme") as acme, firm.intermediary("beta") as beta:
        ref = _redeem(acme, adapter)["customer_ref"]
        own = _terms(acme, ref, when="pull")
        stolen = _terms(beta, ref, when="pull", secret=(secret := generate_secret()))
        adapter.emit(ticket(id="DL-1", customer_ref=ACCOUNT))
        assert len(_pulled(acme, own)) == 1
        with CMIClient(firm.url, secret=secret, terms_id=stolen) as holder:
            response = holder.documents()
        assert response.status_code == 200
        assert response.json()["documents"] == []


def test_the_same_reference_under_two_intermediaries_names_two_customers(firm: Firm) -> None:
    """Beta's own pseudonym happens to be the string acme's customer has: beta's booking
    for it reaches only beta's terms, and acme's customer gets nothing of it."""
    adapter = firm.adapter
    with firm.intermediary("acme") as acme, firm.intermediary("beta") as beta:
        ref = _redeem(acme, adapter)["customer_ref"]
        _terms(acme, ref, destination=firm.destination("alice"))
        _terms(beta, ref, destination=firm.destination("beta"))
        offer_id = _offer(beta, adapter, ref)
        booked = beta.accept(offer_id, _acceptance(adapter, offer_id, ref, "acc-beta"))
        assert booked.status_code == 201, booked.text
        firm.deliver()
        assert len(firm.inboxes.at("beta")) == 1
        assert firm.inboxes.at("alice") == []


def test_an_intermediary_cannot_see_or_accept_anothers_offer(firm: Firm) -> None:
    adapter = firm.adapter
    with firm.intermediary("acme") as acme, firm.intermediary("beta") as beta:
        ref = _redeem(acme, adapter)["customer_ref"]
        _terms(acme, ref, destination=firm.destination("alice"))
        offer_id = _offer(acme, adapter, ref)
        seen = beta.get_offer(offer_id)
        missing = beta.get_offer("off-nope")
        assert seen.status_code == missing.status_code == 404
        assert seen.json()["type"] == missing.json()["type"] == "urn:cmi:problem:not-found"
        taken = beta.accept(offer_id, _acceptance(adapter, offer_id, ref, "acc-stolen"))
        assert taken.status_code == 404, taken.text
        # An offer the firm made itself, for no intermediary, is nobody else's either.
        direct = adapter.answer_request(_request(ACCOUNT, "req-direct")).offers.offers[0]
        xml = _acceptance(adapter, direct.id, ACCOUNT, "acc-direct")
        assert beta.get_offer(direct.id).status_code == 404
        assert beta.accept(direct.id, xml).status_code == 404
    assert firm.shop.booked == []
    assert adapter.store.rows() == []


# -- link codes ---------------------------------------------------------------------------


def test_a_link_code_redeems_once_and_every_refusal_is_the_same(tmp_path: Path) -> None:
    clock = Clock(time.time())
    adapter = emitting_adapter(tmp_path, clock=clock)
    used = adapter.create_link_code(ACCOUNT)
    adapter.redeem_link_code(used.code, intermediary="acme")
    expired = adapter.create_link_code(ACCOUNT, ttl=dt.timedelta(minutes=10))
    clock.now += 600
    unknown = "lc_" + "a" * 32
    messages = set()
    for code in (used.code, expired.code, unknown, "not a code", ""):  # all refused alike
        with pytest.raises(LinkError) as refused:
            adapter.redeem_link_code(code, intermediary="beta")
        messages.add(str(refused.value))
    assert len(messages) == 1
    assert [link.intermediary for link in adapter.links(account=ACCOUNT)] == ["acme"]
    with pytest.raises(LinkError):
        adapter.create_link_code(ACCOUNT, ttl=dt.timedelta(days=2))
    with pytest.raises(LinkError):
        adapter.create_link_code("alice@example.com")
    with pytest.raises(LinkError, match="not an intermediary's name"):
        adapter.redeem_link_code(adapter.create_link_code(ACCOUNT).code, intermediary="<&>")


def test_a_code_is_stored_only_as_a_hash(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    code = adapter.create_link_code(ACCOUNT)
    assert code.code not in repr(code)
    for path in tmp_path.glob("cmi.db*"):  # the file, its WAL and shared memory
        assert code.code.encode() not in path.read_bytes()
    assert adapter.redeem_link_code(code.code, intermediary="acme").account == ACCOUNT


def test_the_endpoint_refuses_every_bad_code_with_one_problem(firm: Firm) -> None:
    adapter = firm.adapter
    with firm.intermediary("acme") as acme:
        code = adapter.create_link_code(ACCOUNT).code
        assert acme.redeem_link(code).status_code == 201
        answers = [acme.redeem_link(c) for c in (code, "lc_" + "b" * 32, "x")]
    bodies = {(a.status_code, a.json()["type"], a.json()["detail"]) for a in answers}
    assert bodies == {
        (422, "urn:cmi:problem:link-refused", "the link code is unknown, used or expired")
    }
    assert len(adapter.links()) == 1


def test_bad_link_requests_get_a_problem_and_change_nothing(firm: Firm) -> None:
    adapter = firm.adapter
    code = adapter.create_link_code(ACCOUNT).code
    with firm.intermediary("acme") as acme:
        holder_terms = _terms(acme, "pseudo-1", when="pull", secret=(secret := generate_secret()))
        for body, content_type, slug in [
            (b'{"code": 1}', "application/json", "invalid-input"),
            (b'{"code": "x", "account": "acct-alice-0001"}', "application/json", "invalid-input"),
            (b"[]", "application/json", "invalid-input"),
            (b"{", "application/json", "invalid-input"),
            (f'{{"code": "{code}"}}'.encode(), "text/plain", "unsupported-media-type"),
        ]:
            answer = acme.request(
                "POST", "/cmi/links", content=body, headers={"content-type": content_type}
            )
            assert answer.json()["type"] == f"urn:cmi:problem:{slug}", answer.text
    with CMIClient(firm.url, secret=secret, terms_id=holder_terms) as holder:
        # A customer links through the firm, not by redeeming a code over the API.
        assert holder.redeem_link(code).json()["type"] == "urn:cmi:problem:forbidden"
        assert holder.list_links().json()["type"] == "urn:cmi:problem:forbidden"
    assert adapter.links(include_revoked=True) == []
    with firm.intermediary("acme") as acme:
        assert acme.redeem_link(code).status_code == 201  # the code was never spent


def test_concurrent_redemptions_of_one_code_make_one_link(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    code = adapter.create_link_code(ACCOUNT).code
    made: list[str] = []
    refused: list[str] = []
    barrier = threading.Barrier(8)

    def redeem(n: int) -> None:
        barrier.wait(timeout=10)
        try:
            made.append(adapter.redeem_link_code(code, intermediary=f"i{n}").id)
        except LinkError:
            refused.append(f"i{n}")

    threads = [threading.Thread(target=redeem, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(made) == 1
    assert len(refused) == 7
    assert [link.id for link in adapter.links(include_revoked=True)] == made


def test_references_are_pairwise_and_intermediaries_see_only_their_own(firm: Firm) -> None:
    adapter = firm.adapter
    with firm.intermediary("acme") as acme, firm.intermediary("beta") as beta:
        at_acme = _redeem(acme, adapter)
        at_beta = _redeem(beta, adapter)
        again = _redeem(acme, adapter, "acct-bob-0002")
        assert len({at_acme["customer_ref"], at_beta["customer_ref"], again["customer_ref"]}) == 3
        for answer in (at_acme, at_beta):
            assert ACCOUNT not in str(answer)
            assert set(answer) == {"id", "customer_ref", "created_at", "href"}
        listed = acme.list_links().json()["links"]
        assert [entry["id"] for entry in listed] == [at_acme["id"], again["id"]]
        assert "acct" not in str(listed)
        # Beta cannot revoke acme's link: the same answer as a link that does not exist.
        theirs = beta.revoke_link(at_acme["id"])
        missing = beta.revoke_link("link_nope")
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json()["type"] == missing.json()["type"]
        assert adapter.get_link(at_acme["id"]).active
    refs = {link.customer_ref for link in adapter.links()}
    assert all(ACCOUNT not in ref for ref in refs)


# -- revocation ---------------------------------------------------------------------------


def test_revoking_a_link_revokes_its_terms_with_consent_and_stops_emission(firm: Firm) -> None:
    adapter = firm.adapter
    with firm.intermediary("acme") as acme:
        linked = _redeem(acme, adapter)
        ref = linked["customer_ref"]
        push = _terms(acme, ref, destination=firm.destination("alice"))
        pull = _terms(acme, ref, when="pull")
        (waiting, _) = adapter.emit(ticket(id="DL-1", customer_ref=ACCOUNT))
        revoked = acme.revoke_link(linked["id"])
        assert revoked.status_code == 200, revoked.text
        answer = revoked.json()
        assert sorted(c["record"]["terms_id"] for c in answer["consents"]) == sorted([push, pull])
        assert answer["cancelled"] == 1
        assert "acct" not in str(answer["link"])
        assert acme.revoke_link(linked["id"]).status_code == 409
        assert acme.list_links().json()["links"] == []
    for terms_id in (push, pull):
        assert adapter.get_terms(terms_id).revoked_at is not None
        events = [r.event for r, _ in adapter.store.consent_records(terms_id)]
        assert events == ["granted", "revoked"]
    assert adapter.store.get_row(waiting.msg_id).state == "cancelled"
    assert adapter.emit(ticket(id="DL-2", customer_ref=ACCOUNT)) == []
    firm.deliver()
    assert firm.inboxes.at("alice") == []
    with pytest.raises(LinkError, match="already revoked"):
        adapter.revoke_link(linked["id"])
    with pytest.raises(LinkNotFoundError):
        adapter.revoke_link("link_nope")


def test_the_firms_direct_terms_and_every_link_get_the_accounts_documents(
    tmp_path: Path,
) -> None:
    adapter = emitting_adapter(tmp_path)
    direct = register(adapter, customer_ref=ACCOUNT)
    acme = link(adapter, ACCOUNT, "acme")
    beta = link(adapter, ACCOUNT, "beta")
    at_acme = register(adapter, customer_ref=acme.customer_ref, intermediary="acme")
    at_beta = register(adapter, customer_ref=beta.customer_ref, intermediary="beta")
    adapter.revoke_terms(at_beta.id)
    with pytest.raises(TermsError, match="already revoked"):
        adapter.revoke_terms(at_beta.id)
    emissions = adapter.emit(ticket(customer_ref=ACCOUNT))
    assert {(e.terms_id, e.customer_ref) for e in emissions} == {
        (direct.id, ACCOUNT),
        (at_acme.id, acme.customer_ref),
    }
