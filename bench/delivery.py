"""The delivery engine against many stores: latency hidden, dead stores isolated, reach.

Usage::

    python bench/delivery.py              # every figure, targets judged (about 2 minutes)
    python bench/delivery.py --quick      # a smoke run (CI, a few seconds): not judged
    python bench/delivery.py latency isolation reach cpu postgres   # some of them
    python bench/delivery.py cpu --against d27f62c   # CPU per document against the
                                                     # worker of an older commit

The stores are a :mod:`receivers` process: one loopback address per store (127.0.0.2
upwards, each a distinct origin), answering 204 after a delay, and optionally one more
address that reads requests and never answers. One worker with default settings
(``adapter.delivery_worker()``) runs in this process, on a SQLite outbox filled before the
clock starts; the clock stops when the documents counted are delivered. Every figure is a
ratio between runs of the same process, except reach (documents a second) and the CPU
per delivered document, which is this process's CPU time (``time.process_time``) over the
documents delivered.

- latency: 100 stores, 1,000 documents: documents/s with 100 ms answers over documents/s
  with immediate answers (target >= 0.8);
- isolation: 100 ms answers; one more store never answers and gets its share of the
  documents: the other 100 stores' documents/s over their rate without it (>= 0.8);
- reach: 1,000 stores, 100 ms answers, the worker pinned to one core (>= 2,000 docs/s);
- cpu: CPU per delivered document, immediate answers, 100 stores;
- claim: claim latency (SQLite, then PostgreSQL in a schema of its own, dropped after) with
  10,000 and with 1,000,000 delivered rows kept;
- postgres: 1, 2 and 4 ``cmi deliver`` processes on one PostgreSQL store (a fresh schema,
  dropped after), 1,000 stores answering after 100 ms: documents/s and the cores used.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from run import Figure
from scale import workers
from transports import receivers

from cmi_sdk import Adapter, EgressGuard, TermsProposal, Transaction, load_model
from cmi_sdk.outbox.sqlite import SQLiteStore
from cmi_sdk.signing import DocumentSigner, self_signed_certificate
from cmi_sdk.webhooks import generate_secret

ROOT = Path(__file__).resolve().parent.parent
PORT = 0  # a free port
DSN = (
    os.environ.get("CMI_BENCH_POSTGRES_DSN")
    or os.environ.get("CMI_TEST_POSTGRES_DSN")
    or "postgresql://postgres@127.0.0.1:5432/test"
)


# -- the firm and its customers --------------------------------------------------------------


def firm(store: Any, urls: Sequence[str]) -> tuple[Adapter, list[str]]:
    """A signing adapter with one customer per store URL; returns it and the customers."""
    key = ec.generate_private_key(ec.SECP256R1())
    signer = DocumentSigner(key=key, certificate=self_signed_certificate(key))
    adapter = Adapter(store=store, signer=signer, egress=EgressGuard(allow_loopback=True))
    customers = []
    for i, url in enumerate(urls):
        customer = f"cust-bench-{i:05d}"
        proposal = TermsProposal.model_validate(
            {
                "customer_ref": customer,
                "destination": url,
                "secret": generate_secret(),
                "standard": "cmi-ticket",
                "purpose": {"code": "records", "text": "delivery benchmark"},
            }
        )
        if adapter.propose_terms(proposal).outcome != "accepted":
            raise SystemExit("the benchmark's terms were not accepted")
        customers.append(customer)
    return adapter, customers


def emit(adapter: Adapter, customers: Sequence[str], count: int, prefix: str, **kw: Any) -> None:
    """``count`` signed documents, dealt to the customers in turn."""
    base = load_model(Transaction, (ROOT / "examples" / "ticket.json").read_text())
    txs = [
        base.model_copy(
            update={"id": f"{prefix}-{i}", "customer_ref": customers[i % len(customers)]}
        )
        for i in range(count)
    ]
    for start in range(0, count, 500):
        adapter.emit_many(txs[start : start + 500], **kw)


def delivered_to(db: sqlite3.Connection, urls: set[str] | None) -> int:
    """Rows delivered (to ``urls`` only, when given), read on a connection of its own."""
    sql = "SELECT count(*) FROM cmi_outbox WHERE state = 'delivered'"
    if urls is None:
        return int(db.execute(sql).fetchone()[0])
    marks = ",".join("?" * len(urls))
    found = db.execute(f"{sql} AND destination IN ({marks})", sorted(urls))
    return int(found.fetchone()[0])


@dataclass
class Run:
    rate: float
    cpu_per_doc: float
    """Seconds of this process's CPU per document delivered."""


def deliver(
    stores: int,
    docs: int,
    delay: float,
    *,
    hang: int = 0,
    worker_module: Any = None,
    options: dict[str, Any] | None = None,
) -> Run:
    """Fill an outbox, start one worker, and time it until the answering stores' documents
    are all delivered."""
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        stop = stack.enter_context(_stopping())  # runs after the receivers are gone
        urls = stack.enter_context(receivers(PORT, stores, delay, hang))
        store = SQLiteStore(tmp / "cmi.db")
        adapter, customers = firm(store, urls)
        stack.callback(store.close)
        stack.callback(adapter.close)
        emit(adapter, customers, docs, "B")
        answering = set(urls[:stores])
        expected = sum(1 for i in range(docs) if urls[i % len(urls)] in answering)
        options = dict(options or {})
        if worker_module is None:
            worker = adapter.delivery_worker(**options)
        else:  # an older worker, for the CPU comparison
            options.setdefault("egress", adapter.egress)
            worker = worker_module.DeliveryWorker(
                store=store, hook=adapter.plugin_manager.hook, **options
            )
        db = sqlite3.connect(tmp / "cmi.db")
        stack.callback(db.close)
        wall, cpu = time.perf_counter(), time.process_time()
        worker.start(poll_interval=0.05)
        stop.append(worker)
        deadline = time.monotonic() + 300
        while delivered_to(db, answering if hang else None) < expected:
            if time.monotonic() > deadline:
                raise SystemExit(f"not delivered within 300 s ({stores} stores, {delay} s)")
            time.sleep(0.05)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        # Stopping waits for what is in flight: a store that never answers holds its
        # request until the receivers are gone, which the stack does first.
        worker._stop.set()
        return Run(expected / wall, cpu / expected)


@contextlib.contextmanager
def _stopping() -> Iterator[list[Any]]:
    """Workers appended to the yielded list are stopped on exit."""
    started: list[Any] = []
    try:
        yield started
    finally:
        for worker in started:
            worker.stop(timeout=60)


def best(func: Callable[[], Run], rounds: int) -> Run:
    runs = [func() for _ in range(rounds)]
    return max(runs, key=lambda r: r.rate)


# -- the figures -----------------------------------------------------------------------------


def bench_latency(quick: bool) -> list[Figure]:
    """The issue's figure, and what bounds it.

    One document at a time per store (the default, which keeps each customer's documents
    in order) means at most one in flight per store: with 100 stores and 100 ms answers,
    at most 100 / 0.1 s = 1,000 documents a second (Little's law), whatever the rate
    with immediate answers; the issue's 0.8 of that rate is out of reach once it passes
    1,250 a second. Measured against that bound instead: how close the default comes.

    With the order let go (``per_destination=10``), a run of 1,000 documents is still too
    short to judge: its last answer comes 100 ms after the last send, so the ratio is at
    most T / (T + 0.1 s), T the run with immediate answers (0.27 s at 3,700 a second:
    0.73). The same ratio over 10,000 documents shows what the engine hides when it may.
    """
    stores, docs, rounds = (10, 100, 1) if quick else (100, 1000, 3)
    immediate, slow, unordered = Run(0, 0), Run(0, 0), Run(0, 0)
    for _ in range(rounds):  # alternated, so a busy machine slows all alike
        run = deliver(stores, docs, 0.0)
        immediate = run if run.rate > immediate.rate else immediate
        run = deliver(stores, docs, 0.1)
        slow = run if run.rate > slow.rate else slow
        run = deliver(stores, docs, 0.1, options={"per_destination": 10})
        unordered = run if run.rate > unordered.rate else unordered
    bound = stores / 0.1  # one in flight a store, each for 100 ms
    figures = [
        Figure("delivery_immediate", immediate.rate, "docs/s"),
        Figure("delivery_100ms", slow.rate, "docs/s"),
        Figure("latency_hidden", slow.rate / immediate.rate, "x immediate", target=0.8),
        Figure("delivery_100ms_in_order_bound", bound, "docs/s (one at a time per store)"),
        Figure("latency_hidden_of_bound", slow.rate / bound, "x the in-order bound", target=0.8),
        Figure("delivery_100ms_per_destination_10", unordered.rate, "docs/s"),
        Figure("latency_hidden_per_destination_10", unordered.rate / immediate.rate, "x immediate"),
    ]
    if quick:
        return figures
    long_docs = 10_000
    options = {"per_destination": 10}
    fast, slow_long = Run(0, 0), Run(0, 0)
    for _ in range(2):
        run = deliver(stores, long_docs, 0.0, options=options)
        fast = run if run.rate > fast.rate else fast
        run = deliver(stores, long_docs, 0.1, options=options)
        slow_long = run if run.rate > slow_long.rate else slow_long
    return [
        *figures,
        Figure("delivery_immediate_10000_per_destination_10", fast.rate, "docs/s"),
        Figure("delivery_100ms_10000_per_destination_10", slow_long.rate, "docs/s"),
        Figure(
            "latency_hidden_10000_per_destination_10",
            slow_long.rate / fast.rate,
            "x immediate",
            target=0.8,
        ),
    ]


def bench_isolation(quick: bool) -> list[Figure]:
    stores, docs, rounds = (10, 100, 1) if quick else (100, 1000, 2)
    clean, hung = Run(0, 0), Run(0, 0)
    for _ in range(rounds):
        run = deliver(stores, docs, 0.1)
        clean = run if run.rate > clean.rate else clean
        # One more store that never answers gets its share of the same documents.
        run = deliver(stores, docs + docs // stores, 0.1, hang=1)
        hung = run if run.rate > hung.rate else hung
    return [
        Figure("delivery_100ms_all_answer", clean.rate, "docs/s"),
        Figure("delivery_100ms_one_never_answers", hung.rate, "docs/s (the others')"),
        Figure("isolation", hung.rate / clean.rate, "x all answer", target=0.8),
    ]


def bench_reach(quick: bool) -> list[Figure]:
    stores, docs = (100, 300) if quick else (1000, 4000)
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})  # one core for the worker (the receiver is apart)
    try:
        run = best(lambda: deliver(stores, docs, 0.1), 1 if quick else 2)
    finally:
        os.sched_setaffinity(0, cores)
    return [
        Figure("reach_1000_stores_100ms_one_core", run.rate, "docs/s", target=2000),
        Figure("reach_cpu_per_doc", run.cpu_per_doc * 1e6, "us"),
    ]


def _older_worker(commit: str) -> Any:
    """The delivery module of an older commit, loaded beside today's."""
    git = ["git", "show", f"{commit}:cmi_sdk/_delivery.py"]
    source = subprocess.run(
        git,
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "older_delivery.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("cmi_sdk._older_delivery", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def bench_cpu(quick: bool, against: str | None = None) -> list[Figure]:
    stores, docs, rounds = (10, 100, 1) if quick else (100, 2000, 3)
    figures = []
    engine = best(lambda: deliver(stores, docs, 0.0), rounds)
    figures.append(Figure("engine_cpu_per_doc", engine.cpu_per_doc * 1e6, "us"))
    if against is not None:
        older = _older_worker(against)
        old = best(lambda: deliver(stores, docs, 0.0, worker_module=older), rounds)
        figures += [
            Figure(f"worker_{against}_cpu_per_doc", old.cpu_per_doc * 1e6, "us"),
            Figure(f"worker_{against}_rate", old.rate, "docs/s"),
            Figure("engine_rate", engine.rate, "docs/s"),
            Figure(
                "cpu_per_doc_ratio",
                old.cpu_per_doc / engine.cpu_per_doc,
                f"x {against}'s (>1: less)",
            ),
        ]
    return figures


# -- PostgreSQL, several worker processes ----------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_postgres(quick: bool) -> list[Figure]:
    import psycopg

    from cmi_sdk.outbox.postgres import PostgresStore

    stores, docs = (50, 100) if quick else (1000, 4000)
    schema = f"cmi_dlv_{secrets.token_hex(4)}"
    store = PostgresStore(DSN, schema=schema)
    figures: list[Figure] = []
    sep = "&" if "?" in DSN else "?"
    database_url = f"{DSN}{sep}schema={schema}"
    try:
        with receivers(PORT, stores, 0.1) as urls, tempfile.TemporaryDirectory() as tmp:
            adapter, customers = firm(store, urls)
            control = psycopg.connect(DSN, autocommit=True)
            sql = f"SELECT count(*) FROM \"{schema}\".outbox WHERE state = 'delivered'"  # noqa: S608
            total = 0
            for n in (1, 2, 4):
                with workers(n, database_url, Path(tmp), poll=0.2) as procs:
                    time.sleep(2.0)  # they start and wait for work
                    with psycopg.connect(DSN) as conn:
                        emit(adapter, customers, docs, f"P{n}", connection=conn)
                        cpu = sum(_cpu_seconds(p.pid) for p in procs)
                        conn.commit()  # NOTIFY: the workers wake now
                    start = time.perf_counter()
                    total += docs
                    deadline = time.monotonic() + 300
                    while (control.execute(sql).fetchone() or (0,))[0] < total:
                        if time.monotonic() > deadline:
                            raise SystemExit(f"{n} workers did not deliver {docs} rows")
                        time.sleep(0.02)
                    elapsed = time.perf_counter() - start
                    cores = (sum(_cpu_seconds(p.pid) for p in procs) - cpu) / elapsed
                    figures += [
                        Figure(f"postgres_{n}_workers_100ms", docs / elapsed, "docs/s"),
                        Figure(f"postgres_{n}_workers_cores", cores, "cores (workers)"),
                    ]
            control.close()
            adapter.close()
    finally:
        store.close()
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return figures


def _queued(n: int, state: Any, now: float) -> Any:
    from cmi_sdk.outbox import NewRow

    return NewRow(
        msg_id=f"msg_{n:08d}",
        terms_id="terms_bench",
        customer_ref="cust-bench",
        transaction_id=f"tx-{n}",
        standard="cmi-ticket",
        document_type="ticket",
        destination="https://store.example/inbox",
        body=b"<ticket/>",
        created_at=now - 86400,
        state=state,
        next_attempt_at=now - 86400,
    )


def _claims(store: Any, now: float, name: str) -> Figure:
    """Ten claims of 10 due rows: the median."""
    took = []
    for _ in range(10):
        t = time.perf_counter()
        got = store.claim(owner="bench", now=now, lease_seconds=60, limit=10)
        took.append(time.perf_counter() - t)
        assert len(got) == 10
    took.sort()
    return Figure(name, took[5] * 1e3, "ms (median)")


def _purge_batches(store: Any, now: float, size: int, name: str) -> Figure:
    """A purge batch (500 delivered rows past their window, with their attempts) among
    ``size`` such rows: the median of up to five batches."""
    took = []
    for _ in range(min(5, size // 500)):
        t = time.perf_counter()
        done = store.purge(delivered_before=now - 3600, limit=500)
        took.append(time.perf_counter() - t)
        assert done["delivered"] == 500, done
    took.sort()
    median = took[len(took) // 2]
    return Figure(f"purge_500_of_{size}_finished_rows{name}", median * 1e3, "ms (median)")


def bench_claim(quick: bool) -> list[Figure]:
    """Claim latency (SQLite, then PostgreSQL) with many finished rows present: 100 due rows among N
    delivered ones (small bodies), claimed 10 at a time; the median of the claims. Then a
    purge batch among them: the worker runs one a minute, on the thread that claims."""
    sizes = (1_000, 10_000) if quick else (10_000, 1_000_000)
    figures = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            store = SQLiteStore(Path(tmp) / "cmi.db")
            now = time.time()

            for start in range(0, size, 20_000):
                chunk = range(start, min(size, start + 20_000))
                store.insert([_queued(n, "delivered", now) for n in chunk])
            store.insert([_queued(size + n, "pending", now) for n in range(100)])
            with sqlite3.connect(Path(tmp) / "cmi.db") as db:  # delivered a day ago
                db.execute(
                    "UPDATE cmi_outbox SET delivered_at = ? WHERE state = 'delivered'",
                    (now - 86400,),
                )
            db.close()
            claim = _claims(store, now, f"claim_10_with_{size}_finished_rows")
            purge = _purge_batches(store, now, size, "")
            store.close()
        figures += [claim, purge]
    for size in sizes:
        figures += _claim_postgres(size)
    return figures


def _claim_postgres(size: int) -> list[Figure]:
    """The same on PostgreSQL, in a schema of its own (dropped after): the delivered rows
    are made by one INSERT over generate_series, each statement bounded in time."""
    import psycopg

    from cmi_sdk.outbox.postgres import PostgresStore

    schema = f"cmi_claim_{secrets.token_hex(4)}"
    store = PostgresStore(DSN, schema=schema)
    now = time.time()
    try:
        store.migrate()
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute("SET statement_timeout = '600s'")
            conn.execute(
                f"""INSERT INTO "{schema}".outbox (msg_id, terms_id, customer_ref,
                    transaction_id, standard, document_type, destination, body, created_at,
                    state, next_attempt_at, delivered_at, attempts)
                SELECT 'msg_' || lpad(g::text, 8, '0'), 'terms_bench', 'cust-bench',
                    'tx-' || g, 'cmi-ticket', 'ticket', 'https://store.example/inbox',
                    '<ticket/>'::bytea, %(then)s, 'delivered', %(then)s, %(then)s, 1
                FROM generate_series(0, %(size)s - 1) g""",  # noqa: S608  (a schema made here)
                {"then": now - 86400, "size": size},
            )
            conn.execute(f'ANALYZE "{schema}".outbox')
        store.insert([_queued(size + n, "pending", now) for n in range(100)])
        claim = _claims(store, now, f"claim_10_with_{size}_finished_rows_postgres")
        purge = _purge_batches(store, now, size, "_postgres")
    finally:
        store.close()
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return [claim, purge]


BENCHMARKS: dict[str, Callable[[bool], list[Figure]]] = {
    "claim": bench_claim,
    "latency": bench_latency,
    "isolation": bench_isolation,
    "reach": bench_reach,
    "cpu": bench_cpu,
    "postgres": bench_postgres,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run; targets not judged")
    parser.add_argument("--against", help="cpu: also measure the worker of this commit")
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], metavar="NAME")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)", flush=True)
    missed = []
    for name in args.names or list(BENCHMARKS):
        if name == "cpu":
            figures = bench_cpu(args.quick, args.against)
        else:
            figures = BENCHMARKS[name](args.quick)
        for figure in figures:
            print(figure.line(), flush=True)
            if not figure.met:
                missed.append(figure.name)
    print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)
    if missed and not args.quick:
        print(f"missed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
