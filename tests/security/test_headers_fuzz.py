"""Every header the firm's endpoint and the customer's store read, fuzzed: a signed request
with one header replaced, dropped or sent twice is answered with a 4xx problem, never a 500.

Today ``webhook-timestamp: ²`` is a 500 with a traceback: ``'²'.isdigit()`` is true, and
``int('²')`` raises. The apps are called in-process through ASGI with the raw header bytes,
as a server hands them over (any byte but CR, LF and NUL; Starlette decodes them as latin-1).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cmi_sdk import Request, load_model
from cmi_sdk.client import signed_headers
from cmi_sdk.receiver import CustomerStore
from cmi_sdk.webhooks import WebhookSigner, generate_secret
from tests.fakes import Shop
from tests.support import CUSTOMER, emitting_adapter, register

XML = b'<?xml version="1.0" encoding="UTF-8"?>\n<note>hello</note>\n'

AUTH_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
ENDPOINT_HEADERS = (*AUTH_HEADERS, "cmi-intermediary", "cmi-terms")
OTHER_HEADERS = ("content-length", "content-type", "accept")

_ids = itertools.count()

# Header values as a server passes them on: bytes other than CR, LF and NUL.
header_bytes = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c not in b"\r\n\x00")
) | st.sampled_from(
    [
        "²".encode("latin-1"),
        "¹²³".encode("latin-1"),
        "١٢٣".encode(),
        b"1" * 13,
        b"-1",
        b"+1700000000",
        b" 1700000000",
        b"1700000000\t",
        b"0x10",
        b"1e9",
        b"",
        b" ",
        b"v1,",
        b"v1,\xff\xfe",
        b"v1a,====",
        b"../etc/passwd",
        b"a.b",
        b"\xb2",
        b"application/xml\xff",
        b"99999999999999999999999999",
    ]
)


@dataclass
class Target:
    """One app and how to sign a request for it; ``sign(msg_id)`` gives its headers."""

    app: Any
    method: str
    path: str
    body: bytes
    sign: Callable[[str], dict[str, str]]
    reads: tuple[str, ...]


def call(
    app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[int, dict[bytes, bytes], bytes]:
    """Call ``app`` once through ASGI; its status, headers and body."""
    messages: list[dict[str, Any]] = []
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], dict(start.get("headers", [])), content


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Target]:
    root: Path = tmp_path_factory.mktemp("fuzz")
    adapter = emitting_adapter(root, plugins=[Shop()])
    request = load_model(
        Request,
        {
            "id": "req-fuzz-1",
            "kind": "flight",
            "customer_ref": CUSTOMER,
            "reply_to": "relay-1",
            "created_at": dt.datetime.now(dt.UTC),
            "wanted": {"origin": "ATL", "destination": "CDG", "date": "2026-12-01"},
        },
    )
    request_xml = adapter.render(request, standard="cmi", document_type="request")
    secret = generate_secret()
    adapter.store.add_intermediary("relay", secret, at=time.time())
    terms = register(adapter, when="pull", destination=None)
    app = adapter.asgi_app()
    store_secret = generate_secret()
    store = CustomerStore(directory=root / "inbox", secrets=[store_secret])

    def as_relay(method: str, path: str, body: bytes) -> Callable[[str], dict[str, str]]:
        return lambda msg_id: signed_headers(
            secret=secret, method=method, target=path, body=body, intermediary="relay",
            msg_id=msg_id,
        )  # fmt: skip

    def as_holder(msg_id: str) -> dict[str, str]:
        return signed_headers(
            secret=terms.secret, method="GET", target="/cmi/documents", terms_id=terms.id,
            msg_id=msg_id,
        )  # fmt: skip

    def delivery(msg_id: str) -> dict[str, str]:
        return WebhookSigner(secret=store_secret).headers(msg_id, XML)

    reads = (*ENDPOINT_HEADERS, *OTHER_HEADERS)
    return {
        "terms": Target(app, "GET", "/cmi/terms", b"", as_relay("GET", "/cmi/terms", b""), reads),
        "requests": Target(
            app,
            "POST",
            "/cmi/requests",
            request_xml,
            as_relay("POST", "/cmi/requests", request_xml),
            reads,
        ),
        "documents": Target(app, "GET", "/cmi/documents", b"", as_holder, reads),
        "links": Target(app, "GET", "/cmi/links", b"", as_relay("GET", "/cmi/links", b""), reads),
        "store": Target(
            store.app, "POST", "/inbox", XML, delivery, (*AUTH_HEADERS, *OTHER_HEADERS)
        ),
    }


def _request(target: Target) -> list[tuple[bytes, bytes]]:
    headers = target.sign(f"msg_fuzz_{next(_ids)}")
    headers["content-type"] = "application/xml"
    headers["content-length"] = str(len(target.body))
    return [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]


def _check(target: Target, headers: list[tuple[bytes, bytes]]) -> int:
    status, answer_headers, body = call(
        target.app, target.method, target.path, headers, target.body
    )
    assert status < 500, (headers, body)
    if status >= 400:
        kind = answer_headers.get(b"content-type", b"")
        assert kind.startswith(b"application/problem+"), (status, kind)
        if kind.startswith(b"application/problem+json"):
            problem = json.loads(body)
            assert problem["status"] == status
            assert problem["type"].startswith("urn:cmi:problem:")
    return status


@pytest.mark.parametrize("name", ["terms", "requests", "documents", "links", "store"])
def test_a_signed_request_is_answered(targets: dict[str, Target], name: str) -> None:
    # The baseline the fuzzing departs from: unchanged, each request is answered.
    target = targets[name]
    assert _check(target, _request(target)) == 200


@pytest.mark.parametrize("name", ["terms", "requests", "documents", "links", "store"])
@pytest.mark.parametrize("header", [*ENDPOINT_HEADERS, *OTHER_HEADERS])
@given(value=header_bytes, how=st.sampled_from(["replace", "twice"]))
@example(value="²".encode("latin-1"), how="replace")
@example(value=b"", how="drop")
def test_one_fuzzed_header_is_a_4xx_problem_never_a_500(
    targets: dict[str, Target], name: str, header: str, value: bytes, how: str
) -> None:
    target = targets[name]
    if header not in target.reads:
        return
    headers = _request(target)
    original = dict(headers).get(header.encode())
    wanted = header.encode()
    if how == "drop":
        headers = [(k, v) for k, v in headers if k != wanted]
    elif how == "twice":
        headers.append((wanted, value))
    else:
        headers = [(k, v) for k, v in headers if k != wanted] + [(wanted, value)]
    status = _check(target, headers)
    changed = how != "replace" or value != original
    if header in ENDPOINT_HEADERS and changed and (header in target.reads):
        # Whoever signs it, a request whose authentication was tampered with is refused
        # as unauthenticated (401) or malformed (400).
        is_signer = header in ("cmi-intermediary", "cmi-terms")
        named = name == "documents" if header == "cmi-terms" else name != "documents"
        if not is_signer or named or how != "drop":
            assert status in (400, 401), (header, value, how, status)
