"""Rows, offers and claims the contract tests store, and a race of threads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from cmi_sdk import Offer, Request, load_model
from cmi_sdk.outbox import AcceptanceClaim, AttemptResult, NewRow, StoredOffer
from tests.support import CUSTOMER, ROOT

NOW = 1_900_000_000.0
ACCOUNT = "acct-0001"


def new_row(n: int, **changes: Any) -> NewRow:
    data: dict[str, Any] = {
        "msg_id": f"msg_{n:04d}",
        "terms_id": "terms_a",
        "customer_ref": CUSTOMER,
        "transaction_id": f"tx-{n}",
        "standard": "cmi",
        "document_type": "transaction",
        "destination": f"https://d{n % 3}.example/inbox",
        "body": f"<doc n='{n}'/>".encode(),
        "created_at": NOW,
        "state": "pending",
        "next_attempt_at": NOW,
    }
    data.update(changes)
    return NewRow(**data)


def outcome(msg_id: str, owner: str, kind: str, **changes: Any) -> AttemptResult:
    data: dict[str, Any] = {
        "msg_id": msg_id,
        "owner": owner,
        "attempt": 1,
        "started_at": NOW,
        "finished_at": NOW + 1,
        "outcome": kind,
        "status": {"delivered": 200, "retry": 503, "dead": 400}[kind],
    }
    if kind == "retry":
        data.update(next_attempt_at=NOW + 60, error="HTTP 503")
    elif kind == "dead":
        data["error"] = "HTTP 400"
    data.update(changes)
    return AttemptResult(**data)


def stored_offer() -> StoredOffer:
    return StoredOffer(
        offer=load_model(Offer, (ROOT / "examples" / "offer.json").read_text()),
        request=load_model(Request, (ROOT / "examples" / "request.json").read_text()),
        xml=b"<offers/>",
        intermediary="acme",
    )


def claim(acceptance_id: str, offer_id: str, owner: str) -> AcceptanceClaim:
    return AcceptanceClaim(
        acceptance_id=acceptance_id,
        offer_id=offer_id,
        intermediary="acme",
        acceptance="{}",
        owner=owner,
        lease_until=NOW + 60,
    )


def race(count: int, target: Callable[[int], None]) -> None:
    """Run ``target(0..count-1)`` on threads released together; re-raise what failed."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            barrier.wait(timeout=10)
            target(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
