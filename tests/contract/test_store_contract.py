"""The store contract: every role of :class:`~cmi_sdk.outbox.OutboxStore`, run against
each store in ``conftest.KINDS`` (SQLite, and PostgreSQL when its DSN is set).

Each test reads as what any store must do, whatever its database; the concurrency cases
use two store instances on the same tables, as two processes would.
"""

from __future__ import annotations

import pytest

from cmi_sdk import (
    Adapter,
    IntermediaryNotFoundError,
    LinkError,
    LinkNotFoundError,
    OfferNotFoundError,
    OutboxRowNotFoundError,
    ReplayedMessageError,
    TermsNotFoundError,
)
from cmi_sdk.outbox import (
    EmissionProblem,
    OutboxStore,
    SeenMessage,
)
from cmi_sdk.webhooks import generate_secret
from tests.contract.rows import ACCOUNT, NOW, claim, new_row, outcome, race, stored_offer
from tests.support import CUSTOMER, register

# -- the store itself ---------------------------------------------------------------------


def test_migrate_is_idempotent_and_close_can_be_followed_by_use(store: OutboxStore) -> None:
    store.migrate()
    store.insert([new_row(1)])
    store.close()
    store.migrate()
    assert store.get_row("msg_0001").state == "pending"
    store.close()


def test_capabilities_are_declared(store: OutboxStore) -> None:
    for name in ("nonblocking", "limits_per_destination", "notifies_work"):
        assert isinstance(getattr(type(store), name), bool), name
    assert store.remembers_with_offers is True  # both stores take the message in add_offers


# -- terms and consent --------------------------------------------------------------------


def test_terms_and_their_consent_records(store_adapter: Adapter, store: OutboxStore) -> None:
    terms = register(store_adapter, customer_ref=ACCOUNT)
    assert store.get_terms(terms.id) == terms
    assert [t.id for t in store.list_terms(customer_ref=ACCOUNT)] == [terms.id]
    assert [t.id for t in store.active_terms(ACCOUNT, NOW)] == [terms.id]
    store.insert([new_row(1, terms_id=terms.id, customer_ref=ACCOUNT)])
    store_adapter.revoke_terms(terms.id)
    assert store.get_terms(terms.id).revoked_at is not None
    assert store.list_terms(customer_ref=ACCOUNT) == []
    assert [t.id for t in store.list_terms(include_revoked=True)] == [terms.id]
    assert store.active_terms(ACCOUNT, NOW) == []
    assert store.get_row("msg_0001").state == "cancelled"  # revoked before it went out
    records = store.consent_records(terms.id)
    assert len(records) == 2  # the acceptance, then the revocation
    assert all(xml.startswith(b"<") for _, xml in records)
    with pytest.raises(TermsNotFoundError):
        store.get_terms("terms_nope")


# -- links --------------------------------------------------------------------------------


def test_a_code_redeems_into_a_link_once(store: OutboxStore) -> None:
    store.add_link_code("h1", ACCOUNT, created_at=NOW, expires_at=NOW + 600)
    made = store.redeem_link_code(
        "h1", intermediary="acme", link_id="link_1", customer_ref="cus_1aa", now=NOW
    )
    assert made is not None
    assert (made.id, made.account, made.intermediary) == ("link_1", ACCOUNT, "acme")
    assert store.get_link("link_1") == made
    again = store.redeem_link_code(
        "h1", intermediary="beta", link_id="link_2", customer_ref="cus_2aa", now=NOW
    )
    assert again is None
    store.add_link_code("h2", ACCOUNT, created_at=NOW, expires_at=NOW + 1)
    late = store.redeem_link_code(
        "h2", intermediary="beta", link_id="link_3", customer_ref="cus_3aa", now=NOW + 2
    )
    assert late is None  # expired
    assert [x.id for x in store.links(account=ACCOUNT)] == ["link_1"]
    assert store.revoke_link("link_1", NOW + 5, []) == (0, [])
    assert store.links() == []
    assert [x.id for x in store.links(include_revoked=True)] == ["link_1"]
    with pytest.raises(LinkError):
        store.revoke_link("link_1", NOW + 6, [])
    with pytest.raises(LinkNotFoundError):
        store.get_link("link_nope")


def test_concurrent_redemptions_of_one_code_make_one_link(
    store: OutboxStore, other: OutboxStore
) -> None:
    store.add_link_code("h", ACCOUNT, created_at=NOW, expires_at=NOW + 600)
    made: list[str] = []
    stores = [store, other] * 3

    def redeem(n: int) -> None:
        found = stores[n].redeem_link_code(
            "h", intermediary=f"i{n}", link_id=f"link_{n}", customer_ref=f"cus_{n}aa", now=NOW
        )
        if found is not None:
            made.append(found.id)

    race(len(stores), redeem)
    assert len(made) == 1
    assert [x.id for x in store.links()] == made


# -- outbox rows and attempts -------------------------------------------------------------


def test_rows_are_inserted_once_claimed_and_completed(store: OutboxStore) -> None:
    assert store.insert([new_row(1), new_row(2), new_row(3, state="pull")]) == 3
    assert store.insert([new_row(1)]) == 0  # the same webhook-id is stored once
    assert store.next_due() == NOW
    taken = store.claim(owner="w", now=NOW, lease_seconds=30, limit=10)
    assert [r.msg_id for r in taken] == ["msg_0001", "msg_0002"]  # never the pull row
    assert {r.state for r in taken} == {"leased"}
    store.heartbeat(owner="w", msg_ids=["msg_0001"], lease_until=NOW + 90)
    assert store.get_row("msg_0001").lease_until == NOW + 90
    store.complete([outcome("msg_0001", "w", "delivered"), outcome("msg_0002", "w", "dead")])
    assert store.get_row("msg_0001").state == "delivered"
    dead = store.get_row("msg_0002")
    assert (dead.state, dead.attempts, dead.last_status) == ("dead", 1, 400)
    assert [a.outcome for a in store.attempts("msg_0002")] == ["dead"]
    assert store.attempt_counts() == {"delivered": 1, "retry": 0, "dead": 1}
    status = store.status(NOW)
    assert (status.counts["delivered"], status.counts["dead"], status.counts["pull"]) == (1, 1, 1)
    assert [r.msg_id for r in store.rows(state="dead")] == ["msg_0002"]
    assert store.redrive(msg_id="msg_0002", now=NOW + 5) == 1
    assert store.get_row("msg_0002").state == "pending"
    with pytest.raises(OutboxRowNotFoundError):
        store.get_row("msg_nope")


def test_a_retry_is_due_again_and_an_expired_lease_is_claimed_again(store: OutboxStore) -> None:
    store.insert([new_row(1), new_row(2)])
    store.claim(owner="a", now=NOW, lease_seconds=30, limit=10)
    store.complete([outcome("msg_0001", "a", "retry")])
    assert store.claim(owner="b", now=NOW + 1, lease_seconds=30, limit=10) == []
    again = store.claim(owner="b", now=NOW + 61, lease_seconds=30, limit=10)
    assert sorted(r.msg_id for r in again) == ["msg_0001", "msg_0002"]
    assert {r.lease_owner for r in again} == {"b"}
    assert store.cancel(owner="b", msg_ids=["msg_0002"], reason="revoked") == 1
    assert store.get_row("msg_0002").state == "cancelled"


def test_two_stores_never_lease_the_same_row(store: OutboxStore, other: OutboxStore) -> None:
    store.insert([new_row(n) for n in range(1, 41)])
    stores = [store, other] * 2
    leased: list[list[str]] = [[] for _ in stores]

    def take(n: int) -> None:
        for _ in range(20):
            got = stores[n].claim(owner=f"w{n}", now=NOW, lease_seconds=30, limit=3)
            if not got:
                return
            leased[n].extend(r.msg_id for r in got)

    race(len(stores), take)
    everything = [msg_id for taken in leased for msg_id in taken]
    assert len(everything) == len(set(everything)) == 40


def test_digest_rows_are_merged_into_one_document(store: OutboxStore) -> None:
    window = {"state": "digest", "next_attempt_at": NOW + 60, "model": "{}"}
    store.insert([new_row(1, **window), new_row(2, **window)])
    assert store.due_digests(NOW) == []
    (group,) = store.due_digests(NOW + 60)
    assert (group.terms_id, group.msg_ids) == ("terms_a", ("msg_0001", "msg_0002"))
    assert store.merge_digest(group.msg_ids, new_row(3)) == 3
    assert {store.get_row(m).state for m in group.msg_ids} == {"merged"}
    assert store.get_row("msg_0003").state == "pending"
    assert store.merge_digest(group.msg_ids, None) == 0  # merged already: nothing changes


def test_digest_rows_are_released_one_by_one(store: OutboxStore) -> None:
    window = {"state": "digest", "next_attempt_at": NOW + 60, "model": "{}"}
    store.insert([new_row(1, **window), new_row(2, **window)])
    assert store.merge_digest(["msg_0001", "msg_0002", "msg_nope"], None) == 2
    assert {store.get_row(m).state for m in ("msg_0001", "msg_0002")} == {"pending"}


# -- destinations -------------------------------------------------------------------------


def test_a_destination_is_disabled_then_enabled(store: OutboxStore) -> None:
    store.disable_destination("https://d1.example/inbox", reason="410 Gone", at=NOW)
    assert store.disabled_destinations() == {"https://d1.example/inbox": "410 Gone"}
    assert store.status(NOW).disabled_destinations == ("https://d1.example/inbox",)
    assert store.enable_destination("https://d1.example/inbox") is True
    assert store.enable_destination("https://d1.example/inbox") is False
    assert store.disabled_destinations() == {}


# -- intermediaries -----------------------------------------------------------------------


def test_an_intermediary_is_added_rotated_and_revoked(store: OutboxStore) -> None:
    first, second = generate_secret(), generate_secret()
    assert store.intermediary("acme") is None
    assert store.intermediary_generation("acme") is None
    store.add_intermediary("acme", first, at=NOW)
    before = store.intermediary_generation("acme")
    assert store.intermediary_secrets("acme", now=NOW) == (first,)
    store.rotate_intermediary("acme", second, at=NOW + 1, grace_until=NOW + 100)
    assert store.intermediary_generation("acme") != before
    assert set(store.intermediary_secrets("acme", now=NOW + 50)) == {first, second}
    assert store.intermediary_secrets("acme", now=NOW + 101) == (second,)
    assert store.revoke_intermediary("acme", at=NOW + 200) is True
    assert store.revoke_intermediary("acme", at=NOW + 201) is False
    assert store.intermediary_secrets("acme", now=NOW + 202) == ()
    found = store.intermediary("acme")
    assert found is not None
    assert found.revoked_at == NOW + 200
    assert [i.name for i in store.list_intermediaries()] == ["acme"]
    with pytest.raises(IntermediaryNotFoundError):
        store.rotate_intermediary("nobody", second, at=NOW, grace_until=NOW)


# -- the replay cache ---------------------------------------------------------------------


def test_a_message_id_is_remembered_until_it_expires(store: OutboxStore) -> None:
    assert store.remember_message("p", "m1", expires_at=NOW + 10, now=NOW) is True
    assert store.remember_message("p", "m1", expires_at=NOW + 10, now=NOW + 1) is False
    assert store.message_seen("p", "m1", now=NOW + 5) is True
    assert store.message_seen("q", "m1", now=NOW + 5) is False  # per party
    assert store.message_seen("p", "m1", now=NOW + 11) is False
    store.forget_message("p", "m1")
    assert store.message_seen("p", "m1", now=NOW + 5) is False
    assert store.remember_message("p", "m1", expires_at=NOW + 10, now=NOW + 6) is True


def test_one_message_is_remembered_once_across_stores(
    store: OutboxStore, other: OutboxStore
) -> None:
    stores = [store, other] * 3
    fresh: list[bool] = []
    race(
        len(stores),
        lambda n: fresh.append(stores[n].remember_message("p", "m", expires_at=NOW + 9, now=NOW)),
    )
    assert sorted(fresh) == [False] * 5 + [True]


# -- offers and acceptances ---------------------------------------------------------------


def test_offers_are_kept_with_the_message_that_asked(store: OutboxStore) -> None:
    stored = stored_offer()
    seen = SeenMessage("intermediary:acme", "msg-1", NOW + 600, NOW)
    store.add_offers([stored], message=seen)
    assert store.get_offer(stored.offer.id) == stored
    assert store.message_seen("intermediary:acme", "msg-1", now=NOW) is True
    with pytest.raises(ReplayedMessageError):
        store.add_offers([], message=seen)
    with pytest.raises(OfferNotFoundError):
        store.get_offer("off-nope")


def test_an_acceptance_is_claimed_finished_and_answered_again(store: OutboxStore) -> None:
    stored = stored_offer()
    store.add_offers([stored])
    offer_id = stored.offer.id
    assert store.begin_acceptance(claim("acc-1", offer_id, "p1"), NOW) is None
    assert store.renew_acceptance("acc-1", "p1", NOW + 90, hold='{"h": 1}') is True
    assert store.renew_acceptance("acc-1", "p2", NOW + 90) is False
    booked = store.finish_acceptance(
        "acc-1", "p1", "booked", '{"booking": "B1"}', NOW + 2, rows=[new_row(1)]
    )
    assert booked is None
    assert store.get_row("msg_0001").state == "pending"  # in the same commit
    found = store.begin_acceptance(claim("acc-1", offer_id, "p2"), NOW + 3)
    assert found is not None
    assert (found.state, found.result, found.hold) == ("booked", '{"booking": "B1"}', '{"h": 1}')
    record = store.get_acceptance("acc-1")
    assert record is not None
    assert record.state == "booked"
    assert store.get_acceptance("acc-nope") is None


def test_a_stalled_acceptance_is_taken_over(store: OutboxStore) -> None:
    stored = stored_offer()
    store.add_offers([stored])
    assert store.begin_acceptance(claim("acc-1", stored.offer.id, "p1"), NOW) is None
    assert store.stalled_acceptances(NOW + 30) == []
    (stalled,) = store.stalled_acceptances(NOW + 61)
    assert stalled.acceptance_id == "acc-1"
    assert store.take_over_acceptance("acc-1", "rec", NOW + 61, NOW + 120) is True
    assert store.take_over_acceptance("acc-1", "rec2", NOW + 62, NOW + 120) is False  # live
    assert store.finish_acceptance("acc-1", "rec", "released", "{}", NOW + 63) is None
    released = store.get_acceptance("acc-1")
    assert released is not None
    assert released.state == "released"


def test_two_acceptances_of_one_offer_book_it_once(store: OutboxStore, other: OutboxStore) -> None:
    stored = stored_offer()
    store.add_offers([stored])
    stores = [store, other] * 3
    answers: list[str | None] = []

    def accept(n: int) -> None:
        found = stores[n].begin_acceptance(claim(f"acc-{n}", stored.offer.id, f"p{n}"), NOW)
        answers.append(None if found is None else found.acceptance_id)

    race(len(stores), accept)
    assert answers.count(None) == 1  # one claimed it
    assert len({a for a in answers if a is not None}) == 1  # the others all see that one


# -- emission problems --------------------------------------------------------------------


def test_emission_problems_are_kept_for_the_operator(store: OutboxStore) -> None:
    problems = [
        EmissionProblem(f"tx-{n}", "terms_a", CUSTOMER, "cmi", "bad mapping", NOW + n, "{}")
        for n in range(3)
    ]
    store.add_emission_problems(problems)
    assert store.count_emission_problems() == 3
    assert [p.transaction_id for p in store.emission_problems(limit=2)] == ["tx-2", "tx-1"]
