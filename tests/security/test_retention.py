"""Retention never reopens a booking.

The attack: an offer's id comes from the intermediary's request id (the same request sent
again finds its offer), so once an expired offer and its acceptance are purged, the same
request id asks again and gets an offer with the very id of the purged one. A late retry
of the old acceptance (its id now unknown) would then book that new offer. Each runs on
SQLite and, with ``CMI_TEST_POSTGRES_DSN``, on PostgreSQL.
"""

from __future__ import annotations

import time

import pytest

from cmi_sdk import AcceptanceError, ConfigurationError
from cmi_sdk.outbox import RetentionStore
from tests.fakes import Clock, Shop
from tests.security.test_bookings import accepting, an_offer, closing, firm, store_url

__all__ = ["store_url"]  # the fixture, shared with the bookings' tests

DAY = 86400.0


def test_a_late_retry_of_a_purged_acceptance_books_nothing(store_url: str) -> None:
    clock = Clock(time.time())
    shop = Shop()
    adapter = firm(store_url, shop, clock=clock)
    try:
        offer = an_offer(adapter, intermediary="relay")
        acceptance = accepting(offer, "acc-1")
        first = adapter.accept_offer(offer.id, acceptance, intermediary="relay")
        assert not first.replayed
        store = adapter.store
        assert isinstance(store, RetentionStore)
        # The worker's windows, long after the offer expired: both records go.
        clock.now = offer.valid_until.timestamp() + 61 * DAY
        with adapter.delivery_worker() as worker:
            worker.run_once()
        assert store.get_acceptance("acc-1") is None
        again = an_offer(adapter, intermediary="relay")  # the same request id asks again
        assert again.id == offer.id
        with pytest.raises(AcceptanceError, match="before offer"):
            adapter.accept_offer(offer.id, acceptance, intermediary="relay")
        assert shop.booked == ["acc-1"]
        # A new acceptance of the new offer books it, once.
        fresh = accepting(again, "acc-2").model_copy(update={"accepted_at": again.created_at})
        assert not adapter.accept_offer(again.id, fresh, intermediary="relay").replayed
        assert shop.booked == ["acc-1", "acc-2"]
    finally:
        closing(adapter)


def test_the_offer_windows_cannot_be_shorter_than_a_day(store_url: str) -> None:
    # Shorter, a purged offer's id could be given again while its acceptance's time still
    # lies within the day of clock skew an acceptance is allowed.
    adapter = firm(store_url)
    try:
        for option in ("keep_offers", "keep_acceptances"):
            with pytest.raises(ConfigurationError, match="a day"):
                adapter.delivery_worker(**{option: DAY - 1})
    finally:
        closing(adapter)


def test_the_operator_sees_what_would_go_and_cannot_shorten_the_offer_windows(
    store_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cmi_sdk.cli import EXIT_USAGE, main

    adapter = firm(store_url, Shop())
    try:
        offer = an_offer(adapter, intermediary="relay")
        adapter.accept_offer(offer.id, accepting(offer, "acc-1"), intermediary="relay")
    finally:
        closing(adapter)
    monkeypatch.setenv("CMI_DATABASE_URL", store_url)
    assert main(["outbox", "purge", "--dry-run", "--keep-offer-days", "0.5"]) == EXIT_USAGE
    assert "--keep-offer-days and --keep-acceptance-days must be >= 1" in capsys.readouterr().err
    # Within its windows the booked offer stays, and a dry run says so.
    assert main(["outbox", "purge", "--dry-run"]) == 0
    assert "0 offers, 0 acceptances" in capsys.readouterr().out
