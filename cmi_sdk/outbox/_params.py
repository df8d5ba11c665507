"""The parameter rows the bundled stores' SQL takes: shared by the SQLite and PostgreSQL
stores so both write the same columns in the same order.

Not part of the store contract: a store of another kind maps rows its own way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cmi_sdk.outbox import AttemptResult, StoredOffer

__all__ = ["CompletionParams", "offer_row"]


def offer_row(stored: StoredOffer) -> tuple[Any, ...]:
    """An offer as both stores' SQL takes it: id, request id, customer, intermediary, the
    offer and the request as JSON, the signed answer, valid until, created (POSIX seconds)."""
    offer = stored.offer
    return (
        offer.id,
        offer.request_id,
        offer.customer_ref,
        stored.intermediary,
        offer.model_dump_json(),
        stored.request.model_dump_json(),
        stored.xml,
        offer.valid_until.timestamp(),
        offer.created_at.timestamp(),
    )


@dataclass(frozen=True, slots=True)
class CompletionParams:
    """A batch of attempt results as the parameter rows both stores' SQL takes: the
    attempt history, and the delivered, retry and dead updates."""

    attempts: list[tuple[Any, ...]]
    delivered: list[tuple[Any, ...]]
    retry: list[tuple[Any, ...]]
    dead: list[tuple[Any, ...]]

    @classmethod
    def of(cls, results: Sequence[AttemptResult]) -> CompletionParams:
        """Split ``results`` into the four parameter lists."""
        return cls(
            attempts=[
                (
                    r.msg_id,
                    r.attempt,
                    r.owner,
                    r.started_at,
                    r.finished_at,
                    r.outcome,
                    r.status,
                    r.error,
                    r.next_attempt_at,
                )
                for r in results
            ],
            delivered=[
                (r.finished_at, r.attempt, r.status, r.msg_id)
                for r in results
                if r.outcome == "delivered"
            ],
            retry=[
                (r.next_attempt_at, r.attempt, r.status, r.error, r.msg_id, r.owner)
                for r in results
                if r.outcome == "retry"
            ],
            dead=[
                (r.finished_at, r.attempt, r.status, r.error, r.msg_id, r.owner)
                for r in results
                if r.outcome == "dead"
            ],
        )
