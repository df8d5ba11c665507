"""Several delivery workers on one PostgreSQL store, each on a store object (a pool) of
its own, as separate processes have: the per-destination lease limit holds across them,
no document goes out twice while its lease holds, a worker killed mid-flight has its
documents sent again with the same ``webhook-id`` only once its lease ran out, and one
worker's open circuit starves no other destination.

The receiver is an HTTP/1.1 server on loopback that records every request (path,
``webhook-id``, when it came) and how many were in flight at once for each path. Every
loop is bounded in count and time; every worker, process and server stops with its test.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cmi_sdk import Adapter, RetrySchedule
from cmi_sdk._delivery import DeliveryWorker, Timeouts
from tests.stores import DSN, postgres_schema
from tests.support import cli_env, emitting_adapter, register, ticket

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not DSN, reason="CMI_TEST_POSTGRES_DSN is not set"),
]


# -- the receiver ---------------------------------------------------------------------------


@dataclass
class Receiver:
    """What the server saw; ``delays`` and ``statuses`` say how each path answers."""

    delays: dict[str, float] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    seen: list[tuple[str, str, float]] = field(default_factory=list)  # path, id, when
    in_flight: Counter[str] = field(default_factory=Counter)
    peak: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def ids(self, path: str | None = None) -> Counter[str]:
        with self.lock:
            return Counter(w for p, w, _ in self.seen if path in (None, p))


@contextlib.contextmanager
def receiving(rx: Receiver) -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            path = self.path
            with rx.lock:
                rx.seen.append((path, self.headers.get("webhook-id", ""), time.monotonic()))
                rx.in_flight[path] += 1
                rx.peak[path] = max(rx.peak[path], rx.in_flight[path])
            try:
                time.sleep(rx.delays.get(path, 0.0))
                self.send_response(rx.statuses.get(path, 200))
                self.send_header("content-length", "0")
                self.end_headers()
            finally:
                with rx.lock:
                    rx.in_flight[path] -= 1

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    rx.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield rx
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# -- the store and the workers --------------------------------------------------------------


@pytest.fixture
def schema() -> Iterator[str]:
    with postgres_schema("cmi_workers_rt") as name:
        yield name


def pg_adapter(tmp_path: Path, schema: str) -> Adapter:
    from cmi_sdk.outbox.postgres import PostgresStore

    return emitting_adapter(tmp_path, store=PostgresStore(DSN, schema=schema))


@contextlib.contextmanager
def fleet(emitter: Adapter, adapters: list[Adapter]) -> Iterator[list[Running]]:
    """The workers appended to the yielded list are stopped on exit (if the test has not
    stopped them), then every adapter is closed."""
    running: list[Running] = []
    try:
        yield running
    finally:
        for run in running:
            with contextlib.suppress(AssertionError):
                run.stop()
        for adapter in (emitter, *adapters):
            close(adapter)


def close(adapter: Adapter) -> None:
    """Close the adapter and the store it was given."""
    adapter.close()
    adapter.store.close()


class Running:
    """A worker delivering on an event loop of its own thread, until stopped."""

    def __init__(self, worker: DeliveryWorker) -> None:
        self.worker = worker
        self.loop: asyncio.AbstractEventLoop | None = None
        self.halt: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.halt = asyncio.Event()
            self.ready.set()
            await self.worker.deliver(stop=self.halt, poll_interval=0.05)

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by stop()
            self.error = exc
        finally:
            self.ready.set()

    def stop(self) -> None:
        if self.loop is not None and self.halt is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.halt.set)
        self.thread.join(20)
        self.worker.close()
        assert not self.thread.is_alive()
        assert self.error is None, self.error


def emit_for(adapter: Adapter, url: str, paths: dict[str, int], customers: int) -> list[str]:
    """Terms of ``customers`` customers at each path, and as many documents as the path
    says, spread over them; their ids."""
    msg_ids: list[str] = []
    for path, count in paths.items():
        refs = [f"cust-{path.strip('/')}-{c}" for c in range(customers)]
        for ref in refs:
            register(adapter, customer_ref=ref, destination=f"{url}{path}")
        txs = [
            ticket(id=f"T{path.strip('/')}-{i}", customer_ref=refs[i % customers])
            for i in range(count)
        ]
        msg_ids.extend(e.msg_id for e in adapter.emit_many(txs))
    return msg_ids


def wait_until(done: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.1)
    return done()


def delivered(adapter: Adapter) -> int:
    return adapter.store.status(time.time()).counts["delivered"]


QUICK = Timeouts(connect=2, read=5, total=8)


# -- the lease limit and duplicates ---------------------------------------------------------


@pytest.mark.parametrize(
    ("slow", "count", "lease"),
    [(0.01, 40, 30.0), (0.15, 40, 30.0), (1.5, 8, 1.0)],
    ids=["quick-stores", "one-slow-store", "one-store-slower-than-the-lease"],
)
def test_three_workers_keep_the_lease_limit_and_send_each_document_once(
    tmp_path: Path, schema: str, slow: float, count: int, lease: float
) -> None:
    # With a store slower than the lease, the workers' heartbeats keep their leases:
    # still no document goes twice, and the limit still holds.
    limit = 2
    rx = Receiver(delays={"/a": 0.01, "/b": 0.01, "/slow": slow})
    emitter = pg_adapter(tmp_path, schema)
    adapters = [pg_adapter(tmp_path, schema) for _ in range(3)]
    with fleet(emitter, adapters) as running, receiving(rx):
        msg_ids = emit_for(emitter, rx.url, {"/a": 130, "/b": 130, "/slow": count}, 8)
        for adapter in adapters:
            worker = adapter.delivery_worker(
                destination_lease_limit=limit,
                per_destination=8,
                concurrency=16,
                lease_seconds=lease,
                timeout=QUICK,
            )
            running.append(Running(worker))
        finished = wait_until(lambda: delivered(emitter) == len(msg_ids), 60)
        for run in running:
            run.stop()
        running.clear()
    assert finished, emitter.store.status(time.time()).counts
    got = rx.ids()
    assert set(got) == set(msg_ids)
    twice = {m: n for m, n in got.items() if n > 1}
    assert twice == {}, f"{len(twice)} documents sent more than once with their lease held"
    assert max(rx.peak.values()) <= limit, dict(rx.peak)


# -- a worker killed mid-flight -------------------------------------------------------------


def worker_process(schema: str, cwd: Path, lease: float) -> subprocess.Popen[bytes]:
    sep = "&" if "?" in DSN else "?"
    env = cli_env(
        f"{DSN}{sep}schema={schema}",
        lease_seconds=str(lease),
        http_timeout="10",
        delivery_concurrency="8",
        per_destination="8",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "cmi_sdk.cli", "deliver", "--poll", "0.1"],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_a_worker_killed_mid_flight_is_redelivered_with_the_same_id_only_after_its_lease(
    tmp_path: Path, schema: str
) -> None:
    # The killed worker's documents are in flight (the store holds its answers); a second
    # worker runs all along. It must send them again, with their ids, but not before the
    # killed worker's lease ran out: until then they may still be delivered by it.
    lease = 3.0
    rx = Receiver(delays={"/hold": 1.0})
    emitter = pg_adapter(tmp_path, schema)
    adapter = pg_adapter(tmp_path, schema)
    first: subprocess.Popen[bytes] | None = None
    second: Running | None = None
    try:
        with receiving(rx):
            msg_ids = emit_for(emitter, rx.url, {"/hold": 8}, 8)
            first = worker_process(schema, tmp_path, lease)
            assert wait_until(lambda: len(rx.ids("/hold")) >= 4, 30), "nothing in flight"
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            with rx.lock:
                sent_first = {w: at for _, w, at in rx.seen}
            # The store answers quickly now; a second worker, in this process.
            rx.delays["/hold"] = 0.0
            second = Running(adapter.delivery_worker(lease_seconds=30, timeout=QUICK))
            finished = wait_until(lambda: delivered(emitter) == len(msg_ids), 30)
            second.stop()
            second = None
    finally:
        if first is not None and first.poll() is None:
            first.kill()
            first.wait(10)
        if second is not None:
            with contextlib.suppress(AssertionError):
                second.stop()
        close(emitter)
        close(adapter)
    assert finished
    got = rx.ids()
    assert set(got) == set(msg_ids)  # every one, by its own id
    with rx.lock:
        seen = list(rx.seen)
    for msg_id, started in sent_first.items():
        again = [at for _, w, at in seen if w == msg_id and at > started]
        assert again, f"{msg_id} was in flight when its worker died, and never sent again"
        # Leased just before it reached the store (a claim, then a connection on
        # loopback): sent again only once that lease ran out.
        assert min(again) - started >= lease - 0.5, (msg_id, min(again) - started)


# -- an open circuit --------------------------------------------------------------------------


def test_one_workers_open_circuit_starves_no_other_destination(tmp_path: Path, schema: str) -> None:
    # A store that answers 503 to everything, with hundreds of documents waiting for it,
    # and a healthy one (another origin: a circuit is an origin's) whose documents come
    # later: every worker's circuit for the broken one opens, and what they keep leased
    # for it must not hold up the healthy one's.
    broken, healthy = Receiver(statuses={"/broken": 503}), Receiver()
    emitter = pg_adapter(tmp_path, schema)
    adapters = [pg_adapter(tmp_path, schema) for _ in range(2)]
    with fleet(emitter, adapters) as running, receiving(broken), receiving(healthy):
        emit_for(emitter, broken.url, {"/broken": 300}, 30)
        for adapter in adapters:
            worker = adapter.delivery_worker(
                destination_lease_limit=4,
                concurrency=8,
                lease_seconds=30,
                timeout=QUICK,
                circuit_threshold=3,
                circuit_interval=30,
                schedule=RetrySchedule(delays=(0.5,) * 20, jitter=0),
            )
            running.append(Running(worker))
        assert wait_until(lambda: len(broken.ids()) >= 6, 20)
        time.sleep(1.0)  # both circuits open, retries falling due every 0.5 s
        later = emit_for(emitter, healthy.url, {"/ok": 40}, 4)
        started = time.monotonic()
        reached = wait_until(lambda: set(healthy.ids()) >= set(later), 20)
        took = time.monotonic() - started
        for run in running:
            run.stop()
        running.clear()
    assert reached, f"{len(set(healthy.ids()))} of {len(later)} healthy documents in 20 s"
    assert took < 10, took
    # The broken store saw about one probe per worker per interval, not every retry.
    assert len(broken.ids()) < 30, len(broken.ids())
