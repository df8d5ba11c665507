"""Retention, for every store: finished documents go after their window, with their
attempts, oldest first and in batches; nothing that can still be sent goes."""

from __future__ import annotations

import pytest

from cmi_sdk import OfferNotFoundError, OutboxRowNotFoundError
from cmi_sdk.outbox import OutboxStore, RetentionStore, StoredOffer
from tests.contract.rows import NOW, claim, new_row, outcome, stored_offer


def test_finished_rows_are_purged_after_their_window(store: OutboxStore) -> None:
    assert isinstance(store, RetentionStore)
    store.insert([new_row(n) for n in range(1, 6)])
    store.claim(owner="w", now=NOW, lease_seconds=30, limit=10)
    store.complete(
        [
            outcome("msg_0001", "w", "delivered", finished_at=NOW + 1),
            outcome("msg_0002", "w", "delivered", finished_at=NOW + 2),
            outcome("msg_0003", "w", "dead", finished_at=NOW + 1),
            outcome("msg_0004", "w", "dead", finished_at=NOW + 1),
            outcome("msg_0005", "w", "retry"),
        ]
    )
    assert store.redrive(msg_id="msg_0004", now=NOW + 3) == 1  # pending again: it stays
    window = {"delivered_before": NOW + 10, "dead_before": NOW + 10}
    assert _documents(store.purgeable(delivered_before=NOW, dead_before=NOW)) == (0, 0)
    assert _documents(store.purgeable(**window)) == (2, 1)

    assert _documents(store.purge(**window, limit=1)) == (1, 1)  # oldest first
    with pytest.raises(OutboxRowNotFoundError):
        store.get_row("msg_0001")
    assert store.attempts("msg_0001") == []
    assert store.get_row("msg_0002").state == "delivered"
    assert _documents(store.purge(**window, limit=10)) == (1, 0)
    assert _documents(store.purge(**window, limit=10)) == (0, 0)
    left = {r.msg_id: r.state for r in store.rows(limit=10)}
    assert left == {"msg_0004": "pending", "msg_0005": "retry"}
    assert [a.outcome for a in store.attempts("msg_0005")] == ["retry"]


def _documents(counts: dict[str, int]) -> tuple[int, int]:
    return counts["delivered"], counts["dead"]


def _until(store: OutboxStore) -> tuple[str, float]:
    stored = stored_offer()
    store.add_offers([stored])
    return stored.offer.id, stored.offer.valid_until.timestamp()


def test_a_purged_acceptance_cannot_book_its_offer_again(store: OutboxStore) -> None:
    # The attack: an acceptance was refused (the offer let go), its record purged, and the
    # intermediary retries it; with the offer still there the retry would start afresh and
    # could book. The offer goes with its acceptances, in one transaction, and only once
    # it can no longer be accepted: the retry finds no offer.
    assert isinstance(store, RetentionStore)
    offer_id, until = _until(store)
    assert store.begin_acceptance(claim("acc-1", offer_id, "p1"), until - 100) is None
    assert store.finish_acceptance("acc-1", "p1", "refused", "{}", until - 90) is None
    # Inside either window nothing goes: the offer can still be accepted, the refusal
    # still be retried and answered as it was.
    for offers_before, acceptances_before in ((until, until), (until + 10, until - 90)):
        window = {"offers_before": offers_before, "acceptances_before": acceptances_before}
        assert store.purgeable(**window)["offers"] == 0
        assert store.purge(**window, limit=10)["offers"] == 0
        found = store.begin_acceptance(claim("acc-1", offer_id, "p2"), until - 80)
        assert found is not None
        assert found.state == "refused"
    window = {"offers_before": until + 10, "acceptances_before": until}
    counts = store.purgeable(**window)
    assert (counts["offers"], counts["acceptances"]) == (1, 1)
    done = store.purge(**window, limit=10)
    assert (done["offers"], done["acceptances"]) == (1, 1)
    assert store.get_acceptance("acc-1") is None
    with pytest.raises(OfferNotFoundError):
        store.begin_acceptance(claim("acc-1", offer_id, "p3"), until + 20)
    with pytest.raises(OfferNotFoundError):
        store.begin_acceptance(claim("acc-2", offer_id, "p3"), until + 20)
    assert store.get_acceptance("acc-1") is None


def test_a_processing_acceptance_keeps_its_offer_however_old(store: OutboxStore) -> None:
    # Its lease may be recovered: the booking process may have booked already.
    assert isinstance(store, RetentionStore)
    offer_id, until = _until(store)
    assert store.begin_acceptance(claim("acc-1", offer_id, "p1"), until - 100) is None
    window = {"offers_before": until + 1e9, "acceptances_before": until + 1e9}
    assert store.purge(**window, limit=10)["offers"] == 0
    (stalled,) = store.stalled_acceptances(until + 1e9)
    assert stalled.acceptance_id == "acc-1"
    assert store.take_over_acceptance("acc-1", "rec", until + 1e9, until + 2e9) is True
    # Booked (it holds the offer): kept for the acceptance window from then on.
    assert store.finish_acceptance("acc-1", "rec", "booked", "{}", until + 1e9) is None
    assert store.purge(**window, limit=10)["offers"] == 0
    later = {"offers_before": until + 1e9, "acceptances_before": until + 1e9 + 1}
    assert store.purgeable(**later)["acceptances"] == 1
    done = store.purge(**later, limit=10)
    assert (done["offers"], done["acceptances"]) == (1, 1)
    with pytest.raises(OfferNotFoundError):
        store.get_offer(offer_id)


def test_expired_offers_and_message_ids_go_in_batches(store: OutboxStore) -> None:
    assert isinstance(store, RetentionStore)
    first, until = _until(store)
    second = stored_offer()
    second = StoredOffer(
        offer=second.offer.model_copy(update={"id": "off-second"}),
        request=second.request,
        xml=second.xml,
        intermediary=second.intermediary,
    )
    store.add_offers([second])
    for n in range(3):
        store.remember_message("acme", f"m{n}", expires_at=NOW + n, now=NOW - 10)
    window = {"offers_before": until + 1, "acceptances_before": until, "seen_before": NOW + 1.5}
    counts = store.purgeable(**window)
    assert (counts["offers"], counts["acceptances"], counts["seen"]) == (2, 0, 2)
    done = store.purge(**window, limit=1)
    assert (done["offers"], done["seen"]) == (1, 1)
    done = store.purge(**window, limit=10)
    assert (done["offers"], done["seen"]) == (1, 1)
    assert store.purgeable(**window)["offers"] == 0
    assert store.message_seen("acme", "m2", now=NOW)  # not yet expired: kept
    for offer_id in (first, "off-second"):
        with pytest.raises(OfferNotFoundError):
            store.get_offer(offer_id)


def test_a_delivered_rows_attempts_go_before_it(store: OutboxStore) -> None:
    assert isinstance(store, RetentionStore)
    store.insert([new_row(n) for n in range(1, 4)])
    store.claim(owner="w", now=NOW, lease_seconds=30, limit=10)
    store.complete(
        [
            outcome("msg_0001", "w", "delivered", finished_at=NOW + 1),
            outcome("msg_0002", "w", "delivered", finished_at=NOW + 2),
            outcome("msg_0003", "w", "retry", finished_at=NOW + 1),
        ]
    )
    window = {"attempts_before": NOW + 10}
    assert store.purgeable(**window)["attempts"] == 2
    assert store.purge(**window, limit=1)["attempts"] == 1  # oldest first
    assert store.attempts("msg_0001") == []
    assert [a.outcome for a in store.attempts("msg_0002")] == ["delivered"]
    assert store.purge(**window, limit=10)["attempts"] == 1
    assert store.purge(**window, limit=10)["attempts"] == 0
    # The documents stay for pulling; a row still being retried keeps its history.
    assert store.get_row("msg_0001").state == "delivered"
    assert [a.outcome for a in store.attempts("msg_0003")] == ["retry"]
