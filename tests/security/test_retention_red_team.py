"""The retention purge under attack, against both real stores: windows that are no
numbers, a purge that races a redrive, a claim, another purge or a customer paging
through the pull API, and a dry run whose counts must be what the purge then deletes.

What tests/contract/test_retention.py already pins (each kind goes after its window,
oldest first, through an index; a processing acceptance keeps its offer; a purged
acceptance cannot book) is not repeated here. Every loop is bounded in count and time.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cmi_sdk import ConfigurationError, OfferNotFoundError, OutboxRowNotFoundError
from cmi_sdk._retention import purge_windows
from cmi_sdk.outbox import EmissionProblem, OutboxStore, RetentionStore, StoredOffer
from cmi_sdk.outbox.sqlite import SQLiteStore
from tests.contract.rows import NOW, claim, new_row, outcome, race, stored_offer
from tests.stores import DSN
from tests.support import CUSTOMER, emitting_adapter

DAY = 86400.0


def exists(store: OutboxStore, msg_id: str) -> bool:
    try:
        store.get_row(msg_id)
    except OutboxRowNotFoundError:
        return False
    return True


def deliver(store: OutboxStore, *msg_ids: str, at: float, kind: str = "delivered") -> None:
    """Claim the rows and record ``kind`` for each, finished at ``at``."""
    claimed = {r.msg_id for r in store.claim(owner="w", now=at, lease_seconds=30, limit=500)}
    assert set(msg_ids) <= claimed
    store.complete([outcome(m, "w", kind, started_at=at, finished_at=at) for m in msg_ids])
    if claimed - set(msg_ids):  # let go of what else the claim took
        store.complete(
            [
                outcome(m, "w", "retry", next_attempt_at=at, finished_at=at)
                for m in claimed - set(msg_ids)
            ]
        )


# -- windows that are no numbers ------------------------------------------------------------


@pytest.mark.parametrize("window", [math.nan, -1.0, -math.inf])
def test_a_window_that_is_no_length_is_refused(window: float) -> None:
    # NaN compares false with everything in Python, but PostgreSQL sorts NaN above every
    # number: "delivered_at < NaN" holds for every row, and the purge deleted them all.
    for name in ("delivered", "dead", "attempts", "offers", "acceptances"):
        windows: dict[str, float | None] = dict.fromkeys(
            ("delivered", "dead", "offers", "acceptances", "attempts"), None
        )
        windows[name] = window
        with pytest.raises(ConfigurationError):
            purge_windows(NOW, **windows)  # type: ignore[arg-type]


def test_a_nan_time_purges_nothing_and_is_refused(store: OutboxStore) -> None:
    assert isinstance(store, RetentionStore)
    store.insert([new_row(n) for n in range(1, 4)])
    deliver(store, "msg_0001", "msg_0002", at=NOW)
    deliver(store, "msg_0003", at=NOW, kind="dead")
    for name in ("delivered_before", "dead_before", "attempts_before"):
        with pytest.raises(ValueError, match="purge"):
            store.purge(**{name: math.nan}, limit=10)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="purge"):
            store.purgeable(**{name: math.nan})  # type: ignore[arg-type]
    assert all(exists(store, f"msg_{n:04d}") for n in range(1, 4))
    assert len(store.attempts("msg_0001")) == 1


@pytest.mark.parametrize("option", ["--keep-days", "--keep-dead-days", "--keep-attempt-days"])
def test_the_command_refuses_a_nan_window_and_deletes_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    option: str,
) -> None:
    from cmi_sdk.cli import EXIT_USAGE, main

    db = tmp_path / "cmi.db"
    store = SQLiteStore(db)
    store.migrate()
    store.insert([new_row(1)])
    deliver(store, "msg_0001", at=NOW)
    monkeypatch.setenv("CMI_DATABASE_URL", f"sqlite:///{db}")
    for value in ("nan", "-inf"):
        assert main(["outbox", "purge", f"{option}={value}"]) == EXIT_USAGE
        assert "must be" in capsys.readouterr().err
    assert exists(store, "msg_0001")
    store.close()


def test_the_worker_refuses_a_window_that_is_no_length(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    try:
        for name in ("keep_delivered", "keep_dead", "keep_attempts"):
            for window in (math.nan, -1.0):
                with pytest.raises(ConfigurationError):
                    adapter.delivery_worker(**{name: window})  # type: ignore[arg-type]
    finally:
        adapter.close()


# -- the dry run ----------------------------------------------------------------------------


def test_a_dry_run_counts_what_the_purge_then_deletes(store: OutboxStore) -> None:
    # Every kind at once, with the windows the command uses: an old delivered row's
    # attempts go with it (counted as the row), not again as attempts of a kept row.
    assert isinstance(store, RetentionStore)
    old, recent = NOW - 40 * DAY, NOW - 10 * DAY
    store.insert(
        [
            new_row(1, created_at=old, next_attempt_at=old),
            new_row(2, created_at=old, next_attempt_at=old),
            new_row(3, created_at=recent, next_attempt_at=recent),
            new_row(4, state="pull", destination=None, created_at=old, next_attempt_at=old),
            new_row(5, created_at=old - 60 * DAY, next_attempt_at=old - 60 * DAY),
        ]
    )
    deliver(store, "msg_0005", at=old - 60 * DAY, kind="dead")
    deliver(store, "msg_0001", "msg_0002", at=old)
    deliver(store, "msg_0003", at=recent)
    stored = stored_offer()
    store.add_offers([stored])
    store.remember_message("acme", "m1", expires_at=NOW - 1, now=NOW - 10)
    store.add_emission_problems(
        [EmissionProblem("tx", "terms_a", CUSTOMER, "cmi", "bad", old - 60 * DAY, "{}")]
    )
    windows = purge_windows(
        max(NOW, stored.offer.valid_until.timestamp() + 31 * DAY),
        delivered=30 * DAY,
        dead=90 * DAY,
        offers=30 * DAY,
        acceptances=30 * DAY,
        attempts=7 * DAY,
    )
    counted = store.purgeable(**windows)
    deleted = dict.fromkeys(counted, 0)
    for _ in range(20):
        done = store.purge(**windows, limit=2)
        deleted = {k: deleted[k] + done[k] for k in deleted}
        if not any(done.values()):
            break
    assert deleted == counted
    assert (counted["delivered"], counted["attempts"]) == (2, 1)
    assert store.purgeable(**windows) == dict.fromkeys(counted, 0)


# -- races ----------------------------------------------------------------------------------


def test_a_row_a_redrive_brought_back_is_never_purged(
    store: OutboxStore, other: OutboxStore
) -> None:
    # A purge and a redrive of the same dead rows, in two connections: each row is
    # either purged (and the redrive finds nothing) or redriven (and stays).
    assert isinstance(store, RetentionStore)
    count = 60
    store.insert([new_row(n) for n in range(1, count + 1)])
    deliver(store, *(f"msg_{n:04d}" for n in range(1, count + 1)), at=NOW, kind="dead")
    redriven: list[str] = []
    vanished: list[str] = []

    def run(n: int) -> None:
        if n == 0:
            for _ in range(count):
                if not any(store.purge(dead_before=NOW + 1, limit=3).values()):
                    break
            return
        for m in range(1, count + 1):
            msg_id = f"msg_{m:04d}"
            try:
                if other.redrive(msg_id=msg_id, now=NOW + 2):
                    redriven.append(msg_id)
            except OutboxRowNotFoundError:
                vanished.append(msg_id)

    race(2, run)
    for msg_id in redriven:
        assert store.get_row(msg_id).state == "pending", msg_id
    assert len(redriven) + len(vanished) <= count
    left = {r.msg_id for r in store.rows(limit=count + 1)}
    assert left == set(redriven)


def test_two_purges_at_once_delete_each_row_once_and_keep_the_rest(
    store: OutboxStore, other: OutboxStore
) -> None:
    # Two workers purge at the same moment while a third claims and completes: nothing
    # fails (no deadlock, no lock timeout), each row is counted by one purge, and what
    # a worker may still send stays.
    assert isinstance(store, RetentionStore)
    assert isinstance(other, RetentionStore)
    finished = 120
    store.insert([new_row(n) for n in range(1, finished + 1)])
    deliver(store, *(f"msg_{n:04d}" for n in range(1, finished + 1)), at=NOW)
    live = [new_row(n, next_attempt_at=NOW + 5) for n in range(1001, 1031)]
    store.insert(live)
    totals = [0, 0]

    def run(n: int) -> None:
        if n < 2:
            mine = (store, other)[n]
            assert isinstance(mine, RetentionStore)
            for _ in range(100):
                done = mine.purge(delivered_before=NOW + 1, attempts_before=NOW + 1, limit=7)
                totals[n] += done["delivered"]
                if not any(done.values()):
                    return
            return
        for _ in range(10):
            rows = other.claim(owner="x", now=NOW + 10, lease_seconds=30, limit=5)
            other.complete(
                [
                    outcome(r.msg_id, "x", "retry", next_attempt_at=NOW + 10, finished_at=NOW + 9)
                    for r in rows
                ]
            )

    race(3, run)
    assert sum(totals) == finished
    left = {r.msg_id: r.state for r in store.rows(limit=500)}
    assert set(left) == {r.msg_id for r in live}
    assert set(left.values()) <= {"pending", "retry"}


def test_a_customer_paging_while_older_documents_are_purged_misses_and_repeats_nothing(
    store: OutboxStore,
) -> None:
    # The cursor is a position (the seq, or the transaction and the seq), not an offset:
    # rows deleted behind it move nothing in front of it.
    assert isinstance(store, RetentionStore)
    pull = {"state": "pull", "destination": None}
    total = 40
    store.insert(
        [
            new_row(n, **pull, created_at=NOW + n, next_attempt_at=NOW + n)
            for n in range(1, total + 1)
        ]
    )
    seen: list[str] = []
    cursor = 0
    for page in range(total):
        found = _pull(store, cursor, 3)
        if not found:
            break
        seen.extend(r.msg_id for r in found)
        cursor = getattr(found[-1], "cursor", found[-1].seq)
        # Everything up to what was just read goes, and a new document arrives.
        store.purge(pull_before=NOW + len(seen) + 1, limit=100)
        store.insert([new_row(500 + page, **pull, created_at=NOW + 1e6)])
    expected = [f"msg_{n:04d}" for n in range(1, total + 1)]
    assert seen[:total] == expected
    assert len(seen) == len(set(seen))
    assert {f"msg_{n:04d}" for n in range(500, 500 + total)} >= set(seen[total:])


def _pull(store: OutboxStore, cursor: int, limit: int) -> list[Any]:
    deadline = time.monotonic() + 5
    while True:  # PostgreSQL holds rows back while an older transaction is open
        found = store.documents_since("terms_a", cursor, limit)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


# -- PostgreSQL: a purge that waits on a row lock ----------------------------------------------


def test_a_dead_row_redriven_and_dead_again_while_a_purge_waits_is_kept(
    kind: str, location: str, store: OutboxStore, other: OutboxStore
) -> None:
    # The purge reads its batch, then deletes it by id and state. A delete that waits on
    # a row lock (here another session holds msg_0001: a late 2xx being recorded) lets
    # msg_0002 be redriven, sent and die again meanwhile: dead, but just now, inside its
    # window. The purge then deleted it.
    if kind != "postgres":
        pytest.skip("SQLite has one writer at a time: the purge's transaction holds it all")
    import psycopg

    assert isinstance(store, RetentionStore)
    store.insert([new_row(1), new_row(2)])
    deliver(store, "msg_0001", "msg_0002", at=NOW, kind="dead")
    holder = psycopg.connect(DSN)
    try:
        lock = f'SELECT 1 FROM "{location}".outbox WHERE msg_id = %s FOR UPDATE'  # noqa: S608
        holder.execute(lock, ("msg_0001",))
        done: dict[str, int] = {}
        purging = threading.Thread(
            target=lambda: done.update(store.purge(dead_before=NOW + 100, limit=10)),  # type: ignore[union-attr]
            daemon=True,
        )
        purging.start()
        _wait_for_lock_or_end(location, purging)
        redriven = other.redrive(msg_id="msg_0002", now=NOW + 200) if purging.is_alive() else 0
        if redriven:
            (row,) = other.claim(owner="y", now=NOW + 200, lease_seconds=30, limit=5)
            other.complete([outcome(row.msg_id, "y", "dead", finished_at=NOW + 201)])
        holder.commit()
        purging.join(10)
        assert not purging.is_alive()
    finally:
        holder.close()
    if redriven:
        assert store.get_row("msg_0002").state == "dead"  # died at NOW + 201: kept
    # Either order is right: the purge took msg_0002 before the redrive could (which then
    # found nothing), or the redrive came first and the row stays.
    assert exists(store, "msg_0002") == bool(redriven)
    assert done["dead"] >= 1
    assert store.purge(dead_before=NOW + 100, limit=10)["dead"] == 2 - done["dead"]
    assert not exists(store, "msg_0001")


def _wait_for_lock_or_end(schema: str, thread: threading.Thread) -> None:
    """Until a session's DELETE on the schema's outbox waits for a lock, or the thread
    ends (bounded: 5 s)."""
    import psycopg

    with psycopg.connect(DSN, autocommit=True) as conn:
        deadline = time.monotonic() + 5
        while thread.is_alive() and time.monotonic() < deadline:
            found = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE %s",
                (f'DELETE FROM "{schema}".outbox%',),  # noqa: S608  (a pattern, not SQL)
            ).fetchone()
            if found and found[0]:
                return
            time.sleep(0.02)


def test_two_purges_of_offers_at_once_fail_nothing_and_keep_a_booking_in_progress(
    store: OutboxStore, other: OutboxStore
) -> None:
    # Offers of one request share their validity: two purges list them in the same
    # order only if the ties are broken the same way. Each locks an offer's acceptances
    # and then the offer; in two orders that is a deadlock, and a purge that fails.
    # Meanwhile a third connection begins an acceptance of one of them: kept.
    assert isinstance(store, RetentionStore)
    assert isinstance(other, RetentionStore)
    base = stored_offer()
    offers = [
        StoredOffer(
            offer=base.offer.model_copy(update={"id": f"off-{n:03d}"}),
            request=base.request,
            xml=base.xml,
            intermediary=base.intermediary,
        )
        for n in range(40)
    ]
    store.add_offers(offers)
    until = base.offer.valid_until.timestamp()
    for n, held in enumerate(offers[:20]):
        acceptance = f"acc-{n:03d}"
        assert store.begin_acceptance(claim(acceptance, held.offer.id, "p"), until - 50) is None
        assert store.finish_acceptance(acceptance, "p", "refused", "{}", until - 40) is None
    window = {"offers_before": until + 10, "acceptances_before": until}
    counted = store.purgeable(**window)
    assert (counted["offers"], counted["acceptances"]) == (40, 20)
    totals = [0, 0]
    late: list[object] = []

    def run(n: int) -> None:
        if n == 2:
            try:  # the offer is purged first, or the acceptance begins first and keeps it
                late.append(other.begin_acceptance(claim("acc-late", "off-039", "q"), until + 5))
            except OfferNotFoundError:
                late.append("purged")
            return
        mine = (store, other)[n]
        assert isinstance(mine, RetentionStore)
        for _ in range(40):
            done = mine.purge(**window, limit=3)
            totals[n] += done["offers"]
            if not done["offers"]:
                return

    race(3, run)
    booked = store.get_acceptance("acc-late")
    assert sum(totals) == 40 - (booked is not None)
    assert (booked is None) == (late == ["purged"])
    if booked is not None:
        assert store.get_offer("off-039").offer.id == "off-039"
    assert store.get_acceptance("acc-000") is None
