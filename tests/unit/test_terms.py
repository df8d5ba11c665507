"""Sharing terms: the firm's answers (accept, one alternative, reject), consent records,
revocation, and the ``cmi_review_terms`` hook."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from cmi_sdk import (
    Adapter,
    ConsentRecord,
    DestinationNotAllowedError,
    EgressGuard,
    ModelValidationError,
    TermsDecision,
    TermsError,
    TermsNotFoundError,
    TermsPolicy,
    TermsProposal,
    hookimpl,
    load_model,
)
from cmi_sdk.signing import verify_document
from cmi_sdk.webhooks import generate_secret
from tests.support import CUSTOMER, emitting_adapter, register, signer

NOW = 1_900_000_000.0  # 2030-03-17T17:46:40Z


def _proposal(**fields: Any) -> TermsProposal:
    data: dict[str, Any] = {
        "customer_ref": CUSTOMER,
        "destination": "https://store.example/inbox",
        "secret": generate_secret(),
        "standard": "cmi-ticket",
        "purpose": {"code": "records", "text": "Keep my travel records"},
    }
    data.update(fields)
    return TermsProposal.model_validate(data)


@pytest.fixture
def terms_adapter(tmp_path: Path) -> Adapter:
    return emitting_adapter(tmp_path, egress=EgressGuard(), clock=lambda: NOW)


def test_accepted_terms_are_registered_with_a_signed_consent_record(terms_adapter: Adapter) -> None:
    decision = terms_adapter.propose_terms(_proposal(fields=["origin", "total"]))
    assert decision.outcome == "accepted"
    terms, consent, xml = decision.terms, decision.consent, decision.consent_xml
    assert terms is not None
    assert consent is not None
    assert xml is not None
    assert terms_adapter.get_terms(terms.id) == terms
    assert terms.created_at == dt.datetime.fromtimestamp(NOW, dt.UTC)
    assert (consent.event, consent.terms_id, consent.firm) == ("granted", terms.id, "delta.com")
    assert consent.terms_digest == terms.digest()
    assert consent.fields == ("origin", "total")
    assert consent.purpose.code == "records"
    verify_document(xml, signer().certificate)
    assert terms_adapter.parse(xml) == consent  # the signed document is the record
    assert terms_adapter.store.consent_records(terms.id) == [(consent, xml)]


def test_the_secret_never_shows(terms_adapter: Adapter) -> None:
    proposal = _proposal()
    decision = terms_adapter.propose_terms(proposal)
    assert decision.terms is not None
    assert proposal.secret not in repr(decision.terms)
    assert "secret" not in decision.terms.public_dict()
    assert decision.consent_xml is not None
    assert proposal.secret.encode() not in decision.consent_xml


def test_revocation_makes_a_revoked_consent_record(terms_adapter: Adapter) -> None:
    terms = register(terms_adapter, destination="https://store.example/inbox")
    consent = terms_adapter.revoke_terms(terms.id)
    assert consent.record.event == "revoked"
    assert consent.record.terms_id == terms.id
    verify_document(consent.xml, signer().certificate)
    assert terms_adapter.get_terms(terms.id).revoked_at is not None
    assert [r.event for r, _ in terms_adapter.store.consent_records(terms.id)] == [
        "granted",
        "revoked",
    ]
    assert terms_adapter.list_terms() == []
    assert [t.id for t in terms_adapter.list_terms(include_revoked=True)] == [terms.id]
    with pytest.raises(TermsError, match="already revoked"):
        terms_adapter.revoke_terms(terms.id)
    with pytest.raises(TermsNotFoundError):
        terms_adapter.revoke_terms("terms_nope")


def test_a_policy_outside_digest_interval_gets_one_alternative(tmp_path: Path) -> None:
    adapter = emitting_adapter(
        tmp_path,
        egress=EgressGuard(),
        clock=lambda: NOW,
        policy=TermsPolicy(min_digest_hours=6, max_digest_hours=24),
    )
    decision = adapter.propose_terms(_proposal(when="digest:1h"))
    assert decision.outcome == "alternative"
    assert decision.alternative is not None
    assert decision.alternative.when == "digest:6h"
    assert "6 to 24 hours" in (decision.reason or "")
    assert adapter.list_terms() == []  # nothing registered for an alternative
    # The customer accepts the alternative by proffering it.
    assert adapter.propose_terms(decision.alternative).outcome == "accepted"


def test_open_ended_terms_get_a_bounded_alternative(tmp_path: Path) -> None:
    adapter = emitting_adapter(
        tmp_path, egress=EgressGuard(), clock=lambda: NOW, policy=TermsPolicy(max_duration_days=30)
    )
    decision = adapter.propose_terms(_proposal())
    assert decision.alternative is not None
    assert decision.alternative.until == dt.datetime.fromtimestamp(NOW + 30 * 86400, dt.UTC)
    short = _proposal(until=dt.datetime.fromtimestamp(NOW + 86400, dt.UTC))
    assert adapter.propose_terms(short).outcome == "accepted"


def test_timings_the_firm_does_not_offer(tmp_path: Path) -> None:
    digest_only = emitting_adapter(
        tmp_path, egress=EgressGuard(), policy=TermsPolicy(timings=("digest",))
    )
    decision = digest_only.propose_terms(_proposal(when="now"))
    assert decision.alternative is not None
    assert decision.alternative.when == "digest:1h"
    pull = _proposal(when="pull", destination=None)
    assert digest_only.propose_terms(pull).outcome == "rejected"


def test_a_purpose_the_firm_does_not_accept_is_rejected(tmp_path: Path) -> None:
    adapter = emitting_adapter(
        tmp_path, egress=EgressGuard(), policy=TermsPolicy(purposes=("records", "tax"))
    )
    decision = adapter.propose_terms(
        _proposal(purpose={"code": "marketing", "text": "Tell me about offers"})
    )
    assert decision.outcome == "rejected"
    assert "marketing" in (decision.reason or "")
    assert "records, tax" in (decision.reason or "")
    assert adapter.list_terms() == []


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"standard": "nope"}, "does not send 'nope'"),
        ({"fields": ["origin", "colour"]}, "no field colour"),
        ({"standard": "cmi", "document_type": "offer"}, "not made from transactions"),
        ({"until": "2000-01-01T00:00:00Z"}, "in the past"),
    ],
)
def test_malformed_terms_are_errors_and_change_nothing(
    terms_adapter: Adapter, fields: dict[str, Any], match: str
) -> None:
    with pytest.raises(TermsError, match=match):
        terms_adapter.propose_terms(_proposal(**fields))
    assert terms_adapter.list_terms(include_revoked=True) == []


@pytest.mark.parametrize(
    "destination", ["http://store.example/", "https://10.0.0.1/", "https://user:pw@store.example/"]
)
def test_destinations_pass_the_egress_guard(terms_adapter: Adapter, destination: str) -> None:
    with pytest.raises(DestinationNotAllowedError):
        terms_adapter.propose_terms(_proposal(destination=destination))
    assert terms_adapter.list_terms(include_revoked=True) == []


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"secret": "hunter2"}, "secret"),
        ({"when": "digest:0h"}, "when"),
        ({"when": "weekly"}, "when"),
        ({"when": "pull"}, "(root)"),  # pull-only terms have no destination
        ({"destination": None}, "(root)"),  # pushing terms need one
        ({"fields": ["Origin"]}, "fields.0"),
        ({"customer_ref": "jane@example.com"}, "customer_ref"),
    ],
)
def test_proposals_are_validated(fields: dict[str, Any], path: str) -> None:
    data = _proposal().model_dump()
    data.update(fields)
    with pytest.raises(ModelValidationError) as info:
        load_model(TermsProposal, data)
    assert path in {issue.path for issue in info.value.issues}


class _FirmDesk:
    """A firm's own review: a human desk that only takes bookkeeping purposes."""

    def __init__(self) -> None:
        self.seen: list[TermsPolicy] = []

    @hookimpl
    def cmi_review_terms(
        self, proposal: TermsProposal, policy: TermsPolicy, now: dt.datetime
    ) -> TermsDecision | None:
        self.seen.append(policy)
        assert now.tzinfo is not None
        if proposal.purpose.code == "bookkeeping":
            return TermsDecision(outcome="accepted")
        return None  # the default policy decides the rest


def test_cmi_review_terms_is_the_firms_to_override(tmp_path: Path) -> None:
    desk = _FirmDesk()
    adapter = emitting_adapter(
        tmp_path,
        egress=EgressGuard(),
        plugins=[desk],
        policy=TermsPolicy(purposes=("records",)),
    )
    bookkeeping = _proposal(purpose={"code": "bookkeeping", "text": "My accountant"})
    assert adapter.propose_terms(bookkeeping).outcome == "accepted"
    assert adapter.propose_terms(_proposal()).outcome == "accepted"  # default: records ok
    marketing = _proposal(purpose={"code": "marketing", "text": "Offers"})
    assert adapter.propose_terms(marketing).outcome == "rejected"
    # The published policy lists the installed standards that can express transactions.
    assert desk.seen[0].standards is not None
    assert {"cmi", "cmi-ticket"} <= set(desk.seen[0].standards)


def test_consent_records_round_trip_as_models() -> None:
    record = ConsentRecord.model_validate(
        {
            "id": "consent_1",
            "event": "granted",
            "issued_at": "2030-03-17T17:46:40Z",
            "firm": "delta.com",
            "customer_ref": CUSTOMER,
            "terms_id": "terms_1",
            "terms_digest": "0" * 64,
            "purpose": {"code": "records", "text": "Keep & file <mine>"},
            "standard": "cmi-ticket",
            "document_type": "ticket",
            "when": "digest:6h",
            "fields": [],
        }
    )
    adapter = Adapter()
    xml = adapter.render(record, standard="cmi", document_type="consent")
    assert adapter.parse(xml) == record
