"""The emit pipeline and the terms service behind :class:`~cmi_sdk.Adapter`.

For every customer a transaction concerns, and every one of their active terms::

    select the standard (hook) ─▶ render ─▶ validate ─▶ minimize to the allowed fields
    ─▶ sign (enveloped XML-DSig) ─▶ outbox row (in the caller's transaction when given)

Nothing is emitted for a customer without terms (it is logged, not raised).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from cmi_sdk._exceptions import (
    CMIError,
    ConfigurationError,
    NotFoundError,
    PluginError,
    StoreError,
    TermsError,
)
from cmi_sdk._models import (
    TRANSACTION_KINDS,
    ConsentRecord,
    SharingTerms,
    TermsDecision,
    TermsPolicy,
    TermsProposal,
    Transaction,
    utc_at,
)
from cmi_sdk._standards import (
    DocumentType,
    Standard,
    StandardRegistry,
)
from cmi_sdk.outbox import DigestGroup, EmissionProblem, NewRow, OutboxStore, State

if TYPE_CHECKING:
    from cmi_sdk._documents import Documents
    from cmi_sdk.egress import EgressGuard

__all__ = ["Emission", "Emitter", "SignedConsent"]

log = logging.getLogger("cmi_sdk.emit")


@dataclass(frozen=True, slots=True)
class Emission:
    """One document the emit pipeline wrote to the outbox.

    :ivar msg_id: its ``webhook-id``, stable across retries.
    :ivar terms_id: the terms it goes out under.
    :ivar customer_ref: the customer it is for.
    :ivar standard: its standard.
    :ivar document_type: its document type.
    :ivar state: ``pending`` (to be pushed), ``digest`` (held for its window's digest
        document, for standards that have one) or ``pull``.
    :ivar withheld: the fields the terms withheld from it.
    :ivar signed: whether it carries the firm's XML-DSig signature.
    :ivar due: when its first delivery attempt is due (the end of the digest window for
        digest terms).
    :ivar document: the bytes that were stored.
    """

    msg_id: str
    terms_id: str
    customer_ref: str
    standard: str
    document_type: str
    state: State
    withheld: tuple[str, ...]
    signed: bool
    due: dt.datetime
    document: bytes


@dataclass(frozen=True, slots=True)
class SignedConsent:
    """A consent record and its signed ``cmi`` ``consent`` document."""

    record: ConsentRecord
    xml: bytes


def _msg_id(*parts: str) -> str:
    # A content-derived id: the same document for the same terms is one message, even when
    # the firm emits it twice, so the outbox and the receiver both store it once. 128 bits
    # of SHA-256, in hex: safe in file names and in the signed webhook content.
    return "msg_" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def transaction_document_type(std: Standard, name: str | None) -> DocumentType[Any]:
    """The standard's document type for transactions: ``name``, or the only one there is."""
    if name is not None:
        doc_type = std.document_type(name)
        if not issubclass(Transaction, doc_type.model):
            raise TermsError(f"{std.name} {doc_type.name} documents are not made from transactions")
        return doc_type
    found = [d for d in std.document_types if d.model is Transaction]
    if len(found) > 1 and std.default_document_type is not None:
        # A standard with two forms of one document (OFX 2 and OFX 1) names the usual one.
        found = [d for d in found if d.name == std.default_document_type]
    if len(found) != 1:
        names = ", ".join(d.name for d in found) or "none"
        raise TermsError(
            f"standard {std.name!r} has {len(found)} document types for transactions"
            f" ({names}); name one"
        )
    return found[0]


class Emitter:
    """The emit pipeline and terms service of one adapter (built by the adapter)."""

    def __init__(
        self,
        *,
        hook: pluggy.HookRelay,
        standards: StandardRegistry,
        store: Callable[[], OutboxStore],
        documents: Documents,
        egress: EgressGuard,
        policy: TermsPolicy,
        firm: str,
        clock: Callable[[], float],
        transaction_kinds: Iterable[str] = TRANSACTION_KINDS,
    ) -> None:
        self._hook = hook
        self._standards = standards
        self._store = store
        self._documents = documents
        self.egress = egress
        self.policy = policy
        self.firm = firm
        self._clock = clock
        self.transaction_kinds = tuple(transaction_kinds)
        """The kinds of transaction the firm emits: terms must be able to carry one."""

    # -- emit -----------------------------------------------------------------------------

    def emit(
        self,
        transactions: Sequence[Transaction],
        *,
        connection: object | None,
        customer_refs: Sequence[str] | None,
        intermediary: str | None = None,
    ) -> list[Emission]:
        rows, emissions, problems = self.prepare(
            transactions,
            connection=connection,
            customer_refs=customer_refs,
            intermediary=intermediary,
        )
        if rows:
            self._store().insert(rows, connection=connection)
        if problems:
            self._store().add_emission_problems(problems, connection=connection)
        return emissions

    def prepare(
        self,
        transactions: Sequence[Transaction],
        *,
        connection: object | None,
        customer_refs: Sequence[str] | None,
        intermediary: str | None = None,
    ) -> tuple[list[NewRow], list[Emission], list[EmissionProblem]]:
        """The outbox rows of ``transactions`` for everyone they concern, not yet written,
        and the problems of the documents that could not be made (for the operator).

        A customer's terms whose document type cannot express a transaction's kind are
        skipped (logged); a document that fails to map, render, validate or sign for one
        set of terms is a problem, not an error: the customer's other terms still get
        theirs.

        :param intermediary: the intermediary the transactions were made through (a
            booking), whose references ``customer_refs`` are; ``None`` for the firm's own.
        """
        now = self._clock()
        rows: list[NewRow] = []
        emissions: list[Emission] = []
        problems: list[EmissionProblem] = []
        # One read of a customer's terms per call: a batch is one commit at one moment.
        terms_of: dict[str, list[SharingTerms]] = {}
        for tx in transactions:
            for ref in customer_refs or (tx.customer_ref,):
                terms_list = terms_of.get(ref)
                if terms_list is None:
                    terms_list = terms_of[ref] = self._recipients(
                        ref, intermediary=intermediary, now=now, connection=connection
                    )
                if not terms_list:
                    log.info(
                        "no active sharing terms for customer %s: transaction %s not emitted"
                        " to them",
                        ref,
                        tx.id,
                    )
                    continue
                own = tx if ref == tx.customer_ref else _for_customer(tx, ref)
                for terms in terms_list:
                    try:
                        made = self._document(own, terms, now)
                    except (StoreError, ConfigurationError):
                        raise  # the emission itself failed, not one document
                    except Exception as exc:
                        problems.append(_problem(own, terms, exc, now))
                        continue
                    if made is not None:
                        rows.append(made[0])
                        emissions.append(made[1])
        return rows, emissions, problems

    def _recipients(
        self, ref: str, *, intermediary: str | None, now: float, connection: object | None
    ) -> list[SharingTerms]:
        """The active terms a document for ``ref`` goes out under; each document carries
        its terms' ``customer_ref``.

        With no ``intermediary``, ``ref`` is the firm's account id: its direct terms and the
        terms of each of its active links. A booking through an intermediary names that
        intermediary's reference: an active link's account gets it as above; an unlinked
        reference (the intermediary's own pseudonym) only the intermediary's own terms."""
        return self._store().active_terms(
            ref, now, intermediary=intermediary, connection=connection
        )

    def _document(
        self, tx: Transaction, terms: SharingTerms, now: float
    ) -> tuple[NewRow, Emission] | None:
        """The row and emission of ``tx`` under ``terms``; None when their document type
        cannot express its kind (a customer may hold terms for each kind of transaction).

        :raises CMIError: the document cannot be made (see :meth:`prepare`).
        """
        if tx.customer_ref != terms.customer_ref:
            # A document carries the reference of the terms it goes under: the account's
            # for the firm's direct terms, each link's own for that link's, never another's.
            tx = _for_customer(tx, terms.customer_ref)
        choice = self._hook.cmi_select_standard(transaction=tx, terms=terms)
        if choice is None:
            raise PluginError("no cmi_select_standard implementation chose a standard")
        std_name, type_name = choice
        std = self._standards.get(std_name)
        doc_type = transaction_document_type(std, type_name)
        if not doc_type.expresses(tx.kind):
            log.info(
                "transaction %s (%s) skipped for terms %s: %s %s documents do not express it",
                tx.id,
                tx.kind,
                terms.id,
                std.name,
                doc_type.name,
            )
            return None
        made = self._documents.for_terms(tx, terms, standard=std, document_type=doc_type)
        msg_id = _msg_id(
            terms.id, tx.id, std.name, doc_type.name, hashlib.sha256(made.xml).hexdigest()
        )
        signed, withheld = made.body, made.withheld
        model = None
        if terms.when == "pull":
            state: State = "pull"
            due = now
        else:
            state = "pending"
            due = _digest_due(terms, now)
            if terms.digest_hours is not None and doc_type.digest is not None:
                # Held for the window's one digest document (see merge_due_digests).
                state = "digest"
                model = tx.model_dump_json()
        row = NewRow(
            msg_id=msg_id,
            terms_id=terms.id,
            customer_ref=terms.customer_ref,
            transaction_id=tx.id,
            standard=std.name,
            document_type=doc_type.name,
            destination=terms.destination,
            body=signed,
            created_at=now,
            state=state,
            next_attempt_at=due,
            model=model,
        )
        emission = Emission(
            msg_id=msg_id,
            terms_id=terms.id,
            customer_ref=terms.customer_ref,
            standard=std.name,
            document_type=doc_type.name,
            state=state,
            withheld=withheld,
            signed=self._documents.signer is not None,
            due=utc_at(due),
            document=signed,
        )
        return row, emission

    def merge_due_digests(self) -> int:
        """Turn every ended digest window into one document of the terms' standard (an
        OFX statement of all the window's lines), ready to go out; return how many.

        A window whose documents cannot be put together (transactions of different
        accounts, say) goes out one document at a time instead, and the log says why.
        """
        store = self._store()
        now = self._clock()
        written = 0
        for group in store.due_digests(now):
            try:
                row = self._digest_row(store.get_terms(group.terms_id), group, now)
            except CMIError as exc:
                log.warning(
                    "digest of terms %s (%d documents) cannot be merged, sending them one by"
                    " one: %s",
                    group.terms_id,
                    len(group.msg_ids),
                    exc,
                )
                row = None
            if store.merge_digest(group.msg_ids, row) and row is not None:
                written += 1
        return written

    def _digest_row(self, terms: SharingTerms, group: DigestGroup, now: float) -> NewRow:
        choice = self._hook.cmi_select_standard(
            transaction=Transaction.model_validate_json(group.models[0]), terms=terms
        )
        std = self._standards.get(choice[0] if choice else terms.standard)
        doc_type = transaction_document_type(std, choice[1] if choice else terms.document_type)
        models = [doc_type.model.model_validate_json(m) for m in group.models]
        made = self._documents.digest_for_terms(models, terms, standard=std, document_type=doc_type)
        ids = [m.id for m in models]
        return NewRow(
            msg_id=_msg_id(terms.id, "digest", *ids, hashlib.sha256(made.xml).hexdigest()),
            terms_id=terms.id,
            customer_ref=terms.customer_ref,
            transaction_id=ids[0] if len(ids) == 1 else f"{ids[0]}+{len(ids) - 1}"[:64],
            standard=std.name,
            document_type=doc_type.name,
            destination=terms.destination,
            body=made.body,
            created_at=now,
            state="pending",
            next_attempt_at=now,
        )

    # -- terms ----------------------------------------------------------------------------

    def effective_policy(self) -> TermsPolicy:
        """The policy as published: with ``standards`` filled in from what is installed
        and can express a kind of transaction the firm emits."""
        if self.policy.standards is not None:
            return self.policy
        offered = tuple(
            std.name
            for std in self._standards
            if any(
                d.model is Transaction and any(d.expresses(k) for k in self.transaction_kinds)
                for d in std.document_types
            )
        )
        return self.policy.model_copy(update={"standards": offered})

    def check_proposal(self, proposal: TermsProposal) -> None:
        """Refuse terms that cannot be registered whatever the policy says."""
        policy = self.effective_policy()
        if policy.standards is not None and proposal.standard not in policy.standards:
            raise TermsError(
                f"the firm does not send {proposal.standard!r} documents (it sends: "
                f"{', '.join(policy.standards) or 'none'})"
            )
        try:
            std = self._standards.get(proposal.standard)
            doc_type = transaction_document_type(std, proposal.document_type)
        except NotFoundError as exc:
            raise TermsError(str(exc)) from None
        if proposal.fields is not None:
            unknown = sorted(set(proposal.fields) - doc_type.field_names)
            if unknown and not doc_type.field_names:
                raise TermsError(
                    f"{std.name} {doc_type.name} documents are shared whole: terms cannot"
                    f" choose their fields (no field {', '.join(unknown)}; leave fields out)"
                )
            if unknown:
                raise TermsError(
                    f"{std.name} {doc_type.name} documents have no field "
                    f"{', '.join(unknown)} (fields: {', '.join(sorted(doc_type.field_names))})"
                )
        if proposal.until is not None and proposal.until <= utc_at(self._clock()):
            raise TermsError("the terms' until is in the past")
        if proposal.destination is not None:
            self.egress.check_url(proposal.destination)

    def check_kinds(self, proposal: TermsProposal) -> None:
        """Refuse terms whose document type expresses none of the kinds the firm emits:
        no document would ever go out under them."""
        try:
            doc_type = transaction_document_type(
                self._standards.get(proposal.standard), proposal.document_type
            )
        except (NotFoundError, TermsError):
            return  # check_proposal names what the firm has
        if not any(doc_type.expresses(kind) for kind in self.transaction_kinds):
            raise TermsError(
                f"{proposal.standard} {doc_type.name} documents express"
                f" {', '.join(doc_type.kinds or ())} transactions, and the firm emits none:"
                f" it emits {', '.join(self.transaction_kinds) or 'none'}"
            )

    def propose(self, proposal: TermsProposal, *, intermediary: str | None) -> TermsDecision:
        self.check_kinds(proposal)  # first: it says why the standard is not offered
        self.check_proposal(proposal)
        now = utc_at(self._clock())
        policy = self.effective_policy()
        decision = self._hook.cmi_review_terms(proposal=proposal, policy=policy, now=now)
        if decision is None:
            raise PluginError("no cmi_review_terms implementation answered")
        if not isinstance(decision, TermsDecision):
            raise PluginError(
                f"cmi_review_terms must return a TermsDecision, not {type(decision).__name__}"
            )
        if decision.outcome == "alternative":
            if decision.alternative is None:
                raise PluginError("cmi_review_terms offered an alternative without terms")
            self.check_kinds(decision.alternative)
            self.check_proposal(decision.alternative)
            return decision
        if decision.outcome == "rejected":
            return decision
        if proposal.destination is not None:
            # Kept as the egress guard normalized it: the URL checked, recorded in the
            # consent and delivered to is one string.
            normalized = self.egress.check_url(proposal.destination)
            proposal = proposal.model_copy(update={"destination": normalized})
        terms = SharingTerms.model_validate(
            {
                **proposal.model_dump(),
                "id": _new_id("terms"),
                "created_at": now,
                "intermediary": intermediary,
            }
        )
        consent = self.consent(terms, "granted", now)
        self._store().add_terms(terms, consent.record, consent.xml)
        log.info("terms %s accepted for customer %s", terms.id, terms.customer_ref)
        return TermsDecision(
            outcome="accepted",
            reason=decision.reason,
            terms=terms,
            consent=consent.record,
            consent_xml=consent.xml,
        )

    def revoke(self, terms_id: str) -> tuple[SignedConsent, int]:
        store = self._store()
        terms = store.get_terms(terms_id)
        if terms.revoked_at is not None:
            raise TermsError(f"terms {terms_id} are already revoked")
        now = utc_at(self._clock())
        consent = self.consent(terms, "revoked", now)
        cancelled = store.revoke_terms(terms_id, now.timestamp(), consent.record, consent.xml)
        log.info("terms %s revoked: %d undelivered documents cancelled", terms_id, cancelled)
        return consent, cancelled

    def consent(self, terms: SharingTerms, event: str, now: dt.datetime) -> SignedConsent:
        doc_type = transaction_document_type(
            self._standards.get(terms.standard), terms.document_type
        )
        record = ConsentRecord.model_validate(
            {
                "id": _new_id("consent"),
                "event": event,
                "issued_at": now,
                "firm": self.firm,
                "customer_ref": terms.customer_ref,
                "intermediary": terms.intermediary,
                "terms_id": terms.id,
                "terms_digest": terms.digest(),
                "purpose": terms.purpose,
                "standard": terms.standard,
                "document_type": doc_type.name,
                "fields": terms.fields,
                "when": terms.when,
                "destination": terms.destination,
                "valid_until": terms.until,
                "policy_url": self.policy.policy_url,
                "jurisdiction": self.policy.jurisdiction,
            }
        )
        return SignedConsent(
            record,
            self._documents.render_signed(record, standard="cmi", document_type="consent"),
        )


def _problem(tx: Transaction, terms: SharingTerms, exc: Exception, now: float) -> EmissionProblem:
    """A document that could not be made, logged and kept for the operator."""
    reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, CMIError) else str(exc)
    log.warning(
        "transaction %s not emitted under terms %s (%s) for customer %s: %s",
        tx.id,
        terms.id,
        terms.standard,
        terms.customer_ref,
        reason,
        exc_info=not isinstance(exc, CMIError),  # a plugin's bug: its traceback
    )
    return EmissionProblem(
        transaction_id=tx.id,
        terms_id=terms.id,
        customer_ref=terms.customer_ref,
        standard=terms.standard,
        reason=reason[:2000],
        created_at=now,
        transaction=tx.model_dump_json(),
    )


def _for_customer(tx: Transaction, ref: str) -> Transaction:
    # Each customer's document carries their own pseudonymous reference, never another's.
    return Transaction.model_validate({**tx.model_dump(), "customer_ref": ref})


def _digest_due(terms: SharingTerms, now: float) -> float:
    hours = terms.digest_hours
    if hours is None:
        return now
    # Digest windows are counted from when the terms were accepted: every document of a
    # window is due at its end, so they go out together.
    period = hours * 3600.0
    start = terms.created_at.timestamp()
    windows = max(0, math.floor((now - start) / period)) + 1
    return start + windows * period
