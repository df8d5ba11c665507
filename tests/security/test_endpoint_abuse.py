"""The firm's endpoint (``cmi serve``) and the customer's store (``cmi listen``) under abuse.

Each test is an attack: slow and idle clients against real servers on loopback (started as
the commands an operator runs), refusals that must not tell an unknown party from a bad
signature, signatures replayed across contexts, ids that must not reach the file system,
``/metrics`` without its token, and a client that disconnects mid-body. Every loop is bounded
in count and time, and every server and socket a test opens is closed by the test.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cmi_sdk import Adapter, EgressGuard
from cmi_sdk._serving import serving
from cmi_sdk.client import CMIClient, signed_headers, signing_payload
from cmi_sdk.outbox.sqlite import SQLiteStore
from cmi_sdk.receiver import CustomerStore, running
from cmi_sdk.webhooks import WebhookSigner, generate_secret
from tests.support import make_adapter, register, ticket

START_TIMEOUT = 30.0
XML = b'<?xml version="1.0" encoding="UTF-8"?>\n<note>hello</note>\n'

# -- servers as an operator runs them -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _environment(root: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMI_") and k != "PYTHONPATH"}
    env["CMI_DATABASE_URL"] = f"sqlite:///{root / 'cmi.db'}"
    env.update({f"CMI_{name.upper()}": value for name, value in settings.items()})
    return env


def _low_fd_limit(limit: int) -> None:
    # Runs in the child before exec: the server gets a small, known descriptor budget, as
    # a default `ulimit -n` of 1024 would be against a few more connections.
    import resource  # noqa: PLC0415  (POSIX only)

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


@dataclass
class Server:
    """A ``cmi`` server process and where it listens."""

    process: subprocess.Popen[bytes]
    port: int
    health: str
    errors: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def cmi_server(
    kind: str, root: Path, *, fd_limit: int | None = None, **settings: str
) -> Iterator[Server]:
    """Run ``cmi serve`` or ``cmi listen`` on a free port with ``CMI_*`` settings; stop it
    (SIGTERM, then SIGKILL) when the block ends."""
    port = _free_port()
    if kind == "serve":
        argv = ["serve", "--port", str(port)]
        health = "/.well-known/cmi"
    else:
        argv = ["listen", "--port", str(port), "--store", "store", "--secret", generate_secret()]
        health = "/health"
    errors = root / f"{kind}.err"
    limit = None if fd_limit is None else (lambda: _low_fd_limit(fd_limit))
    with (
        errors.open("wb") as stderr,
        subprocess.Popen(  # noqa: PLW1509  (a resource limit, set before exec)
            [sys.executable, "-m", "cmi_sdk.cli", *argv],
            cwd=root,
            env=_environment(root, **settings),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=limit,
        ) as process,
    ):
        server = Server(process, port, health, errors)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                try:
                    if httpx.get(server.base + health, timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None, errors.read_text()
                assert time.monotonic() < deadline, errors.read_text()
                time.sleep(0.1)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


def _connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    """What the server sends until it closes the connection, or until ``deadline``."""
    received = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the server kept the connection open; it sent {received[:200]!r}")


def _drip(sock: socket.socket, head: bytes, body_size: int, seconds: float) -> tuple[bytes, float]:
    """Send ``head``, then one byte of a ``body_size``-byte body every 0.2 s for at most
    ``seconds``; return what the server answered and when (seconds after the head)."""
    sock.sendall(head)
    sent_at = time.monotonic()
    deadline = sent_at + seconds
    sock.settimeout(0.2)
    answer = b""
    for _ in range(body_size):
        if time.monotonic() > deadline:
            break
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            chunk = None
        if chunk is not None:
            answer += chunk
            break
        try:
            sock.sendall(b"x")
        except (BrokenPipeError, ConnectionResetError):
            break
    elapsed = time.monotonic() - sent_at
    with contextlib.suppress(AssertionError):
        answer += _read_until_closed(sock, time.monotonic() + 3)
    return answer, elapsed


def _status(answer: bytes) -> int:
    found = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert found is not None, answer[:200]
    return int(found[1])


def _problem(answer: bytes) -> dict[str, object]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/problem+json" in head.lower(), head
    problem: dict[str, object] = json.loads(body)
    return problem


# -- slow clients ----------------------------------------------------------------------------

BODY_TIMEOUT = 1.5
HEADER_TIMEOUT = 1.5


@pytest.mark.parametrize("kind", ["serve", "listen"])
def test_a_dripped_body_gets_408_within_the_deadline_and_its_connection_closes(
    tmp_path: Path, kind: str
) -> None:
    # Today: 1 byte a second keeps the request, and its slot, open for as long as the
    # client likes.
    target = "/cmi/requests" if kind == "serve" else "/inbox"
    head = (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/xml\r\n"
        "Content-Length: 500\r\n\r\n"
    ).encode()
    with cmi_server(
        kind, tmp_path, body_timeout=str(BODY_TIMEOUT), header_timeout=str(HEADER_TIMEOUT)
    ) as server:
        with _connect(server.port) as sock:
            answer, elapsed = _drip(sock, head, 500, seconds=BODY_TIMEOUT + 6)
        assert answer, f"no answer after {elapsed:.1f} s of dripping"
        assert _status(answer) == 408
        assert _problem(answer)["type"] == "urn:cmi:problem:request-timeout"
        assert b"connection: close" in answer.lower()
        assert BODY_TIMEOUT - 0.2 < elapsed < BODY_TIMEOUT + 1.5
        # The slot is free: the server answers the next client at once.
        assert httpx.get(server.base + server.health, timeout=3).status_code == 200


@pytest.mark.parametrize("kind", ["serve", "listen"])
@pytest.mark.parametrize("sent", [b"", b"POST /cmi/requ", b"GET / HTTP/1.1\r\nHost: x\r\n"])
def test_a_request_whose_head_does_not_arrive_is_closed_after_the_header_deadline(
    tmp_path: Path, kind: str, sent: bytes
) -> None:
    # Today: half a request line (or nothing at all) holds a connection for ever.
    with cmi_server(kind, tmp_path, header_timeout=str(HEADER_TIMEOUT)) as server:
        with _connect(server.port) as sock:
            started = time.monotonic()
            sock.sendall(sent)
            _read_until_closed(sock, started + HEADER_TIMEOUT + 3)
            assert time.monotonic() - started > HEADER_TIMEOUT - 0.2


@pytest.mark.parametrize("kind", ["serve", "listen"])
def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout(
    tmp_path: Path, kind: str
) -> None:
    with cmi_server(kind, tmp_path, keep_alive_timeout="1") as server:
        with _connect(server.port) as sock:
            sock.sendall(f"GET {server.health} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            started = time.monotonic()
            answer = _read_until_closed(sock, started + 5)
            assert _status(answer) == 200
            assert 0.8 < time.monotonic() - started < 3


IDLE = 300


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX resource limits")
@pytest.mark.parametrize("kind", ["serve", "listen"])
def test_idle_connections_past_the_descriptor_budget_do_not_stop_a_legitimate_request(
    tmp_path: Path, kind: str
) -> None:
    # Today: with `ulimit -n` at 256, 300 connections that send nothing stop the server:
    # it cannot accept another one, and a real client waits for ever.
    with cmi_server(kind, tmp_path, fd_limit=256, header_timeout="20") as server:
        idle: list[socket.socket] = []
        try:
            for _ in range(IDLE):
                idle.append(_connect(server.port))
            started = time.monotonic()
            response = httpx.get(server.base + server.health, timeout=5)
            assert response.status_code == 200
            assert time.monotonic() - started < 3
        finally:
            for sock in idle:
                sock.close()


@pytest.mark.parametrize("kind", ["serve", "listen"])
def test_idle_connections_past_the_connection_limit_yield_to_a_legitimate_request(
    tmp_path: Path, kind: str
) -> None:
    # Over the limit, the longest-idle connection that has not sent its head is closed to
    # make room: a client that sends its request at once is answered.
    with cmi_server(kind, tmp_path, max_connections="50", header_timeout="20") as server:
        idle: list[socket.socket] = []
        try:
            for _ in range(200):
                idle.append(_connect(server.port))
            for _ in range(3):
                response = httpx.get(server.base + server.health, timeout=5)
                assert response.status_code == 200
            # Everything over the limit was closed by the server, the oldest first.
            closed = 0
            for sock in idle:
                sock.settimeout(0.05)
                with contextlib.suppress(TimeoutError):
                    if sock.recv(1) == b"":
                        closed += 1
            assert closed >= len(idle) - 50
        finally:
            for sock in idle:
                sock.close()


def test_idle_connections_are_all_closed_by_the_server_after_the_header_deadline(
    tmp_path: Path,
) -> None:
    with cmi_server("listen", tmp_path, header_timeout=str(HEADER_TIMEOUT)) as server:
        idle = [_connect(server.port) for _ in range(100)]
        try:
            deadline = time.monotonic() + HEADER_TIMEOUT + 4
            for sock in idle:
                _read_until_closed(sock, deadline)
        finally:
            for sock in idle:
                sock.close()
