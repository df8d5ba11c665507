"""The PostgreSQL store against a real server: the SQLite store's behaviour method by
method, the caller's transaction (psycopg and SQLAlchemy), concurrent workers (SKIP LOCKED,
the per-destination limit, ordering keys), the pull cursor and late commits, NOTIFY, and
connections killed under the store.

Set ``CMI_TEST_POSTGRES_DSN`` (for example ``postgresql://postgres@127.0.0.1:5432/test``)
to run them; each run works in its own schema, dropped at the end.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy
from psycopg import sql
from psycopg.conninfo import make_conninfo
from sqlalchemy.orm import Session

from cmi_sdk import (
    AcceptanceConflictError,
    Adapter,
    ConfigurationError,
    Offer,
    OfferNotFoundError,
    OutboxRowNotFoundError,
    ReplayedMessageError,
    Request,
    RetrySchedule,
    StoreError,
    TermsError,
    TermsNotFoundError,
    load_model,
)
from cmi_sdk.outbox import (
    AcceptanceClaim,
    NewRow,
    OutboxStore,
    SeenMessage,
    StoredOffer,
)
from cmi_sdk.outbox.postgres import (
    SCHEMA_VERSION,
    DocumentRow,
    PostgresStore,
    decode_cursor,
    encode_cursor,
)
from tests.contract.rows import new_row as contract_row
from tests.contract.rows import outcome
from tests.support import CUSTOMER, ROOT, emitting_adapter, register, ticket

DSN = os.environ.get("CMI_TEST_POSTGRES_DSN", "")
if not DSN:
    pytest.skip(
        "CMI_TEST_POSTGRES_DSN is not set: these tests need a PostgreSQL server"
        " (e.g. CMI_TEST_POSTGRES_DSN=postgresql://postgres@127.0.0.1:5432/test)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.timeout(120)

SCHEMA = f"cmi_test_{secrets.token_hex(4)}"
TABLES = (
    "terms",
    "consent",
    "outbox",
    "attempts",
    "destinations",
    "intermediaries",
    "offers",
    "acceptances",
    "seen",
)
NOW = 1_900_000_000.0
FAST = RetrySchedule(delays=(0, 0, 0), jitter=0)


def admin() -> psycopg.Connection[Any]:
    return psycopg.connect(DSN, autocommit=True)


def drop_schema(name: str) -> None:
    with admin() as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def sqlalchemy_url() -> str:
    scheme, _, rest = DSN.partition("://")
    assert scheme in {"postgresql", "postgres"}, "the DSN must be a postgresql:// URL"
    return f"postgresql+psycopg://{rest}"


def new_row(n: int, **changes: Any) -> NewRow:
    """The contract suite's row ``n``, all to one destination."""
    return contract_row(n, **{"destination": "https://a.example/inbox", **changes})


@pytest.fixture(scope="module")
def schema() -> Iterator[str]:
    try:
        yield SCHEMA
    finally:
        drop_schema(SCHEMA)


@pytest.fixture
def store(schema: str) -> Iterator[PostgresStore]:
    """A store on the module's schema, its tables emptied."""
    pg = PostgresStore(DSN, schema=schema)
    with admin() as conn:
        tables = ", ".join(f'"{schema}".{t}' for t in TABLES)
        conn.execute(f"TRUNCATE {tables} RESTART IDENTITY")
    try:
        yield pg
    finally:
        pg.close()


@pytest.fixture
def other(store: PostgresStore) -> Iterator[PostgresStore]:
    """A second store on the same tables: another worker process."""
    pg = PostgresStore(DSN, schema=store.schema, auto_migrate=False)
    try:
        yield pg
    finally:
        pg.close()


@pytest.fixture
def pg_adapter(store: PostgresStore, tmp_path: Path) -> Adapter:
    return emitting_adapter(tmp_path, store=store)


def run_threads(count: int, target: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def guarded(n: int) -> None:
        try:
            target(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors


# -- configuration and schema -------------------------------------------------------------


def test_the_store_is_an_outbox_store(store: PostgresStore) -> None:
    assert isinstance(store, OutboxStore)
    assert repr(store).startswith("PostgresStore(")
    assert store.channel == f"{SCHEMA}_outbox"


def test_migrations_are_idempotent_and_safe_when_processes_start_together() -> None:
    fresh = f"{SCHEMA}_m"
    stores = [PostgresStore(DSN, schema=fresh, auto_migrate=False) for _ in range(4)]
    barrier = threading.Barrier(4)

    def migrate(n: int) -> None:
        barrier.wait()
        stores[n].migrate()

    try:
        run_threads(4, migrate)
        stores[0].migrate()  # again: nothing to do
        with admin() as conn:
            query = sql.SQL("SELECT version FROM {}.migrations ORDER BY version")
            versions = conn.execute(query.format(sql.Identifier(fresh))).fetchall()
        assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]  # each once
        assert stores[1].rows() == []
    finally:
        for pg in stores:
            pg.close()
        drop_schema(fresh)


def test_missing_tables_are_a_store_error_that_says_what_to_do() -> None:
    pg = PostgresStore(DSN, schema=f"{SCHEMA}_none", auto_migrate=False)
    with pytest.raises(StoreError, match=r"tables are missing.*migrate"):
        pg.get_row("msg_1")
    pg.close()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: PostgresStore(DSN, schema="Bad-Name"), "schema must be"),
        (lambda: PostgresStore(DSN, schema="x", pool_size=0), "pool_size"),
        (lambda: PostgresStore.from_url("mysql://u@h/db"), "not a PostgreSQL URL"),
        (lambda: PostgresStore("host=127.0.0.1 nonsense", auto_migrate=False), "connection"),
    ],
)
def test_bad_configuration_is_refused(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        call()


def test_urls_and_unreachable_servers() -> None:
    pg = PostgresStore.from_url(
        "postgresql+psycopg://cmi:hunter2@127.0.0.1:1/firm?connect_timeout=2",
        auto_migrate=False,
    )
    assert "hunter2" not in repr(pg)
    assert "127.0.0.1:1/firm" in repr(pg)
    with pytest.raises(
        StoreError, match=r"cannot connect to PostgreSQL at 127\.0\.0\.1:1/firm"
    ) as info:
        pg.get_row("msg_1")
    assert "hunter2" not in str(info.value)


def test_a_busy_pool_makes_callers_wait_then_fail(store: PostgresStore) -> None:
    small = PostgresStore(DSN, schema=store.schema, pool_size=1, pool_timeout=0.2)
    with small._pool.connection(), pytest.raises(StoreError, match=r"busy for 0\.2 s"):
        small.rows()
    assert small.rows() == []  # the connection is back
    small.close()


def test_a_closed_store_opens_a_new_pool_when_used_again(store: PostgresStore) -> None:
    pg = PostgresStore(DSN, schema=store.schema)
    pg.insert([new_row(1)])
    pg.close()
    assert pg.get_row("msg_0001").state == "pending"
    pg.close()
    pg.close()  # twice: nothing left to close


# -- terms and consent --------------------------------------------------------------------


def test_terms_and_consent_records_round_trip(pg_adapter: Adapter, store: PostgresStore) -> None:
    terms = register(pg_adapter, fields=["origin", "total"])
    other_customer = register(pg_adapter, customer_ref="payer-1234")
    assert store.get_terms(terms.id) == terms
    assert [t.id for t in store.list_terms()] == [terms.id, other_customer.id]
    assert [t.id for t in store.list_terms(customer_ref="payer-1234")] == [other_customer.id]
    assert store.list_terms(intermediary="acme") == []
    ((record, xml),) = store.consent_records(terms.id)
    assert (record.event, record.terms_id) == ("granted", terms.id)
    assert pg_adapter.parse(xml) == record
    assert [t.id for t in store.active_terms(CUSTOMER, time.time())] == [terms.id]
    with pytest.raises(TermsNotFoundError):
        store.get_terms("terms_nope")


def test_revocation_cancels_undelivered_rows_and_keeps_a_record(
    pg_adapter: Adapter, store: PostgresStore
) -> None:
    terms = register(pg_adapter)
    emitted = [pg_adapter.emit(ticket(id=f"DL-{i}"))[0] for i in range(3)]
    (leased,) = store.claim(owner="w", now=time.time(), lease_seconds=30, limit=1)
    store.complete([outcome(leased.msg_id, "w", "delivered")])
    store.claim(owner="w", now=time.time(), lease_seconds=30, limit=1)  # one in flight
    pg_adapter.revoke_terms(terms.id)
    states = Counter(store.get_row(e.msg_id).state for e in emitted)
    assert states == {"cancelled": 2, "delivered": 1}
    assert store.get_terms(terms.id).revoked_at is not None
    assert [r.event for r, _ in store.consent_records(terms.id)] == ["granted", "revoked"]
    assert store.list_terms() == []
    assert [t.id for t in store.list_terms(include_revoked=True)] == [terms.id]
    assert store.active_terms(CUSTOMER, time.time()) == []
    with pytest.raises(TermsError, match="already revoked"):
        pg_adapter.revoke_terms(terms.id)
    with pytest.raises(TermsNotFoundError):
        pg_adapter.revoke_terms("terms_nope")


def test_lapsed_terms_emit_nothing(store: PostgresStore, tmp_path: Path) -> None:
    clock = [NOW]
    adapter = emitting_adapter(tmp_path, store=store, clock=lambda: clock[0])
    register(adapter, until="2030-03-18T00:00:00Z")  # NOW is 2030-03-17
    assert len(adapter.emit(ticket())) == 1
    clock[0] += 86400 * 2
    assert adapter.emit(ticket(id="DL-late")) == []


def test_terms_written_twice_are_a_store_error(pg_adapter: Adapter, store: PostgresStore) -> None:
    terms = register(pg_adapter)
    ((record, xml),) = store.consent_records(terms.id)
    with pytest.raises(StoreError, match="writing terms: 23505"):
        store.add_terms(terms, record, xml)


# -- emitting -----------------------------------------------------------------------------


def test_emit_writes_each_document_once(pg_adapter: Adapter, store: PostgresStore) -> None:
    terms = register(pg_adapter)
    register(pg_adapter, standard="cmi", when="pull", destination=None)
    emissions = pg_adapter.emit(ticket())
    assert sorted(e.state for e in emissions) == ["pending", "pull"]
    assert [e.msg_id for e in pg_adapter.emit(ticket())] == [e.msg_id for e in emissions]
    assert len(store.rows()) == 2
    pushed = next(e for e in emissions if e.state == "pending")
    row = store.get_row(pushed.msg_id)
    assert (row.body, row.destination, row.state) == (pushed.document, terms.destination, "pending")
    assert [r.state for r in store.rows(state="pull")] == ["pull"]
    assert store.insert([new_row(1), new_row(1), new_row(2)]) == 2
    assert store.insert([new_row(1)]) == 0
    assert store.insert([]) == 0
    assert [r.msg_id for r in store.rows(limit=2)] == ["msg_0002", "msg_0001"]
    with pytest.raises(OutboxRowNotFoundError):
        store.get_row("msg_nope")


def test_the_row_commits_with_the_callers_psycopg_transaction(
    pg_adapter: Adapter, store: PostgresStore
) -> None:
    register(pg_adapter)
    with psycopg.connect(DSN) as conn:
        conn.execute("CREATE TEMP TABLE sales (id text PRIMARY KEY)")
        conn.commit()
        with conn.transaction():
            conn.execute("INSERT INTO sales VALUES ('DL-12524057')")
            (emission,) = pg_adapter.emit(ticket(), connection=conn)
            assert store.rows() == []  # not committed yet
        assert store.get_row(emission.msg_id).state == "pending"

        def sale() -> None:
            with conn.transaction():
                conn.execute("INSERT INTO sales VALUES ('DL-1')")
                pg_adapter.emit(ticket(id="DL-1"), connection=conn)
                conn.execute("INSERT INTO sales VALUES ('DL-1')")  # the firm's own write fails

        with pytest.raises(psycopg.errors.UniqueViolation):
            sale()
        assert len(store.rows()) == 1
        assert conn.execute("SELECT count(*) FROM sales").fetchone() == (1,)


def test_the_row_commits_with_the_callers_sqlalchemy_connection(
    pg_adapter: Adapter, store: PostgresStore
) -> None:
    register(pg_adapter)
    engine = sqlalchemy.create_engine(sqlalchemy_url())
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
            (first,) = pg_adapter.emit(ticket(), connection=conn)
            assert store.rows() == []
        assert store.get_row(first.msg_id).state == "pending"
        # Nothing run yet on the connection: the emit begins SQLAlchemy's transaction.
        with engine.connect() as conn:
            (second,) = pg_adapter.emit(ticket(id="DL-2"), connection=conn)
            conn.commit()
        assert store.get_row(second.msg_id).state == "pending"
        with engine.connect() as conn:
            pg_adapter.emit(ticket(id="DL-3"), connection=conn)
            conn.rollback()
        assert len(store.rows()) == 2
    finally:
        engine.dispose()


def test_the_row_commits_with_the_callers_sqlalchemy_session(
    pg_adapter: Adapter, store: PostgresStore
) -> None:
    register(pg_adapter)
    engine = sqlalchemy.create_engine(sqlalchemy_url())
    try:
        with Session(engine) as session:
            (kept,) = pg_adapter.emit(ticket(), connection=session)
            assert store.rows() == []
            session.commit()
        with Session(engine) as session:
            pg_adapter.emit(ticket(id="DL-2"), connection=session)
            session.rollback()
        assert [r.msg_id for r in store.rows()] == [kept.msg_id]
    finally:
        engine.dispose()


def test_connections_that_cannot_carry_the_row_are_refused(
    pg_adapter: Adapter, store: PostgresStore, tmp_path: Path
) -> None:
    register(pg_adapter)
    lite = sqlite3.connect(tmp_path / "other.db")
    for wrong in (object(), lite):
        with pytest.raises(ConfigurationError, match="takes a psycopg Connection"):
            pg_adapter.emit(ticket(), connection=wrong)
    lite.close()
    with admin() as conn, pytest.raises(ConfigurationError, match="autocommit"):
        pg_adapter.emit(ticket(), connection=conn)
    with psycopg.connect(DSN) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        with pytest.raises(StoreError, match="roll it back"):
            pg_adapter.emit(ticket(), connection=conn)
        conn.rollback()
        conn.close()
        with pytest.raises(ConfigurationError, match="closed"):
            pg_adapter.emit(ticket(), connection=conn)
    assert store.rows() == []


def test_a_failure_inside_the_callers_transaction_is_not_retried(store: PostgresStore) -> None:
    with psycopg.connect(DSN) as conn, admin() as killer:
        conn.execute("SELECT 1")  # a transaction is open
        killer.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        with pytest.raises(StoreError, match="caller's transaction failed"):
            store.insert([new_row(1)], connection=conn)
    assert store.rows() == []


# -- claiming, leases, outcomes -----------------------------------------------------------


def test_claim_heartbeat_complete_and_a_stalled_lease(store: PostgresStore) -> None:
    store.insert([new_row(1), new_row(2), new_row(3, next_attempt_at=NOW + 100)])
    first = store.claim(owner="a", now=NOW, lease_seconds=30, limit=10)
    assert [(r.msg_id, r.state, r.attempts, r.lease_owner) for r in first] == [
        ("msg_0001", "leased", 0, "a"),  # a claim is not an attempt
        ("msg_0002", "leased", 0, "a"),
    ]
    assert store.claim(owner="b", now=NOW + 10, lease_seconds=30, limit=10) == []
    store.heartbeat(owner="a", msg_ids=["msg_0001"], lease_until=NOW + 60)
    store.heartbeat(owner="b", msg_ids=["msg_0002"], lease_until=NOW + 600)  # not b's lease
    # msg_0002's lease expired (a died?): b takes it; msg_0001's was renewed.
    (taken,) = store.claim(owner="b", now=NOW + 31, lease_seconds=30, limit=10)
    assert (taken.msg_id, taken.attempts, taken.lease_owner) == ("msg_0002", 0, "b")
    # a's late failure is not recorded over b's lease; a delivery is, whoever holds it.
    store.complete([outcome("msg_0002", "a", "retry")])
    assert store.get_row("msg_0002").state == "leased"
    store.complete(
        [outcome("msg_0001", "a", "retry"), outcome("msg_0002", "a", "delivered", attempt=1)]
    )
    retried, delivered = store.get_row("msg_0001"), store.get_row("msg_0002")
    assert (retried.state, retried.next_attempt_at, retried.last_status) == ("retry", NOW + 60, 503)
    assert (delivered.state, delivered.delivered_at, delivered.lease_owner) == (
        "delivered",
        NOW + 1,
        None,
    )
    assert [a.outcome for a in store.attempts("msg_0002")] == ["retry", "delivered"]
    assert store.attempts("msg_nope") == []
    store.complete([])


def test_cancel_takes_only_the_owners_leased_rows(store: PostgresStore) -> None:
    store.insert([new_row(1), new_row(2), new_row(3)])
    store.claim(owner="a", now=NOW, lease_seconds=30, limit=2)  # msg_0001 and msg_0002
    ids = ["msg_0001", "msg_0002", "msg_0003"]
    assert store.cancel(owner="b", msg_ids=ids, reason="terms revoked") == 0
    assert store.cancel(owner="a", msg_ids=ids, reason="terms revoked") == 2
    assert store.cancel(owner="a", msg_ids=[], reason="terms revoked") == 0
    states = [(store.get_row(m).state, store.get_row(m).lease_owner) for m in ids]
    assert states == [("cancelled", None), ("cancelled", None), ("pending", None)]
    assert store.claim(owner="b", now=NOW + 31, lease_seconds=30, limit=10)[0].msg_id == ids[2]


def test_next_due_and_status(store: PostgresStore) -> None:
    assert store.next_due() is None
    status = store.status(NOW)
    assert status.oldest_pending_age is None
    assert set(status.counts.values()) == {0}
    store.insert(
        [
            new_row(1, created_at=NOW - 50, next_attempt_at=NOW + 100),
            new_row(2, next_attempt_at=NOW + 200),
            new_row(3, state="pull", created_at=NOW - 500),
        ]
    )
    assert store.next_due() == NOW + 100
    store.claim(owner="a", now=NOW + 150, lease_seconds=30, limit=10)
    assert store.next_due() == NOW + 180  # the lease expires before msg_0002 is due
    store.disable_destination("https://gone.example/", reason="410 Gone", at=NOW)
    status = store.status(NOW + 10)
    assert (status.counts["pending"], status.counts["leased"], status.counts["pull"]) == (1, 1, 1)
    assert status.oldest_pending_age == 60
    assert status.disabled_destinations == ("https://gone.example/",)


def test_dead_rows_are_kept_and_redriven(store: PostgresStore) -> None:
    store.insert([new_row(1), new_row(2)])
    store.claim(owner="a", now=NOW, lease_seconds=30, limit=10)
    store.complete(
        [
            outcome("msg_0001", "a", "dead", finished_at=NOW + 5),
            outcome("msg_0002", "a", "dead", finished_at=NOW + 20),
        ]
    )
    dead = store.get_row("msg_0001")
    assert (dead.state, dead.next_attempt_at, dead.last_error) == ("dead", None, "HTTP 400")
    with pytest.raises(ValueError, match="not both"):
        store.redrive(now=NOW)
    with pytest.raises(OutboxRowNotFoundError):
        store.redrive(msg_id="msg_nope", now=NOW)
    assert store.redrive(since=NOW + 10, now=NOW + 30) == 1
    assert store.redrive(msg_id="msg_0001", now=NOW + 30) == 1
    assert store.redrive(msg_id="msg_0001", now=NOW + 30) == 0  # pending now, not dead
    again = store.get_row("msg_0002")
    assert (again.state, again.attempts, again.next_attempt_at) == ("pending", 0, NOW + 30)
    assert len(store.claim(owner="b", now=NOW + 30, lease_seconds=30, limit=10)) == 2


def test_the_worker_delivers_retries_and_gives_up(
    pg_adapter: Adapter, store: PostgresStore
) -> None:
    answers = {"ok": 0, "flaky": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        if b"DL-flaky" in request.content:
            answers["flaky"] += 1
            return httpx.Response(503 if answers["flaky"] <= 2 else 200)
        if b"DL-bad" in request.content:
            return httpx.Response(500)
        answers["ok"] += 1
        return httpx.Response(204)

    register(pg_adapter)
    (ok,) = pg_adapter.emit(ticket())
    (flaky,) = pg_adapter.emit(ticket(id="DL-flaky"))
    (bad,) = pg_adapter.emit(ticket(id="DL-bad"))
    # One destination takes all three: the failures in a row, in whatever order they
    # come, must not open its circuit here (this test is about the schedule).
    with pg_adapter.delivery_worker(
        schedule=FAST, transport=httpx.MockTransport(handler), circuit_threshold=10
    ) as worker:
        stats = worker.run_once()
    assert (stats.delivered, stats.retried, stats.dead) == (2, 5, 1)
    assert store.get_row(ok.msg_id).state == "delivered"
    assert [a.outcome for a in store.attempts(flaky.msg_id)] == ["retry", "retry", "delivered"]
    gone = store.get_row(bad.msg_id)
    assert (gone.state, gone.attempts, gone.last_error) == (
        "dead",
        4,
        "HTTP 500 (after 4 attempts)",
    )


def test_concurrent_claims_never_lease_a_row_twice(
    store: PostgresStore, other: PostgresStore
) -> None:
    store.insert([new_row(n) for n in range(400)])
    workers = [store, other] + [
        PostgresStore(DSN, schema=store.schema, auto_migrate=False) for _ in range(2)
    ]
    claimed: list[list[str]] = [[] for _ in workers]
    barrier = threading.Barrier(len(workers))

    def work(n: int) -> None:
        barrier.wait()
        while rows := workers[n].claim(owner=f"w{n}", now=NOW, lease_seconds=30, limit=7):
            claimed[n].extend(r.msg_id for r in rows)

    try:
        run_threads(len(workers), work)
    finally:
        for pg in workers[2:]:
            pg.close()
    every = [m for ids in claimed for m in ids]
    assert len(every) == len(set(every)) == 400
    assert sum(1 for ids in claimed if ids) >= 2  # they did work side by side
    assert {r.attempts for r in store.rows(limit=400)} == {0}  # claimed, none recorded


def test_the_per_destination_limit_holds_across_workers(
    store: PostgresStore, other: PostgresStore
) -> None:
    destinations = ["https://a.example/", "https://b.example/", "https://c.example/"]
    store.insert(
        [new_row(n, destination=destinations[n % 3], created_at=NOW + n) for n in range(30)]
        + [new_row(99, destination=None)]
    )

    def leased() -> Counter[str | None]:
        return Counter(r.destination for r in store.rows(state="leased", limit=100))

    first = store.claim(owner="w1", now=NOW, lease_seconds=30, limit=5, per_destination=2)
    assert len(first) == 5
    assert max(Counter(r.destination for r in first).values()) <= 2
    second = other.claim(owner="w2", now=NOW, lease_seconds=30, limit=50, per_destination=2)
    assert leased() == dict.fromkeys(destinations, 2) | {None: 1}
    assert len(first) + len(second) == 7
    assert other.claim(owner="w2", now=NOW, lease_seconds=30, limit=50, per_destination=2) == []
    # A delivered row makes room for one more to its destination.
    done = next(r for r in first if r.destination == destinations[0])
    store.complete([outcome(done.msg_id, "w1", "delivered")])
    (more,) = other.claim(owner="w2", now=NOW, lease_seconds=30, limit=50, per_destination=2)
    assert more.destination == destinations[0]
    # Expired leases do not count: their rows are due again.
    again = other.claim(owner="w3", now=NOW + 31, lease_seconds=30, limit=50, per_destination=2)
    assert Counter(r.destination for r in again) == dict.fromkeys(destinations, 2) | {None: 1}
    with pytest.raises(ConfigurationError, match="per_destination"):
        store.claim(owner="w1", now=NOW, lease_seconds=30, limit=5, per_destination=0)


def test_the_per_destination_limit_holds_under_concurrent_claims(store: PostgresStore) -> None:
    destinations = [f"https://d{n}.example/" for n in range(4)]
    store.insert([new_row(n, destination=destinations[n % 4]) for n in range(400)])
    workers = [PostgresStore(DSN, schema=store.schema, auto_migrate=False) for _ in range(6)]
    barrier = threading.Barrier(len(workers))

    def work(n: int) -> None:
        barrier.wait()
        for _ in range(3):
            workers[n].claim(owner=f"w{n}", now=NOW, lease_seconds=30, limit=10, per_destination=3)

    try:
        for _ in range(5):  # rounds: all claim at once, then every lease is delivered
            run_threads(len(workers), work)
            leased = store.rows(state="leased", limit=400)
            assert Counter(r.destination for r in leased) == dict.fromkeys(destinations, 3)
            store.complete([outcome(r.msg_id, r.lease_owner or "", "delivered") for r in leased])
    finally:
        for pg in workers:
            pg.close()


def test_rows_with_an_ordering_key_go_out_one_at_a_time_in_order(store: PostgresStore) -> None:
    ordered = PostgresStore(DSN, schema=store.schema, ordered_by_customer=True)
    elsewhere = "https://b.example/inbox"
    ordered.insert(
        [
            new_row(1),
            new_row(2),
            new_row(3),
            new_row(4, customer_ref="cust-other"),
            new_row(5, destination=elsewhere),
            new_row(6, state="pull", destination=None),
        ]
    )

    def claim(at: float = NOW) -> list[str]:
        rows = ordered.claim(owner="w", now=at, lease_seconds=1000, limit=10)
        return [r.msg_id for r in rows]

    try:
        assert claim() == ["msg_0001", "msg_0004", "msg_0005"]
        assert claim() == []  # msg_0002 waits for msg_0001, leased
        ordered.complete([outcome("msg_0001", "w", "retry")])
        assert claim(NOW + 30) == []  # still waiting: msg_0001 is retrying
        assert claim(NOW + 60) == ["msg_0001"]
        ordered.complete([outcome("msg_0001", "w", "dead")])  # a dead row holds none up
        assert claim(NOW + 60) == ["msg_0002"]
        ordered.complete([outcome("msg_0002", "w", "delivered")])
        assert claim(NOW + 60) == ["msg_0003"]
        # Rows written without a key (by a store without the option) go out together.
        store.insert([new_row(7), new_row(8)])
        assert claim(NOW + 60) == ["msg_0007", "msg_0008"]
    finally:
        ordered.close()


def test_claims_with_both_limits(store: PostgresStore) -> None:
    ordered = PostgresStore(DSN, schema=store.schema, ordered_by_customer=True)
    ordered.insert(
        [new_row(n, customer_ref=f"cust-{n % 2}") for n in range(6)]
        + [new_row(9, customer_ref="cust-9", destination="https://b.example/")]
    )
    try:
        rows = ordered.claim(owner="w", now=NOW, lease_seconds=30, limit=10, per_destination=1)
        assert [r.msg_id for r in rows] == ["msg_0000", "msg_0009"]
    finally:
        ordered.close()


# -- the pull cursor ----------------------------------------------------------------------


def test_cursors_encode_a_transaction_and_a_row() -> None:
    assert decode_cursor(encode_cursor(2**64 - 1, 2**63 - 1)) == (2**64 - 1, 2**63 - 1)
    assert decode_cursor(0) == decode_cursor(-1) == (0, 0)
    assert decode_cursor(12345) == (0, 12345)
    assert len(str(encode_cursor(2**64 - 1, 2**63 - 1))) <= 39


def test_documents_come_in_pages_in_order(store: PostgresStore) -> None:
    store.insert([new_row(1), new_row(2, state="pull", destination=None)])
    store.insert([new_row(3), new_row(4, terms_id="terms_b")])
    store.insert([new_row(5)])
    store.claim(owner="a", now=NOW, lease_seconds=30, limit=10)
    store.complete([outcome("msg_0005", "a", "delivered")])
    with admin() as conn:
        query = sql.SQL("UPDATE {}.outbox SET state = 'cancelled' WHERE msg_id = 'msg_0003'")
        conn.execute(query.format(sql.Identifier(store.schema)))
    page = store.documents_since("terms_a", 0, 2)
    assert [r.msg_id for r in page] == ["msg_0001", "msg_0002"]
    assert all(isinstance(r, DocumentRow) for r in page)
    last = page[-1]
    assert isinstance(last, DocumentRow)
    rest = store.documents_since("terms_a", last.cursor, 10)
    assert [r.msg_id for r in rest] == ["msg_0005"]  # cancelled rows are not served
    final = rest[-1]
    assert isinstance(final, DocumentRow)
    assert store.documents_since("terms_a", final.cursor, 10) == []
    assert store.documents_since("terms_a", 2**127, 10) == []
    assert store.documents_since("terms_a", 0, 0) == []
    assert [r.msg_id for r in store.documents_since("terms_b", 0, 10)] == ["msg_0004"]


def test_the_cursor_never_skips_a_row_that_commits_late(store: PostgresStore) -> None:
    store.insert([new_row(0)])
    seen: list[str] = []
    cursor = 0

    def read() -> list[str]:
        nonlocal cursor
        rows = store.documents_since("terms_a", cursor, 100)
        if rows:
            last = rows[-1]
            assert isinstance(last, DocumentRow)
            cursor = last.cursor
        seen.extend(r.msg_id for r in rows)
        return [r.msg_id for r in rows]

    with psycopg.connect(DSN) as early, psycopg.connect(DSN) as late:
        store.insert([new_row(1)], connection=early)  # begins first, commits last
        store.insert([new_row(2)], connection=late)
        late.commit()
        assert read() == ["msg_0000"]  # msg_0002 waits for the older transaction
        early.commit()
        assert read() == ["msg_0001", "msg_0002"]
        assert read() == []
    assert sorted(seen) == ["msg_0000", "msg_0001", "msg_0002"]
    assert len(seen) == len(set(seen))


def test_rolled_back_rows_are_never_served(store: PostgresStore) -> None:
    with psycopg.connect(DSN) as conn:
        store.insert([new_row(1)], connection=conn)
        conn.rollback()
    store.insert([new_row(2)])
    assert [r.msg_id for r in store.documents_since("terms_a", 0, 10)] == ["msg_0002"]


# -- NOTIFY -------------------------------------------------------------------------------


def test_notify_wakes_an_idle_worker(store: PostgresStore, other: PostgresStore) -> None:
    assert other.wait_for_work(0.05) is False  # listening from now on

    def later() -> None:
        time.sleep(0.2)
        store.insert([new_row(1)])

    thread = threading.Thread(target=later)
    started = time.monotonic()
    thread.start()
    assert other.wait_for_work(10) is True
    assert time.monotonic() - started < 5
    thread.join()
    assert other.wait_for_work(0.05) is False  # one wake-up per batch of notifications
    # Pull rows wake nobody; a caller's rows wake the workers when the caller commits.
    store.insert([new_row(2, state="pull", destination=None)])
    assert other.wait_for_work(0.2) is False
    with psycopg.connect(DSN) as conn:
        store.insert([new_row(3)], connection=conn)
        assert other.wait_for_work(0.2) is False
        conn.commit()
    assert other.wait_for_work(5) is True
    with psycopg.connect(DSN) as conn:
        store.insert([new_row(4)], connection=conn)
        conn.rollback()
    assert other.wait_for_work(0.2) is False
    # Redriving dead rows wakes the workers too.
    store.claim(owner="a", now=NOW, lease_seconds=30, limit=1)
    store.complete([outcome("msg_0001", "a", "dead")])
    assert store.redrive(msg_id="msg_0001", now=NOW) == 1
    assert other.wait_for_work(5) is True


# -- lost connections ---------------------------------------------------------------------


def test_a_terminated_connection_is_replaced(store: PostgresStore) -> None:
    name = f"cmi-test-{secrets.token_hex(4)}"
    pg = PostgresStore(make_conninfo(DSN, application_name=name), schema=store.schema)

    def kill() -> int:
        with admin() as conn:
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (name,),
            ).fetchone()
        assert killed is not None
        return int(killed[0])

    try:
        pg.insert([new_row(1)])
        assert pg.wait_for_work(0.05) is False
        assert kill() == 2  # the pooled connection and the listening one
        assert pg.get_row("msg_0001").state == "pending"  # a read, retried
        kill()
        assert [r.msg_id for r in pg.claim(owner="a", now=NOW, lease_seconds=30, limit=5)] == [
            "msg_0001"
        ]
        kill()
        pg.complete([outcome("msg_0001", "a", "delivered")])
        kill()
        assert pg.insert([new_row(2)]) == 1  # nothing was sent before the kill: safe to redo
        assert pg.get_row("msg_0001").state == "delivered"
        # The listener missed what happened while it was down: it says so.
        assert pg.wait_for_work(1) is True
        assert pg.wait_for_work(0.05) is False
        store.insert([new_row(3)])
        assert pg.wait_for_work(5) is True
    finally:
        pg.close()


def test_a_connection_lost_while_committing_is_reported_not_retried(
    store: PostgresStore, caplog: pytest.LogCaptureFixture
) -> None:
    # A deferred trigger ends the session inside COMMIT: the client cannot know whether
    # the transaction committed, so the store must say so instead of writing again.
    names = {"s": sql.Identifier(store.schema)}
    with admin() as conn:
        conn.execute(
            sql.SQL(
                "CREATE FUNCTION {s}.die() RETURNS trigger LANGUAGE plpgsql AS"
                " 'BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END'"
            ).format(**names)
        )
        conn.execute(
            sql.SQL(
                "CREATE CONSTRAINT TRIGGER die_at_commit AFTER INSERT ON {s}.destinations"
                " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
                " WHEN (NEW.url = 'https://die.example/') EXECUTE FUNCTION {s}.die()"
            ).format(**names)
        )
    try:
        with pytest.raises(StoreError, match=r"while committing .* may or may not"):
            store.disable_destination("https://die.example/", reason="test", at=NOW)
        assert "trying again" not in caplog.text
        assert store.disabled_destinations() == {}  # it died before committing, this time
        store.disable_destination("https://gone.example/", reason="410", at=NOW)
        assert store.disabled_destinations() == {"https://gone.example/": "410"}
    finally:
        with admin() as conn:
            conn.execute(sql.SQL("DROP TRIGGER die_at_commit ON {s}.destinations").format(**names))
            conn.execute(sql.SQL("DROP FUNCTION {s}.die()").format(**names))


# -- destinations, intermediaries, replay -------------------------------------------------


def test_destinations_are_disabled_and_enabled(store: PostgresStore) -> None:
    url = "https://gone.example/inbox"
    assert store.disabled_destinations() == {}
    store.disable_destination(url, reason="410 Gone at message msg_1", at=NOW)
    store.disable_destination(url, reason="later", at=NOW + 1)  # the first reason stays
    assert store.disabled_destinations() == {url: "410 Gone at message msg_1"}
    assert store.enable_destination(url) is True
    assert store.enable_destination(url) is False
    assert store.disabled_destinations() == {}


def test_intermediaries_and_their_secrets(store: PostgresStore) -> None:
    assert store.intermediary_secrets("acme") == ()
    store.add_intermediary("acme", "s1", at=NOW)
    store.add_intermediary("acme", "s2", at=NOW + 1)  # a rotation
    store.add_intermediary("acme", "s1", at=NOW + 2)
    assert store.intermediary_secrets("acme") == ("s1", "s2")

    def rotate(n: int) -> None:
        store.add_intermediary("relay", f"k{n}", at=NOW)

    run_threads(4, rotate)
    assert sorted(store.intermediary_secrets("relay")) == ["k0", "k1", "k2", "k3"]


def test_message_ids_are_remembered_until_they_expire(store: PostgresStore) -> None:
    assert store.remember_message("acme", "m1", expires_at=NOW + 300, now=NOW) is True
    assert store.remember_message("acme", "m1", expires_at=NOW + 300, now=NOW + 1) is False
    assert store.remember_message("relay", "m1", expires_at=NOW + 300, now=NOW + 1) is True
    store.forget_message("acme", "m1")
    assert store.remember_message("acme", "m1", expires_at=NOW + 300, now=NOW + 2) is True
    assert store.remember_message("acme", "m1", expires_at=NOW + 900, now=NOW + 301) is True
    assert store.remember_message("acme", "m1", expires_at=NOW + 900, now=NOW + 302) is False


# -- offers and acceptances ---------------------------------------------------------------


def _stored_offer() -> StoredOffer:
    return StoredOffer(
        offer=load_model(Offer, (ROOT / "examples" / "offer.json").read_text()),
        request=load_model(Request, (ROOT / "examples" / "request.json").read_text()),
        xml=b"<offers/>",
        intermediary="acme",
    )


def test_offers_round_trip(store: PostgresStore) -> None:
    stored = _stored_offer()
    store.add_offers([stored])
    store.add_offers([])
    assert store.get_offer(stored.offer.id) == stored
    with pytest.raises(OfferNotFoundError):
        store.get_offer("off-nope")
    with pytest.raises(StoreError, match="23505"):
        store.add_offers([stored])


def test_offers_are_kept_with_the_message_that_asked_for_them(store: PostgresStore) -> None:
    stored = _stored_offer()
    seen = SeenMessage("intermediary:acme", "msg-1", NOW + 600, NOW)
    assert store.message_seen("intermediary:acme", "msg-1", now=NOW) is False
    store.add_offers([stored], message=seen)
    assert store.message_seen("intermediary:acme", "msg-1", now=NOW) is True
    assert store.get_offer(stored.offer.id) == stored
    # The same message again (a replay racing the original): nothing is kept.
    again = StoredOffer(
        offer=stored.offer.model_copy(update={"id": "off-again"}),
        request=stored.request,
        xml=stored.xml,
        intermediary="acme",
    )
    with pytest.raises(ReplayedMessageError):
        store.add_offers([again], message=seen)
    with pytest.raises(OfferNotFoundError):
        store.get_offer("off-again")
    # An answer without offers remembers its message all the same.
    store.add_offers([], message=SeenMessage("intermediary:acme", "msg-2", NOW + 600, NOW))
    assert store.message_seen("intermediary:acme", "msg-2", now=NOW) is True


def _claim(acceptance_id: str, offer_id: str, owner: str = "p1") -> AcceptanceClaim:
    return AcceptanceClaim(
        acceptance_id=acceptance_id,
        offer_id=offer_id,
        intermediary="acme",
        acceptance="{}",
        owner=owner,
        lease_until=NOW + 60,
    )


def test_an_acceptance_id_is_claimed_once_across_processes(
    store: PostgresStore, other: PostgresStore
) -> None:
    stored = _stored_offer()
    store.add_offers([stored])
    offer_id = stored.offer.id
    assert store.begin_acceptance(_claim("acc-1", offer_id), NOW) is None
    found = other.begin_acceptance(_claim("acc-1", offer_id, "p2"), NOW + 1)
    assert found is not None
    assert (found.state, found.result, found.lease_owner) == ("processing", None, "p1")
    assert store.finish_acceptance("acc-1", "p1", "booked", '{"booking": "B1"}', NOW + 2) is None
    found = other.begin_acceptance(_claim("acc-1", offer_id, "p2"), NOW + 3)
    assert found is not None
    assert (found.state, found.result) == ("booked", '{"booking": "B1"}')
    with pytest.raises(AcceptanceConflictError, match="was given for another offer"):
        store.begin_acceptance(_claim("acc-1", "off-2"), NOW)
    # Another acceptance of the same offer gets the booking's record.
    found = other.begin_acceptance(_claim("acc-9", offer_id, "p2"), NOW + 3)
    assert found is not None
    assert found.acceptance_id == "acc-1"
    assert other.get_acceptance("acc-9") is None


def test_concurrent_acceptances_of_one_offer_are_claimed_once(
    store: PostgresStore, other: PostgresStore
) -> None:
    stored = _stored_offer()
    store.add_offers([stored])
    answers: list[str | None] = []
    barrier = threading.Barrier(8)
    stores = [store, other] * 4

    def accept(n: int) -> None:
        barrier.wait()
        found = stores[n].begin_acceptance(_claim(f"acc-{n % 3}", stored.offer.id, f"p{n}"), NOW)
        answers.append(None if found is None else found.acceptance_id)

    run_threads(8, accept)
    assert answers.count(None) == 1
    assert len({a for a in answers if a is not None}) == 1  # all see the one that holds it


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_leaves_its_parents_connections_alone(store: PostgresStore) -> None:
    assert store.wait_for_work(0.05) is False  # listening
    store.insert([new_row(1)])
    assert store.wait_for_work(5) is True
    with store._pool.connection() as idle:
        pass  # back in the pool: an idle connection the child inherits
    inherited = [idle, store._listener]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads around
        pid = os.fork()
    if pid == 0:  # the child: its own connections, never the parent's
        code = 1
        try:
            store.insert([new_row(2)])
            store.wait_for_work(0.05)
            store.close()
            code = 0 if store.get_row("msg_0002").state == "pending" else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    for conn in inherited:  # still open, still the parent's sessions
        assert conn is not None
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert store.wait_for_work(5) is True  # the child's insert, heard by the parent
