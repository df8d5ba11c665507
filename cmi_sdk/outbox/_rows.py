"""Row mapping both bundled stores share: their statements return columns in the same
order and take parameters in the same order, so one function turns a row into its model
(or a model into its parameters) for SQLite and PostgreSQL alike."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, cast

from cmi_sdk._exceptions import ConfigurationError
from cmi_sdk._models import ConsentRecord, Link, Offer, Request, SharingTerms, utc_at
from cmi_sdk._secrets import SecretsKeyring, open_secret, seal_secret
from cmi_sdk.outbox import (
    STATES,
    AcceptanceClaim,
    AttemptResult,
    DigestGroup,
    NewRow,
    OutboxRow,
    OutboxStatus,
    State,
    StoredOffer,
)
from cmi_sdk.outbox import _intermediaries as intermediaries
from cmi_sdk.outbox._intermediaries import Intermediary

__all__ = [
    "ATTEMPT_OUTCOMES",
    "attempt_of_row",
    "claim_params",
    "consent_params",
    "digest_groups",
    "intermediary_of_row",
    "link_of_row",
    "need_keyring",
    "outbox_row",
    "revoked_terms_json",
    "row_fields",
    "row_params",
    "status_of",
    "stored_offer_of_row",
    "terms_of_row",
    "terms_params",
]

ATTEMPT_OUTCOMES = ("delivered", "retry", "dead")


def terms_of_row(values: Sequence[Any], keyring: SecretsKeyring | None) -> SharingTerms:
    """Terms from their JSON and their (perhaps sealed) secret."""
    data = json.loads(values[0])
    data["secret"] = open_secret(keyring, values[1], context=f"terms:{data['id']}")
    return SharingTerms.model_validate(data)


def terms_params(terms: SharingTerms, keyring: SecretsKeyring | None) -> tuple[Any, ...]:
    """Terms as ``insert_terms`` takes them: the secret sealed when there is a keyring."""
    return (
        terms.id,
        terms.customer_ref,
        terms.intermediary,
        json.dumps(terms.public_dict()),
        seal_secret(keyring, terms.secret, context=f"terms:{terms.id}"),
        terms.created_at.timestamp(),
        None if terms.until is None else terms.until.timestamp(),
    )


def consent_params(consent: ConsentRecord, xml: bytes) -> tuple[Any, ...]:
    """A consent record as ``insert_consent`` takes it."""
    return (
        consent.id,
        consent.terms_id,
        consent.event,
        consent.issued_at.timestamp(),
        consent.model_dump_json(),
        xml,
    )


def revoked_terms_json(text: str, consent: ConsentRecord) -> str:
    """The terms' JSON, saying they were revoked when the consent record was issued."""
    data = json.loads(text)
    data["revoked_at"] = consent.issued_at.isoformat()
    return json.dumps(data)


def link_of_row(values: Sequence[Any]) -> Link:
    """A link from its columns: id, account, intermediary, reference, created, revoked."""
    return Link.model_validate(
        {
            "id": values[0],
            "account": values[1],
            "intermediary": values[2],
            "customer_ref": values[3],
            "created_at": utc_at(values[4]),
            "revoked_at": None if values[5] is None else utc_at(values[5]),
        }
    )


def row_params(r: NewRow) -> tuple[Any, ...]:
    """A new outbox row as ``insert_row`` takes it (PostgreSQL adds its ordering key)."""
    return (
        r.msg_id,
        r.terms_id,
        r.customer_ref,
        r.transaction_id,
        r.standard,
        r.document_type,
        r.destination,
        r.body,
        r.created_at,
        r.state,
        r.next_attempt_at,
        r.model,
    )


def row_fields(values: Sequence[Any]) -> dict[str, Any]:
    """An outbox row's fields from the ``row_columns`` of a statement."""
    return {
        "seq": values[0],
        "msg_id": values[1],
        "terms_id": values[2],
        "customer_ref": values[3],
        "transaction_id": values[4],
        "standard": values[5],
        "document_type": values[6],
        "destination": values[7],
        "body": bytes(values[8]),
        "created_at": values[9],
        "state": cast(State, values[10]),
        "attempts": values[11],
        "next_attempt_at": values[12],
        "lease_owner": values[13],
        "lease_until": values[14],
        "last_status": values[15],
        "last_error": values[16],
        "delivered_at": values[17],
    }


def outbox_row(values: Sequence[Any]) -> OutboxRow:
    """An outbox row from the ``row_columns`` of a statement."""
    return OutboxRow(**row_fields(values))


def attempt_of_row(r: Sequence[Any]) -> AttemptResult:
    """An attempt from the columns ``attempts`` reads."""
    return AttemptResult(
        msg_id=r[0],
        owner=r[1],
        attempt=r[2],
        started_at=r[3],
        finished_at=r[4],
        outcome=r[5],
        status=r[6],
        error=r[7],
        next_attempt_at=r[8],
    )


def digest_groups(found: Iterable[Sequence[Any]]) -> list[DigestGroup]:
    """The rows ``due_digests`` reads (terms, due, msg_id, model; by terms and due) as
    one group a window."""
    groups: dict[tuple[str, float], list[tuple[str, str]]] = {}
    for terms_id, due, msg_id, model in found:
        groups.setdefault((terms_id, float(due)), []).append((msg_id, model))
    return [
        DigestGroup(
            terms_id=terms_id,
            due=due,
            msg_ids=tuple(m for m, _ in rows),
            models=tuple(d for _, d in rows),
        )
        for (terms_id, due), rows in groups.items()
    ]


def status_of(
    counts: Iterable[Sequence[Any]], oldest: float | None, disabled: Iterable[str], now: float
) -> OutboxStatus:
    """The outbox's status from its counts by state and its oldest waiting row."""
    by_state: dict[str, int] = dict.fromkeys(STATES, 0)
    by_state.update((state, int(n)) for state, n in counts)
    return OutboxStatus(
        counts=by_state,
        oldest_pending_age=None if oldest is None else max(0.0, now - oldest),
        disabled_destinations=tuple(sorted(disabled)),
    )


def stored_offer_of_row(values: Sequence[Any]) -> StoredOffer:
    """An offer from the columns ``get_offer`` reads."""
    offer, request, xml, intermediary = values
    return StoredOffer(
        offer=Offer.model_validate_json(offer),
        request=Request.model_validate_json(request),
        xml=bytes(xml),
        intermediary=intermediary,
    )


def claim_params(claim: AcceptanceClaim, now: float) -> tuple[Any, ...]:
    """A claimed acceptance as ``claim_acceptance`` takes it."""
    return (
        claim.acceptance_id,
        claim.offer_id,
        now,
        now,
        claim.intermediary,
        claim.acceptance,
        claim.owner,
        claim.lease_until,
    )


def intermediary_of_row(row: Sequence[Any], keyring: SecretsKeyring | None) -> Intermediary:
    """An intermediary from its ``intermediary_columns``, its secrets opened."""
    return Intermediary(
        name=row[0],
        created_at=row[1],
        secrets=tuple(intermediaries.decode(row[2], row[0], keyring)),
        revoked_at=row[3],
        generation=row[4],
    )


def need_keyring(keyring: SecretsKeyring | None) -> SecretsKeyring:
    """The store's keyring, for a call that seals secrets.

    :raises ConfigurationError: the store has none."""
    if keyring is None:
        raise ConfigurationError(
            "no secrets key is configured: set CMI_SECRETS_KEY or CMI_SECRETS_KEY_FILE"
            " (make a key with `cmi secrets generate-key`)"
        )
    return keyring
