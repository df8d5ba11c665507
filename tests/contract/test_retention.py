"""Retention, for every store: finished documents go after their window, with their
attempts, oldest first and in batches; nothing that can still be sent goes."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest

from cmi_sdk import Adapter, OfferNotFoundError, OutboxRowNotFoundError
from cmi_sdk._retention import RETAINED, purge_windows
from cmi_sdk.outbox import EmissionProblem, OutboxStore, RetentionStore, StoredOffer
from cmi_sdk.outbox._queries import queries
from tests.contract.rows import ACCOUNT, NOW, claim, new_row, outcome, stored_offer
from tests.stores import DSN
from tests.support import CUSTOMER, register, ticket


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


def test_the_store_counts_the_kinds_the_command_names(store: OutboxStore) -> None:
    assert isinstance(store, RetentionStore)
    assert list(store.purge(limit=1)) == list(store.purgeable()) == list(RETAINED)


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


def test_emission_problems_go_after_the_dead_letters_window(store: OutboxStore) -> None:
    # Each keeps a whole transaction (customer data) for the operator to emit again once
    # the cause is fixed: the operator's to-do list, as dead letters are, and as long.
    assert isinstance(store, RetentionStore)
    store.add_emission_problems(
        [
            EmissionProblem(f"tx-{n}", "terms_a", CUSTOMER, "cmi", "bad mapping", NOW + n, "{}")
            for n in range(3)
        ]
    )
    assert store.purgeable(problems_before=NOW)["problems"] == 0
    assert store.purgeable(problems_before=NOW + 2)["problems"] == 2
    assert store.purge(problems_before=NOW + 2, limit=1)["problems"] == 1  # oldest first
    assert [p.transaction_id for p in store.emission_problems()] == ["tx-2", "tx-1"]
    assert store.purge(problems_before=NOW + 2, limit=10)["problems"] == 1
    assert store.count_emission_problems() == 1
    windows = purge_windows(
        NOW + 1000, delivered=None, dead=500, offers=None, acceptances=None, attempts=None
    )
    assert store.purge(**windows, limit=10)["problems"] == 1
    assert store.count_emission_problems() == 0


def _gone(store: OutboxStore, *msg_ids: str) -> bool:
    for msg_id in msg_ids:
        try:
            store.get_row(msg_id)
        except OutboxRowNotFoundError:
            continue
        return False
    return True


def test_cancelled_rows_go_a_window_after_their_terms_were_revoked(
    store_adapter: Adapter, store: OutboxStore
) -> None:
    # A revoked customer's undelivered documents go nowhere and nobody pulls them (a pull
    # under revoked terms is refused): kept for ever, they were customer data kept for
    # nothing.
    assert isinstance(store, RetentionStore)
    terms = register(store_adapter, customer_ref=ACCOUNT)
    mine = {"terms_id": terms.id, "customer_ref": ACCOUNT}
    held = {"state": "digest", "next_attempt_at": NOW + 600, "model": "{}"}
    store.insert([new_row(1, **mine), new_row(2, **mine, **held), new_row(3, **mine)])
    store.claim(owner="w", now=NOW, lease_seconds=30, limit=1)  # msg_0001, being sent
    store_adapter.revoke_terms(terms.id)  # at NOW: cancels all three
    # Written from terms read just before the revocation: the worker cancels it.
    store.insert([new_row(4, **mine)])
    assert [r.msg_id for r in store.claim(owner="w", now=NOW, lease_seconds=30, limit=9)] == [
        "msg_0004"
    ]
    assert store.cancel(owner="w", msg_ids=["msg_0004"], reason="terms revoked") == 1
    assert {store.get_row(f"msg_{n:04d}").state for n in range(1, 5)} == {"cancelled"}
    store.insert([new_row(5)])  # another customer's, pending: it stays

    assert store.purgeable(cancelled_before=NOW)["cancelled"] == 0  # inside the window
    assert store.purge(cancelled_before=NOW, limit=10)["cancelled"] == 0
    assert store.purgeable(cancelled_before=NOW + 1)["cancelled"] == 4
    assert store.purge(cancelled_before=NOW + 1, limit=3)["cancelled"] == 3
    assert store.purge(cancelled_before=NOW + 1, limit=10)["cancelled"] == 1
    assert _gone(store, "msg_0001", "msg_0002", "msg_0003", "msg_0004")
    assert store.get_row("msg_0005").state == "pending"
    # The revocation itself stays on record.
    assert [r.event for r, _ in store.consent_records(terms.id)] == ["granted", "revoked"]


def test_merged_rows_go_a_window_after_their_digest_was_made(store: OutboxStore) -> None:
    # Their content went out inside the digest document; that one is an ordinary
    # document, kept for the pull window after its delivery.
    assert isinstance(store, RetentionStore)
    held = {"state": "digest", "next_attempt_at": NOW + 60, "model": "{}"}
    store.insert([new_row(1, **held), new_row(2, **held), new_row(3, **held)])
    digest = new_row(9, created_at=NOW + 100, next_attempt_at=NOW + 100)
    assert store.merge_digest(["msg_0001", "msg_0002"], digest) == 3
    assert store.purgeable(merged_before=NOW + 100)["merged"] == 0
    assert store.purgeable(merged_before=NOW + 101)["merged"] == 2
    assert store.purge(merged_before=NOW + 101, limit=1)["merged"] == 1
    assert store.purge(merged_before=NOW + 101, limit=10)["merged"] == 1
    assert store.purge(merged_before=NOW + 101, limit=10)["merged"] == 0
    assert _gone(store, "msg_0001", "msg_0002")
    # A row still held for its window, and the digest document, stay.
    assert store.get_row("msg_0003").state == "digest"
    assert store.get_row("msg_0009").state == "pending"


def test_pull_only_documents_go_after_the_pull_window(store: OutboxStore) -> None:
    assert isinstance(store, RetentionStore)
    pull = {"state": "pull", "destination": None}
    store.insert(
        [
            new_row(1, **pull),
            new_row(2, **pull, created_at=NOW + 5, next_attempt_at=NOW + 5),
            new_row(3),
        ]
    )
    assert [r.msg_id for r in store.documents_since("terms_a", 0, 10)] == [
        "msg_0001",
        "msg_0002",
        "msg_0003",
    ]
    assert store.purgeable(pull_before=NOW)["pull"] == 0
    assert store.purgeable(pull_before=NOW + 1)["pull"] == 1
    assert store.purge(pull_before=NOW + 1, limit=10)["pull"] == 1
    assert [r.msg_id for r in store.documents_since("terms_a", 0, 10)] == [
        "msg_0002",
        "msg_0003",
    ]
    assert store.purge(pull_before=NOW + 10, limit=10)["pull"] == 1
    assert store.get_row("msg_0003").state == "pending"  # not pull-only: not this window


def test_the_delivered_window_is_the_window_of_every_finished_document(
    store: OutboxStore,
) -> None:
    # The worker's and the command's windows: a pull-only, merged or cancelled document
    # goes when a delivered one would, dead letters keep their own window.
    assert isinstance(store, RetentionStore)
    held = {"state": "digest", "next_attempt_at": NOW, "model": "{}"}
    store.insert(
        [
            new_row(1),
            new_row(2, state="pull", destination=None),
            new_row(3, **held),
            new_row(4, **held),
        ]
    )
    store.merge_digest(["msg_0003", "msg_0004"], new_row(5, created_at=NOW + 1))
    store.claim(owner="w", now=NOW, lease_seconds=30, limit=1)  # msg_0001
    store.complete([outcome("msg_0001", "w", "delivered", finished_at=NOW + 1)])

    def windows(now: float) -> dict[str, float]:
        return purge_windows(
            now, delivered=100, dead=1000, offers=86400, acceptances=86400, attempts=None
        )

    assert sum(store.purgeable(**windows(NOW + 100)).values()) == 0
    counts = store.purgeable(**windows(NOW + 102))
    assert (counts["delivered"], counts["pull"], counts["merged"]) == (1, 1, 2)
    done = store.purge(**windows(NOW + 102), limit=10)
    assert {k: n for k, n in done.items() if n} == {"delivered": 1, "pull": 1, "merged": 2}
    # Nothing is purged with the window None (kept).
    store.insert([new_row(6, state="pull", destination=None)])
    kept = purge_windows(
        NOW + 1e9, delivered=None, dead=None, offers=None, acceptances=None, attempts=None
    )
    assert store.purge(**kept, limit=10)["pull"] == 0


@pytest.mark.parametrize(
    "name",
    [
        *(f"purgeable_{state}" for state in ("delivered", "dead", "pull", "merged", "cancelled")),
        "purge_problems",
    ],
)
def test_each_kind_is_found_through_an_index(
    kind: str, location: str, store: OutboxStore, name: str
) -> None:
    # However many rows are kept, a purge batch reads only the oldest of its kind: no
    # scan of the table, no sort of every row of that state.
    assert isinstance(store, RetentionStore)
    if kind == "sqlite":
        with closing(sqlite3.connect(location)) as conn:
            found = conn.execute(
                f"EXPLAIN QUERY PLAN {queries('sqlite')[name]}", (NOW, 10)
            ).fetchall()
        plan = "\n".join(str(step[-1]) for step in found)
        assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, plan
        assert "TEMP B-TREE" not in plan, plan
        return
    import psycopg

    statement = queries("postgres")[name].replace("{s}", f'"{location}"')
    with psycopg.connect(DSN, autocommit=True) as conn:
        # Disabled, not forbidden: without an index that fits, the plan still shows them.
        for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
            conn.execute(f"SET {setting} = off")
        found = conn.execute(f"EXPLAIN {statement}", (NOW, 10)).fetchall()
    plan = "\n".join(str(line[0]) for line in found)
    assert "Index" in plan, plan
    assert "Seq Scan" not in plan, plan
    assert "Sort" not in plan, plan


def test_a_batch_with_nothing_due_reads_a_few_pages_however_many_rows_are_kept(
    kind: str, location: str, store: OutboxStore
) -> None:
    # An index whose first column its own condition fixes (the state) is used, but read
    # whole: the plan alone does not tell, the pages read do.
    if kind != "postgres":
        pytest.skip("the SQLite plans above say it; PostgreSQL counts pages")
    import psycopg

    assert isinstance(store, RetentionStore)
    states = ("delivered", "dead", "pull", "merged", "cancelled")
    q = {n: t.replace("{s}", f'"{location}"') for n, t in queries("postgres").items()}
    # Every time column set, and inside every window: nothing is due.
    fill = """INSERT INTO {s}.outbox (msg_id, terms_id, customer_ref, transaction_id, standard,
        document_type, body, created_at, state, next_attempt_at, delivered_at, dead_at,
        ended_at)
    SELECT %(state)s || i, 't', 'c', 'tx', 'cmi', 'transaction', '\\x00', %(now)s + i,
        %(state)s, %(now)s + i, %(now)s + i, %(now)s + i, %(now)s + i
    FROM generate_series(1, 5000) AS i"""
    with psycopg.connect(DSN, autocommit=True) as conn:
        for state in states:
            conn.execute(fill.replace("{s}", f'"{location}"'), {"state": state, "now": NOW})
        conn.execute(f'ANALYZE "{location}".outbox')
        for state in states:
            (plan,) = conn.execute(
                f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {q[f'purgeable_{state}']}", (NOW, 10)
            ).fetchone()
            top = plan[0]["Plan"]
            pages = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
            assert pages <= 5, (state, pages)


def test_a_purge_batch_deletes_its_rows_by_id(kind: str, location: str, store: OutboxStore) -> None:
    # Found by their ids, not by their state, whose index holds every such row: a batch
    # among a million delivered rows took 164 ms on SQLite, against 3.5 ms among 10,000.
    if kind != "sqlite":
        pytest.skip("PostgreSQL's planner takes the primary key for = ANY(...) of a few ids")
    with closing(sqlite3.connect(location)) as conn:
        found = conn.execute(
            f"EXPLAIN QUERY PLAN {queries('sqlite')['purge_rows']}", ("delivered", "[]")
        ).fetchall()
    plan = "\n".join(str(step[-1]) for step in found)
    assert "(msg_id=?)" in plan, plan
    assert "(state=?)" not in plan, plan


def test_the_attempts_of_dead_letters_are_never_read_by_a_purge_batch(
    kind: str, location: str, store: OutboxStore
) -> None:
    # Dead letters keep their attempts (eight each, by the schedule) for their own window,
    # far longer than delivered documents' attempts are kept: a batch walking every old
    # attempt read them all again each minute, with the write lock held (half a second a
    # batch with 100,000 dead letters on SQLite).
    assert isinstance(store, RetentionStore)
    if kind == "sqlite":
        with closing(sqlite3.connect(location)) as conn:
            found = conn.execute(
                f"EXPLAIN QUERY PLAN {queries('sqlite')['purge_delivered_attempts']}",
                (NOW, 0.0, 10),
            ).fetchall()
        plan = "\n".join(str(step[-1]) for step in found)
        assert "cmi_attempts_delivered" in plan, plan
        return
    import psycopg

    q = queries("postgres")["purge_delivered_attempts"].replace("{s}", f'"{location}"')
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(
            f"""INSERT INTO "{location}".attempts (msg_id, attempt, owner, started_at,
                finished_at, outcome)
            SELECT 'dead' || (i / 8), i %% 8, 'w', %(then)s, %(then)s, 'retry'
            FROM generate_series(1, 20000) AS i""",  # noqa: S608  (the test's own schema)
            {"then": NOW - 30 * 86400},
        )
        conn.execute(f'ANALYZE "{location}".attempts')
        # Nothing is due (no delivering attempt): the statement deletes nothing.
        (plan,) = conn.execute(
            f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {q}", (NOW, 0.0, 10)
        ).fetchone()
    top = plan[0]["Plan"]
    pages = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
    assert pages <= 5, pages


def test_expired_offers_are_walked_in_one_order_through_an_index(
    kind: str, location: str, store: OutboxStore
) -> None:
    # Two purges lock the offers they found one after the other: in one order (their time,
    # then their id), never in two that would deadlock on offers sharing their time.
    statement = queries(kind)["purgeable_offers"]
    assert "ORDER BY o.valid_until, o.id" in statement
    if kind == "sqlite":
        with closing(sqlite3.connect(location)) as conn:
            found = conn.execute(f"EXPLAIN QUERY PLAN {statement}", (NOW, NOW, 10)).fetchall()
        plan = "\n".join(str(step[-1]) for step in found)
        assert "cmi_offers_expiry" in plan, plan
        assert "TEMP B-TREE" not in plan, plan
        return
    import psycopg

    named = statement.replace("{s}", f'"{location}"')
    with psycopg.connect(DSN, autocommit=True) as conn:
        for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
            conn.execute(f"SET {setting} = off")
        found = conn.execute(f"EXPLAIN {named}", (NOW, NOW, 10)).fetchall()
    plan = "\n".join(str(line[0]) for line in found)
    assert "offers_expiry" in plan, plan
    assert "Sort" not in plan, plan


def test_a_row_cancelled_while_its_200_came_back_keeps_its_attempts(
    store: OutboxStore, store_adapter: Adapter
) -> None:
    # Its terms revoked while the send was answered: the row stays cancelled, and its
    # attempts (the record that it went out after all) stay as long as it does, not the
    # delivered documents' seven days.
    assert isinstance(store, RetentionStore)
    terms = register(store_adapter, destination="https://store.example/inbox")
    (row,) = store_adapter.emit(ticket())
    store.claim(owner="w", now=NOW, lease_seconds=60, limit=10)
    store_adapter.revoke_terms(terms.id)
    store.complete([outcome(row.msg_id, "w", "delivered", finished_at=NOW + 1)])
    assert store.get_row(row.msg_id).state == "cancelled"
    assert [a.outcome for a in store.attempts(row.msg_id)] == ["delivered"]
    later = NOW + 8 * 86400  # past the attempts' window, inside the documents'
    windows = purge_windows(
        later,
        delivered=30 * 86400,
        dead=90 * 86400,
        offers=30 * 86400,
        acceptances=30 * 86400,
        attempts=7 * 86400,
    )
    assert store.purgeable(**windows)["attempts"] == 0
    assert store.purge(**windows, limit=500)["attempts"] == 0
    assert [a.outcome for a in store.attempts(row.msg_id)] == ["delivered"]
