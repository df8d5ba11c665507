"""How delivery scales with worker processes, and what emitting in the firm's transactions
costs: figures for ``docs/scale.md``.

Usage::

    python bench/scale.py            # full run (under ~3 minutes)
    python bench/scale.py --quick    # a short run (under ~40 s)

Delivery: 1, 2 and 4 ``cmi deliver`` processes on one PostgreSQL store (a fresh schema,
dropped after), posting to one local receiver process (a bare uvicorn ASGI app answering
204). The workers start first and wait (LISTEN); a batch of signed documents then commits
in one transaction and the clock runs from the commit until every row is ``delivered``.
Meanwhile the CPU time of each process is read from ``/proc/<pid>/stat`` (utime + stime):
the workers, the receiver, the PostgreSQL backends of the workers' sessions (found by
their ``application_name``), and the whole machine from ``/proc/stat``.

Emission: signed documents written in the caller's own transactions, 100 rows and one
firm row each (``adapter.emit_many(..., connection=conn)``), on PostgreSQL (a psycopg
connection) and on SQLite (a ``sqlite3`` connection to the store's file).

Each figure prints as ``name: value unit``; the last line judges where delivery saturates.
The PostgreSQL server is ``CMI_BENCH_POSTGRES_DSN``, else ``CMI_TEST_POSTGRES_DSN``, else
``postgresql://postgres@127.0.0.1:5432/test``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from cmi_sdk import Adapter, EgressGuard, TermsProposal, Transaction, load_model
from cmi_sdk.signing import DocumentSigner, self_signed_certificate
from cmi_sdk.webhooks import generate_secret

ROOT = Path(__file__).resolve().parent.parent
CUSTOMER = "cust-7f3a9c"
TICK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
DSN = (
    os.environ.get("CMI_BENCH_POSTGRES_DSN")
    or os.environ.get("CMI_TEST_POSTGRES_DSN")
    or "postgresql://postgres@127.0.0.1:5432/test"
)

# The same bare receiver and free-port helper as bench/run.py (this folder is on sys.path
# when a script here runs).
from run import receiver_process  # noqa: E402


def line(name: str, value: float, unit: str) -> None:
    shown = f"{value:.2f}" if abs(value) < 100 else f"{value:,.0f}"
    print(f"{name}: {shown} {unit}", flush=True)


# -- CPU time from /proc -----------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, seconds; 0 when it is gone or unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 onwards
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine (all cores) since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / TICK


def postgres_processes() -> list[int]:
    """The PostgreSQL server's processes on this machine: backends, WAL writer and the rest."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "postgres":
                    found.append(int(entry.name))
    return found


@dataclass
class CpuUse:
    """Cores used over a measured interval, by part."""

    workers: float
    receiver: float
    postgres: float
    """Every process of the PostgreSQL server (backends, WAL writer, ...)."""
    bench: float
    """This process (polling for the end)."""
    machine: float

    @property
    def other(self) -> float:
        """Busy time no measured process accounts for."""
        return max(0.0, self.machine - self.workers - self.receiver - self.postgres - self.bench)


class CpuMeter:
    """Cores used by named groups of processes between ``start`` and ``stop``."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._before: dict[int, float] = {}
        self._machine = 0.0
        self._wall = 0.0

    def start(self) -> None:
        self._before = {pid: cpu_seconds(pid) for pids in self.groups.values() for pid in pids}
        self._machine = machine_busy()
        self._wall = time.perf_counter()

    def stop(self) -> CpuUse:
        wall = time.perf_counter() - self._wall
        used = {
            name: sum(cpu_seconds(pid) - self._before.get(pid, 0.0) for pid in pids) / wall
            for name, pids in self.groups.items()
        }
        return CpuUse(
            workers=used["workers"],
            receiver=used["receiver"],
            postgres=used["postgres"],
            bench=used["bench"],
            machine=(machine_busy() - self._machine) / wall,
        )


# -- the firm --------------------------------------------------------------------------------


def transactions(prefix: str, count: int) -> list[Transaction]:
    base = load_model(Transaction, (ROOT / "examples" / "ticket.json").read_text())
    return [
        base.model_copy(update={"id": f"{prefix}-{i}", "customer_ref": CUSTOMER})
        for i in range(count)
    ]


def signing_adapter(store: Any, destination: str) -> Adapter:
    key = ec.generate_private_key(ec.SECP256R1())
    signer = DocumentSigner(key=key, certificate=self_signed_certificate(key))
    adapter = Adapter(store=store, signer=signer, egress=EgressGuard(allow_loopback=True))
    proposal = TermsProposal.model_validate(
        {
            "customer_ref": CUSTOMER,
            "destination": destination,
            "secret": generate_secret(),
            "standard": "cmi-ticket",
            "purpose": {"code": "records", "text": "scale benchmark"},
        }
    )
    decision = adapter.propose_terms(proposal)
    if decision.outcome != "accepted":
        raise SystemExit(f"the benchmark's terms were not accepted: {decision.reason}")
    return adapter


@contextlib.contextmanager
def postgres_schema() -> Iterator[tuple[Any, str]]:
    """A PostgresStore in a fresh schema (dropped on exit), and the schema's name."""
    import psycopg

    from cmi_sdk.outbox.postgres import PostgresStore

    schema = f"cmi_scale_{secrets.token_hex(4)}"
    store = PostgresStore(DSN, schema=schema)
    try:
        yield store, schema
    finally:
        store.close()
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# -- the receiver and the workers -----------------------------------------------------------


@contextlib.contextmanager
def workers(
    count: int, database_url: str, cwd: Path, *, poll: float = 0.5
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` ``cmi deliver`` processes on ``database_url``, their output dropped;
    terminated (then killed, if they do not end) on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CMI_", "PYTHONPATH"))}
    env.update(
        {"CMI_DATABASE_URL": database_url, "CMI_ALLOW_LOOPBACK": "1", "PYTHONPATH": str(ROOT)}
    )
    started: list[subprocess.Popen[bytes]] = []
    command = [sys.executable, "-m", "cmi_sdk.cli", "deliver", "--poll", str(poll)]
    try:
        for _ in range(count):
            quiet = subprocess.DEVNULL
            started.append(
                subprocess.Popen(command, cwd=cwd, env=env, stdin=quiet, stdout=quiet, stderr=quiet)
            )
        yield started
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(30)  # what is in flight finishes first
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


# -- delivery --------------------------------------------------------------------------------


@dataclass
class DeliveryRun:
    workers: int
    rate: float
    cpu: CpuUse


def bench_delivery(quick: bool, tmp: Path) -> list[DeliveryRun]:
    import psycopg

    count = 600 if quick else 4000
    rounds = 1 if quick else 3
    results: list[DeliveryRun] = []
    with receiver_process() as (url, receiver_pid), postgres_schema() as (store, schema):
        adapter = signing_adapter(store, url)
        app_name = f"cmi_scale_{schema[-8:]}"
        sep = "&" if "?" in DSN else "?"
        database_url = f"{DSN}{sep}schema={schema}&application_name={app_name}"
        control = psycopg.connect(DSN, autocommit=True)
        delivered_sql = f"SELECT count(*) FROM \"{schema}\".outbox WHERE state = 'delivered'"  # noqa: S608
        emitted = 0

        def delivered() -> int:
            found = control.execute(delivered_sql).fetchone()
            return int(found[0]) if found else 0

        def listening() -> int:
            """The workers waiting for work: their sessions whose last statement is LISTEN."""
            found = control.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = %s AND query LIKE 'LISTEN%%'",
                (app_name,),
            ).fetchone()
            return int(found[0]) if found else 0

        try:
            for n in (1, 2, 4):
                with workers(n, database_url, tmp) as procs:
                    deadline = time.monotonic() + 30
                    while listening() < n:  # each worker waits for work
                        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                            raise SystemExit(f"{n} delivery workers did not start")
                        time.sleep(0.1)
                    groups = {
                        "workers": [p.pid for p in procs],
                        "receiver": [receiver_pid],
                        "postgres": postgres_processes(),
                        "bench": [os.getpid()],
                    }
                    meter = CpuMeter(groups)
                    best: DeliveryRun | None = None
                    for r in range(rounds):
                        txs = transactions(f"W{n}R{r}", count)
                        with psycopg.connect(DSN) as conn:
                            adapter.emit_many(txs, connection=conn)
                            meter.start()
                            conn.commit()  # NOTIFY: the workers wake now
                        start = time.perf_counter()
                        emitted += count
                        deadline = time.monotonic() + 120
                        while delivered() < emitted:
                            if time.monotonic() > deadline:
                                raise SystemExit(f"{n} workers did not deliver {count} rows")
                            time.sleep(0.05)
                        elapsed = time.perf_counter() - start
                        run = DeliveryRun(n, count / elapsed, meter.stop())
                        if best is None or run.rate > best.rate:
                            best = run
                    assert best is not None
                    results.append(best)
        finally:
            control.close()
            adapter.close()
    return results


# -- emission in the caller's transactions --------------------------------------------------


def emit_rate(
    txs: Sequence[Transaction],
    write_in_transaction: Callable[[Sequence[Transaction]], None],
) -> float:
    start = time.perf_counter()
    for i in range(0, len(txs), 100):
        write_in_transaction(txs[i : i + 100])
    return len(txs) / (time.perf_counter() - start)


def bench_emit_postgres(quick: bool) -> float:
    import psycopg

    count = 500 if quick else 5000
    with postgres_schema() as (store, schema):
        adapter = signing_adapter(store, "http://127.0.0.1:9/inbox")
        with psycopg.connect(DSN) as conn:
            conn.execute(f'CREATE TABLE "{schema}".sales (id text PRIMARY KEY)')
            insert_sale = f'INSERT INTO "{schema}".sales (id) VALUES (%s)'  # noqa: S608
            conn.commit()
            adapter.emit_many(transactions("warm", 100), connection=conn)  # caches, plans
            conn.commit()

            def write(chunk: Sequence[Transaction]) -> None:
                with conn.transaction():  # the firm's transaction: its rows and the outbox's
                    conn.cursor().executemany(insert_sale, [(t.id,) for t in chunk])
                    adapter.emit_many(chunk, connection=conn)

            rate = emit_rate(transactions("E", count), write)
        adapter.close()
    return rate


def bench_emit_sqlite(quick: bool, tmp: Path) -> float:
    from cmi_sdk.outbox.sqlite import SQLiteStore

    count = 500 if quick else 5000
    store = SQLiteStore(tmp / "emit.db")
    adapter = signing_adapter(store, "http://127.0.0.1:9/inbox")
    conn = store.connect()
    try:
        conn.execute("CREATE TABLE sales (id TEXT PRIMARY KEY)")
        conn.commit()
        adapter.emit_many(transactions("warm", 100), connection=conn)
        conn.commit()

        def write(chunk: Sequence[Transaction]) -> None:
            conn.executemany("INSERT INTO sales (id) VALUES (?)", [(t.id,) for t in chunk])
            adapter.emit_many(chunk, connection=conn)
            conn.commit()

        rate = emit_rate(transactions("E", count), write)
    finally:
        conn.close()
        adapter.close()
    return rate


# -- the judgment ----------------------------------------------------------------------------


def per_delivery(run: DeliveryRun) -> float:
    """CPU milliseconds per delivery: workers, receiver and PostgreSQL together."""
    return 1e3 * (run.cpu.workers + run.cpu.receiver + run.cpu.postgres) / run.rate


def judge(runs: list[DeliveryRun]) -> str:
    """Where delivery saturates, from the measured rates and cores (at the most workers)."""
    one, top = runs[0], runs[-1]
    best = max(runs, key=lambda r: r.rate)
    cpu = top.cpu
    scaling = ", ".join(f"{r.workers} give {r.rate / one.rate:.2f}x" for r in runs[1:])
    seen = (
        f"at {top.workers} workers {cpu.machine:.2f} of {CORES} cores were busy (workers"
        f" {cpu.workers:.2f}, receiver {cpu.receiver:.2f} of its 1, PostgreSQL"
        f" {cpu.postgres:.2f}, other processes {cpu.other + cpu.bench:.2f})"
    )
    if cpu.machine >= 0.75 * CORES:
        largest = max(
            ("the workers", cpu.workers),
            ("the receiver", cpu.receiver),
            ("PostgreSQL", cpu.postgres),
            key=lambda item: item[1],
        )
        verdict = (
            f"CPU: {seen}, {largest[0]} the most; CPU per delivery grows from"
            f" {per_delivery(one):.2f} ms with 1 worker to {per_delivery(top):.2f} ms with"
            f" {top.workers} as they contend"
        )
        if cpu.other >= 0.25:
            verdict += "; the machine was shared, so the rates are low"
    elif cpu.receiver >= 0.85:
        verdict = f"the receiver (one process, one core at most): {seen}"
    elif cpu.postgres >= 0.5 * CORES:
        verdict = f"PostgreSQL: {seen}"
    else:
        verdict = f"latency, not CPU (each worker posts its batch in sequence): {seen}"
    return (
        f"saturation: {scaling} one worker (best {best.rate:,.0f}/s with {best.workers});"
        f" it saturates on {verdict}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short run (under ~40 s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = bench_delivery(args.quick, folder)
        for run in runs:
            plural = "worker" if run.workers == 1 else "workers"
            line(f"delivery_postgres_{run.workers}_{plural}", run.rate, "deliveries/s")
        for run in runs[1:]:
            line(f"delivery_scaling_{run.workers}_over_1", run.rate / runs[0].rate, "x")
        for run in runs:
            prefix = f"cpu_{run.workers}w"
            line(f"{prefix}_workers", run.cpu.workers, "cores")
            line(f"{prefix}_receiver", run.cpu.receiver, "cores")
            line(f"{prefix}_postgres", run.cpu.postgres, "cores")
            line(f"{prefix}_this_script", run.cpu.bench, "cores")
            line(f"{prefix}_machine", run.cpu.machine, f"cores of {CORES}")
            line(f"{prefix}_cpu_per_delivery", per_delivery(run), "ms (workers+receiver+pg)")
        line("emit_postgres_caller_tx_signed", bench_emit_postgres(args.quick), "docs/s")
        line("emit_sqlite_caller_tx_signed", bench_emit_sqlite(args.quick, folder), "docs/s")
    print(judge(runs), flush=True)
    line("bench_wall_time", time.perf_counter() - start, "s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
