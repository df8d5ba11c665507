"""Which HTTP client the delivery engine sends with: candidates measured in one run.

Usage::

    python bench/transports.py            # 3,000 POSTs per candidate, 3 rounds
    python bench/transports.py --quick    # 400 POSTs, 1 round

Each candidate posts the same ~1 KB body to the stores of a :mod:`receivers` process
(100 loopback origins, immediate 204 answers, then 20 ms answers), with 64 requests in
flight spread across the origins, one connection per origin, as the delivery engine
does. Printed per candidate: requests a second (best round) and the sender's CPU per
request (``time.process_time``, this process only). Rounds alternate between candidates so
a busy machine slows all of them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import aiohttp
import httpx

try:  # only for the comparison: pip install httpx-aiohttp
    import httpx_aiohttp
except ImportError:  # pragma: no cover
    httpx_aiohttp = None

from receivers import store_addresses

HERE = Path(__file__).resolve().parent
BODY = b"<ticket>" + b"x" * 1000 + b"</ticket>"
HEADERS = {"content-type": "application/xml", "webhook-id": "msg_bench"}

Post = Callable[[str], Awaitable[int]]


def free_port() -> int:
    """A port free on 127.0.0.2 now (the receivers take it on every address)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.2", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def receivers(port: int, stores: int, delay: float, hang: int = 0) -> Iterator[list[str]]:
    """A receiver process on ``stores`` (+ ``hang``) loopback addresses; yields their URLs.
    ``port`` 0 picks a free one."""
    port = port or free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, str(HERE / "receivers.py"), "--port", str(port)),
            *("--stores", str(stores), "--delay", str(delay), "--hang", str(hang)),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            raise SystemExit("the receivers did not start")
        yield [f"http://{a}:{port}/inbox" for a in store_addresses(stores + hang)]
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


async def drive(post: Post, urls: Sequence[str], count: int, in_flight: int) -> int:
    """``count`` POSTs, ``in_flight`` at once, each task to its own origins in turn."""
    per_task = count // in_flight

    async def lane(index: int) -> None:
        for i in range(per_task):
            status = await post(urls[(index + i * in_flight) % len(urls)])
            if status != 204:
                raise SystemExit(f"answer {status}")

    await asyncio.gather(*(lane(i) for i in range(in_flight)))
    return per_task * in_flight


async def httpx_default(urls: Sequence[str], count: int, in_flight: int) -> int:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=len(urls))
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:

        async def post(url: str) -> int:
            return (await client.post(url, content=BODY, headers=HEADERS)).status_code

        return await drive(post, urls, count, in_flight)


async def httpx_over_aiohttp(urls: Sequence[str], count: int, in_flight: int) -> int:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=1)
    session = aiohttp.ClientSession(connector=connector)
    transport = httpx_aiohttp.AiohttpTransport(client=session)
    async with httpx.AsyncClient(transport=transport, trust_env=False) as client:

        async def post(url: str) -> int:
            return (await client.post(url, content=BODY, headers=HEADERS)).status_code

        done = await drive(post, urls, count, in_flight)
    await session.close()
    return done


async def aiohttp_one_session(urls: Sequence[str], count: int, in_flight: int) -> int:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=1)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(url: str) -> int:
            async with session.post(url, data=BODY, headers=HEADERS) as response:
                await response.read()
                return response.status

        return await drive(post, urls, count, in_flight)


async def aiohttp_per_origin(urls: Sequence[str], count: int, in_flight: int) -> int:
    sessions = {url: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for url in urls}

    async def post(url: str) -> int:
        async with sessions[url].post(url, data=BODY, headers=HEADERS) as response:
            await response.read()
            return response.status

    try:
        return await drive(post, urls, count, in_flight)
    finally:
        for session in sessions.values():
            await session.close()


CANDIDATES: dict[str, Callable[[Sequence[str], int, int], Awaitable[int]]] = {
    "httpx_asyncclient": httpx_default,
    "httpx_aiohttp_transport": httpx_over_aiohttp,
    "aiohttp_one_session": aiohttp_one_session,
    "aiohttp_session_per_origin": aiohttp_per_origin,
}


if httpx_aiohttp is None:
    del CANDIDATES["httpx_aiohttp_transport"]


def measure(urls: Sequence[str], count: int, in_flight: int, rounds: int) -> dict[str, tuple]:
    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        for name, candidate in CANDIDATES.items():
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            done = asyncio.run(candidate(urls, count, in_flight))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            rate, per = done / wall, cpu / done * 1e6
            if name not in best or rate > best[name][0]:
                best[name] = (rate, per)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--port", type=int, default=0, help="default: a free one")
    args = parser.parse_args(argv)
    count, rounds = (400, 1) if args.quick else (3000, 3)
    for delay in (0.0, 0.02):
        with receivers(args.port, 100, delay) as urls:
            for name, (rate, per) in measure(urls, count, 64, rounds).items():
                print(
                    f"transport_{name}_delay{int(delay * 1000)}ms: {rate:,.0f} requests/s,"
                    f" {per:,.0f} us CPU/request",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
