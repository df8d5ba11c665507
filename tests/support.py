"""Shared builders for the emission tests: a signer, an adapter on its own store, terms."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from cmi_sdk import (
    Adapter,
    EgressGuard,
    Link,
    SharingTerms,
    TermsProposal,
    Transaction,
    load_model,
)
from cmi_sdk._serving import serving
from cmi_sdk.outbox.sqlite import SQLiteStore
from cmi_sdk.signing import DocumentSigner, self_signed_certificate
from cmi_sdk.testing import link_customer
from cmi_sdk.webhooks import generate_secret

ROOT = Path(__file__).resolve().parent.parent
CUSTOMER = "cust-7f3a9c"


@functools.cache
def signer() -> DocumentSigner:
    """One ECDSA P-256 signer for the whole run (key generation is the slow part)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return DocumentSigner(key=key, certificate=self_signed_certificate(key, common_name="firm"))


def make_adapter(tmp_path: Path, **options: Any) -> Adapter:
    """An adapter with its own SQLite store in ``tmp_path``, signing, loopback allowed."""
    options.setdefault("store", SQLiteStore(tmp_path / "cmi.db"))
    options.setdefault("signer", signer())
    options.setdefault("egress", EgressGuard(allow_loopback=True))
    options.setdefault("firm", "delta.com")
    return Adapter(**options)


def ticket(**changes: Any) -> Transaction:
    """The seed's ticket as a transaction, with ``changes`` applied (validated)."""
    data = load_model(Transaction, (ROOT / "examples" / "ticket.json").read_text()).model_dump()
    data.update(changes)
    return Transaction.model_validate(data)


def register(adapter: Adapter, *, intermediary: str | None = None, **fields: Any) -> SharingTerms:
    """Register terms (accepted as proposed, or the test fails) and return them; with
    ``intermediary``, as that intermediary proffers them (for its own reference)."""
    data: dict[str, Any] = {
        "customer_ref": CUSTOMER,
        "destination": "http://127.0.0.1:9/inbox",
        "secret": generate_secret(),
        "standard": "cmi-ticket",
        "purpose": {"code": "records", "text": "Keep my travel records"},
    }
    data.update(fields)
    decision = adapter.propose_terms(TermsProposal.model_validate(data), intermediary=intermediary)
    assert decision.outcome == "accepted", decision.reason
    assert decision.terms is not None
    return decision.terms


def link(adapter: Adapter, account: str, intermediary: str) -> Link:
    """Link ``account`` to ``intermediary`` as a customer does (a code, redeemed)."""
    return link_customer(adapter, account, intermediary)


@contextlib.contextmanager
def serve_app(app: Any, *, timeout: float = 10.0) -> Iterator[str]:
    """Serve any ASGI app on a free loopback port; yield its base URL, ending in ``/``."""
    with serving(app, timeout=timeout) as url:
        yield url + "/"


class Clock:
    """A settable clock in POSIX seconds, for adapters, stores and plugins."""

    def __init__(self, now: float = 1_900_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Plan = Callable[[int], "int | tuple[int, dict[str, str]] | None"]


class Faulty:
    """An ASGI wrapper that answers the n-th request (1-based) as ``plan(n)`` says: a
    status (with optional headers) instead of the wrapped app, or None to pass it on."""

    def __init__(self, inner: Any, plan: Plan) -> None:
        self.inner = inner
        self.plan = plan
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            answer = self.plan(self.requests)
            if answer is None:
                await self.inner(scope, receive, send)
                return
            status, headers = answer if isinstance(answer, tuple) else (answer, {})
            while (await receive()).get("more_body"):
                pass
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
                }
            )
            await send({"type": "http.response.body", "body": b""})
        finally:
            self.in_flight -= 1
