"""Fault injection: real ``cmi deliver`` processes posting to a receiver that fails at
random, killed with SIGKILL and cut off from PostgreSQL while they work. Nothing emitted
is lost, nothing is stored twice.

The receiver runs in this process (uvicorn on loopback): a :class:`CustomerStore` behind
:class:`FaultyReceiver`, which answers a seeded random share of the deliveries with a 500,
a 429 (``Retry-After: 0``), an answer held back past the workers' 1 s HTTP timeout, or a
connection closed in the middle of a 200 answer (uvicorn closes the socket when the app
returns without finishing its answer; the worker sees ``RemoteProtocolError``). A held
answer always comes after the store kept the document, a cut one half of the time: the
worker sends it again, and the store's dedup on ``webhook-id`` is what keeps it single.

Two findings, since fixed, are pinned by the regression tests at the end of the module.

After the faults stop and a last clean ``cmi deliver --once`` has run, :func:`check`
reads the whole history (outbox rows, every recorded attempt, the receiver's record of
each delivery and the files in the store) and lists every document lost, stored twice,
stored without being emitted, or stored with other bytes than emitted. Duplicate
*deliveries* are counted, not refused: at-least-once delivery makes them.

Every loop is bounded in rounds and in time; every process and server started here is
stopped in a ``finally`` block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from cmi_sdk import Adapter, Emission, Transaction
from cmi_sdk._exceptions import StoreError
from cmi_sdk._serving import serving
from cmi_sdk.outbox import OutboxStore
from cmi_sdk.outbox.sqlite import SQLiteStore
from cmi_sdk.receiver import CustomerStore, StoredDocument
from cmi_sdk.webhooks import generate_secret
from tests.support import cli_env, emitting_adapter, register, signer, ticket

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DSN = os.environ.get("CMI_TEST_POSTGRES_DSN", "")

HTTP_TIMEOUT = 1.0  # the workers' CMI_HTTP_TIMEOUT
SLOW_ANSWER = 1.6  # a held answer goes out after this long: past HTTP_TIMEOUT
LEASE_SECONDS = 2
RETRY_SCHEDULE = "0.2,0.2,0.5,0.5,1,1,1,1,1,1,1,1"  # 13 attempts: more than a row needs
FAULT_RATES = {"500": 0.08, "429": 0.06, "slow": 0.04, "reset": 0.06}
ACTIVE = ("pending", "retry", "leased")


# -- the receiver ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """One request the receiver saw."""

    webhook_id: str
    fault: str
    """``none`` (passed to the store), ``500``, ``429``, ``slow`` or ``reset``."""
    stored_first: bool
    """The store handled it before the fault (``slow``, some ``reset``)."""
    status: int | None
    """The status the worker got in full: None when it got none (``slow``, ``reset``)."""


class FaultyReceiver:
    """An ASGI wrapper around a :class:`CustomerStore` that fails deliveries at random
    (seeded), records every request, and records what the store did with each one."""

    def __init__(self, *, seed: int) -> None:
        self.inner: Any = None  # the store's app, set once the store is built
        self.rng = random.Random(seed)  # noqa: S311  (fault choice, not a secret)
        self.faulty = True
        self.deliveries: list[Delivery] = []
        self.stored: list[tuple[str, bool]] = []  # (webhook-id, duplicate), from the store
        self._lock = threading.Lock()

    def on_document(self, doc: StoredDocument) -> None:
        """The store's ``on_document`` callback: a delivery it accepted (or deduplicated)."""
        with self._lock:
            self.stored.append((doc.webhook_id, doc.duplicate))

    def _pick(self) -> str:
        if not self.faulty:
            return "none"
        draw = self.rng.random()
        for fault, rate in FAULT_RATES.items():
            if draw < rate:
                return fault
            draw -= rate
        return "none"

    def _record(self, delivery: Delivery) -> None:
        with self._lock:
            self.deliveries.append(delivery)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        webhook_id = dict(scope["headers"]).get(b"webhook-id", b"").decode()
        fault = self._pick()
        stored_first = fault == "slow" or (fault == "reset" and self.rng.random() < 0.5)
        if fault == "none":
            statuses: list[int] = []

            async def watch(message: Any) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])
                await send(message)

            await self.inner(scope, receive, watch)
            status = statuses[0] if statuses else None
            self._record(Delivery(webhook_id, fault, stored_first=False, status=status))
            return
        held: list[Any] = []
        if stored_first:

            async def hold(message: Any) -> None:
                held.append(message)

            await self.inner(scope, receive, hold)
        else:
            while (await receive()).get("more_body"):
                pass
        if fault in {"500", "429"}:
            headers = [(b"retry-after", b"0")] if fault == "429" else []
            await send({"type": "http.response.start", "status": int(fault), "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            self._record(Delivery(webhook_id, fault, stored_first=stored_first, status=int(fault)))
            return
        self._record(Delivery(webhook_id, fault, stored_first=stored_first, status=None))
        if fault == "slow":
            await asyncio.sleep(SLOW_ANSWER)
            for message in held:
                with contextlib.suppress(OSError):
                    await send(message)  # the worker gave up on it already
            return
        # reset: a 200 that never ends. Returning without the rest of the body makes
        # uvicorn close the connection; the worker must not take it for an answer.
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"64")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"status":', "more_body": True})


@contextlib.contextmanager
def receiver(tmp_path: Path, secret_list: list[str], seed: int) -> Iterator[Receiver]:
    """A faulty receiver around a customer store in ``tmp_path/inbox``, served on loopback."""
    certificate = signer().certificate.public_bytes(Encoding.PEM)
    faulty = FaultyReceiver(seed=seed)
    inbox = CustomerStore(
        directory=tmp_path / "inbox",
        secrets=secret_list,
        certificate=certificate,
        on_document=faulty.on_document,
    )
    faulty.inner = inbox.app
    # uvicorn logs each cut answer as an error; here they are the point, not news.
    quiet = _DropCutAnswers()
    logger = logging.getLogger("uvicorn.error")
    logger.addFilter(quiet)
    try:
        with serving(faulty) as url:
            yield Receiver(url + "/", inbox, faulty)
    finally:
        logger.removeFilter(quiet)


class _DropCutAnswers(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing response" not in record.getMessage()


@dataclass
class Receiver:
    url: str
    inbox: CustomerStore
    faulty: FaultyReceiver


# -- the workers ----------------------------------------------------------------------------


def worker_env(database_url: str) -> dict[str, str]:
    return cli_env(
        database_url,
        lease_seconds=str(LEASE_SECONDS),
        retry_schedule=RETRY_SCHEDULE,
        http_timeout=str(HTTP_TIMEOUT),
        delivery_concurrency="4",
        per_destination="4",
    )


class Fleet:
    """``cmi deliver`` processes: started, killed, replaced, and always stopped."""

    def __init__(self, env: dict[str, str], cwd: Path, size: int, seed: int) -> None:
        self.env = env
        self.cwd = cwd
        self.size = size
        self.rng = random.Random(seed)  # noqa: S311
        self.live: list[subprocess.Popen[bytes]] = []
        self.started = 0
        self.kills = 0
        self.crashes: list[str] = []  # workers that ended on their own: exit code, log tail
        self._logs: dict[int, Path] = {}

    def start(self) -> None:
        self.started += 1
        log = self.cwd / f"worker-{self.started}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "cmi_sdk.cli", "deliver", "--poll", "0.2"],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self._logs[process.pid] = log
        self.live.append(process)

    def fill(self) -> None:
        """Replace workers that ended on their own (and keep what they said)."""
        for process in list(self.live):
            code = process.poll()
            if code is not None:
                self.live.remove(process)
                tail = self._logs[process.pid].read_text(errors="replace")[-600:]
                self.crashes.append(f"exit {code}: {tail}")
        while len(self.live) < self.size:
            self.start()

    def kill_one(self) -> None:
        """SIGKILL a random live worker and start its replacement."""
        if self.live:
            process = self.rng.choice(self.live)
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            self.live.remove(process)
            self.kills += 1
        self.fill()

    def stop(self) -> None:
        for process in self.live:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        for process in self.live:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.live.clear()


def deliver_once(env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "cmi_sdk.cli", "deliver", "--once"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def active(store: OutboxStore) -> int:
    counts = store.status(time.time()).counts
    return sum(counts[state] for state in ACTIVE)


def finish(store: OutboxStore, env: dict[str, str], cwd: Path) -> int:
    """With the faults off: ``cmi deliver --once`` until nothing is left to send (bounded:
    20 runs, 30 s). Returns the number of runs."""
    deadline = time.monotonic() + 30
    for runs in range(20):
        if active(store) == 0 or time.monotonic() > deadline:
            return runs
        deliver_once(env, cwd)
        if active(store):
            time.sleep(0.5)  # a dead worker's lease, or a retry, is not due yet
    return 20


def run_faults(
    *,
    fleet: Fleet,
    store: OutboxStore,
    waves: Waves,
    seconds: float,
    kill_every: tuple[float, float],
    seed: int,
    cut_backends: Callable[[], int] | None = None,
) -> tuple[int, float]:
    """Emit the waves, one a second; kill workers (and cut their PostgreSQL backends)
    until every row is delivered or ``seconds`` pass. Returns (backends terminated,
    seconds taken)."""
    rng = random.Random(seed)  # noqa: S311
    start = time.monotonic()
    deadline = start + seconds
    next_wave = start + 1.0
    next_kill = start + rng.uniform(*kill_every)
    next_cut = start + 2.0
    next_check = start + 0.5
    terminated = 0
    for _ in range(int(seconds / 0.1) + 10):
        now = time.monotonic()
        if now > deadline:
            break
        fleet.fill()
        if now >= next_wave:
            waves.next()
            next_wave = now + 1.0
        if now >= next_kill:
            fleet.kill_one()
            next_kill = now + rng.uniform(*kill_every)
        if cut_backends is not None and now >= next_cut:
            terminated += cut_backends()
            next_cut = now + rng.uniform(1.5, 2.5)
        if now >= next_check:
            delivered = store.status(time.time()).counts["delivered"]
            if waves.done and delivered >= waves.count:
                break
            next_check = now + 0.5
        time.sleep(0.1)
    return terminated, time.monotonic() - start


# -- the history and its invariants ---------------------------------------------------------


@dataclass
class History:
    """What the checker found; ``problems`` is empty when every invariant holds."""

    emitted: int
    deliveries: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    stored_new: int = 0
    duplicates_absorbed: int = 0
    attempts_recorded: int = 0
    states: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        faults = ", ".join(f"{k} {self.faults[k]}" for k in ("500", "429", "slow", "reset"))
        return (
            f"emitted {self.emitted}, deliveries seen {self.deliveries} (faults: {faults}),"
            f" stored {self.stored_new}, duplicate deliveries absorbed"
            f" {self.duplicates_absorbed}, attempts recorded {self.attempts_recorded},"
            f" states {dict(self.states)}"
        )


def check(store: OutboxStore, emitted: dict[str, bytes], rx: Receiver) -> History:
    """Read the whole history and list every broken invariant."""
    history = History(emitted=len(emitted))
    problems = history.problems
    deliveries = list(rx.faulty.deliveries)
    stored = list(rx.faulty.stored)
    history.deliveries = len(deliveries)
    history.faults = Counter(d.fault for d in deliveries if d.fault != "none")
    acknowledged = {d.webhook_id for d in deliveries if d.status is not None and d.status < 300}
    new = Counter(webhook_id for webhook_id, duplicate in stored if not duplicate)
    posts = Counter(d.webhook_id for d in deliveries)
    history.stored_new = sum(new.values())
    history.duplicates_absorbed = sum(1 for _, duplicate in stored if duplicate)

    for msg_id, body in emitted.items():
        row = store.get_row(msg_id)
        history.states[row.state] += 1
        attempts = store.attempts(msg_id)
        history.attempts_recorded += len(attempts)
        if row.state != "delivered":
            last = attempts[-1].error if attempts else None
            problems.append(
                f"{msg_id}: {row.state} after {row.attempts} claims, {len(attempts)} recorded"
                f" attempts, {posts[msg_id]} posts seen by the receiver ({last})"
            )
        if new[msg_id] == 0:
            problems.append(f"lost: {msg_id} was emitted and never stored")
        elif new[msg_id] > 1:
            problems.append(f"duplicate effect: {msg_id} stored {new[msg_id]} times")
        path = rx.inbox.directory / f"{msg_id}.xml"
        if not path.is_file() or not (rx.inbox.directory / f"{msg_id}.json").is_file():
            problems.append(f"lost: {msg_id} has no stored files")
        elif path.read_bytes() != body:
            problems.append(f"{msg_id}: the stored bytes are not the emitted ones")
        for attempt in attempts:
            # A worker records "delivered" only for a 2xx the receiver answered in full.
            if attempt.outcome == "delivered" and msg_id not in acknowledged:
                problems.append(f"{msg_id}: recorded delivered, never acknowledged")
    strangers = (set(rx.inbox.documents()) | set(new)) - set(emitted)
    problems.extend(f"stored but never emitted: {m}" for m in sorted(strangers))
    return history


# -- the suites -----------------------------------------------------------------------------

CUSTOMERS = ("cust-fi-a", "cust-fi-b", "cust-fi-c")


@contextlib.contextmanager
def faulty_receiver(tmp_path: Path, seed: int) -> Iterator[tuple[list[str], Receiver]]:
    """A receiver that knows the secrets the terms will carry (chosen before it starts)."""
    secret_list = [generate_secret() for _ in CUSTOMERS]
    with receiver(tmp_path, secret_list, seed) as rx:
        yield secret_list, rx


def register_all(adapter: Adapter, rx: Receiver, secret_list: list[str]) -> None:
    """Terms for each customer, each at its own path of the receiver."""
    for customer, secret in zip(CUSTOMERS, secret_list, strict=True):
        register(
            adapter, customer_ref=customer, destination=f"{rx.url}inbox/{customer}", secret=secret
        )


class Waves:
    """The documents, emitted a wave at a time: the first before the workers start, the
    rest while they are being killed."""

    def __init__(self, emit: Callable[[list[Transaction]], list[Emission]], count: int) -> None:
        self.emit = emit
        self.count = count
        self.emitted: dict[str, bytes] = {}
        self._txs = [
            ticket(id=f"FI-{i}", customer_ref=CUSTOMERS[i % len(CUSTOMERS)]) for i in range(count)
        ]

    @property
    def done(self) -> bool:
        return not self._txs

    def next(self, size: int = 30) -> None:
        wave, self._txs = self._txs[:size], self._txs[size:]
        if wave:
            emissions = self.emit(wave)
            assert len(emissions) == len(wave)
            self.emitted.update((e.msg_id, e.document) for e in emissions)


def report(
    name: str,
    history: History,
    *,
    fleet: Fleet,
    terminated: int,
    elapsed: float,
    runs: int,
    record_property: Callable[[str, object], None],
) -> None:
    line = (
        f"fault-injection [{name}]: {history.summary()}; worker kills {fleet.kills},"
        f" workers started {fleet.started}, backend terminations {terminated},"
        f" unexpected worker exits {len(fleet.crashes)}; faults phase {elapsed:.1f} s,"
        f" clean --once runs {runs}"
    )
    print(line)  # the run's summary, shown with -s or -rA
    record_property("fault_injection", line)


@pytest.mark.skipif(
    not DSN,
    reason="CMI_TEST_POSTGRES_DSN is not set: the PostgreSQL fault suite needs a server"
    " (e.g. CMI_TEST_POSTGRES_DSN=postgresql://postgres@127.0.0.1:5432/test)",
)
def test_postgres_workers_killed_and_cut_off_lose_nothing(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    import psycopg  # only with a server to talk to

    from cmi_sdk.outbox.postgres import PostgresStore

    token = secrets.token_hex(4)
    schema = f"cmi_fault_{token}"
    app_name = f"cmi_fault_w_{token}"  # the workers' sessions, and only theirs
    sep = "&" if "?" in DSN else "?"
    url = f"{DSN}{sep}schema={schema}&application_name={app_name}"
    store = PostgresStore(DSN, schema=schema)
    control = psycopg.connect(DSN, autocommit=True, application_name=f"cmi_fault_c_{token}")
    fleet = Fleet(worker_env(url), tmp_path, size=3, seed=11)
    adapter = emitting_adapter(tmp_path, store=store)

    def in_firms_transaction(txs: list[Transaction]) -> list[Emission]:
        with psycopg.connect(DSN) as conn:  # committed on leaving the block
            return adapter.emit_many(txs, connection=conn)

    def cut_backends() -> int:
        found = control.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s"
            " AND pid <> pg_backend_pid()",
            (app_name,),
        ).fetchone()
        return int(found[0]) if found else 0

    waves = Waves(in_firms_transaction, count=210)
    try:
        with faulty_receiver(tmp_path, seed=7) as (secret_list, rx):
            register_all(adapter, rx, secret_list)
            waves.next()
            try:
                fleet.fill()
                terminated, elapsed = run_faults(
                    fleet=fleet,
                    store=store,
                    waves=waves,
                    seconds=40,
                    kill_every=(1.0, 2.0),
                    seed=13,
                    cut_backends=cut_backends,
                )
            finally:
                rx.faulty.faulty = False
                fleet.stop()
            waves.next(waves.count)  # the rest, if the time ran out
            runs = finish(store, worker_env(url), tmp_path)
            history = check(store, waves.emitted, rx)
    finally:
        fleet.stop()
        adapter.close()
        store.close()
        with contextlib.suppress(psycopg.Error):
            control.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        control.close()
    report(
        "postgresql, 3 workers",
        history,
        fleet=fleet,
        terminated=terminated,
        elapsed=elapsed,
        runs=runs,
        record_property=record_property,
    )
    assert terminated > 0, "no worker backend was ever terminated: the fault did not happen"
    assert fleet.kills > 0
    assert fleet.crashes == [], "a worker ended on its own"
    assert history.problems == []
    assert history.states == Counter({"delivered": waves.count})


def test_sqlite_worker_killed_loses_nothing(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    db = tmp_path / "cmi.db"
    url = f"sqlite:///{db}"
    store = SQLiteStore(db)
    fleet = Fleet(worker_env(url), tmp_path, size=1, seed=17)
    adapter = emitting_adapter(tmp_path, store=store)
    waves = Waves(adapter.emit_many, count=150)
    try:
        with faulty_receiver(tmp_path, seed=19) as (secret_list, rx):
            register_all(adapter, rx, secret_list)
            waves.next()
            try:
                fleet.fill()
                _, elapsed = run_faults(
                    fleet=fleet,
                    store=store,
                    waves=waves,
                    seconds=30,
                    kill_every=(2.0, 3.0),
                    seed=23,
                )
            finally:
                rx.faulty.faulty = False
                fleet.stop()
            waves.next(waves.count)
            runs = finish(store, worker_env(url), tmp_path)
            history = check(store, waves.emitted, rx)
    finally:
        fleet.stop()
        adapter.close()
    report(
        "sqlite, 1 worker",
        history,
        fleet=fleet,
        terminated=0,
        elapsed=elapsed,
        runs=runs,
        record_property=record_property,
    )
    assert fleet.kills > 0
    assert fleet.crashes == [], "a worker ended on its own"
    assert history.problems == []
    assert history.states == Counter({"delivered": waves.count})


# -- a finding: claims that never posted use up the retry schedule --------------------------


class RetryBudgetSpentError(AssertionError):
    """The row went dead with fewer POSTs than the retry schedule allows."""


class HoldFirst:
    """Holds every delivery of one ``webhook-id`` (the worker is killed meanwhile);
    answers 503 to everything else, and to everything once ``holding`` is off."""

    def __init__(self, held_id: str) -> None:
        self.held_id = held_id
        self.holding = True
        self.cycle = 0
        self.arrived = threading.Event()
        self.seen: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        webhook_id = dict(scope["headers"]).get(b"webhook-id", b"").decode()
        self.seen.append(webhook_id)
        while (await receive()).get("more_body"):
            pass
        if self.holding and webhook_id == self.held_id:
            cycle = self.cycle
            self.arrived.set()
            deadline = time.monotonic() + 30
            while self.cycle == cycle and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def test_claims_that_never_posted_do_not_spend_the_retry_schedule(tmp_path: Path) -> None:
    db = tmp_path / "cmi.db"
    env = worker_env(f"sqlite:///{db}")
    # Three attempts; one lane, so the second row waits behind the first, which the
    # receiver holds until the worker is killed.
    env |= {
        "CMI_RETRY_SCHEDULE": "0.2,0.2",
        "CMI_LEASE_SECONDS": "1",
        "CMI_HTTP_TIMEOUT": "10",
        "CMI_PER_DESTINATION": "1",
    }
    adapter = emitting_adapter(tmp_path, store=SQLiteStore(db))
    secret = generate_secret()
    try:
        app = HoldFirst("")
        with serving(app) as url:
            register(adapter, customer_ref=CUSTOMERS[0], destination=f"{url}/inbox", secret=secret)
            (first,) = adapter.emit(ticket(id="FI-first", customer_ref=CUSTOMERS[0]))
            (second,) = adapter.emit(ticket(id="FI-second", customer_ref=CUSTOMERS[0]))
            app.held_id = first.msg_id
            try:
                for _ in range(3):  # one worker per claim, each killed while it posts `first`
                    app.arrived.clear()
                    with (tmp_path / "held.log").open("ab") as out:
                        worker = subprocess.Popen(
                            [sys.executable, "-m", "cmi_sdk.cli", "deliver", "--once"],
                            cwd=tmp_path,
                            env=env,
                            stdin=subprocess.DEVNULL,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                        )
                    try:
                        assert app.arrived.wait(30), "the worker never posted"
                    finally:
                        worker.kill()
                        worker.wait(10)
                    app.cycle += 1
                    time.sleep(1.2)  # the dead worker's lease runs out
            finally:
                app.holding = False
                app.cycle += 1
            assert app.seen == [first.msg_id] * 3  # `second` was claimed 3 times, never posted
            assert adapter.store.get_row(second.msg_id).attempts == 0  # claims are not attempts
            deliver_once(env, tmp_path)  # every POST answered 503 now
    finally:
        adapter.close()
    assert app.seen.count(second.msg_id) == 1
    row = adapter.store.get_row(second.msg_id)
    if row.state == "dead":
        raise RetryBudgetSpentError(
            f"{second.msg_id} is dead after one POST ({row.last_error}); the schedule"
            " allows 3 attempts"
        )
    assert row.state == "retry"


# -- a finding: a store error between rounds ends the worker --------------------------------


class _NextDueFailsOnce:
    """A store whose ``next_due`` fails once, as PostgreSQL's does when both of its tries
    lose the connection (a restart, a failover)."""

    def __init__(self, inner: OutboxStore) -> None:
        self.inner = inner
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def next_due(self) -> float | None:
        if not self.failed:
            self.failed = True
            raise StoreError("the connection to PostgreSQL was lost while reading the due time")
        return self.inner.next_due()


def test_a_store_error_between_rounds_does_not_end_the_worker(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path)
    worker = adapter.delivery_worker()
    flaky = _NextDueFailsOnce(adapter.store)
    worker.store = flaky  # a proxy: the store's methods, through __getattr__
    stop = threading.Event()
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    try:
        worker.run(poll_interval=0.05, stop=stop)  # returns when stopped, not before
    finally:
        timer.cancel()
        worker.close()
        adapter.close()
    assert flaky.failed
