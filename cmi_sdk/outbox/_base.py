"""What the bundled stores share: every method whose logic is the same in SQLite and
PostgreSQL, written once over named queries. Each store says how a statement is found
(:meth:`SQLStore._fetch`) and how a write transaction runs
(:meth:`SQLStore._transaction`); what differs between the dialects is in their query
files, or in the methods a store keeps for itself (claiming rows, the caller's
transaction, waking workers).

Not part of the store contract: a store of another kind implements the role protocols
its own way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from cmi_sdk._exceptions import (
    AcceptanceConflictError,
    IntermediaryNotFoundError,
    LinkError,
    LinkNotFoundError,
    OfferNotFoundError,
    ReplayedMessageError,
    StoreError,
    TermsError,
    TermsNotFoundError,
)
from cmi_sdk._models import ConsentRecord, Link, SharingTerms
from cmi_sdk._secrets import SecretsKeyring
from cmi_sdk.outbox import (
    AcceptanceClaim,
    AcceptanceRecord,
    AcceptanceState,
    AttemptResult,
    DigestGroup,
    EmissionProblem,
    NewRow,
    OutboxStatus,
    SeenMessage,
    StoredOffer,
)
from cmi_sdk.outbox import _intermediaries as intermediaries
from cmi_sdk.outbox._intermediaries import Intermediary
from cmi_sdk.outbox._params import CompletionParams, offer_row
from cmi_sdk.outbox._queries import filtered
from cmi_sdk.outbox._rows import (
    ATTEMPT_OUTCOMES,
    attempt_of_row,
    claim_params,
    consent_params,
    digest_groups,
    intermediary_of_row,
    link_of_row,
    revoked_terms_json,
    status_of,
    stored_offer_of_row,
    terms_of_row,
    terms_params,
)

__all__ = ["Cursor", "Run", "SQLStore"]

_T = TypeVar("_T")


def _check_times(times: dict[str, object]) -> None:
    """Refuse a purge time that is NaN: every comparison with it is false in SQLite, but
    true in PostgreSQL for ``x < NaN``, which would delete every row of its kind."""
    if any(isinstance(t, float) and math.isnan(t) for t in times.values()):
        raise ValueError("a purge time is NaN: nothing was purged")


class Cursor(Protocol):
    """What a statement run inside a transaction gives back (sqlite3's and psycopg's
    cursors alike)."""

    @property
    def rowcount(self) -> int:
        """How many rows the statement changed."""

    def fetchone(self) -> Any:
        """The next row, or None."""

    def fetchall(self) -> list[Any]:
        """The remaining rows."""


class Run(Protocol):
    """Runs the store's named statements inside one transaction."""

    def __call__(self, name: str, params: Any = ()) -> Cursor:
        """Run the statement ``name``; its cursor (``rowcount``, ``fetchone()`` ...)."""

    def many(self, name: str, params: Sequence[Any]) -> None:
        """Run the statement ``name`` once for each parameter row."""


class SQLStore:
    """The methods both bundled stores share."""

    keyring: SecretsKeyring | None
    _purged: float
    _MARKER: str
    """The dialect's parameter marker, for the filters built here."""

    # -- what each store provides ---------------------------------------------------------

    def _query(self, name: str) -> str:
        """The text of the statement ``name`` as this store runs it."""
        raise NotImplementedError

    def _fetch(self, what: str, name: str, params: Any = ()) -> list[Any]:
        """The rows of the statement ``name``, outside a write transaction; ``what`` says
        what it is doing in an error."""
        raise NotImplementedError

    def _transaction(self, what: str, body: Callable[[Run], _T], *, durable: bool = True) -> _T:
        """Run ``body`` in a write transaction; ``durable=False`` commits without waiting
        for the disk (leases, heartbeats, outcomes: a loss costs a resend)."""
        raise NotImplementedError

    def _with_caller(self, connection: object, what: str, body: Callable[[Run], _T]) -> _T:
        """Run ``body`` in the caller's open transaction (``connection``), which the
        caller commits or rolls back."""
        raise NotImplementedError

    def _insert_rows(self, run: Run, rows: Sequence[NewRow]) -> None:
        """Write outbox rows inside ``run``'s transaction."""
        raise NotImplementedError

    def _id_list(self, ids: Sequence[str]) -> Any:
        """A list of ids as one statement parameter (an array, or JSON text)."""
        raise NotImplementedError

    def _text(self, what: str, name: str, params: Any) -> list[Any]:
        """The rows of a statement built here from the query ``name``."""
        raise NotImplementedError

    # -- terms and consent ----------------------------------------------------------------

    def add_terms(self, terms: SharingTerms, consent: ConsentRecord, consent_xml: bytes) -> None:
        """Keep accepted terms and their consent record, in one transaction."""
        terms_row = terms_params(terms, self.keyring)
        consent_row = consent_params(consent, consent_xml)

        def body(run: Run) -> None:
            run("insert_terms", terms_row)
            run("insert_consent", consent_row)

        self._transaction("writing terms", body)

    def get_terms(self, terms_id: str) -> SharingTerms:
        """The terms with that id, revoked or not; raises TermsNotFoundError."""
        rows = self._fetch("reading terms", "get_terms", (terms_id,))
        if not rows:
            raise TermsNotFoundError(f"no sharing terms with id {terms_id!r}")
        return terms_of_row(rows[0], self.keyring)

    def list_terms(
        self,
        *,
        customer_ref: str | None = None,
        intermediary: str | None = None,
        include_revoked: bool = False,
    ) -> list[SharingTerms]:
        """Terms, oldest first."""
        found = self._filtered(
            "listing terms",
            "list_terms",
            (("customer_ref", customer_ref), ("intermediary", intermediary)),
            include_revoked=include_revoked,
        )
        return [terms_of_row(r, self.keyring) for r in found]

    def _filtered(
        self,
        what: str,
        name: str,
        equal: Sequence[tuple[str, object | None]],
        *,
        include_revoked: bool,
    ) -> list[Any]:
        statement, params = filtered(
            self._query(name), self._MARKER, equal, include_revoked=include_revoked
        )
        return self._text(what, statement, params)

    def active_terms(
        self,
        customer_ref: str,
        now: float,
        *,
        intermediary: str | None = None,
        connection: object | None = None,
    ) -> list[SharingTerms]:
        """The terms a document for the account ``customer_ref`` (or, with
        ``intermediary``, for that intermediary's reference) goes out under at ``now``;
        with ``connection``, read in the caller's transaction (it sees the caller's own
        writes)."""
        params = {"ref": customer_ref, "intermediary": intermediary, "now": now}
        what = "reading the active terms"
        if connection is not None:
            rows = self._with_caller(
                connection, what, lambda run: run("recipients", params).fetchall()
            )
        else:
            rows = self._fetch(what, "recipients", params)
        return [terms_of_row(r, self.keyring) for r in rows]

    def revoke_terms(
        self, terms_id: str, at: float, consent: ConsentRecord, consent_xml: bytes
    ) -> int:
        """Revoke terms, keep the consent record, cancel their undelivered rows; return how
        many rows were cancelled. Raises TermsNotFoundError, or TermsError if revoked."""

        def body(run: Run) -> int:
            found = run("terms_to_revoke", (terms_id,)).fetchone()
            if found is None:
                raise TermsNotFoundError(f"no sharing terms with id {terms_id!r}")
            if found[0] is not None:
                raise TermsError(f"terms {terms_id} are already revoked")
            return self._revoke(run, found[1], at, consent, consent_xml)

        return self._transaction("revoking terms", body)

    @staticmethod
    def _revoke(run: Run, text: str, at: float, consent: ConsentRecord, xml: bytes) -> int:
        """Mark terms revoked, keep the record, and cancel their rows; how many were."""
        run("revoke_terms", (at, revoked_terms_json(text, consent), consent.terms_id))
        run("insert_consent", consent_params(consent, xml))
        cancelled: int = run("cancel_terms_rows", (at, consent.terms_id)).rowcount
        return cancelled

    def consent_records(self, terms_id: str) -> list[tuple[ConsentRecord, bytes]]:
        """The consent records of the terms, oldest first, with their signed documents."""
        rows = self._fetch("reading consent records", "consent_records", (terms_id,))
        return [(ConsentRecord.model_validate_json(r[0]), bytes(r[1])) for r in rows]

    # -- service links --------------------------------------------------------------------

    def add_link_code(
        self, code_hash: str, account: str, *, created_at: float, expires_at: float
    ) -> None:
        """Keep a link code's hash; codes that expired unredeemed are dropped meanwhile."""

        def body(run: Run) -> None:
            run("drop_expired_link_codes", (created_at,))
            run("insert_link_code", (code_hash, account, created_at, expires_at))

        self._transaction("writing a link code", body)

    def get_link(self, link_id: str) -> Link:
        """The link with that id, revoked or not; raises LinkNotFoundError."""
        found = self._fetch("reading a link", "get_link", (link_id,))
        if not found:
            raise LinkNotFoundError(f"no link {link_id!r}")
        return link_of_row(found[0])

    def links(
        self,
        *,
        account: str | None = None,
        intermediary: str | None = None,
        include_revoked: bool = False,
    ) -> list[Link]:
        """Links, oldest first."""
        found = self._filtered(
            "listing links",
            "list_links",
            (("account", account), ("intermediary", intermediary)),
            include_revoked=include_revoked,
        )
        return [link_of_row(r) for r in found]

    def revoke_link(
        self, link_id: str, at: float, revocations: Sequence[tuple[ConsentRecord, bytes]]
    ) -> tuple[int, list[str]]:
        """Revoke the link and its terms named by ``revocations``, in one transaction."""

        def body(run: Run) -> tuple[int, list[str]]:
            found = run("link_to_revoke", (link_id,)).fetchone()
            if found is None:
                raise LinkNotFoundError(f"no link {link_id!r}")
            if found[0] is not None:
                raise LinkError(f"link {link_id} is already revoked")
            _, intermediary, customer_ref = found
            run("revoke_link", (at, link_id))
            cancelled = 0
            for consent, xml in revocations:
                terms = run(
                    "linked_terms_to_revoke", (consent.terms_id, intermediary, customer_ref)
                ).fetchone()
                if terms is not None:  # else revoked meanwhile, with its own record
                    cancelled += self._revoke(run, terms[0], at, consent, xml)
            late = run("linked_terms_left", (intermediary, customer_ref)).fetchall()
            return cancelled, [r[0] for r in late]

        return self._transaction("revoking a link", body)

    # -- outbox ---------------------------------------------------------------------------

    def complete(self, results: Sequence[AttemptResult]) -> None:
        """Record attempts and outcomes in one transaction (a group commit)."""
        if not results:
            return
        params = CompletionParams.of(results)

        def body(run: Run) -> None:
            run.many("insert_attempt", params.attempts)
            # A receiver's 2xx is a fact whoever holds the lease now; a failure is
            # recorded only by the worker that still holds the lease (see the queries).
            for name, rows in (
                ("mark_delivered", params.delivered),
                ("mark_retry", params.retry),
                ("mark_dead", params.dead),
            ):
                if rows:
                    run.many(name, rows)

        self._transaction("recording delivery outcomes", body, durable=False)

    def due_digests(self, now: float) -> list[DigestGroup]:
        """The ``digest`` rows whose window ended by ``now``, by terms and window."""
        return digest_groups(self._fetch("reading due digests", "due_digests", (now,)))

    def next_due(self) -> float | None:
        """When the next pending or retrying row is due, or the next lease expires."""
        rows = self._fetch("reading the next due time", "next_due")
        value = rows[0][0] if rows else None
        return None if value is None else float(value)

    def status(self, now: float) -> OutboxStatus:
        """Counts by state and the oldest pending row's age."""
        counts = self._fetch("counting rows", "count_states")
        oldest = self._fetch("reading the oldest pending row", "oldest_waiting")[0][0]
        return status_of(counts, oldest, self.disabled_destinations(), now)

    def attempt_counts(self) -> dict[str, int]:
        """Delivery attempts ever recorded, by outcome."""
        counts = dict.fromkeys(ATTEMPT_OUTCOMES, 0)
        rows = self._fetch("counting attempts", "attempt_counts")
        counts.update((outcome, int(n)) for outcome, n in rows)
        return counts

    def attempts(self, msg_id: str) -> list[AttemptResult]:
        """Every recorded attempt of a row, in order."""
        return [attempt_of_row(r) for r in self._fetch("reading attempts", "attempts", (msg_id,))]

    # -- retention ------------------------------------------------------------------------

    def purge(
        self,
        *,
        delivered_before: float = 0.0,
        dead_before: float = 0.0,
        pull_before: float = 0.0,
        merged_before: float = 0.0,
        cancelled_before: float = 0.0,
        offers_before: float = 0.0,
        acceptances_before: float = 0.0,
        seen_before: float = 0.0,
        attempts_before: float = 0.0,
        problems_before: float = 0.0,
        limit: int,
    ) -> dict[str, int]:
        """Delete what is finished past its window, oldest first, a batch of each kind.

        :raises ValueError: a time is NaN (PostgreSQL sorts NaN above every number)."""
        _check_times(locals())
        keep = (offers_before, acceptances_before)
        documents = {
            "delivered": delivered_before,
            "dead": dead_before,
            "pull": pull_before,
            "merged": merged_before,
            "cancelled": cancelled_before,
        }

        def body(run: Run) -> dict[str, int]:
            done = dict.fromkeys((*documents, "offers", "acceptances", "seen", "attempts"), 0)
            for state, before in documents.items():
                found = [m for (m,) in run(f"purgeable_{state}", (before, limit)).fetchall()]
                if not found:
                    continue
                # One statement a batch, not one a row (a round trip each on PostgreSQL).
                gone = [m for (m,) in run("purge_rows", (state, self._id_list(found))).fetchall()]
                if gone:
                    run("purge_attempts", (self._id_list(gone),))
                done[state] += len(gone)
            for (offer_id,) in run("purgeable_offers", (*keep, limit)).fetchall():
                # Locked (its acceptances first, as an acceptance takes them), then checked
                # again: an acceptance that began or finished meanwhile keeps it.
                run("lock_offer_acceptances", (offer_id,))
                run("lock_offer", (offer_id,))
                if run("purge_offer", (offer_id, *keep)).rowcount:
                    done["offers"] += 1
                    done["acceptances"] += run("purge_offer_acceptances", (offer_id,)).rowcount
            done["seen"] = run("purge_seen_batch", (seen_before, limit)).rowcount
            purged = run("purge_delivered_attempts", (attempts_before, delivered_before, limit))
            done["attempts"] = purged.rowcount
            done["problems"] = run("purge_problems", (problems_before, limit)).rowcount
            return done

        return self._transaction("purging finished rows", body, durable=False)

    def purgeable(
        self,
        *,
        delivered_before: float = 0.0,
        dead_before: float = 0.0,
        pull_before: float = 0.0,
        merged_before: float = 0.0,
        cancelled_before: float = 0.0,
        offers_before: float = 0.0,
        acceptances_before: float = 0.0,
        seen_before: float = 0.0,
        attempts_before: float = 0.0,
        problems_before: float = 0.0,
    ) -> dict[str, int]:
        """How many finished rows :meth:`purge` would delete, of each kind.

        :raises ValueError: a time is NaN."""
        _check_times(locals())

        def count(name: str, *params: float) -> list[Any]:
            return list(self._fetch(f"counting {name[6:]} to purge", name, params)[0])

        offers, acceptances = count("count_purgeable_offers", offers_before, acceptances_before)
        return {
            "delivered": int(count("count_purgeable_delivered", delivered_before)[0]),
            "dead": int(count("count_purgeable_dead", dead_before)[0]),
            "pull": int(count("count_purgeable_pull", pull_before)[0]),
            "merged": int(count("count_purgeable_merged", merged_before)[0]),
            "cancelled": int(count("count_purgeable_cancelled", cancelled_before)[0]),
            "offers": int(offers),
            "acceptances": int(acceptances),
            "seen": int(count("count_purgeable_seen", seen_before)[0]),
            "attempts": int(
                count("count_purgeable_attempts", attempts_before, delivered_before)[0]
            ),
            "problems": int(count("count_purgeable_problems", problems_before)[0]),
        }

    # -- destinations ---------------------------------------------------------------------

    def disable_destination(self, url: str, *, reason: str, at: float) -> None:
        """Stop delivering to ``url`` (it answered 410 Gone)."""
        self._transaction(
            "disabling a destination", lambda run: run("disable_destination", (url, at, reason))
        )

    def enable_destination(self, url: str) -> bool:
        """Deliver to ``url`` again; True if it was disabled."""
        return self._transaction(
            "enabling a destination",
            lambda run: run("enable_destination", (url,)).rowcount > 0,
        )

    def disabled_destinations(self) -> dict[str, str]:
        """Disabled destinations and why."""
        return dict(self._fetch("reading destinations", "disabled_destinations"))

    # -- intermediaries and the stored secrets --------------------------------------------

    def add_intermediary(self, name: str, secret: str, *, at: float) -> None:
        """Register an intermediary, or add a secret to it (kept alongside the others, with
        no end). A revoked intermediary registered again starts afresh: its old secrets
        stay gone. The row is locked meanwhile (in PostgreSQL; SQLite has one writer), so
        two processes adding secrets at once both keep theirs."""

        def body(run: Run) -> None:
            run("add_intermediary", (name, at))
            found = run("intermediary_secrets", (name,)).fetchone()
            held = [] if found is None or found[1] is not None else self._secrets_of(found, name)
            self._put_intermediary(run, name, intermediaries.with_secret(held, secret))

        self._transaction("registering an intermediary", body)

    def _secrets_of(
        self, found: Sequence[Any], name: str
    ) -> list[intermediaries.IntermediarySecret]:
        return intermediaries.decode(found[0], name, self.keyring)

    def _put_intermediary(
        self, run: Run, name: str, secrets: Sequence[intermediaries.IntermediarySecret]
    ) -> None:
        run("put_intermediary", (intermediaries.encode(secrets, name, self.keyring), name))

    def rotate_intermediary(self, name: str, secret: str, *, at: float, grace_until: float) -> None:
        """Give an intermediary a new secret; its others work until ``grace_until``.

        :raises IntermediaryNotFoundError: no such intermediary, or it is revoked."""

        def body(run: Run) -> None:
            found = run("intermediary_secrets", (name,)).fetchone()
            if found is None or found[1] is not None:
                raise IntermediaryNotFoundError(
                    intermediaries.not_active(name, known=found is not None)
                )
            secrets = intermediaries.rotated(
                self._secrets_of(found, name), secret, at=at, grace_until=grace_until
            )
            self._put_intermediary(run, name, secrets)

        self._transaction("rotating an intermediary's secret", body)

    def revoke_intermediary(self, name: str, *, at: float) -> bool:
        """Refuse the intermediary's requests from now on, and forget its secrets; False
        when it was revoked already.

        :raises IntermediaryNotFoundError: no such intermediary."""

        def body(run: Run) -> bool:
            found = run("intermediary_secrets", (name,)).fetchone()
            if found is None:
                raise IntermediaryNotFoundError(intermediaries.not_active(name, known=False))
            if found[1] is not None:
                return False
            run("revoke_intermediary", (at, name))
            return True

        return self._transaction("revoking an intermediary", body)

    def intermediary(self, name: str) -> Intermediary | None:
        """The intermediary with its secrets (opened), or None when unknown."""
        found = self._fetch("reading an intermediary", "get_intermediary", (name,))
        return intermediary_of_row(found[0], self.keyring) if found else None

    def list_intermediaries(self) -> list[Intermediary]:
        """Every intermediary, revoked ones too, by name."""
        found = self._fetch("listing intermediaries", "list_intermediaries")
        return [intermediary_of_row(r, self.keyring) for r in found]

    def intermediary_generation(self, name: str) -> int | None:
        """How many times the intermediary's row has changed (None when unknown): one read
        of a key, without opening any secret, for the endpoint to check on every request."""
        found = self._fetch("reading an intermediary", "intermediary_generation", (name,))
        return int(found[0][0]) if found else None

    def intermediary_secrets(self, name: str, *, now: float | None = None) -> tuple[str, ...]:
        """The secrets the intermediary's requests may be signed with at ``now`` (the
        current time by default); empty when unknown or revoked."""
        found = self.intermediary(name)
        if found is None:
            return ()
        return found.valid_secrets(time.time() if now is None else now)

    @staticmethod
    def _reseal(run: Run, keyring: SecretsKeyring) -> int:
        """Seal the secrets not sealed with the keyring's first key; how many rows changed."""
        changed = 0
        for terms_id, stored in run("all_terms_secrets").fetchall():
            if keyring.is_current(stored):
                continue
            where = f"terms:{terms_id}"
            sealed = keyring.seal(keyring.open(stored, context=where), context=where)
            run("update_terms_secret", (sealed, terms_id))
            changed += 1
        for name, text in run("all_intermediary_secrets").fetchall():
            resealed = intermediaries.reseal(text, name, keyring)
            if resealed is not None:
                run("update_intermediary_secrets", (resealed, name))
                changed += 1
        return changed

    # -- replay cache ---------------------------------------------------------------------

    def remember_message(self, party: str, msg_id: str, *, expires_at: float, now: float) -> bool:
        """Record a message id accepted from ``party``; False when already seen (and not
        yet expired).

        Committed without waiting for the disk (the ids live minutes; a power cut's loss
        reopens at most the last few, inside their timestamp window)."""
        message = SeenMessage(party, msg_id, expires_at, now)
        return self._transaction(
            "remembering a message id", lambda run: self._remember(run, message), durable=False
        )

    def _remember(self, run: Run, message: SeenMessage) -> bool:
        # Expired ids are purged at most once a second (per process), through their index:
        # a purge per request would cost more as traffic grows.
        if message.now - self._purged >= 1.0:
            self._purged = message.now
            run("purge_seen", (message.now,))
        params = (message.party, message.msg_id, message.expires_at, message.now)
        inserted: int = run("remember_message", params).rowcount
        return inserted == 1

    def message_seen(self, party: str, msg_id: str, *, now: float) -> bool:
        """Whether a message id from ``party`` is remembered and not expired at ``now``."""
        return bool(self._fetch("reading a message id", "message_seen", (party, msg_id, now)))

    def forget_message(self, party: str, msg_id: str) -> None:
        """Drop a message id: the request it came with was refused, and stores nothing."""
        self._transaction(
            "forgetting a message id",
            lambda run: run("forget_message", (party, msg_id)),
            durable=False,
        )

    # -- offers and acceptances -----------------------------------------------------------

    def add_offers(
        self, offers: Sequence[StoredOffer], *, message: SeenMessage | None = None
    ) -> None:
        """Keep offers, with the requests they answer and their signed documents; with
        ``message``, remember it in the same transaction (one commit a request).

        Committed without waiting for the disk: an offer lost in a power cut is a quote the
        customer asks for again, never a booking or a document.

        :raises ReplayedMessageError: ``message`` was already seen; nothing is stored."""
        params = [offer_row(o) for o in offers]

        def body(run: Run) -> None:
            if message is not None and not self._remember(run, message):
                raise ReplayedMessageError(f"message id {message.msg_id} was already used")
            if params:
                run.many("insert_offer", params)

        if params or message is not None:
            self._transaction("writing offers", body, durable=False)

    def get_offer(self, offer_id: str) -> StoredOffer:
        """The offer with that id; raises OfferNotFoundError."""
        found = self._fetch("reading an offer", "get_offer", (offer_id,))
        if not found:
            raise OfferNotFoundError(f"no offer {offer_id!r}")
        return stored_offer_of_row(found[0])

    def begin_acceptance(self, claim: AcceptanceClaim, now: float) -> AcceptanceRecord | None:
        """Claim an acceptance; None when it is now ``processing`` under ``claim.owner``,
        else the record in the way (itself, or the acceptance that holds the offer).

        Safe across processes: the acceptance's row is locked (PostgreSQL; SQLite has one
        writer at a time), or its insert waits on a concurrent one, and the offer's
        ``accepted_by`` is set only while empty, so of concurrent claims of one offer the
        first to commit holds it, and the others wait for that commit and then read its
        record. The acceptance's row and the offer's ``accepted_by`` change together."""
        retake = (
            now,
            claim.intermediary,
            claim.acceptance,
            claim.owner,
            claim.lease_until,
            claim.acceptance_id,
        )

        def body(run: Run) -> AcceptanceRecord | None:
            for _ in range(8):  # each round ends, or a concurrent change made it start over
                found = AcceptanceRecord.of_row(
                    run("lock_acceptance", (claim.acceptance_id,)).fetchone()
                )
                if self._in_the_way(found, claim):
                    return found
                if run("take_offer", (claim.acceptance_id, claim.offer_id)).rowcount == 0:
                    other = AcceptanceRecord.of_row(
                        run("offer_holder", (claim.offer_id,)).fetchone()
                    )
                    if other is not None:
                        return other
                    if run("offer_exists", (claim.offer_id,)).fetchone() is None:
                        raise OfferNotFoundError(f"no offer {claim.offer_id!r}")
                    continue  # its holder let it go meanwhile
                if found is not None:
                    run("reclaim_acceptance", retake)
                    return None
                if run("claim_acceptance", claim_params(claim, now)).rowcount == 1:
                    return None
                # The same id was claimed concurrently, and committed first: give the offer
                # back and read what that claim made.
                run("release_offer", (claim.offer_id, claim.acceptance_id))
            raise StoreError(f"acceptance {claim.acceptance_id} kept changing while claimed")

        return self._transaction("claiming an acceptance", body)

    def renew_acceptance(
        self, acceptance_id: str, owner: str, lease_until: float, *, hold: str | None = None
    ) -> bool:
        """Extend ``owner``'s lease and record the hold; False when the lease was lost.

        Committed without waiting for the disk: a power cut's loss leaves the hold
        unrecorded (it expires by itself in the firm's system) and the lease shorter."""
        params = (lease_until, hold, acceptance_id, owner)
        return self._transaction(
            "renewing an acceptance's lease",
            lambda run: run("renew_acceptance", params).rowcount == 1,
            durable=False,
        )

    def take_over_acceptance(
        self, acceptance_id: str, owner: str, now: float, lease_until: float
    ) -> bool:
        """Take a ``processing`` acceptance whose lease expired over for ``owner``."""
        params = (owner, lease_until, acceptance_id, now)
        return self._transaction(
            "taking an acceptance over",
            lambda run: run("take_over_acceptance", params).rowcount == 1,
        )

    @staticmethod
    def _in_the_way(found: AcceptanceRecord | None, claim: AcceptanceClaim) -> bool:
        """Whether the acceptance's own record answers the claim (it is processing,
        booked or refused); False when it is new or released.

        :raises AcceptanceConflictError: the id was given for another offer."""
        if found is None:
            return False
        if found.offer_id != claim.offer_id:
            raise AcceptanceConflictError(
                f"acceptance {claim.acceptance_id} was given for another offer"
            )
        return found.state != "released"

    def finish_acceptance(
        self,
        acceptance_id: str,
        owner: str,
        state: AcceptanceState,
        result: str,
        now: float,
        *,
        rows: Sequence[NewRow] = (),
        problems: Sequence[EmissionProblem] = (),
    ) -> AcceptanceRecord | None:
        """Record the outcome, and for a booking its documents and emission problems, in
        one transaction, while ``owner`` holds the lease; else return the record."""

        def body(run: Run) -> AcceptanceRecord | None:
            found = AcceptanceRecord.of_row(run("lock_acceptance", (acceptance_id,)).fetchone())
            if found is None:
                raise StoreError(f"acceptance {acceptance_id} is not in the store")
            ours = found.state == "processing" and found.lease_owner == owner
            late = state == "booked" and found.state == "released"
            if not (ours or late):
                return found
            if state == "booked":
                held = run("hold_offer", (acceptance_id, found.offer_id, acceptance_id))
                if held.rowcount == 0:  # released, and another acceptance holds it now
                    return found
            else:
                run("release_offer", (found.offer_id, acceptance_id))
            run("finish_acceptance", (state, result, now, acceptance_id))
            if rows:
                self._insert_rows(run, rows)
            if problems:
                run.many("insert_problem", [p.row() for p in problems])
            return None

        return self._transaction("recording an acceptance", body)

    def get_acceptance(self, acceptance_id: str) -> AcceptanceRecord | None:
        """The acceptance with that id, or None."""
        found = self._fetch("reading an acceptance", "get_acceptance", (acceptance_id,))
        return AcceptanceRecord.of_row(found[0]) if found else None

    def stalled_acceptances(self, now: float, limit: int = 100) -> list[AcceptanceRecord]:
        """``processing`` acceptances whose lease expired before ``now``, oldest first."""
        found = self._fetch("reading stalled acceptances", "stalled_acceptances", (now, limit))
        return [a for a in map(AcceptanceRecord.of_row, found) if a is not None]

    # -- emission problems ----------------------------------------------------------------

    def add_emission_problems(
        self, problems: Sequence[EmissionProblem], *, connection: object | None = None
    ) -> None:
        """Keep emission problems; with ``connection``, in the caller's transaction."""
        params = [p.row() for p in problems]
        if not params:
            return
        what = "writing emission problems"
        if connection is not None:
            self._with_caller(connection, what, lambda run: run.many("insert_problem", params))
        else:
            self._transaction(what, lambda run: run.many("insert_problem", params))

    def emission_problems(self, *, limit: int = 100) -> list[EmissionProblem]:
        """Emission problems, newest first."""
        found = self._fetch("reading emission problems", "emission_problems", (limit,))
        return [EmissionProblem(*r) for r in found]

    def count_emission_problems(self) -> int:
        """How many emission problems are kept."""
        return int(self._fetch("counting emission problems", "count_emission_problems")[0][0])
