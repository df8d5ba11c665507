"""Builders of real objects the tests share: a signer, an emitting adapter on its own
store, the seed's ticket, registered terms, links, an app served on loopback. The fakes
(a clock, a tiny airline, a failing wrapper) are in ``tests/fakes.py``."""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cmi_sdk import (
    Adapter,
    EgressGuard,
    Link,
    SharingTerms,
    TermsProposal,
    Transaction,
    load_model,
)
from cmi_sdk._serving import serving
from cmi_sdk.outbox.sqlite import SQLiteStore
from cmi_sdk.signing import DocumentSigner, self_signed_certificate
from cmi_sdk.testing import link_customer
from cmi_sdk.webhooks import generate_secret

ROOT = Path(__file__).resolve().parent.parent
CUSTOMER = "cust-7f3a9c"


@functools.cache
def signer() -> DocumentSigner:
    """One ECDSA P-256 signer for the whole run (key generation is the slow part)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return DocumentSigner(key=key, certificate=self_signed_certificate(key, common_name="firm"))


def emitting_adapter(tmp_path: Path, **options: Any) -> Adapter:
    """An adapter with its own SQLite store in ``tmp_path``, signing, loopback allowed."""
    options.setdefault("store", SQLiteStore(tmp_path / "cmi.db"))
    options.setdefault("signer", signer())
    options.setdefault("egress", EgressGuard(allow_loopback=True))
    options.setdefault("firm", "delta.com")
    return Adapter(**options)


def ticket(**changes: Any) -> Transaction:
    """The seed's ticket as a transaction, with ``changes`` applied (validated)."""
    data = load_model(Transaction, (ROOT / "examples" / "ticket.json").read_text()).model_dump()
    data.update(changes)
    return Transaction.model_validate(data)


def register(adapter: Adapter, *, intermediary: str | None = None, **fields: Any) -> SharingTerms:
    """Register terms (accepted as proposed, or the test fails) and return them; with
    ``intermediary``, as that intermediary proffers them (for its own reference)."""
    data: dict[str, Any] = {
        "customer_ref": CUSTOMER,
        "destination": "http://127.0.0.1:9/inbox",
        "secret": generate_secret(),
        "standard": "cmi-ticket",
        "purpose": {"code": "records", "text": "Keep my travel records"},
    }
    data.update(fields)
    decision = adapter.propose_terms(TermsProposal.model_validate(data), intermediary=intermediary)
    assert decision.outcome == "accepted", decision.reason
    assert decision.terms is not None
    return decision.terms


def link(adapter: Adapter, account: str, intermediary: str) -> Link:
    """Link ``account`` to ``intermediary`` as a customer does (a code, redeemed)."""
    return link_customer(adapter, account, intermediary)


@contextlib.contextmanager
def serve_app(app: Any, *, timeout: float = 10.0) -> Iterator[str]:
    """Serve any ASGI app on a free loopback port; yield its base URL, ending in ``/``."""
    with serving(app, timeout=timeout) as url:
        yield url + "/"


def cli_env(database_url: str, **settings: str) -> dict[str, str]:
    """The environment of a ``cmi`` process a test starts: this one's without its own
    ``CMI_`` settings and ``PYTHONPATH``, the store at ``database_url``, loopback
    destinations allowed, this checkout importable, and ``settings`` as ``CMI_<NAME>``
    (``lease_seconds="1"`` is ``CMI_LEASE_SECONDS=1``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CMI_", "PYTHONPATH"))}
    env |= {"CMI_DATABASE_URL": database_url, "CMI_ALLOW_LOOPBACK": "1", "PYTHONPATH": str(ROOT)}
    env |= {f"CMI_{name.upper()}": value for name, value in settings.items()}
    return env


def accept_in_thread(
    listener: socket.socket,
    handle: Callable[[socket.socket], None],
    *,
    stopping: Callable[[], bool],
    accepted: Callable[[], None] = lambda: None,
    seconds: float = 60.0,
) -> tuple[threading.Thread, list[threading.Thread]]:
    """Accept connections on ``listener`` in a thread of its own, each ``handle``d in a
    thread, until ``stopping()`` or for ``seconds`` at most; ``accepted`` is called as each
    comes. Returns the acceptor and the list of handlers (which grows as they start)."""
    listener.settimeout(0.05)
    handlers: list[threading.Thread] = []

    def serve() -> None:
        deadline = time.monotonic() + seconds
        while not stopping() and time.monotonic() < deadline:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted()
            handler = threading.Thread(target=handle, args=(conn,), daemon=True)
            handlers.append(handler)
            handler.start()

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    return acceptor, handlers


@dataclass
class Certificate:
    """A TLS server's certificate and key files."""

    cert: Path
    key: Path

    def trusted(self) -> ssl.SSLContext:
        """A client context that trusts this certificate alone, names verified."""
        return ssl.create_default_context(cafile=str(self.cert))


def certificate(folder: Path, name: str) -> Certificate:
    """A self-signed certificate for the host ``name`` (its own authority), and its key,
    written into ``folder``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths = Certificate(folder / f"{name}.pem", folder / f"{name}.key")
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths
