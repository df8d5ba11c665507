"""Which HTTP client the delivery engine sends with: candidates measured in one run.

Usage::

    python bench/transports.py              # 3,000 POSTs per candidate, 3 rounds
    python bench/transports.py --quick      # 400 POSTs, 1 round
    python bench/transports.py http2        # only the HTTP/2 comparison (or only http1)

Each candidate posts the same ~1 KB body to the stores of a :mod:`receivers` process
(100 loopback origins, immediate 204 answers, then 20 ms answers), with 64 requests in
flight spread across the origins, one connection per origin, as the delivery engine
does. Printed per candidate: requests a second (best round) and the sender's CPU per
request (``time.process_time``, this process only). Rounds alternate between candidates so
a busy machine slows all of them alike.

``http2`` compares HTTP/2 (httpx with ``http2=True``: httpx is already a dependency, and
aiohttp's client speaks HTTP/1.1 only) with the engine's aiohttp HTTP/1.1 on the same stores
(a :mod:`receivers_h2` process, which speaks both): in clear text (HTTP/2 with prior
knowledge, so that no TLS cost blurs the protocols) and over TLS (a certificate made for the
run; the client's ALPN offer picks the protocol, as on the internet), each with one request
at a time per store (100 stores, 64 in flight) and multiplexed (10 stores, 10 in flight
each: 10 streams on one HTTP/2 connection against 10 HTTP/1.1 connections). httpx runs with
one client for all stores, and with a client per store (which leaves out its pool's scan of
every connection, to see HTTP/2 itself). It needs the ``h2`` package (``pip install
'httpx[http2]'``); without it that part is skipped, with a message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import gc
import importlib.util
import ipaddress
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import aiohttp
import httpx

try:  # only for the comparison: pip install httpx-aiohttp
    import httpx_aiohttp
except ImportError:  # pragma: no cover
    httpx_aiohttp = None

try:  # only for the HTTP/2 comparison: pip install 'httpx[http2]'
    import h2
except ImportError:  # pragma: no cover
    h2 = None

from receivers import free_port, store_addresses

HERE = Path(__file__).resolve().parent
BODY = b"<ticket>" + b"x" * 1000 + b"</ticket>"
HEADERS = {"content-type": "application/xml", "webhook-id": "msg_bench"}

Post = Callable[[str], Awaitable[int]]


@contextlib.contextmanager
def receivers(
    port: int,
    stores: int,
    delay: float,
    hang: int = 0,
    *,
    http2: bool = False,
    tls: Path | None = None,
) -> Iterator[list[str]]:
    """A receiver process on ``stores`` (+ ``hang``) loopback addresses; yields their URLs.
    ``port`` 0 picks a free one. ``http2``: the stores of :mod:`receivers_h2` (no ``hang``),
    over TLS with the certificate and key in the folder ``tls`` if given."""
    port = port or free_port("127.0.0.2")
    if http2:
        script = ["receivers_h2.py"]
        if tls is not None:
            script += ["--cert", str(tls / "store.pem"), "--key", str(tls / "store.key")]
    else:
        script = ["receivers.py", "--hang", str(hang)]
    script[0] = str(HERE / script[0])
    script += ["--port", str(port), "--stores", str(stores), "--delay", str(delay)]
    process = subprocess.Popen([sys.executable, *script], stdout=subprocess.PIPE)
    scheme = "https" if tls is not None else "http"
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            raise SystemExit("the receivers did not start")
        yield [f"{scheme}://{a}:{port}/inbox" for a in store_addresses(stores + hang)]
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


# HTTP/2 against the engine's HTTP/1.1, on the same stores. ``tls``: the client's context
# (None in clear text); ``per_store``: connections (HTTP/1.1) or streams (HTTP/2) at once.


async def aiohttp_http1(
    urls: Sequence[str], count: int, in_flight: int, *, tls: ssl.SSLContext | None, per_store: int
) -> int:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=per_store, ssl=tls or True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(url: str) -> int:
            async with session.post(url, data=BODY, headers=HEADERS) as response:
                await response.read()
                if response.version != aiohttp.HttpVersion11:
                    raise SystemExit(f"aiohttp spoke HTTP/{response.version}")
                return response.status

        return await drive(post, urls, count, in_flight)


async def httpx_http2(
    urls: Sequence[str], count: int, in_flight: int, *, tls: ssl.SSLContext | None, per_store: int
) -> int:
    # One connection per origin, its streams multiplexed (httpcore waits for the connection
    # being opened instead of opening another); in clear text, HTTP/2 with prior knowledge.
    del per_store
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=len(urls))
    if tls is None:
        transport = httpx.AsyncHTTPTransport(http1=False, http2=True, limits=limits)
    else:
        transport = httpx.AsyncHTTPTransport(http2=True, verify=tls, limits=limits)
    async with httpx.AsyncClient(transport=transport, trust_env=False) as client:

        async def post(url: str) -> int:
            response = await client.post(url, content=BODY, headers=HEADERS)
            if response.http_version != "HTTP/2":
                raise SystemExit(f"httpx spoke {response.http_version}")
            return response.status_code

        return await drive(post, urls, count, in_flight)


async def httpx_http2_client_per_store(
    urls: Sequence[str], count: int, in_flight: int, *, tls: ssl.SSLContext | None, per_store: int
) -> int:
    # A client per origin: the pool of each holds one connection, so what is measured is
    # HTTP/2 itself (httpcore and h2), not httpx's scan of a pool of many connections.
    del per_store
    context = tls or ssl.create_default_context()  # one for all (unused in clear text)
    clients = {
        url: httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(http1=tls is not None, http2=True, verify=context),
            trust_env=False,
        )
        for url in urls
    }

    async def post(url: str) -> int:
        response = await clients[url].post(url, content=BODY, headers=HEADERS)
        if response.http_version != "HTTP/2":
            raise SystemExit(f"httpx spoke {response.http_version}")
        return response.status_code

    try:
        return await drive(post, urls, count, in_flight)
    finally:
        for client in clients.values():
            await client.aclose()


HTTP2_CANDIDATES = {
    "aiohttp_http1": aiohttp_http1,
    "httpx_http2": httpx_http2,
    "httpx_http2_client_per_store": httpx_http2_client_per_store,
}


def certificate(folder: Path, addresses: Sequence[str]) -> None:
    """A CA (``ca.pem``) and a store certificate for every address (``store.pem``,
    ``store.key``), ECDSA P-256, valid for a day: what the TLS stores serve and the client
    verifies, as the engine does."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cmi-sdk bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    store = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench store")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address(a)) for a in addresses]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "store.pem").write_bytes(store.public_bytes(pem))
    (folder / "store.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def measure(
    urls: Sequence[str],
    count: int,
    in_flight: int,
    rounds: int,
    candidates: dict[str, Callable[[Sequence[str], int, int], Awaitable[int]]] | None = None,
) -> dict[str, tuple]:
    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        for name, candidate in (candidates or CANDIDATES).items():
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
    parser.add_argument("parts", nargs="*", choices=["http1", "http2", []], metavar="PART")
    args = parser.parse_args(argv)
    parts = args.parts or ["http1", "http2"]
    count, rounds = (400, 1) if args.quick else (3000, 3)
    if "http1" in parts:
        for delay in (0.0, 0.02):
            with receivers(args.port, 100, delay) as urls:
                for name, (rate, per) in measure(urls, count, 64, rounds).items():
                    report(f"transport_{name}_delay{int(delay * 1000)}ms", rate, per)
    if "http2" in parts:
        if h2 is None:
            print("http2: skipped, the h2 package is missing (pip install 'httpx[http2]')")
        else:
            http2(args.port, count, rounds)
    return 0


def report(name: str, rate: float, per: float) -> None:
    print(f"{name}: {rate:,.0f} requests/s, {per:,.0f} us CPU/request", flush=True)


def http2(port: int, count: int, rounds: int) -> None:
    """HTTP/2 against aiohttp's HTTP/1.1: clear text and TLS, one request at a time per
    store and ten."""
    if importlib.util.find_spec("sniffio") is None:
        # httpcore imports sniffio each time it makes a lock (several a request): without it,
        # each is a failed import, a search of sys.path, which httpx's figures then include.
        print("http2: sniffio is not installed, httpx pays for a failed import per lock")
    with tempfile.TemporaryDirectory() as folder:
        certificate(Path(folder), store_addresses(100))
        for scheme in ("h2c", "tls"):
            tls = Path(folder) if scheme == "tls" else None
            for stores, per_store in ((100, 1), (10, 10)):
                in_flight = 64 if per_store == 1 else stores * per_store
                for delay in (0.0, 0.02):
                    with receivers(port, stores, delay, http2=True, tls=tls) as urls:
                        candidates = {
                            name: functools.partial(
                                candidate,
                                tls=client_context(tls / "ca.pem") if tls else None,
                                per_store=per_store,
                            )
                            for name, candidate in HTTP2_CANDIDATES.items()
                        }
                        best = measure(urls, count, in_flight, rounds, candidates)
                    for name, (rate, per) in best.items():
                        label = (
                            f"{scheme}_{stores}stores_{per_store}each_delay{int(delay * 1000)}ms"
                        )
                        report(f"http2_{label}_{name}", rate, per)


def client_context(ca: Path) -> ssl.SSLContext:
    """A verifying client context that trusts the run's CA (a new one per client: httpx sets
    its ALPN offer on the context it is given)."""
    return ssl.create_default_context(cafile=str(ca))


if __name__ == "__main__":
    sys.exit(main())
