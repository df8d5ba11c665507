"""Processes killed with SIGKILL at the worst moments: nothing is lost, nothing is stored
twice. Real processes (the ``cmi`` command, a firm's script), a real store on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cmi_sdk import Adapter, EgressGuard, Transaction, load_model
from cmi_sdk.outbox.sqlite import SQLiteStore
from cmi_sdk.receiver import CustomerStore
from cmi_sdk.signing import DocumentSigner, generate_development_keys
from cmi_sdk.webhooks import generate_secret
from tests.support import ROOT, cli_env, register, serve_app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


class Stall:
    """Lets the wrapped store handle the first request in full (the document is stored),
    then holds the answer back until released: the sender is killed in between."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.requests: list[str] = []
        self.stored = threading.Event()
        self.release = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        headers = dict(scope["headers"])
        self.requests.append(headers.get(b"webhook-id", b"").decode())
        if len(self.requests) > 1:
            await self.inner(scope, receive, send)
            return
        held: list[Any] = []

        async def hold(message: Any) -> None:
            held.append(message)

        await self.inner(scope, receive, hold)
        self.stored.set()
        deadline = time.monotonic() + 30
        while not self.release.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for message in held:
            try:
                await send(message)
            except OSError:
                return  # the sender is gone


@dataclass
class Firm:
    tmp: Path
    db: Path
    env: dict[str, str]
    adapter: Adapter
    inbox: CustomerStore
    secret: str

    def cmi(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cmi_sdk.cli", *args],
            cwd=self.tmp,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture
def firm(tmp_path: Path) -> Firm:
    key, cert = generate_development_keys(tmp_path / "keys")
    db = tmp_path / "cmi.db"
    env = cli_env(
        f"sqlite:///{db}",
        signing_key=str(key),
        signing_cert=str(cert),
        lease_seconds="1",
        retry_schedule="0,0,0",
    )
    signer = DocumentSigner.from_pem(key.read_bytes(), cert.read_bytes())
    adapter = Adapter(store=SQLiteStore(db), signer=signer, egress=EgressGuard(allow_loopback=True))
    secret = generate_secret()
    inbox = CustomerStore(
        directory=tmp_path / "inbox", secrets=[secret], certificate=cert.read_bytes()
    )
    return Firm(tmp_path, db, env, adapter, inbox, secret)


@pytest.fixture
def stalled(firm: Firm) -> Iterator[tuple[Stall, str]]:
    stall = Stall(firm.inbox.app)
    try:
        with serve_app(stall) as url:
            yield stall, url + "inbox"
    finally:
        stall.release.set()


def _ticket() -> Transaction:
    return load_model(Transaction, (ROOT / "examples" / "ticket.json").read_text())


def test_worker_killed_between_the_post_and_recording_it(
    firm: Firm, stalled: tuple[Stall, str]
) -> None:
    stall, url = stalled
    register(firm.adapter, destination=url, secret=firm.secret)
    (emission,) = firm.adapter.emit(_ticket())

    worker = subprocess.Popen(
        [sys.executable, "-m", "cmi_sdk.cli", "deliver", "--once"],
        cwd=firm.tmp,
        env=firm.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert stall.stored.wait(30), "the worker never delivered"
        os.kill(worker.pid, signal.SIGKILL)
        assert worker.wait(10) == -signal.SIGKILL
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        stall.release.set()

    row = firm.adapter.store.get_row(emission.msg_id)
    assert row.state == "leased"  # the POST happened; its outcome was never recorded
    assert firm.inbox.documents() == [emission.msg_id]

    time.sleep(1.2)  # the dead worker's lease runs out
    result = firm.cmi("deliver", "--once")
    assert result.returncode == 0, result.stderr
    assert "delivered 1" in result.stdout

    assert stall.requests == [emission.msg_id, emission.msg_id]  # the same webhook-id again
    assert firm.inbox.documents() == [emission.msg_id]  # stored once
    row = firm.adapter.store.get_row(emission.msg_id)
    # The killed worker's attempt was never recorded: the count is of recorded outcomes.
    assert (row.state, row.attempts) == ("delivered", 1)


FIRM_SCRIPT = textwrap.dedent(
    """
    import sqlite3, sys, time
    from pathlib import Path
    from cmi_sdk import Transaction, load_model
    from cmi_sdk.config import Settings

    adapter = Settings.load().adapter()
    tx = load_model(Transaction, Path(sys.argv[1]).read_text())
    conn = sqlite3.connect(sys.argv[2])
    conn.execute("CREATE TABLE IF NOT EXISTS sales (id TEXT PRIMARY KEY)")
    conn.commit()
    conn.execute("INSERT INTO sales VALUES (?)", (tx.id,))
    adapter.emit(tx, connection=conn)
    if sys.argv[3] == "commit":
        conn.commit()
    print("ready", flush=True)
    time.sleep(60)
    """
)


def _run_firm_and_kill(firm: Firm, mode: str) -> None:
    script = firm.tmp / "firm.py"
    script.write_text(FIRM_SCRIPT)
    process = subprocess.Popen(
        [sys.executable, str(script), str(ROOT / "examples" / "ticket.json"), str(firm.db), mode],
        cwd=firm.tmp,
        env=firm.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(process.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(30)
        assert line == ["ready\n"], process.stderr.read() if process.poll() is not None else ""  # type: ignore[union-attr]
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_emitter_killed_after_the_firms_commit(firm: Firm) -> None:
    with serve_app(firm.inbox.app) as url:
        register(firm.adapter, destination=url + "inbox", secret=firm.secret)
        _run_firm_and_kill(firm, "commit")
        (row,) = firm.adapter.store.rows()
        assert row.state == "pending"
        with firm.adapter.delivery_worker() as worker:
            assert worker.run_once().delivered == 1
        assert firm.inbox.documents() == [row.msg_id]
    with sqlite3.connect(firm.db) as conn:
        assert conn.execute("SELECT id FROM sales").fetchall() == [("DL-12524057",)]


def test_emitter_killed_before_the_firms_commit_leaves_neither(firm: Firm) -> None:
    register(firm.adapter, destination="http://127.0.0.1:9/inbox", secret=firm.secret)
    _run_firm_and_kill(firm, "no-commit")
    assert firm.adapter.store.rows() == []
    with sqlite3.connect(firm.db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM sales").fetchone() == (0,)
