"""A state machine over links, terms and emissions: no document ever reaches a
destination the linked customer did not register.

Intermediaries link accounts, redeem codes (one of several intermediaries, sometimes a used
or expired one), revoke links; anyone registers terms for any reference (a link's, another
intermediary's link's, an account id, a pseudonym of its own) and revokes them; the firm
emits for accounts and intermediaries book for their references; the outbox is delivered
and pulled. After every step, every document in the outbox, delivered or pulled went out
under terms its transaction's owner registered: the account's direct terms or the terms of
one of the account's links active when it was emitted (for a booking under an unlinked
reference, that intermediary's own terms for it), and carries that terms' reference.
"""

from __future__ import annotations

import datetime as dt
import itertools
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from cmi_sdk import Acceptance, Adapter, LinkError, Request, TermsProposal, load_model
from cmi_sdk.outbox.sqlite import SQLiteStore
from cmi_sdk.webhooks import generate_secret
from tests.fakes import Clock, Shop
from tests.support import emitting_adapter, ticket

ACCOUNTS = ("acct-alice", "acct-bob")
INTERMEDIARIES = ("acme", "beta", "gamma")


@dataclass
class Model:
    """What the firm should hold: links, terms, and whom each transaction is for."""

    links: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    """Active links: id to (account, intermediary, customer_ref)."""
    terms: dict[str, tuple[str | None, str, str | None]] = field(default_factory=dict)
    """Active terms: id to (intermediary, customer_ref, destination)."""
    allowed: dict[str, set[str]] = field(default_factory=dict)
    """Each transaction id to the terms its documents may go out under."""
    refs: dict[str, str] = field(default_factory=dict)
    """Every terms id ever registered to its customer_ref."""
    destinations: dict[str, str] = field(default_factory=dict)
    """Every push destination to the terms it was registered with."""

    def recipients(self, ref: str, intermediary: str | None) -> set[str]:
        """The terms a document for ``ref`` (an account, or ``intermediary``'s reference)
        goes to now."""
        account: str | None = ref if intermediary is None else None
        if intermediary is not None:
            for owner, by, linked in self.links.values():
                if (by, linked) == (intermediary, ref):
                    account = owner
        if account is None:
            return {t for t, (i, r, _) in self.terms.items() if (i, r) == (intermediary, ref)}
        pairs = {(i, r) for a, i, r in self.links.values() if a == account}
        return {
            t
            for t, (i, r, _) in self.terms.items()
            if (i is None and r == account) or (i, r) in pairs
        }


class LinksMachine(RuleBasedStateMachine):
    codes = Bundle("codes")
    links = Bundle("links")
    terms = Bundle("terms")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="cmi-links-"))
        self.clock = Clock(1_900_000_000.0)
        self.shop = Shop(seats=10_000)
        self.store = SQLiteStore(self.tmp / "cmi.db")
        self.adapter: Adapter = emitting_adapter(
            self.tmp, store=self.store, clock=self.clock, plugins=[self.shop]
        )
        self.model = Model()
        self.counter = itertools.count(1)
        self.delivered: list[tuple[str, str]] = []
        self.used: set[str] = set()

    def teardown(self) -> None:
        self.adapter.close()
        self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- links ------------------------------------------------------------------------------

    @rule(target=codes, account=st.sampled_from(ACCOUNTS))
    def create_code(self, account: str) -> tuple[str, str, float]:
        code = self.adapter.create_link_code(account, ttl=dt.timedelta(minutes=10))
        return code.code, account, code.expires_at.timestamp()

    @rule(target=links, code=codes, intermediary=st.sampled_from(INTERMEDIARIES))
    def redeem(self, code: tuple[str, str, float], intermediary: str) -> str:
        text, account, expires = code
        fresh = text not in self.used and self.clock.now < expires
        try:
            made = self.adapter.redeem_link_code(text, intermediary=intermediary)
        except LinkError:
            assert not fresh
            return "link_none"
        assert fresh
        self.used.add(text)
        assert made.account == account
        assert account not in made.customer_ref
        assert all(r != made.customer_ref for _, _, r in self.model.links.values())
        self.model.links[made.id] = (account, intermediary, made.customer_ref)
        return made.id

    @rule(seconds=st.sampled_from([60.0, 700.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(link_id=consumes(links))
    def revoke_link(self, link_id: str) -> None:
        if link_id not in self.model.links:
            return
        _, intermediary, ref = self.model.links.pop(link_id)
        revocation = self.adapter.revoke_link(link_id)
        revoked = {c.record.terms_id for c in revocation.consents}
        expected = {t for t, (i, r, _) in self.model.terms.items() if (i, r) == (intermediary, ref)}
        assert revoked == expected
        for terms_id in revoked:
            del self.model.terms[terms_id]

    # -- terms ------------------------------------------------------------------------------

    @rule(
        target=terms,
        intermediary=st.sampled_from((None, *INTERMEDIARIES)),
        whose=st.integers(0, 9),
        kind=st.sampled_from(["link", "account", "pseudonym"]),
        pull=st.booleans(),
    )
    def register(self, intermediary: str | None, whose: int, kind: str, pull: bool) -> str:
        links = sorted(self.model.links.values())
        if kind == "link" and links:
            ref = links[whose % len(links)][2]  # any intermediary's link: maybe not its own
        elif kind == "account":
            ref = ACCOUNTS[whose % len(ACCOUNTS)]
        else:
            ref = f"pseudo-{whose}"
        n = next(self.counter)
        destination = None if pull else f"http://127.0.0.1:9/inbox-{n}"
        proposal = TermsProposal.model_validate(
            {
                "customer_ref": ref,
                "destination": destination,
                "when": "pull" if pull else "now",
                "secret": generate_secret(),
                "standard": "cmi-ticket",
                "purpose": {"code": "records", "text": "my records"},
            }
        )
        decision = self.adapter.propose_terms(proposal, intermediary=intermediary)
        assert decision.terms is not None
        terms_id = decision.terms.id
        self.model.terms[terms_id] = (intermediary, ref, destination)
        self.model.refs[terms_id] = ref
        if destination is not None:
            self.model.destinations[destination] = terms_id
        return terms_id

    @rule(terms_id=consumes(terms))
    def revoke_terms(self, terms_id: str) -> None:
        if terms_id in self.model.terms:
            self.adapter.revoke_terms(terms_id)
            del self.model.terms[terms_id]

    # -- emissions --------------------------------------------------------------------------

    @rule(account=st.sampled_from(ACCOUNTS))
    def firm_emits(self, account: str) -> None:
        tx = ticket(id=f"TX-{next(self.counter)}", customer_ref=account)
        expected = self.model.recipients(account, None)
        self.model.allowed[tx.id] = expected
        emitted = self.adapter.emit(tx)
        assert {e.terms_id for e in emitted} == expected

    @rule(intermediary=st.sampled_from(INTERMEDIARIES), whose=st.integers(0, 9))
    def intermediary_books(self, intermediary: str, whose: int) -> None:
        mine = sorted(r for _, i, r in self.model.links.values() if i == intermediary)
        ref = mine[whose % len(mine)] if mine and whose % 2 else f"pseudo-{whose}"
        n = next(self.counter)
        request = load_model(
            Request,
            {
                "id": f"req-{n}",
                "kind": "flight",
                "customer_ref": ref,
                "reply_to": "relay-1",
                "created_at": self.adapter.now(),
                "wanted": {"origin": "ATL", "destination": "CDG", "date": "2026-12-01"},
            },
        )
        offer = self.adapter.answer_request(request, intermediary=intermediary).offers.offers[0]
        expected = self.model.recipients(ref, intermediary)
        result = self.adapter.accept_offer(
            offer.id,
            Acceptance(
                id=f"acc-{n}", offer_id=offer.id, customer_ref=ref, accepted_at=self.adapter.now()
            ),
            intermediary=intermediary,
        )
        assert result.transaction_id is not None
        self.model.allowed[result.transaction_id] = expected
        rows = {r.msg_id: r for r in self.adapter.store.rows(limit=10_000)}
        assert {rows[m].terms_id for m in result.documents} == expected

    @rule()
    def deliver(self) -> None:
        def receive(request: httpx.Request) -> httpx.Response:
            self.delivered.append((str(request.url), request.headers["webhook-id"]))
            return httpx.Response(204)

        with self.adapter.delivery_worker(transport=httpx.MockTransport(receive)) as worker:
            worker.run_once()

    # -- the invariant ----------------------------------------------------------------------

    @invariant()
    def documents_reach_only_what_their_customer_registered(self) -> None:
        store = self.adapter.store
        rows = {r.msg_id: r for r in store.rows(limit=10_000)}
        for row in rows.values():
            assert row.terms_id in self.model.allowed[row.transaction_id], row
            ref = self.model.refs[row.terms_id]
            assert row.customer_ref == ref
            assert f'customer="{ref}"'.encode() in row.body
        for url, msg_id in self.delivered:
            row = rows[msg_id]
            assert self.model.destinations[url] == row.terms_id
            assert row.state == "delivered"
        for terms_id in self.model.terms:
            for row in store.documents_since(terms_id, 0, 10_000):  # what a pull returns
                assert row.terms_id == terms_id
                assert terms_id in self.model.allowed[row.transaction_id]


LinksMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)
TestLinks = LinksMachine.TestCase
