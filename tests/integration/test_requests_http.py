"""Requests, offers and acceptances over real HTTP on loopback: each refusal has its own
problem type, and a refused request leaves nothing behind."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cmi_sdk import Acceptance, Adapter, Offer, OfferSet, Request, hookimpl, load_model
from cmi_sdk.client import CMIClient, signed_headers
from cmi_sdk.outbox.sqlite import SQLiteStore
from cmi_sdk.signing import verify_document
from cmi_sdk.webhooks import generate_secret
from tests.fakes import Shop
from tests.support import CUSTOMER, emitting_adapter, register, serve_app, signer


@dataclass
class Firm:
    adapter: Adapter
    url: str
    secret: str
    shop: Shop
    db: Path

    def client(self, **options: Any) -> CMIClient:
        options.setdefault("secret", self.secret)
        options.setdefault("intermediary", "relay")
        return CMIClient(self.url, **options)

    def stored(self) -> dict[str, int]:
        with sqlite3.connect(self.db) as conn:
            return {
                table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: S608
                for table in ("cmi_offers", "cmi_seen", "cmi_acceptances", "cmi_outbox")
            }


@pytest.fixture
def firm(tmp_path: Path) -> Iterator[Firm]:
    shop = Shop()
    adapter = emitting_adapter(tmp_path, plugins=[shop])
    secret = generate_secret()
    adapter.store.add_intermediary("relay", secret, at=time.time())
    with serve_app(adapter.asgi_app(max_body_bytes=16 * 1024)) as url:
        yield Firm(adapter, url.rstrip("/"), secret, shop, tmp_path / "cmi.db")
    adapter.close()


def _request_xml(adapter: Adapter, **changes: Any) -> bytes:
    data: dict[str, Any] = {
        "id": "req-http-1",
        "kind": "flight",
        "customer_ref": "cust-7f3a9c",
        "reply_to": "relay-1",
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "wanted": {"origin": "ATL", "destination": "CDG", "date": "2026-12-01"},
    }
    data.update(changes)
    return adapter.render(load_model(Request, data), standard="cmi", document_type="request")


def _problem(response: httpx.Response, status: int, slug: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"] == f"urn:cmi:problem:{slug}", response.text


def test_the_loop_over_http(firm: Firm) -> None:
    register(firm.adapter, destination="http://127.0.0.1:9/inbox")  # the firm's own terms
    with firm.client() as client:
        # The customer linked the intermediary: its bookings are the account's.
        redeemed = client.redeem_link(firm.adapter.create_link_code(CUSTOMER).code)
        assert redeemed.status_code == 201, redeemed.text
        ref = redeemed.json()["customer_ref"]
        response = client.post_request(_request_xml(firm.adapter, customer_ref=ref))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/xml")
        verify_document(response.content, signer().certificate)
        answer = firm.adapter.parse(response.content)
        assert isinstance(answer, OfferSet)
        (offer,) = answer.offers
        single = client.get_offer(offer.id)
        assert single.status_code == 200
        verify_document(single.content, signer().certificate)
        acceptance = Acceptance(
            id="acc-http-1",
            offer_id=offer.id,
            customer_ref=offer.customer_ref,
            accepted_at=dt.datetime.now(dt.UTC),
        )
        xml = firm.adapter.render(acceptance, standard="cmi", document_type="acceptance")
        booked = client.accept(offer.id, xml)
        assert booked.status_code == 201, booked.text
        assert booked.json()["outcome"] == "booked"
        again = client.accept(offer.id, xml)  # a retry: the same answer, booked once
        assert again.json()["transaction_id"] == booked.json()["transaction_id"]
    assert firm.shop.booked == ["acc-http-1"]
    assert firm.stored()["cmi_outbox"] == 1  # the ticket, under the customer's terms


def _send(firm: Firm, body: bytes, **header_changes: Any) -> httpx.Response:
    headers = signed_headers(
        secret=header_changes.pop("secret", firm.secret),
        method="POST",
        target="/cmi/requests",
        body=body,
        intermediary=header_changes.pop("intermediary", "relay"),
        timestamp=header_changes.pop("timestamp", None),
        msg_id=header_changes.pop("msg_id", None),
    )
    headers["content-type"] = "application/xml"
    headers.update(header_changes)
    return httpx.post(firm.url + "/cmi/requests", content=body, headers=headers, timeout=10)


def _signed(
    secret: str, body: bytes, *, target: str = "/cmi/requests", **more: Any
) -> dict[str, str]:
    """Headers for ``POST target`` signed as the intermediary ``relay``."""
    headers = signed_headers(
        secret=secret, method="POST", target=target, body=body, intermediary="relay", **more
    )
    headers["content-type"] = "application/xml"
    return headers


XXE = b"""<?xml version="1.0"?>
<!DOCTYPE request [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<request xmlns="urn:cmi:core:1.0" id="r" kind="flight"><customerRef>&x;</customerRef></request>"""

LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]><lolz>&lol3;</lolz>"""

DEEP = b"<a>" * 200 + b"</a>" * 200

DTD_ONLY = b'<?xml version="1.0"?><!DOCTYPE request SYSTEM "http://127.0.0.1:9/x.dtd"><request/>'


@pytest.mark.parametrize(
    ("body", "status", "slug"),
    [
        (XXE, 400, "forbidden-xml"),
        (LAUGHS, 400, "forbidden-xml"),
        (DTD_ONLY, 400, "forbidden-xml"),
        (DEEP, 400, "too-deep"),
        (b"<request>", 400, "malformed-xml"),
        (b'<request xmlns="urn:cmi:core:1.0" id="r" kind="flight"/>', 422, "invalid-document"),
    ],
    ids=["xxe", "billion-laughs", "external-dtd", "deep", "malformed", "schema"],
)
def test_hostile_xml_is_refused_and_nothing_stored(
    firm: Firm, body: bytes, status: int, slug: str
) -> None:
    before = firm.stored()
    _problem(_send(firm, body), status, slug)
    assert firm.stored() == before


def test_an_oversized_body_is_refused_before_it_is_read(firm: Firm) -> None:
    body = b"<a>" + b"x" * (20 * 1024) + b"</a>"
    _problem(_send(firm, body), 413, "too-large")
    assert firm.stored()["cmi_seen"] == 0


def test_forged_stale_replayed_and_unknown_are_refused(firm: Firm) -> None:
    body = _request_xml(firm.adapter)
    before = firm.stored()
    _problem(_send(firm, body, secret=generate_secret()), 401, "bad-signature")
    _problem(_send(firm, body, timestamp=int(time.time()) - 3600), 401, "stale-timestamp")
    _problem(_send(firm, body, intermediary="nobody"), 401, "bad-signature")
    assert firm.stored() == before
    first = _send(firm, body, msg_id="req_once")
    assert first.status_code == 200, first.text
    _problem(_send(firm, body, msg_id="req_once"), 401, "replayed")


def test_a_refused_request_forgets_its_message_id(firm: Firm) -> None:
    _problem(_send(firm, b"<request>", msg_id="req_fix"), 400, "malformed-xml")
    # The intermediary fixes the body and sends it again under the same id.
    assert _send(firm, _request_xml(firm.adapter), msg_id="req_fix").status_code == 200


def test_a_secret_added_while_serving_is_accepted_at_once(firm: Firm) -> None:
    """The endpoint keeps each intermediary's verifier between requests; a rotation (a
    secret added to the store) must not wait for it to be refreshed."""
    assert _send(firm, _request_xml(firm.adapter)).status_code == 200  # kept now
    rotated = generate_secret()
    firm.adapter.store.add_intermediary("relay", rotated, at=time.time())
    assert _send(firm, _request_xml(firm.adapter), secret=rotated).status_code == 200
    assert _send(firm, _request_xml(firm.adapter)).status_code == 200  # the old one too
    _problem(
        _send(firm, _request_xml(firm.adapter), secret=generate_secret()), 401, "bad-signature"
    )


def test_the_signed_target_includes_the_query(firm: Firm) -> None:
    body = _request_xml(firm.adapter)
    url = firm.url + "/cmi/requests"
    headers = _signed(firm.secret, body, target="/cmi/requests?answer=cmi")
    ok = httpx.post(url + "?answer=cmi", content=body, headers=headers, timeout=10)
    assert ok.status_code == 200, ok.text
    # The same signature does not cover the target without its query.
    headers = _signed(firm.secret, body, target="/cmi/requests?answer=cmi")
    _problem(httpx.post(url, content=body, headers=headers, timeout=10), 401, "bad-signature")


def test_the_wrong_content_type_and_document(firm: Firm) -> None:
    body = _request_xml(firm.adapter)
    _problem(
        _send(firm, body, **{"content-type": "application/json"}), 415, "unsupported-media-type"
    )
    offer_xml = firm.adapter.render(
        load_model(Acceptance, {
            "id": "a", "offer_id": "o", "customer_ref": "cust-7f3a9c",
            "accepted_at": "2026-01-01T00:00:00Z",
        }),
        standard="cmi",
        document_type="acceptance",
    )  # fmt: skip
    _problem(_send(firm, offer_xml), 422, "invalid-document")


def test_a_terms_holder_cannot_post_requests(firm: Firm) -> None:
    terms = register(firm.adapter, destination="http://127.0.0.1:9/inbox")
    with CMIClient(firm.url, secret=terms.secret, terms_id=terms.id) as client:
        _problem(client.post_request(_request_xml(firm.adapter)), 403, "forbidden")


def test_pipeline_refusals_have_their_own_types(firm: Firm) -> None:
    firm.shop.fare = "10.00"  # below the floor
    _problem(_send(firm, _request_xml(firm.adapter)), 502, "price-below-floor")
    bad = _request_xml(
        firm.adapter, wanted={"origin": "JFK", "destination": "CDG", "date": "2026-12-01"}
    )
    _problem(_send(firm, bad), 422, "invalid-request")
    assert firm.stored()["cmi_offers"] == 0


def test_offers_are_the_asking_intermediarys(firm: Firm) -> None:
    other = generate_secret()
    firm.adapter.store.add_intermediary("other", other, at=time.time())
    with firm.client() as client:
        answer = firm.adapter.parse(client.post_request(_request_xml(firm.adapter)).content)
    assert isinstance(answer, OfferSet)
    with firm.client(secret=other, intermediary="other") as client:
        _problem(client.get_offer(answer.offers[0].id), 404, "not-found")
        _problem(client.get_offer("off_nope"), 404, "not-found")


def test_unknown_routes_are_problems_too(firm: Firm) -> None:
    _problem(httpx.get(firm.url + "/cmi/nothing-here", timeout=10), 404, "not-found")
    _problem(httpx.delete(firm.url + "/.well-known/cmi", timeout=10), 405, "method-not-allowed")


def _send_to(firm: Firm, body: bytes, target: str) -> httpx.Response:
    headers = signed_headers(
        secret=firm.secret, method="POST", target=target, body=body, intermediary="relay"
    )
    headers["content-type"] = "application/xml"
    return httpx.post(firm.url + target, content=body, headers=headers, timeout=10)


class Seen:
    """Records the canonical request the firm's hooks are given."""

    def __init__(self) -> None:
        self.requests: list[Request] = []

    @hookimpl
    def cmi_validate_request(self, request: Request) -> list[str]:
        self.requests.append(request)
        return []


def test_a_ubl_request_for_quotation_gets_a_ubl_quotation(firm: Firm) -> None:
    seen = Seen()
    firm.adapter.plugin_manager.register(seen)
    request = load_model(Request, {
        "id": "req-ubl-1", "kind": "flight", "customer_ref": "cust-7f3a9c",
        "reply_to": "relay-1", "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "wanted": {"origin": "ATL", "destination": "CDG", "date": "2026-12-01"},
    })  # fmt: skip
    as_cmi = firm.adapter.render(request, standard="cmi", document_type="request")
    as_ubl = firm.adapter.render(request, standard="ubl", document_type="RequestForQuotation")
    ubl = _send_to(firm, as_ubl, "/cmi/requests")
    assert ubl.status_code == 200, ubl.text
    verify_document(ubl.content, signer().certificate)
    quotation = firm.adapter.validate(ubl.content)
    assert (quotation.standard.name, quotation.document_type.name) == ("ubl", "Quotation")
    offer = quotation.to_model()
    assert isinstance(offer, Offer)
    assert offer.request_id == "req-ubl-1"
    # The same request in the cmi vocabulary, answered in it: the same request id from the
    # same intermediary, so the first answer's offer (the hooks saw one request).
    again = _send_to(firm, as_cmi, "/cmi/requests")
    assert again.status_code == 200
    assert seen.requests == [request]
    assert firm.adapter.parse(again.content).offers[0].id == offer.id
    # The intermediary may ask for the other vocabulary.
    crossed = _send_to(firm, as_ubl, "/cmi/requests?answer=cmi")
    assert firm.adapter.validate(crossed.content).document_type.name == "offers"
    _problem(_send_to(firm, as_cmi, "/cmi/requests?answer=nope"), 422, "invalid-input")


def test_a_declined_ubl_request_is_a_problem(firm: Firm) -> None:
    firm.shop.seats = 0
    request = firm.adapter.parse(_request_xml(firm.adapter))
    as_ubl = firm.adapter.render(request, standard="ubl", document_type="RequestForQuotation")
    _problem(_send_to(firm, as_ubl, "/cmi/requests"), 422, "declined")


class Gate:
    """Holds every request in validation until opened; counts how many got there."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.calls = 0

    @hookimpl
    def cmi_validate_request(self) -> list[str]:
        self.calls += 1
        self.entered.set()
        self.opened.wait(10)
        return []


def test_a_copy_sent_while_the_original_is_answered_is_refused_at_once(
    tmp_path: Path,
) -> None:
    gate = Gate()
    # The original waits at the gate while the copy goes and comes back: a budget no busy
    # machine misses, so the original is answered, not timed out.
    adapter = emitting_adapter(tmp_path, plugins=[Shop(), gate], request_budget=30.0)
    secret = generate_secret()
    adapter.store.add_intermediary("relay", secret, at=time.time())
    body = _request_xml(adapter)
    headers = _signed(secret, body, msg_id="msg_twice")
    with serve_app(adapter.asgi_app()) as url:
        first: list[httpx.Response] = []
        sender = threading.Thread(
            target=lambda: first.append(
                httpx.post(url + "cmi/requests", content=body, headers=headers, timeout=10)
            )
        )
        sender.start()
        assert gate.entered.wait(10)
        copy = httpx.post(url + "cmi/requests", content=body, headers=headers, timeout=10)
        gate.opened.set()
        sender.join(10)
        _problem(copy, 401, "replayed")
        assert first[0].status_code == 200, first[0].text
        again = httpx.post(url + "cmi/requests", content=body, headers=headers, timeout=10)
        _problem(again, 401, "replayed")
    assert gate.calls == 1  # the firm's systems ran for the original only
    adapter.close()


def test_a_secret_struck_from_the_store_stops_working(
    firm: Firm, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _send(firm, _request_xml(firm.adapter)).status_code == 200  # its verifier kept
    with sqlite3.connect(firm.db) as conn:  # by hand: the API only adds secrets
        conn.execute(
            "UPDATE cmi_intermediaries SET secrets = ? WHERE name = 'relay'",
            (json.dumps([generate_secret()]),),
        )
    monkeypatch.setattr("cmi_sdk.asgi._VERIFIER_SECONDS", 0.0)  # as if a minute went by
    _problem(_send(firm, _request_xml(firm.adapter)), 401, "bad-signature")


class OlderStore:
    """A store written to the protocol before add_offers took a message: no message_seen,
    add_offers(offers) only, which it declares."""

    remembers_with_offers = False

    def __init__(self, inner: SQLiteStore) -> None:
        self._inner = inner

    def add_offers(self, offers: Any) -> None:
        self._inner.add_offers(offers)

    def __getattr__(self, name: str) -> Any:
        if name == "message_seen":
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_a_store_without_message_seen_still_refuses_replays(tmp_path: Path) -> None:
    store = OlderStore(SQLiteStore(tmp_path / "cmi.db"))
    adapter = emitting_adapter(tmp_path, plugins=[Shop()], store=store)
    secret = generate_secret()
    adapter.store.add_intermediary("relay", secret, at=time.time())
    body = _request_xml(adapter)
    with serve_app(adapter.asgi_app()) as url:
        headers = _signed(secret, body, msg_id="msg_old")
        ok = httpx.post(url + "cmi/requests", content=body, headers=headers, timeout=10)
        assert ok.status_code == 200, ok.text
        again = httpx.post(url + "cmi/requests", content=body, headers=headers, timeout=10)
        _problem(again, 401, "replayed")
    adapter.close()
