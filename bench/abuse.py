"""Slow and idle clients against ``cmi serve`` and ``cmi listen``, as the commands run.

Usage::

    python bench/abuse.py serve             # or: listen
    python bench/abuse.py serve --code DIR  # the same against another checkout's cmi_sdk

Prints one line per attack: a body dripped at 1 byte/s, half a request line, 1,100 idle
connections then a legitimate request, and 300 idle connections under ``ulimit -n 256``.
Loopback only; every server and socket is closed before the next attack, and each attack is
bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from receivers import free_port

from cmi_sdk.webhooks import generate_secret

SECRET = generate_secret()


@contextlib.contextmanager
def server(
    kind: str, code: str | None, fd_limit: int | None = None, **settings: str
) -> Iterator[tuple[int, str, int]]:
    """Run the command on a free port; yield the port, its health route and its pid."""
    root = tempfile.mkdtemp(prefix="cmi-abuse-")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMI_")}
    env["CMI_DATABASE_URL"] = f"sqlite:///{root}/cmi.db"
    env.update({f"CMI_{k.upper()}": v for k, v in settings.items()})
    if code:
        env["PYTHONPATH"] = code
    if kind == "serve":
        argv, health = ["serve", "--port", str(port)], "/.well-known/cmi"
    else:
        argv = ["listen", "--port", str(port), "--store", "store"]
        env["CMI_DESTINATION_SECRET"] = SECRET  # never on a command line
        # A checkout from before the command line became a package keeps it in cli.py.
        single_file = Path(code or ".", "cmi_sdk", "cli.py")
        if code and single_file.is_file() and "--secret-file" not in single_file.read_text():
            argv += ["--secret", SECRET]  # a checkout from before secrets left the argv
        health = "/health"
    command = [sys.executable, "-m", "cmi_sdk.cli", *argv]
    if fd_limit:
        command = [
            sys.executable,
            "-c",
            (
                "import resource, runpy, sys\n"
                "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({fd_limit}, hard))\n"
                f"sys.argv = ['cmi', *{argv!r}]\n"
                "runpy.run_module('cmi_sdk.cli', run_name='__main__')\n"
            ),
        ]
    process = subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}{health}", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"cmi {kind} did not start")
            time.sleep(0.1)
        yield port, health, process.pid
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def drip(kind: str, port: int, limit: float) -> str:
    """Send a head announcing 1,000 bytes, then a byte a second."""
    target = "/cmi/requests" if kind == "serve" else "/inbox"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/xml\r\n"
            "Content-Length: 1000\r\n\r\n".encode()
        )
        started = time.monotonic()
        sock.settimeout(1.0)
        while time.monotonic() - started < limit:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                sock.sendall(b"x")
                continue
            status = data.split(b"\r\n", 1)[0].decode()
            return f"answered {status!r} after {time.monotonic() - started:.2f} s"
    return f"no answer after {limit:.0f} s (still open)"


def half_line(port: int, limit: float) -> str:
    """Send half a request line and wait."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /cmi/requ")
        started = time.monotonic()
        sock.settimeout(limit)
        try:
            sock.recv(100)
        except TimeoutError:
            return f"still open after {limit:.0f} s"
        return f"closed by the server after {time.monotonic() - started:.2f} s"


def head_flood(port: int, health: str, limit: int) -> str:
    """Send header lines as fast as the server takes them, up to ``limit`` bytes."""
    line = b"X-Filler: " + b"a" * 8000 + b"\r\n"
    sent = 0
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET {health} HTTP/1.1\r\nHost: x\r\n".encode())
        try:
            while sent < limit and time.monotonic() - started < 10:
                sock.sendall(line * 100)
                sent += len(line) * 100
        except (BrokenPipeError, ConnectionResetError):
            return f"the server closed after {sent / 1e6:.1f} MB"
    return f"{sent / 1e6:.0f} MB taken in {time.monotonic() - started:.1f} s"


def _rss(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def idle_then_request(port: int, health: str, count: int) -> str:
    """Open ``count`` connections that send nothing, then make one real request."""
    idle: list[socket.socket] = []
    refused = 0
    for _ in range(count):
        try:
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        except OSError:
            refused += 1
    started = time.monotonic()
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}{health}", timeout=5)
        took = 1000 * (time.monotonic() - started)
        legit = f"a legitimate GET: {answer.status_code} in {took:.0f} ms"
    except httpx.HTTPError as exc:
        legit = f"a legitimate GET failed: {type(exc).__name__}"
    time.sleep(0.5)
    held = 0
    for sock in idle:
        sock.setblocking(False)  # noqa: FBT003  (the socket API)
        try:
            if sock.recv(1) == b"":
                continue
        except BlockingIOError:
            held += 1
        except OSError:
            continue
    for sock in idle:
        sock.close()
    return f"{count} idle ({refused} refused): {legit}; held by the server: {held}"


def main() -> None:
    """Run every attack against one command."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["serve", "listen"])
    parser.add_argument("--code", metavar="DIR", help="run another checkout's cmi_sdk")
    args = parser.parse_args()
    short = {"body_timeout": "5", "header_timeout": "3"}
    with server(args.kind, args.code, **short) as (port, _health, _pid):
        print("body at 1 byte/s (CMI_BODY_TIMEOUT=5):", drip(args.kind, port, 15))
        print("half a request line (CMI_HEADER_TIMEOUT=3):", half_line(port, 15))
    with server(args.kind, args.code) as (port, health, pid):
        print("defaults:", idle_then_request(port, health, 1100))
        before = _rss(pid)
        flood = head_flood(port, health, 200_000_000)
        print(f"header lines, 200 MB at most: {flood}; server RSS {before} -> {_rss(pid)}")
    with server(args.kind, args.code, fd_limit=256) as (port, health, _pid):
        print("ulimit -n 256:", idle_then_request(port, health, 300))


if __name__ == "__main__":
    main()
