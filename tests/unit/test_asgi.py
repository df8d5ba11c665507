"""The firm's endpoint (``cmi_sdk.asgi``): discovery, terms, revocation, pulls and refusals.

Every request is signed the way :mod:`cmi_sdk.client` signs them, through Starlette's test
client. Every refusal is checked for its status, its problem type, and for having changed
nothing in the store.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.routing import Mount

from cmi_sdk import (
    Adapter,
    ConsentRecord,
    EgressGuard,
    HardenedParser,
    SignatureVerificationError,
    TermsPolicy,
    Transaction,
    load_model,
)
from cmi_sdk.asgi import PROBLEM_TYPES
from cmi_sdk.client import signed_headers
from cmi_sdk.outbox.sqlite import SQLiteStore
from cmi_sdk.signing import (
    DocumentSigner,
    self_signed_certificate,
    verify_detached,
    verify_document,
)
from cmi_sdk.webhooks import generate_secret, public_key_for

with warnings.catch_warnings():
    # Starlette 1.x would rather its test client ran on httpx2; the SDK depends on httpx.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]
CUSTOMER = "cust-7f3a9c"
DESTINATION = "http://127.0.0.1:9/inbox"
RFC7807 = "{urn:ietf:rfc:7807}"


# -- parties and requests ----------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """One party of the endpoint: a registered intermediary, or the holder of some terms."""

    client: TestClient
    secret: str
    intermediary: str | None = None
    terms_id: str | None = None

    def headers(
        self, method: str, target: str, body: bytes = b"", *, timestamp: int | None = None
    ) -> dict[str, str]:
        """The authentication headers for ``method target`` with ``body``."""
        return signed_headers(
            secret=self.secret,
            method=method,
            target=target,
            body=body,
            intermediary=self.intermediary,
            terms_id=self.terms_id,
            timestamp=timestamp,
        )

    def send(
        self,
        method: str,
        target: str,
        *,
        json_body: Any = None,
        body: bytes | None = None,
        content_type: str | None = "application/json",
        headers: dict[str, str] | None = None,
        timestamp: int | None = None,
    ) -> httpx.Response:
        """Sign and send one request; ``target`` is the path and query, as signed."""
        if body is None:
            body = b"" if json_body is None else json.dumps(json_body).encode()
        signed = self.headers(method, target, body, timestamp=timestamp)
        if body and content_type is not None:
            signed["content-type"] = content_type
        signed.update(headers or {})
        response: httpx.Response = self.client.request(method, target, content=body, headers=signed)
        return response

    @property
    def held(self) -> str:
        """The id of the terms a holder signs for."""
        assert self.terms_id is not None
        return self.terms_id


def proposal(**changes: Any) -> dict[str, Any]:
    """Terms that push every ticket at once to a loopback destination; ``None`` drops a key."""
    body: dict[str, Any] = {
        "customer_ref": CUSTOMER,
        "destination": DESTINATION,
        "secret": generate_secret(),
        "standard": "cmi-ticket",
        "purpose": {"code": "records", "text": "my records"},
    }
    body.update(changes)
    return {key: value for key, value in body.items() if value is not None}


def pull_proposal(**changes: Any) -> dict[str, Any]:
    """Pull-only terms."""
    return proposal(**{"when": "pull", "destination": None, **changes})


def register_terms(intermediary: Caller, body: dict[str, Any]) -> Caller:
    """Register ``body`` through ``intermediary``; return the customer holding the terms."""
    response = intermediary.send("POST", "/cmi/terms", json_body=body)
    assert response.status_code == 201, response.text
    terms_id = response.json()["terms"]["id"]
    return Caller(intermediary.client, body["secret"], terms_id=terms_id)


def linked(adapter: Adapter, intermediary: Caller, account: str = CUSTOMER) -> str:
    """The intermediary's own reference for the firm's customer ``account``, from a link
    code the firm made and the intermediary redeemed (``POST /cmi/links``): terms
    registered for it get the documents the firm emits for the account."""
    code = adapter.create_link_code(account).code
    response = intermediary.send("POST", "/cmi/links", json_body={"code": code})
    assert response.status_code == 201, response.text
    ref: str = response.json()["customer_ref"]
    return ref


def add_intermediary(adapter: Adapter, client: TestClient, name: str) -> Caller:
    """Register intermediary ``name`` with a fresh secret."""
    secret = generate_secret()
    adapter.store.add_intermediary(name, secret, at=time.time())
    return Caller(client, secret, intermediary=name)


def ticket(number: int = 12524057) -> Transaction:
    """The example ticket, under its own transaction id."""
    data = json.loads((ROOT / "examples" / "ticket.json").read_text(encoding="utf-8"))
    data["id"] = f"DL-{number}"
    return load_model(Transaction, data)


def stored(adapter: Adapter) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """What a refused request must leave as it was: the terms and the outbox rows."""
    terms: list[tuple[str, Any]] = [
        (t.id, t.revoked_at) for t in adapter.list_terms(include_revoked=True)
    ]
    rows: list[tuple[str, str]] = [(r.msg_id, r.state) for r in adapter.store.rows()]
    return terms, rows


def assert_problem(response: httpx.Response, slug: str) -> dict[str, Any]:
    """Check an RFC 9457 JSON problem of type ``slug``; return its body."""
    status, title = PROBLEM_TYPES[slug]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = response.json()
    assert problem["type"] == f"urn:cmi:problem:{slug}"
    assert problem["status"] == status
    assert problem["title"] == title
    assert problem["detail"]
    if status == 401:
        assert response.headers["www-authenticate"] == "Standard-Webhooks"
    return problem


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def document_signer() -> DocumentSigner:
    key = ec.generate_private_key(ec.SECP256R1())
    return DocumentSigner(key=key, certificate=self_signed_certificate(key))


@pytest.fixture
def adapter_factory(
    tmp_path: Path, document_signer: DocumentSigner
) -> Iterator[Callable[..., Adapter]]:
    """Adapters for delta.com, each with its own store in ``tmp_path``."""
    stores: list[SQLiteStore] = []

    def make(**options: Any) -> Adapter:
        store = SQLiteStore(tmp_path / f"cmi-{len(stores)}.db")
        stores.append(store)
        options.setdefault("store", store)
        options.setdefault("signer", document_signer)
        options.setdefault("egress", EgressGuard(allow_loopback=True))
        options.setdefault("firm", "delta.com")
        return Adapter(**options)

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def endpoint_adapter(adapter_factory: Callable[..., Adapter]) -> Adapter:
    return adapter_factory()


@pytest.fixture
def client(endpoint_adapter: Adapter) -> Iterator[TestClient]:
    with TestClient(endpoint_adapter.asgi_app()) as test_client:
        yield test_client


@pytest.fixture
def acme(endpoint_adapter: Adapter, client: TestClient) -> Caller:
    return add_intermediary(endpoint_adapter, client, "acme")


# -- GET /.well-known/cmi ----------------------------------------------------------------


def test_well_known_publishes_firm_standards_policy_and_certificate(
    client: TestClient, document_signer: DocumentSigner
) -> None:
    response = client.get("/.well-known/cmi")
    assert response.status_code == 200
    document = response.json()
    assert document["firm"] == "delta.com"
    assert document["capabilities"] == {
        "terms": "/cmi/terms",
        "documents": "/cmi/documents",
        "requests": "/cmi/requests",
        "offers": "/cmi/offers/{id}",
        "acceptance": "/cmi/offers/{id}/acceptance",
        "links": "/cmi/links",
        "openapi": "/cmi/openapi.json",
        "timings": ["now", "digest", "pull"],
    }
    ticket_standard = next(s for s in document["standards"] if s["name"] == "cmi-ticket")
    (ticket_type,) = ticket_standard["document_types"]
    assert ticket_type["name"] == "ticket"
    assert ticket_type["model"] == "Transaction"
    assert {"origin", "destination", "seat", "total"} <= set(ticket_type["fields"])
    assert ticket_type["fields"] == sorted(ticket_type["fields"])
    assert "ticket_number" in ticket_type["kept"]
    policy = document["terms_policy"]
    assert set(policy["standards"]) >= {"cmi", "cmi-ticket"}
    assert policy["timings"] == ["now", "digest", "pull"]
    assert policy["purposes"] is None
    (key,) = document["keys"]["documents"]
    expected = document_signer.certificate.public_bytes(serialization.Encoding.PEM).decode()
    assert key["certificate"] == expected
    assert key["algorithm"] == "ecdsa-p256-sha256"
    assert document["keys"]["webhooks_v1a"] == []
    assert document["authentication"]["signer_headers"] == ["cmi-intermediary", "cmi-terms"]
    assert document["problem_types"] == {
        f"urn:cmi:problem:{slug}": status for slug, (status, _) in PROBLEM_TYPES.items()
    }


def test_well_known_lists_the_v1a_public_key(adapter_factory: Callable[..., Adapter]) -> None:
    key = "whsk_" + base64.b64encode(secrets.token_bytes(32)).decode()
    adapter = adapter_factory(webhook_ed25519_key=key)
    with TestClient(adapter.asgi_app()) as client:
        document = client.get("/.well-known/cmi").json()
    assert document["keys"]["webhooks_v1a"] == [public_key_for(key)]


def test_well_known_publishes_the_policy_as_configured(
    adapter_factory: Callable[..., Adapter],
) -> None:
    policy = TermsPolicy(standards=("cmi-ticket",), timings=("pull",), purposes=("records",))
    adapter = adapter_factory(policy=policy, signer=None)
    with TestClient(adapter.asgi_app()) as client:
        document = client.get("/.well-known/cmi").json()
    assert document["terms_policy"]["standards"] == ["cmi-ticket"]
    assert document["terms_policy"]["purposes"] == ["records"]
    assert document["capabilities"]["timings"] == ["pull"]
    assert document["keys"]["documents"] == []


# -- POST /cmi/terms ---------------------------------------------------------------------


def test_intermediary_registers_terms(
    endpoint_adapter: Adapter, acme: Caller, document_signer: DocumentSigner
) -> None:
    body = proposal(fields=["total", "origin", "destination"])
    response = acme.send(
        "POST", "/cmi/terms", json_body=body, content_type="application/json; charset=utf-8"
    )
    assert response.status_code == 201, response.text
    answer = response.json()
    assert answer["outcome"] == "accepted"
    terms = answer["terms"]
    assert response.headers["location"] == f"/cmi/terms/{terms['id']}" == terms["href"]
    assert terms["intermediary"] == "acme"
    assert terms["fields"] == ["destination", "origin", "total"]
    assert "secret" not in terms
    assert body["secret"] not in response.text
    consent_xml = answer["consent_xml"].encode()
    verify_document(consent_xml, document_signer.certificate)
    record = endpoint_adapter.parse(consent_xml)
    assert isinstance(record, ConsentRecord)
    assert record.terms_id == terms["id"] == answer["consent"]["terms_id"]
    assert record.event == "granted"
    assert record.firm == "delta.com"
    assert record.intermediary == "acme"
    (registered,) = endpoint_adapter.list_terms()
    assert registered.id == terms["id"]
    assert registered.intermediary == "acme"
    assert registered.secret == body["secret"]
    # The Location answers the intermediary.
    assert acme.send("GET", response.headers["location"]).status_code == 200


def test_policy_offers_one_alternative_and_registers_nothing(
    adapter_factory: Callable[..., Adapter],
) -> None:
    adapter = adapter_factory(policy=TermsPolicy(max_digest_hours=24))
    with TestClient(adapter.asgi_app()) as client:
        acme = add_intermediary(adapter, client, "acme")
        response = acme.send("POST", "/cmi/terms", json_body=proposal(when="digest:48h"))
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["outcome"] == "alternative"
        assert answer["alternative"]["when"] == "digest:24h"
        assert "secret" not in answer["alternative"]
        assert answer["reason"]
        assert "terms" not in answer
        assert "consent_xml" not in answer
        assert adapter.list_terms(include_revoked=True) == []
        # Proffering the alternative gets it accepted.
        again = acme.send("POST", "/cmi/terms", json_body=proposal(when="digest:24h"))
        assert again.status_code == 201
        assert again.json()["outcome"] == "accepted"


def test_policy_rejects_a_purpose_it_does_not_accept(
    adapter_factory: Callable[..., Adapter],
) -> None:
    adapter = adapter_factory(policy=TermsPolicy(purposes=("records",)))
    with TestClient(adapter.asgi_app()) as client:
        acme = add_intermediary(adapter, client, "acme")
        body = proposal(purpose={"code": "marketing", "text": "offers"})
        response = acme.send("POST", "/cmi/terms", json_body=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["outcome"] == "rejected"
    assert "marketing" in answer["reason"]
    assert "terms" not in answer
    assert "alternative" not in answer
    assert adapter.list_terms(include_revoked=True) == []


# -- refusals ----------------------------------------------------------------------------


def test_unsigned_request_is_unauthorized(endpoint_adapter: Adapter, client: TestClient) -> None:
    before = stored(endpoint_adapter)
    response = client.post("/cmi/terms", json=proposal())
    assert_problem(response, "unauthorized")
    assert stored(endpoint_adapter) == before


def test_naming_two_signers_is_unauthorized(endpoint_adapter: Adapter, acme: Caller) -> None:
    before = stored(endpoint_adapter)
    response = acme.send("POST", "/cmi/terms", json_body=proposal(), headers={"cmi-terms": "x"})
    assert_problem(response, "unauthorized")
    assert stored(endpoint_adapter) == before


def test_unknown_intermediary_is_refused_as_a_bad_signature(
    endpoint_adapter: Adapter, client: TestClient
) -> None:
    # Not "unknown-party": the answer must not tell which names are registered.
    before = stored(endpoint_adapter)
    stranger = Caller(client, generate_secret(), intermediary="stranger")
    assert_problem(stranger.send("POST", "/cmi/terms", json_body=proposal()), "bad-signature")
    assert stored(endpoint_adapter) == before


def test_unknown_terms_holder_is_refused_as_a_bad_signature(
    endpoint_adapter: Adapter, client: TestClient
) -> None:
    holder = Caller(client, generate_secret(), terms_id="terms_0000")
    assert_problem(holder.send("GET", "/cmi/documents"), "bad-signature")
    assert stored(endpoint_adapter) == ([], [])


def test_wrong_secret_is_bad_signature(endpoint_adapter: Adapter, acme: Caller) -> None:
    impostor = Caller(acme.client, generate_secret(), intermediary="acme")
    assert_problem(impostor.send("POST", "/cmi/terms", json_body=proposal()), "bad-signature")
    assert endpoint_adapter.list_terms(include_revoked=True) == []


def test_tampered_body_is_bad_signature(endpoint_adapter: Adapter, acme: Caller) -> None:
    signed = json.dumps(proposal(customer_ref="cust-aaaa")).encode()
    sent = json.dumps(proposal(customer_ref="cust-bbbb")).encode()
    headers = acme.headers("POST", "/cmi/terms", signed)
    headers["content-type"] = "application/json"
    response = acme.client.post("/cmi/terms", content=sent, headers=headers)
    assert_problem(response, "bad-signature")
    assert endpoint_adapter.list_terms(include_revoked=True) == []


def test_missing_signature_headers_are_bad_signature(
    endpoint_adapter: Adapter, acme: Caller
) -> None:
    response = acme.client.get("/cmi/terms", headers={"cmi-intermediary": "acme"})
    assert_problem(response, "bad-signature")


@pytest.mark.parametrize("offset", [-3600, 3600])
def test_timestamp_outside_the_window_is_stale(
    endpoint_adapter: Adapter, acme: Caller, offset: int
) -> None:
    body = proposal()
    response = acme.send("POST", "/cmi/terms", json_body=body, timestamp=int(time.time()) + offset)
    assert_problem(response, "stale-timestamp")
    assert endpoint_adapter.list_terms(include_revoked=True) == []


def test_the_same_signed_request_twice_is_replayed(endpoint_adapter: Adapter, acme: Caller) -> None:
    body = json.dumps(proposal()).encode()
    headers = {**acme.headers("POST", "/cmi/terms", body), "content-type": "application/json"}
    first = acme.client.post("/cmi/terms", content=body, headers=headers)
    assert first.status_code == 201
    before = stored(endpoint_adapter)
    second = acme.client.post("/cmi/terms", content=body, headers=headers)
    assert_problem(second, "replayed")
    assert stored(endpoint_adapter) == before
    assert len(before[0]) == 1


def test_message_ids_are_single_use_per_signer_only(
    endpoint_adapter: Adapter, acme: Caller
) -> None:
    beta = add_intermediary(endpoint_adapter, acme.client, "beta")
    msg_id = "req_shared"
    for caller in (acme, beta):
        headers = signed_headers(
            secret=caller.secret,
            method="GET",
            target="/cmi/terms",
            intermediary=caller.intermediary,
            msg_id=msg_id,
        )
        assert acme.client.get("/cmi/terms", headers=headers).status_code == 200


def test_body_over_the_declared_limit_is_too_large(
    adapter_factory: Callable[..., Adapter],
) -> None:
    adapter = adapter_factory()
    with TestClient(adapter.asgi_app(max_body_bytes=1024)) as client:
        acme = add_intermediary(adapter, client, "acme")
        big = proposal(purpose={"code": "records", "text": "x" * 1500})
        response = acme.send("POST", "/cmi/terms", json_body=big)
        assert_problem(response, "too-large")
        # Under the cap, the same endpoint takes terms.
        assert acme.send("POST", "/cmi/terms", json_body=proposal()).status_code == 201
    assert len(adapter.list_terms()) == 1


def test_chunked_body_over_the_limit_is_too_large(adapter_factory: Callable[..., Adapter]) -> None:
    adapter = adapter_factory()
    with TestClient(adapter.asgi_app(max_body_bytes=1024)) as client:
        acme = add_intermediary(adapter, client, "acme")
        body = json.dumps(proposal(purpose={"code": "records", "text": "x" * 1500})).encode()
        headers = {**acme.headers("POST", "/cmi/terms", body), "content-type": "application/json"}

        def chunks() -> Iterable[bytes]:
            for start in range(0, len(body), 256):
                yield body[start : start + 256]

        response = client.post("/cmi/terms", content=chunks(), headers=headers)
        assert "content-length" not in response.request.headers
        assert response.request.headers["transfer-encoding"] == "chunked"
    assert_problem(response, "too-large")
    assert adapter.list_terms(include_revoked=True) == []


def test_chunked_body_under_the_limit_is_read(acme: Caller, endpoint_adapter: Adapter) -> None:
    body = json.dumps(proposal()).encode()
    headers = {**acme.headers("POST", "/cmi/terms", body), "content-type": "application/json"}
    response = acme.client.post("/cmi/terms", content=iter([body[:10], body[10:]]), headers=headers)
    assert response.status_code == 201, response.text
    assert len(endpoint_adapter.list_terms()) == 1


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", None])
def test_terms_not_in_json_are_unsupported_media_type(
    endpoint_adapter: Adapter, acme: Caller, content_type: str | None
) -> None:
    response = acme.send("POST", "/cmi/terms", json_body=proposal(), content_type=content_type)
    assert_problem(response, "unsupported-media-type")
    assert endpoint_adapter.list_terms(include_revoked=True) == []


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b""])
def test_a_body_that_is_not_json_is_invalid_input(
    endpoint_adapter: Adapter, acme: Caller, body: bytes
) -> None:
    response = acme.send(
        "POST", "/cmi/terms", body=body, headers={"content-type": "application/json"}
    )
    problem = assert_problem(response, "invalid-input")
    assert problem["errors"]
    assert all(error["reason"] for error in problem["errors"])
    assert endpoint_adapter.list_terms(include_revoked=True) == []


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"secret": "not-a-secret"}, "secret"),
        ({"purpose": None}, "purpose"),
        ({"when": "sometimes"}, "when"),
        ({"customer_ref": "jane@example.com"}, "customer_ref"),
        ({"destination": "ftp://example.com/"}, "destination"),
        ({"fields": ["Not A Field"]}, "fields.0"),
        ({"colour": "blue"}, "colour"),
        ({"when": "pull"}, "(root)"),
    ],
)
def test_terms_that_break_the_model_are_invalid_input_naming_the_field(
    endpoint_adapter: Adapter, acme: Caller, changes: dict[str, Any], path: str
) -> None:
    response = acme.send("POST", "/cmi/terms", json_body=proposal(**changes))
    problem = assert_problem(response, "invalid-input")
    assert path in [error["path"] for error in problem["errors"]], problem
    assert endpoint_adapter.list_terms(include_revoked=True) == []


def test_a_json_array_is_invalid_input(endpoint_adapter: Adapter, acme: Caller) -> None:
    problem = assert_problem(acme.send("POST", "/cmi/terms", json_body=[1]), "invalid-input")
    assert [e["path"] for e in problem["errors"]] == ["(root)"]


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"standard": "nope"}, "nope"),
        ({"fields": ["shoe_size"]}, "shoe_size"),
        ({"document_type": "nope"}, "nope"),
        ({"standard": "cmi", "document_type": "consent"}, "consent"),
        ({"until": "2001-01-01T00:00:00Z"}, "past"),
    ],
)
def test_terms_the_firm_cannot_take_are_refused(
    endpoint_adapter: Adapter, acme: Caller, changes: dict[str, Any], words: str
) -> None:
    response = acme.send("POST", "/cmi/terms", json_body=proposal(**changes))
    problem = assert_problem(response, "terms-refused")
    assert words in problem["detail"]
    assert endpoint_adapter.list_terms(include_revoked=True) == []


@pytest.mark.parametrize(
    "destination",
    [
        "http://10.0.0.1/",
        "https://10.0.0.1/",
        "http://127.0.0.1:9/inbox",
        "https://169.254.169.254/",
    ],
)
def test_a_destination_the_egress_guard_refuses(
    adapter_factory: Callable[..., Adapter], destination: str
) -> None:
    adapter = adapter_factory(egress=EgressGuard())
    with TestClient(adapter.asgi_app()) as client:
        acme = add_intermediary(adapter, client, "acme")
        response = acme.send("POST", "/cmi/terms", json_body=proposal(destination=destination))
    assert_problem(response, "destination-not-allowed")
    assert adapter.list_terms(include_revoked=True) == []


def test_a_terms_holder_may_not_proffer_terms(endpoint_adapter: Adapter, acme: Caller) -> None:
    holder = register_terms(acme, pull_proposal())
    before = stored(endpoint_adapter)
    response = holder.send("POST", "/cmi/terms", json_body=proposal())
    assert_problem(response, "forbidden")
    assert stored(endpoint_adapter) == before


# -- problem details as XML --------------------------------------------------------------


@pytest.mark.parametrize("accept", ["application/xml", "text/xml", "application/problem+xml"])
def test_xml_only_clients_get_problems_as_xml(
    endpoint_adapter: Adapter, client: TestClient, accept: str
) -> None:
    response = client.post("/cmi/terms", json=proposal(), headers={"accept": accept})
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+xml")
    root = HardenedParser().parse(response.content).getroot()
    assert root.tag == f"{RFC7807}problem"
    assert root.findtext(f"{RFC7807}type") == "urn:cmi:problem:unauthorized"
    assert root.findtext(f"{RFC7807}status") == "401"
    assert root.findtext(f"{RFC7807}title") == PROBLEM_TYPES["unauthorized"][1]
    assert endpoint_adapter.list_terms(include_revoked=True) == []


def test_xml_problem_escapes_the_detail(client: TestClient) -> None:
    response = client.get("/cmi/<&>", headers={"accept": "application/xml"})
    assert response.status_code == 404
    root = HardenedParser().parse(response.content).getroot()
    assert root.findtext(f"{RFC7807}type") == "urn:cmi:problem:not-found"
    assert "<&>" in (root.findtext(f"{RFC7807}detail") or "")


@pytest.mark.parametrize("accept", ["application/json, application/xml", "*/*", ""])
def test_other_clients_get_problems_as_json(client: TestClient, accept: str) -> None:
    response = client.post("/cmi/terms", json=proposal(), headers={"accept": accept})
    assert_problem(response, "unauthorized")


# -- GET /cmi/terms ----------------------------------------------------------------------


def test_an_intermediary_lists_only_its_own_terms(endpoint_adapter: Adapter, acme: Caller) -> None:
    beta = add_intermediary(endpoint_adapter, acme.client, "beta")
    mine = register_terms(acme, pull_proposal())
    other = register_terms(acme, pull_proposal(customer_ref="cust-0b1c2d"))
    theirs = register_terms(beta, pull_proposal())
    listed = acme.send("GET", "/cmi/terms")
    assert listed.status_code == 200
    assert [t["id"] for t in listed.json()["terms"]] == [mine.terms_id, other.terms_id]
    assert all("secret" not in t for t in listed.json()["terms"])
    filtered = acme.send("GET", "/cmi/terms?customer=cust-0b1c2d")
    assert [t["id"] for t in filtered.json()["terms"]] == [other.terms_id]
    assert acme.send("GET", "/cmi/terms?customer=cust-nobody").json() == {"terms": []}
    assert [t["id"] for t in beta.send("GET", "/cmi/terms").json()["terms"]] == [theirs.terms_id]


def test_a_terms_holder_lists_only_its_own_terms(acme: Caller) -> None:
    holder = register_terms(acme, pull_proposal())
    register_terms(acme, pull_proposal())
    listed = holder.send("GET", "/cmi/terms")
    assert listed.status_code == 200
    assert [t["id"] for t in listed.json()["terms"]] == [holder.terms_id]


def test_another_intermediarys_terms_are_not_found(endpoint_adapter: Adapter, acme: Caller) -> None:
    beta = add_intermediary(endpoint_adapter, acme.client, "beta")
    holder = register_terms(acme, pull_proposal())
    hidden = assert_problem(beta.send("GET", f"/cmi/terms/{holder.terms_id}"), "not-found")
    absent = assert_problem(beta.send("GET", "/cmi/terms/terms_0000"), "not-found")
    # Probing cannot tell hidden terms from absent ones.
    assert hidden.keys() == absent.keys()
    assert hidden["detail"].replace(holder.terms_id, "ID") == absent["detail"].replace(
        "terms_0000", "ID"
    )


def test_one_customers_terms_are_not_found_by_another(acme: Caller) -> None:
    holder = register_terms(acme, pull_proposal())
    neighbour = register_terms(acme, pull_proposal(customer_ref="cust-0b1c2d"))
    assert_problem(neighbour.send("GET", f"/cmi/terms/{holder.terms_id}"), "not-found")
    assert_problem(neighbour.send("DELETE", f"/cmi/terms/{holder.terms_id}"), "not-found")
    assert acme.send("GET", f"/cmi/terms/{holder.terms_id}").json()["terms"]["revoked_at"] is None


def test_the_terms_holder_reads_its_terms_and_consent_records(
    acme: Caller, document_signer: DocumentSigner
) -> None:
    holder = register_terms(acme, pull_proposal())
    response = holder.send("GET", f"/cmi/terms/{holder.terms_id}")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["terms"]["id"] == holder.terms_id
    assert "secret" not in answer["terms"]
    (consent,) = answer["consent"]
    assert consent["record"]["event"] == "granted"
    assert consent["record"]["terms_id"] == holder.terms_id
    verify_document(consent["xml"].encode(), document_signer.certificate)


# -- DELETE /cmi/terms/{id} --------------------------------------------------------------


def test_the_customer_revokes_terms_and_queued_documents_are_cancelled(
    endpoint_adapter: Adapter, acme: Caller, document_signer: DocumentSigner
) -> None:
    holder = register_terms(acme, proposal(customer_ref=linked(endpoint_adapter, acme)))
    emitted = endpoint_adapter.emit(ticket())
    assert [e.state for e in emitted] == ["pending"]
    response = holder.send("DELETE", f"/cmi/terms/{holder.terms_id}")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["outcome"] == "revoked"
    assert answer["consent"]["event"] == "revoked"
    assert answer["consent"]["terms_id"] == holder.terms_id
    consent_xml = answer["consent_xml"].encode()
    verify_document(consent_xml, document_signer.certificate)
    record = endpoint_adapter.parse(consent_xml)
    assert isinstance(record, ConsentRecord)
    assert record.event == "revoked"
    assert [r.state for r in endpoint_adapter.store.rows()] == ["cancelled"]
    assert endpoint_adapter.get_terms(holder.held).revoked_at is not None
    assert endpoint_adapter.emit(ticket(2)) == []

    before = stored(endpoint_adapter)
    again = holder.send("DELETE", f"/cmi/terms/{holder.terms_id}")
    assert_problem(again, "conflict")
    assert stored(endpoint_adapter) == before
    # The customer still sees both records.
    events = [
        c["record"]["event"]
        for c in holder.send("GET", f"/cmi/terms/{holder.terms_id}").json()["consent"]
    ]
    assert events == ["granted", "revoked"]


def test_the_intermediary_revokes_its_terms_and_no_other_may(
    endpoint_adapter: Adapter, acme: Caller
) -> None:
    beta = add_intermediary(endpoint_adapter, acme.client, "beta")
    holder = register_terms(acme, pull_proposal())
    before = stored(endpoint_adapter)
    assert_problem(beta.send("DELETE", f"/cmi/terms/{holder.terms_id}"), "not-found")
    assert stored(endpoint_adapter) == before
    response = acme.send("DELETE", f"/cmi/terms/{holder.terms_id}")
    assert response.status_code == 200
    assert response.json()["outcome"] == "revoked"
    assert endpoint_adapter.list_terms() == []


def test_revoking_unknown_terms_is_not_found(acme: Caller) -> None:
    assert_problem(acme.send("DELETE", "/cmi/terms/terms_0000"), "not-found")


# -- GET /cmi/documents ------------------------------------------------------------------


def test_the_customer_pulls_documents_page_by_page(
    endpoint_adapter: Adapter, acme: Caller, document_signer: DocumentSigner
) -> None:
    holder = register_terms(acme, pull_proposal(customer_ref=linked(endpoint_adapter, acme)))
    for number in (1001, 1002, 1003):
        (emission,) = endpoint_adapter.emit(ticket(number))
        assert emission.state == "pull"

    first = holder.send("GET", "/cmi/documents?limit=2")
    assert first.status_code == 200, first.text
    page = first.json()
    assert [d["transaction_id"] for d in page["documents"]] == ["DL-1001", "DL-1002"]
    assert page["more"] is True
    assert page["next"] == page["documents"][-1]["cursor"]

    second = holder.send("GET", f"/cmi/documents?since={page['next']}&limit=2").json()
    assert [d["transaction_id"] for d in second["documents"]] == ["DL-1003"]
    assert second["more"] is False

    last = holder.send("GET", f"/cmi/documents?since={second['next']}&limit=2").json()
    assert last == {"documents": [], "next": second["next"], "more": False}

    for document in page["documents"] + second["documents"]:
        assert document["standard"] == "cmi-ticket"
        assert document["document_type"] == "ticket"
        assert document["id"].startswith("msg_")
        verify_document(document["xml"].encode(), document_signer.certificate)
    parsed = endpoint_adapter.parse(second["documents"][0]["xml"].encode())
    assert isinstance(parsed, Transaction)
    assert parsed.id == "DL-1003"


def test_a_pulled_statement_carries_its_detached_signature(
    endpoint_adapter: Adapter, acme: Caller, document_signer: DocumentSigner
) -> None:
    """OFX has no place for a signature: the statement is pulled as rendered, and its
    detached signature over those exact bytes comes beside it."""
    holder = register_terms(
        acme,
        pull_proposal(
            customer_ref=linked(endpoint_adapter, acme),
            standard="ofx",
            document_type="statement-sgml",
        ),
    )
    data = json.loads((ROOT / "examples" / "bank-transaction.json").read_text(encoding="utf-8"))
    data["customer_ref"] = CUSTOMER
    (emission,) = endpoint_adapter.emit(load_model(Transaction, data))
    (document,) = holder.send("GET", "/cmi/documents").json()["documents"]
    assert document["xml"].encode() == emission.document
    assert document["xml"].startswith("OFXHEADER:100")
    signature = document["signature"].encode()
    assert f'URI="{document["id"]}.ofx"'.encode() in signature
    assert verify_detached(emission.document, signature, document_signer.certificate)
    with pytest.raises(SignatureVerificationError):
        verify_detached(emission.document + b"\n", signature, document_signer.certificate)


def test_without_since_the_pull_starts_at_the_beginning(
    endpoint_adapter: Adapter, acme: Caller
) -> None:
    holder = register_terms(acme, pull_proposal(customer_ref=linked(endpoint_adapter, acme)))
    endpoint_adapter.emit(ticket())
    answer = holder.send("GET", "/cmi/documents").json()
    assert len(answer["documents"]) == 1
    assert answer["more"] is False


def test_a_customer_pulls_only_documents_of_its_own_terms(
    endpoint_adapter: Adapter, acme: Caller
) -> None:
    holder = register_terms(acme, pull_proposal(customer_ref=linked(endpoint_adapter, acme)))
    neighbour = register_terms(acme, pull_proposal(customer_ref="cust-0b1c2d"))
    endpoint_adapter.emit(ticket())
    assert len(holder.send("GET", "/cmi/documents").json()["documents"]) == 1
    # Naming other terms in the query does not widen what the holder sees.
    answer = neighbour.send("GET", f"/cmi/documents?terms={holder.terms_id}").json()
    assert answer["documents"] == []


@pytest.mark.parametrize(
    "query",
    [
        "since=abc",
        "since=-1",
        "since=1.5",
        "since=" + "9" * 41,
        "limit=0",
        "limit=101",
        "limit=-2",
        "limit=two",
        "limit=",
    ],
)
def test_a_bad_cursor_or_limit_is_invalid_input(acme: Caller, query: str) -> None:
    holder = register_terms(acme, pull_proposal())
    assert_problem(holder.send("GET", f"/cmi/documents?{query}"), "invalid-input")


def test_an_intermediary_pulls_only_for_terms_it_names(
    endpoint_adapter: Adapter, acme: Caller
) -> None:
    holder = register_terms(acme, pull_proposal(customer_ref=linked(endpoint_adapter, acme)))
    endpoint_adapter.emit(ticket())
    assert_problem(acme.send("GET", "/cmi/documents"), "forbidden")
    response = acme.send("GET", f"/cmi/documents?terms={holder.terms_id}")
    assert response.status_code == 200
    assert len(response.json()["documents"]) == 1
    beta = add_intermediary(endpoint_adapter, acme.client, "beta")
    assert_problem(beta.send("GET", f"/cmi/documents?terms={holder.terms_id}"), "not-found")


def test_nothing_is_pulled_after_revocation(endpoint_adapter: Adapter, acme: Caller) -> None:
    holder = register_terms(acme, pull_proposal())
    endpoint_adapter.emit(ticket())
    endpoint_adapter.revoke_terms(holder.held)
    assert_problem(holder.send("GET", "/cmi/documents"), "forbidden")
    assert_problem(acme.send("GET", f"/cmi/documents?terms={holder.terms_id}"), "forbidden")


def test_the_signature_covers_the_query(acme: Caller) -> None:
    holder = register_terms(acme, pull_proposal())
    headers = holder.headers("GET", "/cmi/documents?since=0")
    response = holder.client.get("/cmi/documents?since=1", headers=headers)
    assert_problem(response, "bad-signature")


def test_the_signature_covers_the_path_and_method(acme: Caller) -> None:
    holder = register_terms(acme, pull_proposal())
    headers = holder.headers("GET", f"/cmi/terms/{holder.terms_id}")
    response = holder.client.delete(f"/cmi/terms/{holder.terms_id}", headers=headers)
    assert_problem(response, "bad-signature")
    assert holder.send("GET", f"/cmi/terms/{holder.terms_id}").json()["terms"]["revoked_at"] is None


# -- mounted in the firm's own app -------------------------------------------------------


def test_the_endpoint_works_mounted_under_a_prefix(endpoint_adapter: Adapter) -> None:
    app = Starlette(routes=[Mount("/api", app=endpoint_adapter.asgi_app())])
    with TestClient(app) as client:
        acme = add_intermediary(endpoint_adapter, client, "acme")
        response = acme.send("POST", "/api/cmi/terms", json_body=pull_proposal())
        assert response.status_code == 201, response.text
        terms_id = response.json()["terms"]["id"]
        assert acme.send("GET", f"/api/cmi/terms/{terms_id}").status_code == 200
        assert client.get("/api/.well-known/cmi").json()["firm"] == "delta.com"


def test_location_points_inside_the_mounted_endpoint(endpoint_adapter: Adapter) -> None:
    app = Starlette(routes=[Mount("/api", app=endpoint_adapter.asgi_app())])
    with TestClient(app) as client:
        acme = add_intermediary(endpoint_adapter, client, "acme")
        response = acme.send("POST", "/api/cmi/terms", json_body=pull_proposal())
        assert response.status_code == 201
        terms = response.json()["terms"]
        assert response.headers["location"] == f"/api/cmi/terms/{terms['id']}"
        assert terms["href"] == response.headers["location"]


# -- bugs: user input that ends as an internal error ---------------------------------------


@pytest.mark.parametrize("query", ["since=%C2%B2", "limit=%C2%B2", "limit=" + "9" * 5000])
def test_odd_digits_in_the_query_are_invalid_input(acme: Caller, query: str) -> None:
    holder = register_terms(acme, pull_proposal())
    assert_problem(holder.send("GET", f"/cmi/documents?{query}"), "invalid-input")


@pytest.mark.parametrize(
    "body", [b'{"customer_ref": ' + b"1" * 5000 + b"}", b"[" * 30000], ids=["long-int", "deep"]
)
def test_json_the_decoder_chokes_on_is_invalid_input(
    endpoint_adapter: Adapter, acme: Caller, body: bytes
) -> None:
    response = acme.send(
        "POST", "/cmi/terms", body=body, headers={"content-type": "application/json"}
    )
    assert_problem(response, "invalid-input")


def test_a_signature_for_one_request_does_not_authorize_another(
    endpoint_adapter: Adapter, acme: Caller
) -> None:
    holder = register_terms(acme, pull_proposal())
    body = json.dumps(proposal()).encode()
    headers = acme.headers("POST", "/cmi/terms", body)
    response = acme.client.request(
        "DELETE", f"/cmi/terms/{holder.terms_id}", content=body, headers=headers
    )
    assert_problem(response, "bad-signature")
    assert endpoint_adapter.get_terms(holder.held).revoked_at is None
