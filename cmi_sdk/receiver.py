"""A customer's store: the receiving end of the documents a firm sends.

:class:`CustomerStore` is a small ASGI application (Starlette) that accepts Standard Webhooks
deliveries of XML documents and keeps each one as a file. It is what ``cmi listen`` runs,
and what the SDK's own tests and demos deliver to; a real store can start from it.

A delivery is ``POST`` to any path (so a destination such as ``http://127.0.0.1:8000/inbox``
works) and is checked in this order, the cheapest and least trusting checks first:

1. the body is at most ``max_bytes`` (413), judged from ``Content-Length`` before any of it
   is read and counted again while it streams in, and arrives within ``body_timeout``
   seconds of the request's head (408, and the connection is closed);
2. the ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers verify over
   the exact body with one of the store's secrets, inside the timestamp tolerance (401);
3. the ``webhook-id`` can name a file on any system: 1 to 128 of ``A-Z a-z 0-9 _ -`` and
   not a Windows device name such as ``CON`` or ``NUL`` (400); the SDK's own ids are
   ``msg_`` and 32 hex digits;
4. the ``Content-Type`` is ``application/xml``, or ``application/x-ofx`` for OFX (OFX 2's
   XML, or OFX 1's SGML), parameters allowed (415);
5. a detached signature, when the delivery carries one (the ``cmi-document-signature``
   header: the signature document in base64, for a standard with no place for a signature
   inside the document, OFX), is a well-formed signature (422);
6. with the firm's certificate configured, the document's signature verifies against it
   (422): the detached one over the body's exact bytes, or else the enveloped XML-DSig
   inside the document, which must carry nothing the signature does not cover (no
   comment, no processing instruction inside or after the root). What is stored is then
   exactly what was verified. A document with neither is refused: "this document is not
   signed".

Then ``DIR/<webhook-id>.json`` (what was received, and when), ``DIR/<webhook-id>.xml``
(``.ofx`` for OFX: the body, byte for byte, under the name the customer's software opens)
and, for a detached signature, ``DIR/<webhook-id>.ofx.sig`` (the signature document, which
``cmi verify`` finds beside the document) are written, and the answer is 200. A
``webhook-id`` whose document is already there is a duplicate: the answer is 200 and
nothing is rewritten, so a sender that retries after a lost answer does no harm.

Every refusal is an RFC 9457 ``application/problem+json`` object with ``type``, ``title``,
``status`` and ``detail``; the types are stable URIs:

==========================================  ======  ===================================
``type``                                    status  meaning
==========================================  ======  ===================================
``urn:cmi:problem:bad-request``             400     unreadable ``Content-Length`` or body
``urn:cmi:problem:invalid-webhook-id``      400     the id cannot be a file name
``urn:cmi:problem:unauthorized``            401     the webhook signature does not verify
``urn:cmi:problem:method-not-allowed``      405     not ``POST`` (nor ``GET /health``)
``urn:cmi:problem:request-timeout``         408     the body did not arrive in time
``urn:cmi:problem:too-large``               413     the body is over ``max_bytes``
``urn:cmi:problem:unsupported-media-type``  415     not ``application/xml`` (or OFX)
``urn:cmi:problem:document-signature``      422     the XML-DSig does not verify, or
                                                    there is none
``urn:cmi:problem:refused-xml``             422     the hardened parser refuses the XML
``urn:cmi:problem:header-too-large``        431     the head is over the server's cap
``urn:cmi:problem:storage-unavailable``     503     the files could not be written
``urn:cmi:problem:internal-error``          500     a bug in the receiver
==========================================  ======  ===================================

A 4xx answer is permanent: sending the same bytes again gets the same answer, so a sender
should give up on them rather than retry (a 401 for a stale timestamp is cured by signing
again with a fresh one, and a 408 by sending faster; this store never sends 429). 422 in
particular means the document itself is bad: signed by someone else, or changed after
signing, so no number of retries can succeed. 5xx answers are worth retrying later.

One store (one process) per directory: deduplication is guarded by a lock inside the
process, not by a lock on the directory.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Final

import uvicorn
from cryptography import x509
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.config import LOGGING_CONFIG

from cmi_sdk._exceptions import ConfigurationError, SignatureVerificationError, XMLInputError
from cmi_sdk._files import PRIVATE_FILE, private_directory, replace_file, warn_if_shared
from cmi_sdk._serving import (
    DEFAULT_BODY_TIMEOUT,
    BodyTimeoutError,
    ClientGoneError,
    ServerLimits,
    client_text,
    read_body,
    server_config,
)
from cmi_sdk._xml import DEFAULT_MAX_BYTES
from cmi_sdk.signing import DETACHED_SIGNATURE_HEADER, verify_detached, verify_document
from cmi_sdk.webhooks import DEFAULT_TOLERANCE, WebhookVerifier

__all__ = [
    "CustomerStore",
    "StoredDocument",
    "format_line",
    "running",
    "serve",
]

_log = logging.getLogger(__name__)

# fullmatch, not ^...$: '$' also matches before a trailing newline.
_SAFE_ID: Final = re.compile(r"[A-Za-z0-9_\-]{1,128}")
# Windows opens a device for these whatever the extension ("NUL.xml"); no firm sends them.
_DEVICE: Final = re.compile(r"(?i)(con|prn|aux|nul|com[0-9]|lpt[0-9])")
_DIGITS: Final = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() takes '²' too

_WEBHOOK_HEADERS: Final = ("webhook-id", "webhook-timestamp", "webhook-signature")

# The media types a document may come as, and the extension it is kept under.
_EXTENSIONS: Final = {"application/xml": "xml", "application/x-ofx": "ofx"}
# A detached signature is about 1.5 KB; a header far past that is no signature of ours.
_MAX_SIGNATURE_HEADER: Final = 16 * 1024

# slug -> (status, title). A problem type's title never varies (RFC 9457, section 3.1.3);
# the detail says what happened this time.
_PROBLEMS: Final[dict[str, tuple[int, str]]] = {
    "bad-request": (400, "Malformed request"),
    "invalid-webhook-id": (400, "The webhook-id cannot name a stored document"),
    "unauthorized": (401, "The webhook signature does not verify"),
    "method-not-allowed": (405, "Method not allowed"),
    "request-timeout": (408, "The request's body did not arrive in time"),
    "too-large": (413, "The document is too large"),
    "unsupported-media-type": (415, "Documents must be sent as application/xml or OFX"),
    "document-signature": (422, "The document's XML signature does not verify"),
    "refused-xml": (422, "The document is refused by the hardened XML parser"),
    "internal-error": (500, "The receiver failed"),
    "storage-unavailable": (503, "The document could not be stored"),
}

_SHUTDOWN_SECONDS: Final = 5  # in-flight deliveries get this long to finish on shutdown


@dataclass(frozen=True, slots=True)
class StoredDocument:
    """One accepted delivery, as handed to ``on_document``.

    :ivar webhook_id: the delivery's ``webhook-id``, also the stored files' name.
    :ivar path: the stored ``.xml`` (or ``.ofx``) file (for a duplicate: the one stored the
        first time); a detached signature is beside it, with ``.sig`` added.
    :ivar size: the size of this delivery's body, in bytes.
    :ivar received_at: when this delivery arrived (timezone-aware, UTC).
    :ivar signature_verified: ``True`` when the document's XML-DSig was verified against the
        firm's certificate, ``None`` when the store has no certificate to check it with.
        (Never ``False``: a document whose signature fails is refused, not stored.)
    :ivar duplicate: ``True`` when a document with this ``webhook-id`` was already stored,
        so nothing was written this time.
    """

    webhook_id: str
    path: Path
    size: int
    received_at: datetime.datetime
    signature_verified: bool | None
    duplicate: bool


def format_line(doc: StoredDocument) -> str:
    """The one line ``cmi listen`` prints for a delivery.

    For example ``stored msg_abc 812 bytes signature verified``, or
    ``duplicate msg_abc (already stored)``.

    :param doc: the delivery to describe.
    """
    if doc.duplicate:
        return f"duplicate {doc.webhook_id} (already stored)"
    if doc.signature_verified is None:
        check = "signature not checked"
    elif doc.signature_verified:
        check = "signature verified"
    else:
        check = "signature NOT verified"
    return f"stored {doc.webhook_id} {doc.size} bytes {check}"


def _problem(slug: str, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    status, title = _PROBLEMS[slug]
    return JSONResponse(
        {"type": f"urn:cmi:problem:{slug}", "title": title, "status": status, "detail": detail},
        status_code=status,
        headers=headers,
        media_type="application/problem+json",
    )


def _utc_text(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


class CustomerStore:
    """A customer's store: receives signed XML documents over Standard Webhooks, keeps them
    as files.

    Serve :attr:`app` with any ASGI server, or use :func:`serve` and :func:`running`.
    Files are created readable by their owner only.

    :param directory: where documents are kept; created if missing.
    :param secrets: the ``whsec_`` secrets a delivery may be signed with (several during a
        rotation).
    :param certificate: the firm's certificate, PEM. When given, every document's enveloped
        XML-DSig must verify against it (pinned), or the delivery is refused with 422.
    :param tolerance: the largest accepted distance between ``webhook-timestamp`` and now,
        in seconds.
    :param max_bytes: the largest accepted body, in bytes.
    :param body_timeout: seconds a delivery's body may take to arrive in full, from the end
        of its head; a slower one is answered 408 and its connection closed.
    :param on_document: called once per accepted delivery, duplicates included, after the
        files are on disk and before the sender gets its answer. It runs in a worker thread,
        one call at a time. An exception it raises is logged and otherwise ignored: the
        document is already stored, and failing the delivery would only make the sender
        send it again.
    :raises ConfigurationError: a secret or the certificate cannot be loaded, a limit is not
        positive, or the directory cannot be created.
    """

    def __init__(
        self,
        *,
        directory: str | Path,
        secrets: Sequence[str],
        certificate: bytes | None = None,
        tolerance: int = DEFAULT_TOLERANCE,
        max_bytes: int = DEFAULT_MAX_BYTES,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        on_document: Callable[[StoredDocument], None] | None = None,
    ) -> None:
        # A lone string is a Sequence[str] too; iterating it would give one-letter "secrets"
        # and a baffling error.
        if isinstance(secrets, str):
            raise ConfigurationError("secrets must be a list of whsec_ secrets, not one string")
        if max_bytes <= 0 or tolerance <= 0 or not 0 < body_timeout < math.inf:
            raise ConfigurationError("max_bytes, tolerance and body_timeout must be positive")
        self._body_timeout = body_timeout
        self._verifier = WebhookVerifier(secrets=tuple(secrets), tolerance=tolerance)
        self._certificate: x509.Certificate | None = None
        if certificate is not None:
            # Loaded now, so a bad file stops the store at startup instead of turning every
            # delivery into a 422.
            try:
                self._certificate = x509.load_pem_x509_certificate(certificate)
            except ValueError:
                raise ConfigurationError(
                    "the firm's certificate is not a PEM certificate"
                ) from None
        self._directory = Path(directory)
        try:
            # Documents are the customer's own records: nobody else on the machine reads
            # them, whatever the umask (an existing folder is the customer's to set).
            if self._directory.is_dir():
                warn_if_shared(self._directory, "the store's folder")
            else:
                private_directory(self._directory)
        except OSError as exc:
            raise ConfigurationError(f"cannot create {self._directory}: {exc}") from None
        self._max_bytes = max_bytes
        self._on_document = on_document
        # Held from the existence check to the last rename, so two deliveries of one id
        # (a retry racing the original) store it once.
        self._lock = threading.Lock()
        self._notify_lock = threading.Lock()
        self._app = Starlette(
            routes=[
                Route("/health", self._health, methods=["GET"]),
                Route("/{path:path}", self._deliver, methods=["POST"]),
            ],
            exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        )

    @property
    def directory(self) -> Path:
        """Where the documents are kept."""
        return self._directory

    @property
    def app(self) -> Starlette:
        """The ASGI application: ``POST`` any path to deliver, ``GET /health`` to check."""
        return self._app

    def documents(self) -> list[str]:
        """The ``webhook-id`` of every stored document, sorted by name (not by arrival)."""
        return sorted(
            path.stem
            for extension in _EXTENSIONS.values()
            for path in self._directory.glob(f"*.{extension}")
            if _SAFE_ID.fullmatch(path.stem) and path.is_file()
        )

    async def _health(self, _request: Request) -> Response:
        count = len(await run_in_threadpool(self.documents))
        return JSONResponse({"status": "ok", "documents": count})

    async def _deliver(self, request: Request) -> Response:
        received_at = datetime.datetime.now(datetime.UTC)
        try:
            body = await self._read_body(request)
            webhook_id = self._authenticate(request, body)
            content_type, extension = _check_content_type(request)
            detached = _detached_signature(request)
            verified = await self._verify_document(body, detached, extension)
        except _Refused as refused:
            # A body that did not arrive leaves the connection in an unknown state: close it.
            close = {"connection": "close"} if refused.slug == "request-timeout" else None
            return _problem(refused.slug, refused.detail, headers=close)
        headers = {name: request.headers[name] for name in _WEBHOOK_HEADERS}
        headers["content-type"] = content_type
        try:
            doc = await run_in_threadpool(
                self._accept,
                webhook_id,
                _Received(body, extension, detached),
                headers,
                received_at,
                verified,
            )
        except OSError as exc:
            _log.error("cannot store %s: %s", webhook_id, exc)
            return _problem("storage-unavailable", "the document could not be written; retry later")
        status = "duplicate" if doc.duplicate else "stored"
        return JSONResponse({"status": status, "webhook_id": webhook_id, "size": doc.size})

    async def _read_body(self, request: Request) -> bytes:
        too_large = _Refused("too-large", f"the body is larger than {self._max_bytes} bytes")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not _DIGITS.fullmatch(declared):
                raise _Refused("bad-request", "Content-Length is not a number")
            if int(declared) > self._max_bytes:
                raise too_large
        # Counted as well: a chunked body has no Content-Length to trust.
        try:
            return await read_body(request, max_bytes=self._max_bytes, timeout=self._body_timeout)
        except OverflowError:
            raise too_large from None
        except BodyTimeoutError as exc:
            _log.info("%s: %s, answered 408", client_text(request), exc)
            raise _Refused("request-timeout", str(exc)) from None
        except ClientGoneError as exc:
            # Nobody is left to read the answer: one line, no traceback.
            _log.info("%s: %s", client_text(request), exc)
            raise _Refused("bad-request", "the body ended before Content-Length") from None

    def _authenticate(self, request: Request, body: bytes) -> str:
        # A header sent twice could be read one way here and another way by whoever reads
        # the stored metadata; there is no honest reason to send one twice.
        if any(len(request.headers.getlist(name)) > 1 for name in _WEBHOOK_HEADERS):
            raise _Refused("unauthorized", "each webhook header must be sent once")
        try:
            webhook_id = self._verifier.verify(request.headers, body)
        except SignatureVerificationError as exc:
            raise _Refused("unauthorized", str(exc)) from None
        # Checked before the id comes near the file system: with '/' or '\' in it, the id
        # would name a file outside the directory.
        if not _SAFE_ID.fullmatch(webhook_id) or _DEVICE.fullmatch(webhook_id):
            raise _Refused(
                "invalid-webhook-id",
                "webhook-id must be 1 to 128 ASCII letters, digits, '_' or '-',"
                " and not a device name (CON, NUL, COM1, ...)",
            )
        return webhook_id

    async def _verify_document(
        self, body: bytes, detached: bytes | None, extension: str
    ) -> bool | None:
        if self._certificate is None:
            return None
        if detached is None and extension != "xml":
            raise _Refused(
                "document-signature",
                f"this document is not signed: its signature travels in the"
                f" {DETACHED_SIGNATURE_HEADER} header, and there is none",
            )
        try:
            if detached is not None:
                await run_in_threadpool(
                    verify_detached, body, detached, self._certificate, max_bytes=self._max_bytes
                )
            else:
                await run_in_threadpool(
                    verify_document, body, self._certificate, max_bytes=self._max_bytes
                )
        except SignatureVerificationError as exc:
            raise _Refused("document-signature", str(exc)) from None
        except XMLInputError as exc:
            raise _Refused("refused-xml", str(exc)) from None
        return True

    def _accept(
        self,
        webhook_id: str,
        received: _Received,
        headers: dict[str, str],
        received_at: datetime.datetime,
        verified: bool | None,
    ) -> StoredDocument:
        body = received.body
        path = self._directory / f"{webhook_id}.{received.extension}"
        with self._lock:
            stored = [
                self._directory / f"{webhook_id}.{extension}" for extension in _EXTENSIONS.values()
            ]
            first = next((p for p in stored if p.exists()), None)
            duplicate = first is not None
            if first is not None:
                path = first
            else:
                metadata: dict[str, object] = {
                    **headers,
                    "received_at": _utc_text(received_at),
                    "size": len(body),
                    "signature_verified": verified,
                }
                if received.signature is not None:
                    metadata["signature_file"] = f"{path.name}.sig"
                text = json.dumps(metadata, indent=2, sort_keys=True) + "\n"
                # The .json first and the document last: a crash in between leaves a .json
                # (and a .sig) without its document, which the sender's retry overwrites,
                # and never a document without its .json, which the existence check would
                # call a duplicate.
                replace_file(
                    self._directory / f"{webhook_id}.json", text.encode(), mode=PRIVATE_FILE
                )
                if received.signature is not None:
                    replace_file(
                        path.with_name(f"{path.name}.sig"), received.signature, mode=PRIVATE_FILE
                    )
                replace_file(path, body, mode=PRIVATE_FILE)
        doc = StoredDocument(
            webhook_id=webhook_id,
            path=path,
            size=len(body),
            received_at=received_at,
            signature_verified=verified,
            duplicate=duplicate,
        )
        if self._on_document is not None:
            # One call at a time, so lines a callback prints never interleave; outside the
            # storage lock, so a slow callback does not hold up storing other documents.
            with self._notify_lock:
                try:
                    self._on_document(doc)
                except Exception:
                    _log.exception("on_document failed for %s (the document is stored)", webhook_id)
        return doc


@dataclass(frozen=True, slots=True)
class _Received:
    """A delivery's document: its bytes, the extension it is kept under, and its detached
    signature, if it came with one."""

    body: bytes
    extension: str
    signature: bytes | None


class _Refused(Exception):  # noqa: N818 (never leaves this module)
    """A delivery refused with the problem type ``slug``."""

    def __init__(self, slug: str, detail: str) -> None:
        super().__init__(detail)
        self.slug = slug
        self.detail = detail


def _check_content_type(request: Request) -> tuple[str, str]:
    content_type = request.headers.get("content-type", "")
    # Media types are case-insensitive; parameters such as charset do not matter here.
    extension = _EXTENSIONS.get(content_type.split(";", 1)[0].strip().lower())
    if extension is None:
        raise _Refused(
            "unsupported-media-type",
            f"expected application/xml or application/x-ofx, got"
            f" {content_type or 'no Content-Type'!r}",
        )
    return content_type, extension


def _detached_signature(request: Request) -> bytes | None:
    """The delivery's detached signature document, if it carries one; checked only as to
    form here (the hardened parser reads it when it is verified)."""
    values = request.headers.getlist(DETACHED_SIGNATURE_HEADER)
    if not values:
        return None
    if len(values) > 1 or len(values[0]) > _MAX_SIGNATURE_HEADER:
        raise _Refused(
            "document-signature", f"one {DETACHED_SIGNATURE_HEADER} header of a signature"
        )
    try:
        signature = base64.b64decode(values[0], validate=True)
    except ValueError:
        raise _Refused(
            "document-signature", f"the {DETACHED_SIGNATURE_HEADER} header is not base64"
        ) from None
    if not signature.lstrip().startswith(b"<"):
        raise _Refused("document-signature", "the detached signature is not XML")
    return signature


async def _http_error(_request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):  # registered for HTTPException only
        return await _internal_error(_request, exc)
    slug = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "-")
    if slug not in _PROBLEMS:
        return Response(status_code=exc.status_code, headers=exc.headers)
    return _problem(slug, str(exc.detail), headers=exc.headers)


async def _internal_error(_request: Request, _exc: Exception) -> Response:
    # Starlette re-raises the exception after this answer, so the server logs it; its text
    # stays out of the answer, as it may hold paths or configuration.
    return _problem("internal-error", "the receiver failed; retry later")


class _Server(uvicorn.Server):
    """A uvicorn server that reports the port it bound once it is listening."""

    def __init__(self, config: uvicorn.Config, ready: Callable[[int], None] | None) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._ready is not None:
            self._ready(int(self.servers[0].sockets[0].getsockname()[1]))


def _server(
    store: CustomerStore,
    host: str,
    port: int,
    ready: Callable[[int], None] | None,
    *,
    embedded: bool,
    limits: ServerLimits | None,
) -> _Server:
    config = server_config(
        store.app,
        limits=limits,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        # Embedded, the host process keeps its own logging configuration.
        log_config=None if embedded else LOGGING_CONFIG,
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=_SHUTDOWN_SECONDS,
    )
    return _Server(config, ready)


def serve(
    store: CustomerStore,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ready: Callable[[int], None] | None = None,
    limits: ServerLimits | None = None,
) -> None:
    """Serve ``store`` with uvicorn in this thread until interrupted.

    On Ctrl-C or SIGTERM the server stops taking connections, lets deliveries in flight
    finish (for up to 5 seconds), then re-delivers the signal to the handler that was there
    before: by default, Ctrl-C ends as a :exc:`KeyboardInterrupt` raised from here (the
    caller decides how to exit), and SIGTERM ends the process.

    :param store: the store to serve.
    :param host: the address to listen on; the loopback address by default.
    :param port: the port to listen on; 0 picks a free one.
    :param ready: called once with the port actually bound, as soon as the server listens.
        It runs on the server's event loop: it should return quickly, and not raise.
    :param limits: deadlines for a request's head and the keep-alive, and the connection
        cap (:class:`~cmi_sdk.ServerLimits`; its defaults when None).
    :raises ConfigurationError: the server could not listen (the port is taken, the
        address is not local, ...); the reason is logged.
    """
    server = _server(store, host, port, ready, embedded=False, limits=limits)
    try:
        server.run()
    except SystemExit:
        # uvicorn exits the process when it cannot bind; a library caller gets an error.
        if server.started:
            raise
        raise ConfigurationError(f"cannot listen on {host} port {port}") from None


@contextlib.contextmanager
def running(
    store: CustomerStore,
    host: str = "127.0.0.1",
    *,
    timeout: float = 10.0,
    limits: ServerLimits | None = None,
) -> Iterator[str]:
    """Serve ``store`` in a background thread, on a free port, for the ``with`` block.

    ::

        with running(store) as url:  # "http://127.0.0.1:54321/"
            httpx.post(url, content=xml, headers=...)

    On exit the server stops and its thread is joined.

    :param store: the store to serve.
    :param host: the address to listen on; the loopback address by default.
    :param timeout: how long to wait for the server to start, and then to stop, in seconds.
    :param limits: as for :func:`serve`.
    :returns: the server's base URL, ending in ``/``.
    :raises ConfigurationError: the server did not start within ``timeout``.
    """
    bound = threading.Event()
    ports: list[int] = []

    def ready(port: int) -> None:
        ports.append(port)
        bound.set()

    server = _server(store, host, 0, ready, embedded=True, limits=limits)
    thread = threading.Thread(target=server.run, name="cmi-customer-store", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not bound.wait(0.05):
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ConfigurationError(f"the customer store did not start on {host}")
        url_host = f"[{host}]" if ":" in host else host
        yield f"http://{url_host}:{ports[0]}/"
    finally:
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            # Deliveries still running after the grace period: drop them, not the caller.
            server.force_exit = True
            thread.join(timeout)
