"""The firm's CMI endpoint: a Starlette app to mount in the firm's own app or serve alone.

Routes:

- ``GET /.well-known/cmi``: capabilities, the standards and fields the firm offers, the
  terms it accepts, and its public keys; every link carries the mount prefix;
- ``GET /cmi/openapi.json``: the endpoint's OpenAPI 3.1 description, to generate clients;
- ``POST /cmi/terms``: an intermediary proffers terms for a customer; the answer is
  accepted (with the signed consent record), one alternative, or rejected;
- ``GET /cmi/terms`` and ``GET /cmi/terms/{id}``: the terms an intermediary registered, or
  the customer's own;
- ``DELETE /cmi/terms/{id}``: revoke, by the intermediary or the customer; the answer is
  the signed consent record of the revocation;
- ``GET /cmi/documents?since=CURSOR``: the customer pulls what was emitted under their terms;
- ``POST /cmi/links``: an intermediary redeems a customer's link code and receives its own
  pairwise ``customer_ref`` for them; ``GET /cmi/links`` and ``DELETE /cmi/links/{id}``:
  its own links (see :mod:`cmi_sdk._links`).

Every route but the well-known one is authenticated (see :mod:`cmi_sdk.client`): a size cap
before the body is read in full, a Standard Webhooks signature, a timestamp window and a
replay cache. Errors are RFC 9457 problem details, JSON by default, XML when the client
accepts only XML; a refused request changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple, cast
from xml.sax.saxutils import escape

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cmi_sdk._exceptions import (
    AcceptanceConflictError,
    AcceptanceError,
    CMIError,
    ConfigurationError,
    DestinationNotAllowedError,
    DocumentTooDeepError,
    DocumentTooLargeError,
    DocumentTypeNotFoundError,
    DocumentValidationError,
    FirmSystemError,
    ForbiddenXMLError,
    InvalidInputError,
    LinkError,
    LinkNotFoundError,
    MalformedXMLError,
    ModelValidationError,
    NotFoundError,
    Problem,
    ReplayedMessageError,
    RequestRefusedError,
    SignatureVerificationError,
    StaleTimestampError,
    StoreError,
    TermsError,
    TermsNotFoundError,
    UnknownPartyError,
)
from cmi_sdk._models import (
    Acceptance,
    Link,
    Offer,
    SharingTerms,
    TermsDecision,
    TermsProposal,
    load_model,
)
from cmi_sdk._models import Request as CustomerRequest
from cmi_sdk._offers import Answer, Prepared
from cmi_sdk._openapi import OPENAPI_PATH, openapi_document
from cmi_sdk._replay import RequestIds
from cmi_sdk._serving import (
    DEFAULT_BODY_TIMEOUT,
    BodyTimeoutError,
    ClientGoneError,
    client_text,
    read_body,
)
from cmi_sdk._version import __version__
from cmi_sdk.client import REQUEST_SIGNATURE_CONTEXT, request_signing_secret, signing_payload
from cmi_sdk.outbox import OutboxRow, SeenMessage
from cmi_sdk.webhooks import DEFAULT_TOLERANCE, WebhookVerifier, generate_secret, public_key_for

if TYPE_CHECKING:
    # Annotations only: the adapter imports this module to build its app, so a runtime
    # import back would make the two modules a cycle.
    from cmi_sdk._adapter import Adapter, ValidatedDocument

__all__ = ["PROBLEM_TYPES", "create_app"]

log = logging.getLogger("cmi_sdk.asgi")

PROBLEM_TYPES: dict[str, tuple[int, str]] = {p.value: (p.status, p.summary) for p in Problem}
"""Every problem type the endpoint answers with: ``urn:cmi:problem:<slug>`` to the
status and title, as :class:`~cmi_sdk.Problem` has them. The slugs are stable; clients may
rely on them."""


_CURSOR = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() takes '²' too
_AUTH_HEADERS = (
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "cmi-intermediary",
    "cmi-terms",
)
_SIGNER = re.compile(r"[^\x00-\x1f\x7f]{1,200}")  # an intermediary's name, a terms id
_SINCE = re.compile(r"[0-9]{1,40}")  # the PostgreSQL store's cursors are wider
# Every id and reference the firm hands out (an Identifier, a CustomerRef) fits: anything
# else names nothing, and is not looked up (PostgreSQL text cannot even hold a NUL).
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")


class ProblemError(CMIError):
    """An error answered as RFC 9457 problem details: ``problem`` says its type and status."""

    def __init__(
        self, problem: Problem, detail: str, *, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(detail)
        self.problem = problem
        self.detail = detail
        self.extra = extra or {}


def _wants_xml(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    kinds = [part.split(";")[0].strip().lower() for part in accept.split(",") if part.strip()]
    return bool(kinds) and all(k.endswith(("/xml", "+xml")) for k in kinds)


def problem_response(request: Request, problem: ProblemError) -> Response:
    """The problem as ``application/problem+json``, or ``+xml`` for XML-only clients."""
    status = problem.problem.status
    body: dict[str, Any] = {
        "type": problem.problem.type,
        "title": problem.problem.summary,
        "status": status,
        "detail": problem.detail,
        **problem.extra,
    }
    headers = {"www-authenticate": "Standard-Webhooks"} if status == 401 else None
    if status == 408:
        # The rest of the body may still come: the connection cannot carry another request.
        headers = {"connection": "close"}
    if _wants_xml(request):
        # RFC 9457 appendix B's XML form, namespace urn:ietf:rfc:7807.
        parts = "".join(
            f"<{key}>{escape(str(value))}</{key}>"
            for key, value in body.items()
            if isinstance(value, str | int)
        )
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<problem xmlns="urn:ietf:rfc:7807">{parts}</problem>\n'
        )
        return Response(
            xml, status_code=status, media_type="application/problem+xml", headers=headers
        )
    return JSONResponse(
        body, status_code=status, media_type="application/problem+json", headers=headers
    )


# Most specific first: the first class the exception is an instance of names its problem.
_PROBLEM_OF: tuple[tuple[type[CMIError], Problem], ...] = (
    (DocumentTooLargeError, Problem.TOO_LARGE),
    (MalformedXMLError, Problem.MALFORMED_XML),
    (ForbiddenXMLError, Problem.FORBIDDEN_XML),
    (DocumentTooDeepError, Problem.TOO_DEEP),
    (DocumentValidationError, Problem.INVALID_DOCUMENT),
    (StaleTimestampError, Problem.STALE_TIMESTAMP),
    (ReplayedMessageError, Problem.REPLAYED),
    (UnknownPartyError, Problem.UNKNOWN_PARTY),
    (SignatureVerificationError, Problem.BAD_SIGNATURE),
    (DestinationNotAllowedError, Problem.DESTINATION_NOT_ALLOWED),
    (TermsError, Problem.TERMS_REFUSED),
    (LinkError, Problem.LINK_REFUSED),
    (NotFoundError, Problem.NOT_FOUND),
    (InvalidInputError, Problem.INVALID_INPUT),
    (StoreError, Problem.STORE_UNAVAILABLE),
)


def _problem_for(exc: CMIError) -> ProblemError:
    if isinstance(exc, ProblemError):
        return exc
    if isinstance(exc, AcceptanceConflictError):
        # The store's message names the offer the id was first given for, which may be
        # another intermediary's: the answer names nothing.
        return ProblemError(
            Problem.ACCEPTANCE_CONFLICT, "the acceptance id was used for another offer"
        )
    if isinstance(exc, RequestRefusedError | AcceptanceError | FirmSystemError):
        # Each carries its problem: a 4xx for the caller's input, a 5xx for an outage.
        return ProblemError(exc.problem, str(exc))
    if isinstance(exc, ModelValidationError):
        issues = [{"path": i.path, "reason": i.reason} for i in exc.issues]
        return ProblemError(
            Problem.INVALID_INPUT, str(exc).splitlines()[0], extra={"errors": issues}
        )
    for kind, problem in _PROBLEM_OF:
        if isinstance(exc, kind):
            return ProblemError(problem, str(exc))
    log.error("unexpected error answered as internal: %s", exc)
    return ProblemError(Problem.INTERNAL, "the request could not be completed")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who signed a request: an intermediary, or the customer holding some terms."""

    intermediary: str | None = None
    terms: SharingTerms | None = None
    party: str = ""
    msg_id: str = ""
    message: SeenMessage | None = None
    """The message for the replay cache, when it is to be remembered later (requests)."""

    def may_see(self, terms: SharingTerms) -> bool:
        """Whether the principal may read or revoke ``terms``."""
        if self.intermediary is not None:
            return terms.intermediary == self.intermediary
        return self.terms is not None and self.terms.id == terms.id


@dataclass(slots=True)
class _RequestRead:
    """What reading a request for offers (on the pipeline's thread) leaves for the endpoint
    to finish with: who signed it, and the standard to answer in."""

    principal: Principal | None = None
    standard: str = "cmi"


Handler = Callable[[Request], Awaitable[Response]]

_MIN_TOKEN = 16

#: How long the endpoint keeps an intermediary's verifier before reading its secrets again.
_VERIFIER_SECONDS = 60.0


class _KeptVerifier(NamedTuple):
    """An intermediary's verifier, and what says it is still good."""

    verifier: WebhookVerifier
    kept_at: float
    """When it was made (monotonic seconds)."""
    generation: int
    """The intermediary row's generation it was made from."""
    until: float
    """When its first secret with an end stops working (the adapter's clock)."""


def create_app(
    adapter: Adapter,
    *,
    max_body_bytes: int = 64 * 1024,
    tolerance: int = DEFAULT_TOLERANCE,
    page_size: int = 100,
    metrics: bool = False,
    metrics_token: str | None = None,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> Starlette:
    """Build the endpoint for ``adapter``.

    :param max_body_bytes: the cap on request bodies, applied before they are read in full.
    :param tolerance: the timestamp window, seconds, either side of the firm's clock.
    :param page_size: the most documents one pull returns.
    :param metrics: serve ``GET /metrics`` in the Prometheus text format (off by default:
        it tells volumes to whoever can reach it; expose it to the firm's monitoring only).
    :param metrics_token: with ``metrics``, the bearer token ``GET /metrics`` must carry
        (``Authorization: Bearer TOKEN``, compared in constant time); without it, the route
        is open to whoever reaches the endpoint.
    :param body_timeout: seconds a request's body may take to arrive in full, from the end
        of its head; a slower one is answered 408 and its connection closed.
    :raises ConfigurationError: a metrics token shorter than 16 characters, a body timeout
        that is not a positive number of seconds.
    """
    if metrics_token is not None and len(metrics_token) < _MIN_TOKEN:
        raise ConfigurationError(f"a metrics token holds at least {_MIN_TOKEN} characters")
    if not 0 < body_timeout < math.inf:
        raise ConfigurationError("body_timeout must be a positive, finite number of seconds")
    endpoint = _Endpoint(adapter, max_body_bytes, tolerance, page_size)
    endpoint.body_timeout = body_timeout
    endpoint.metrics_token = metrics_token
    # Starlette tries routes in order: the busiest goes first (no two paths overlap).
    routes = [
        Route("/cmi/requests", endpoint.post_request, methods=["POST"]),
        Route("/.well-known/cmi", endpoint.well_known, methods=["GET"]),
        Route(OPENAPI_PATH, endpoint.openapi, methods=["GET"]),
        Route("/cmi/terms", endpoint.guarded(endpoint.post_terms), methods=["POST"]),
        Route("/cmi/terms", endpoint.guarded(endpoint.list_terms), methods=["GET"]),
        Route("/cmi/terms/{terms_id}", endpoint.guarded(endpoint.get_terms), methods=["GET"]),
        Route("/cmi/terms/{terms_id}", endpoint.guarded(endpoint.delete_terms), methods=["DELETE"]),
        Route("/cmi/documents", endpoint.guarded(endpoint.documents), methods=["GET"]),
        Route("/cmi/links", endpoint.guarded(endpoint.post_link), methods=["POST"]),
        Route("/cmi/links", endpoint.guarded(endpoint.list_links), methods=["GET"]),
        Route("/cmi/links/{link_id}", endpoint.guarded(endpoint.delete_link), methods=["DELETE"]),
        Route("/cmi/offers/{offer_id}", endpoint.guarded(endpoint.get_offer), methods=["GET"]),
        Route(
            "/cmi/offers/{offer_id}/acceptance",
            endpoint.guarded(endpoint.post_acceptance),
            methods=["POST"],
        ),
    ]
    endpoint.serves_metrics = metrics
    if metrics:
        routes.append(Route("/metrics", endpoint.metrics, methods=["GET"]))
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_problem})


async def _http_problem(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 as problem details too."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    problem = {404: Problem.NOT_FOUND, 405: Problem.METHOD_NOT_ALLOWED}.get(
        status, Problem.INTERNAL
    )
    detail = f"{request.method} {request.url.path}: " + (
        "no such route" if status == 404 else "method not allowed here"
    )
    return problem_response(request, ProblemError(problem, detail))


def _prefix(request: Request) -> str:
    """The path the endpoint is mounted under in the firm's app (empty when served alone):
    every link it gives carries it."""
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")


def _href(request: Request, terms: SharingTerms) -> str:
    # Mounted inside a firm's app, links carry the mount's prefix.
    return f"{_prefix(request)}/cmi/terms/{terms.id}"


def _terms_json(request: Request, terms: SharingTerms) -> dict[str, Any]:
    return {**terms.public_dict(), "id": terms.id, "href": _href(request, terms)}


def _link_href(request: Request, link_id: str) -> str:
    return f"{_prefix(request)}/cmi/links/{link_id}"


def _link_json(request: Request, link: Link) -> dict[str, Any]:
    # What the intermediary may know of its link: never the firm's account id.
    return {**link.public_dict(), "href": _link_href(request, link.id)}


def _decision_json(request: Request, decision: TermsDecision) -> dict[str, Any]:
    out: dict[str, Any] = {"outcome": decision.outcome, "reason": decision.reason}
    if decision.terms is not None:
        out["terms"] = _terms_json(request, decision.terms)
    if decision.alternative is not None:
        out["alternative"] = decision.alternative.public_dict()
    if decision.consent is not None:
        out["consent"] = decision.consent.model_dump(mode="json")
    if decision.consent_xml is not None:
        out["consent_xml"] = decision.consent_xml.decode()
    return out


def _offer_id(request: Request) -> str:
    """The offer id of the route, when it could name an offer: else the answer is the one
    for a missing offer."""
    offer_id: str = request.path_params["offer_id"]
    if not _ID.fullmatch(offer_id):
        raise ProblemError(Problem.NOT_FOUND, f"no offer {offer_id!r}")
    return offer_id


def _target(scope: Mapping[str, Any]) -> str:
    """The request target the signature covers: the scope's (decoded) path, with the three
    characters a path cannot carry raw (``?``, ``#``, ``\\``) escaped, and the query, if
    any. Clients sign the target as they send it (see :mod:`cmi_sdk.client`)."""
    path = scope["path"].replace("?", "%3F").replace("#", "%23").replace("\\", "%5C")
    query = scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


class _Endpoint:
    """The routes' logic. Store calls run in Starlette's thread pool, off the event loop,
    but for a request for offers: it runs where its pipeline runs (see
    :attr:`~cmi_sdk.Adapter.answers_inline`)."""

    def __init__(
        self, adapter: Adapter, max_body_bytes: int, tolerance: int, page_size: int
    ) -> None:
        self.adapter = adapter
        self.max_body_bytes = max_body_bytes
        self.tolerance = tolerance
        self.page_size = page_size
        self.body_timeout = DEFAULT_BODY_TIMEOUT
        self.metrics_token: str | None = None
        self.serves_metrics = False
        # Checks the signature of a request naming a signer the firm does not know, so
        # that it is refused exactly as a bad signature is (same answer, same work).
        self._decoy = WebhookVerifier(secrets=(generate_secret(),), tolerance=tolerance)
        # Each intermediary's verifier, kept between requests for at most _VERIFIER_SECONDS
        # (the API only adds secrets, but a secret struck from the store by hand must stop
        # working soon); a signature the kept verifier refuses is checked again against
        # the secrets in the store, so a rotation works at once.
        self._verifiers: dict[str, _KeptVerifier] = {}
        # The message ids of requests for offers, from authentication to the answer.
        self.request_ids = RequestIds(lambda: self.adapter.store)

    async def read_body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        too_large = ProblemError(Problem.TOO_LARGE, f"the body is over the {limit}-byte limit")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not _CURSOR.fullmatch(declared):
                raise ProblemError(Problem.BAD_REQUEST, "Content-Length is not a number")
            if int(declared) > limit:
                raise too_large
        try:
            return await read_body(request, max_bytes=limit, timeout=self.body_timeout)
        except OverflowError:
            raise too_large from None
        except BodyTimeoutError as exc:
            log.info("%s: %s, answered 408", client_text(request), exc)
            raise ProblemError(Problem.REQUEST_TIMEOUT, str(exc)) from None
        except ClientGoneError as exc:
            # Nobody is left to read the answer: one line, no traceback.
            log.info("%s %s: %s", client_text(request), request.url.path, exc)
            raise ProblemError(Problem.BAD_REQUEST, str(exc)) from None

    def authenticate(self, request: Request, body: bytes, *, remember: bool = True) -> Principal:
        """Who signed the request; its message id is remembered at once (replay cache) or,
        with ``remember=False``, only checked, and left for the caller to remember with
        what the request stores (see ``Principal.message``)."""
        headers = request.headers
        # A header sent twice could be read one way here and another way by a proxy or a
        # log; no honest client sends one twice.
        if any(len(headers.getlist(h)) > 1 for h in _AUTH_HEADERS):
            raise ProblemError(Problem.UNAUTHORIZED, "each authentication header must be sent once")
        name = headers.get("cmi-intermediary")
        terms_id = headers.get("cmi-terms")
        store = self.adapter.store
        if name is not None and terms_id is None:
            # A name no store could hold (control characters, a NUL PostgreSQL refuses)
            # is not looked up: it is unknown, and refused as every unknown signer is.
            known = _SIGNER.fullmatch(name) is not None
            verifier = self._kept_verifier(name) if known else self._decoy
            principal, party = Principal(intermediary=name), f"intermediary:{name}"
        elif terms_id is not None and name is None:
            terms: SharingTerms | None = None
            if _SIGNER.fullmatch(terms_id):
                with contextlib.suppress(TermsNotFoundError):
                    terms = store.get_terms(terms_id)
            # Unknown terms are refused by the same check as a wrong secret (the decoy's).
            verifier = self._decoy if terms is None else self._terms_verifier(terms.secret)
            principal, party = Principal(terms=terms), f"terms:{terms_id}"
        else:
            raise ProblemError(
                Problem.UNAUTHORIZED,
                "sign the request and name the signer: cmi-intermediary or cmi-terms",
            )
        payload = signing_payload(request.method, _target(request.scope), body)
        now = self.adapter.clock()
        try:
            msg_id = verifier.verify(headers, payload, now=now)
        except StaleTimestampError:
            raise
        except SignatureVerificationError:
            # The decoy came from a fresh look at the store: nothing to read again, and an
            # unknown name costs one lookup and one check, as a known one's bad signature.
            if name is None or verifier is self._decoy:
                raise
            # Perhaps signed with a secret added since the verifier was kept.
            fresh = self._intermediary_verifier(name)
            if fresh.secrets == verifier.secrets:
                raise
            msg_id = fresh.verify(headers, payload, now=now)
        message = SeenMessage(party, msg_id, now + 2 * self.tolerance, now)
        if remember:
            if not store.remember_message(party, msg_id, expires_at=message.expires_at, now=now):
                raise ReplayedMessageError(f"message id {msg_id} was already used")
            return replace(principal, party=party, msg_id=msg_id)
        self.request_ids.hold(message)
        return replace(principal, party=party, msg_id=msg_id, message=message)

    def _kept_verifier(self, name: str) -> WebhookVerifier:
        # The row's generation is read on every request (one key lookup, no secret opened):
        # a revocation or rotation made by any process counts from the next request.
        generation = self.adapter.store.intermediary_generation(name)
        kept = self._verifiers.get(name)
        if (
            kept is not None
            and kept.generation == generation
            and time.monotonic() - kept.kept_at < _VERIFIER_SECONDS
            and self.adapter.clock() < kept.until
        ):
            return kept.verifier
        return self._intermediary_verifier(name)

    def _intermediary_verifier(self, name: str) -> WebhookVerifier:
        """The verifier of the intermediary's secrets as the store has them now; for a name
        the firm does not know, or a revoked intermediary, the decoy, which refuses every
        signature (never kept, so made-up names take no memory)."""
        found = self.adapter.store.intermediary(name)
        now = self.adapter.clock()
        secrets = () if found is None else found.valid_secrets(now)
        if found is None or not secrets:  # unknown and revoked are told apart to nobody
            return self._decoy
        # Secrets already ended stay in the row until the next rotation: only the ends
        # still to come limit how long the verifier is kept.
        ends = [
            s.expires_at for s in found.secrets if s.expires_at is not None and s.expires_at > now
        ]
        verifier = WebhookVerifier(
            secrets=tuple(request_signing_secret(s) for s in secrets), tolerance=self.tolerance
        )
        self._verifiers[name] = _KeptVerifier(
            verifier, time.monotonic(), found.generation, min(ends, default=math.inf)
        )
        return verifier

    def _terms_verifier(self, secret: str) -> WebhookVerifier:
        return WebhookVerifier(secrets=(request_signing_secret(secret),), tolerance=self.tolerance)

    def guarded(self, handle: Callable[[Request, Principal, bytes], Response]) -> Handler:
        """Wrap a handler with the size cap, authentication and problem responses."""

        async def endpoint(request: Request) -> Response:
            principal: Principal | None = None
            try:
                body = await self.read_body(request)
                principal = await run_in_threadpool(self.authenticate, request, body)
                return await run_in_threadpool(handle, request, principal, body)
            except CMIError as exc:
                problem = _problem_for(exc)
            except Exception:
                log.exception("the CMI endpoint failed on %s %s", request.method, request.url.path)
                problem = ProblemError(Problem.INTERNAL, "internal error")
            if principal is not None:
                # A refused request leaves nothing behind, not even its message id.
                await run_in_threadpool(
                    self.adapter.store.forget_message, principal.party, principal.msg_id
                )
            return problem_response(request, problem)

        return endpoint

    async def metrics(self, request: Request) -> Response:
        if self.metrics_token is not None:
            # The scheme is case-insensitive (RFC 9110, 11.1); the token is compared in
            # constant time, as bytes (a header may hold any latin-1 character).
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            wanted = self.metrics_token.encode()
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("latin-1"), wanted
            ):
                response = problem_response(
                    request,
                    ProblemError(Problem.METRICS_UNAUTHORIZED, "send Authorization: Bearer TOKEN"),
                )
                response.headers["www-authenticate"] = 'Bearer realm="cmi-metrics"'
                return response
        text = await run_in_threadpool(prometheus_text, self.adapter)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def well_known(self, request: Request) -> Response:
        document = await run_in_threadpool(
            functools.partial(
                well_known_document, self.adapter, self.tolerance, prefix=_prefix(request)
            )
        )
        return JSONResponse(document)

    async def openapi(self, request: Request) -> Response:
        document = openapi_document(
            self.adapter, prefix=_prefix(request), metrics=self.serves_metrics
        )
        return JSONResponse(document)

    def post_terms(self, request: Request, principal: Principal, body: bytes) -> Response:
        if principal.intermediary is None:
            raise ProblemError(
                Problem.FORBIDDEN, "terms are proffered through a registered intermediary"
            )
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ProblemError(Problem.UNSUPPORTED_MEDIA_TYPE, "terms are sent as application/json")
        proposal = load_model(TermsProposal, body)
        decision = self.adapter.propose_terms(proposal, intermediary=principal.intermediary)
        if decision.outcome == "accepted" and decision.terms is not None:
            return JSONResponse(
                _decision_json(request, decision),
                status_code=201,
                headers={"location": _href(request, decision.terms)},
            )
        return JSONResponse(_decision_json(request, decision), status_code=200)

    def list_terms(self, request: Request, principal: Principal, _body: bytes) -> Response:
        if principal.terms is not None:
            return JSONResponse({"terms": [_terms_json(request, principal.terms)]})
        customer = request.query_params.get("customer")
        if customer is not None and not _ID.fullmatch(customer):
            raise ProblemError(Problem.INVALID_INPUT, "customer is a customer_ref")
        found = self.adapter.store.list_terms(
            customer_ref=customer,
            intermediary=principal.intermediary,
            include_revoked=True,
        )
        return JSONResponse({"terms": [_terms_json(request, t) for t in found]})

    def visible_terms(self, terms_id: str, principal: Principal) -> SharingTerms:
        if not _ID.fullmatch(terms_id):
            raise ProblemError(Problem.NOT_FOUND, f"no sharing terms {terms_id!r}")
        try:
            terms = self.adapter.store.get_terms(terms_id)
        except TermsNotFoundError:
            raise ProblemError(Problem.NOT_FOUND, f"no sharing terms {terms_id!r}") from None
        if not principal.may_see(terms):
            # The same answer as for absent terms: ids are not to be probed.
            raise ProblemError(Problem.NOT_FOUND, f"no sharing terms {terms_id!r}")
        return terms

    def get_terms(self, request: Request, principal: Principal, _body: bytes) -> Response:
        terms = self.visible_terms(request.path_params["terms_id"], principal)
        records = self.adapter.store.consent_records(terms.id)
        consent = [{"record": r.model_dump(mode="json"), "xml": x.decode()} for r, x in records]
        return JSONResponse({"terms": _terms_json(request, terms), "consent": consent})

    def delete_terms(self, request: Request, principal: Principal, _body: bytes) -> Response:
        terms = self.visible_terms(request.path_params["terms_id"], principal)
        if terms.revoked_at is not None:
            raise ProblemError(Problem.CONFLICT, f"terms {terms.id} are already revoked")
        try:
            consent = self.adapter.revoke_terms(terms.id)
        except TermsError:  # revoked meanwhile, by the customer or a concurrent request
            raise ProblemError(Problem.CONFLICT, f"terms {terms.id} are already revoked") from None
        return JSONResponse(
            {
                "outcome": "revoked",
                "consent": consent.record.model_dump(mode="json"),
                "consent_xml": consent.xml.decode(),
            }
        )

    def post_link(self, request: Request, principal: Principal, body: bytes) -> Response:
        """Redeem a link code: the customer's reference for this intermediary."""
        name = self._linking(principal)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ProblemError(
                Problem.UNSUPPORTED_MEDIA_TYPE, "a link code is sent as application/json"
            )
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # nesting past the decoder's depth too
            raise ProblemError(Problem.INVALID_INPUT, 'send {"code": "..."}') from None
        if not isinstance(data, dict) or set(data) != {"code"} or not isinstance(data["code"], str):
            raise ProblemError(Problem.INVALID_INPUT, 'send {"code": "..."}')
        link = self.adapter.redeem_link_code(data["code"], intermediary=name)
        return JSONResponse(
            _link_json(request, link),
            status_code=201,
            headers={"location": _link_href(request, link.id)},
        )

    def list_links(self, request: Request, principal: Principal, _body: bytes) -> Response:
        """The intermediary's own active links: never an account id."""
        name = self._linking(principal)
        found = self.adapter.links(intermediary=name)
        return JSONResponse({"links": [_link_json(request, link) for link in found]})

    def delete_link(self, request: Request, principal: Principal, _body: bytes) -> Response:
        """Revoke one of the intermediary's own links, and its terms."""
        name = self._linking(principal)
        link_id = request.path_params["link_id"]
        if not _ID.fullmatch(link_id):
            raise ProblemError(Problem.NOT_FOUND, f"no link {link_id!r}")
        try:
            link = self.adapter.get_link(link_id)
        except LinkNotFoundError:
            raise ProblemError(Problem.NOT_FOUND, f"no link {link_id!r}") from None
        if link.intermediary != name:
            # The same answer as for a missing link: ids are not to be probed.
            raise ProblemError(Problem.NOT_FOUND, f"no link {link_id!r}")
        if link.revoked_at is not None:
            raise ProblemError(Problem.CONFLICT, f"link {link_id} is already revoked")
        try:
            revocation = self.adapter.revoke_link(link_id)
        except LinkError:  # revoked meanwhile, by the firm or a concurrent request
            raise ProblemError(Problem.CONFLICT, f"link {link_id} is already revoked") from None
        return JSONResponse(
            {
                "outcome": "revoked",
                "link": _link_json(request, revocation.link),
                "consents": [
                    {"record": c.record.model_dump(mode="json"), "xml": c.xml.decode()}
                    for c in revocation.consents
                ],
                "cancelled": revocation.cancelled,
            }
        )

    @staticmethod
    def _linking(principal: Principal) -> str:
        if principal.intermediary is None:
            raise ProblemError(Problem.FORBIDDEN, "links are redeemed and kept by intermediaries")
        return principal.intermediary

    def _xml_document(self, request: Request, body: bytes, model: type) -> ValidatedDocument:
        """The body as a valid document of any installed standard whose model is
        ``model``: a ``cmi`` request or a UBL RequestForQuotation alike."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in {"application/xml", "text/xml"}:
            raise ProblemError(
                Problem.UNSUPPORTED_MEDIA_TYPE, "send the document as application/xml"
            )
        try:
            doc = self.adapter.validate(body)  # the hardened parser, then the XSD
        except DocumentTypeNotFoundError as exc:
            # Not a missing resource (404): a document the firm cannot read.
            raise ProblemError(
                Problem.UNSUPPORTED_STANDARD,
                f"{exc}; GET /.well-known/cmi lists the standards the firm reads",
            ) from None
        if doc.document_type.model is not model:
            raise ProblemError(
                Problem.INVALID_DOCUMENT,
                f"expected a {model.__name__} document, not a {doc.standard.name}"
                f" {doc.document_type.name}",
            )
        return doc

    def _answer_standard(self, request: Request, asked_in: str) -> str:
        """The standard the answer is written in: ``?answer=`` when the intermediary names
        one, else the request's own (a UBL RequestForQuotation gets a UBL Quotation)."""
        query = request.scope.get("query_string")
        wanted = request.query_params.get("answer", asked_in) if query else asked_in
        if wanted == "cmi":
            return wanted
        if wanted not in self.adapter.standards or not any(
            d.model is Offer for d in self.adapter.standards.get(wanted).document_types
        ):
            raise ProblemError(Problem.INVALID_INPUT, f"the firm cannot answer in {wanted!r}")
        return wanted

    def _answer_as(self, answer: Answer, standard: str) -> Response:
        """The answer in another standard: its offer document (one offer), signed."""
        if not answer.offers.offers:
            raise ProblemError(
                Problem.DECLINED,
                answer.offers.declined or "the firm makes no offer for this request",
            )
        doc_type = next(
            d.name for d in self.adapter.standards.get(standard).document_types if d.model is Offer
        )
        xml = self.adapter.render_signed(
            answer.offers.offers[0], standard=standard, document_type=doc_type
        )
        return Response(xml, media_type="application/xml")

    def _intermediary(self, principal: Principal) -> str:
        if principal.intermediary is None:
            raise ProblemError(
                Problem.FORBIDDEN, "requests and acceptances come through intermediaries"
            )
        return principal.intermediary

    async def post_request(self, request: Request) -> Response:
        """Authenticate, parse and answer where the pipeline runs: on its worker thread
        (one hand-off), or on the loop when every pipeline hook is nonblocking.

        The message id is remembered (replay cache) in the commit that stores the answer's
        offers, so a request is answered with one write; a request refused before that
        leaves nothing behind, and one refused after it forgets its id."""
        read = _RequestRead()
        committed = False
        try:
            body = await self.read_body(request)
            answer = await self.adapter.answer_request_async(
                functools.partial(self._read_request, request, body, read)
            )
            committed = True
            if read.standard == "cmi":
                return Response(answer.xml, media_type="application/xml")
            return await run_in_threadpool(self._answer_as, answer, read.standard)
        except CMIError as exc:
            problem = _problem_for(exc)
        except Exception:
            log.exception("the CMI endpoint failed on POST %s", request.url.path)
            problem = ProblemError(Problem.INTERNAL, "internal error")
        finally:
            if read.principal is not None:
                self.request_ids.release(read.principal.message)
        principal = read.principal
        if principal is not None and RequestIds.forgets(principal.message, committed=committed):
            await run_in_threadpool(
                self.adapter.store.forget_message, principal.party, principal.msg_id
            )
        return problem_response(request, problem)

    def _read_request(self, request: Request, body: bytes, read: _RequestRead) -> Prepared:
        """Authenticate and parse a request for offers, where its pipeline runs; its message
        id is checked and held in flight, to be remembered in the commit of the answer (a
        store that does not remember ids with its offers remembers it at once)."""
        deferred = self.adapter.store.remembers_with_offers
        read.principal = principal = self.authenticate(request, body, remember=not deferred)
        name = self._intermediary(principal)
        doc = self._xml_document(request, body, CustomerRequest)
        read.standard = self._answer_standard(request, doc.standard.name)
        # _xml_document checked that the document's model is a request.
        return Prepared(cast("CustomerRequest", doc.to_model()), name, principal.message)

    def get_offer(self, request: Request, principal: Principal, _body: bytes) -> Response:
        name = self._intermediary(principal)
        offer_id = _offer_id(request)
        stored = self.adapter.get_offer(offer_id)
        if stored.intermediary != name:
            # Only the intermediary that asked: its customer's reference is its own.
            raise ProblemError(Problem.NOT_FOUND, f"no offer {offer_id!r}")
        return Response(self.adapter.offer_document(offer_id), media_type="application/xml")

    def post_acceptance(self, request: Request, principal: Principal, body: bytes) -> Response:
        name = self._intermediary(principal)
        offer_id = _offer_id(request)
        if self.adapter.get_offer(offer_id).intermediary != name:
            # An offer made for another intermediary's customer (or for none) is not this
            # one's to accept: the same answer as for a missing offer.
            raise ProblemError(Problem.NOT_FOUND, f"no offer {offer_id!r}")
        acceptance = self._xml_document(request, body, Acceptance).to_model()
        assert isinstance(acceptance, Acceptance)  # noqa: S101  (its document type's model)
        result = self.adapter.accept_offer(
            request.path_params["offer_id"], acceptance, intermediary=name
        )
        if result.outcome != "booked":  # a retry of a refused acceptance: the same refusal
            problem = Problem.of(result.problem or "")
            if problem is None or problem.outage:
                # A refusal recorded by an earlier version, or under a slug since retired:
                # a retry gets the same refusal, never "try again".
                problem = Problem.ACCEPTANCE_REFUSED
            raise ProblemError(problem, result.detail or "the acceptance was refused")
        return JSONResponse(result.to_json(), status_code=201)

    def _detached(self, row: OutboxRow) -> dict[str, str]:
        """A pulled document's detached signature, beside it, for a standard with no place
        for one (OFX): ``signature`` is the signature document, over the bytes of ``xml``."""
        signature = self.adapter.documents.signature_beside(
            row.body, standard=row.standard, document_type=row.document_type, name=row.msg_id
        )
        return {} if signature is None else {"signature": signature.decode()}

    def documents(self, request: Request, principal: Principal, _body: bytes) -> Response:
        terms = principal.terms
        if terms is None:
            wanted = request.query_params.get("terms")
            if not wanted:
                raise ProblemError(
                    Problem.FORBIDDEN, "an intermediary pulls for terms it names: ?terms=ID"
                )
            terms = self.visible_terms(wanted, principal)
        if terms.revoked_at is not None:
            raise ProblemError(Problem.FORBIDDEN, f"terms {terms.id} are revoked")
        since = request.query_params.get("since", "0")
        limit_text = request.query_params.get("limit", str(self.page_size))
        if not _SINCE.fullmatch(since):
            raise ProblemError(
                Problem.INVALID_INPUT, "since is a cursor from a previous answer's next"
            )
        if not _CURSOR.fullmatch(limit_text) or not 1 <= int(limit_text) <= self.page_size:
            raise ProblemError(Problem.INVALID_INPUT, f"limit is 1 to {self.page_size}")
        limit = int(limit_text)
        rows = self.adapter.store.documents_since(terms.id, int(since), limit + 1)
        page = rows[:limit]
        documents = [
            {
                "id": row.msg_id,
                "cursor": str(getattr(row, "cursor", row.seq)),
                "transaction_id": row.transaction_id,
                "standard": row.standard,
                "document_type": row.document_type,
                "created_at": row.summary()["created_at"],
                "xml": row.body.decode(),
                **self._detached(row),
            }
            for row in page
        ]
        return JSONResponse(
            {
                "documents": documents,
                "next": str(getattr(page[-1], "cursor", page[-1].seq)) if page else since,
                "more": len(rows) > limit,
            }
        )


def prometheus_text(adapter: Adapter) -> str:
    """The outbox's health in the Prometheus text exposition format: rows by state, the
    age of the oldest row waiting to go out, delivery attempts by outcome, dead letters,
    emission problems and disabled destinations; with a delivery worker in this process,
    also its attempts' latency (a histogram by outcome), its attempts by outcome and
    reason, what it has in flight and its open circuits."""
    store = adapter.store
    status = store.status(adapter.clock())
    attempts = store.attempt_counts()
    lines = [
        "# HELP cmi_outbox_rows Outbox rows by state.",
        "# TYPE cmi_outbox_rows gauge",
        *(f'cmi_outbox_rows{{state="{k}"}} {v}' for k, v in sorted(status.counts.items())),
        "# HELP cmi_outbox_oldest_pending_age_seconds Age of the oldest row waiting to go out.",
        "# TYPE cmi_outbox_oldest_pending_age_seconds gauge",
        f"cmi_outbox_oldest_pending_age_seconds {status.oldest_pending_age or 0:.3f}",
        "# HELP cmi_delivery_attempts_total Delivery attempts by outcome.",
        "# TYPE cmi_delivery_attempts_total counter",
        *(f'cmi_delivery_attempts_total{{outcome="{k}"}} {v}' for k, v in sorted(attempts.items())),
        "# HELP cmi_outbox_dead_letters Dead letters waiting for an operator.",
        "# TYPE cmi_outbox_dead_letters gauge",
        f"cmi_outbox_dead_letters {status.counts.get('dead', 0)}",
        "# HELP cmi_emission_problems Documents that could not be made, kept for the operator.",
        "# TYPE cmi_emission_problems gauge",
        f"cmi_emission_problems {store.count_emission_problems()}",
        "# HELP cmi_destinations_disabled Destinations disabled by a 410 Gone.",
        "# TYPE cmi_destinations_disabled gauge",
        f"cmi_destinations_disabled {len(status.disabled_destinations)}",
    ]
    if adapter.delivery_metrics is not None:
        # Attempt latency and outcomes by reason, from the workers running in this process.
        lines.extend(adapter.delivery_metrics.prometheus_lines())
    return "\n".join(lines) + "\n"


def well_known_document(
    adapter: Adapter, tolerance: int = DEFAULT_TOLERANCE, *, prefix: str = ""
) -> dict[str, Any]:
    """What ``GET /.well-known/cmi`` publishes; its links carry ``prefix``, the path the
    endpoint is mounted under (``/partners``)."""
    keys: dict[str, Any] = {"documents": [], "webhooks_v1a": []}
    signer = adapter.signer
    if signer is not None:
        der = signer.certificate.public_bytes(serialization.Encoding.DER)
        keys["documents"].append(
            {
                "algorithm": "ecdsa-p256-sha256"
                if isinstance(signer.key, ec.EllipticCurvePrivateKey)
                else "rsa-sha256",
                "certificate": signer.certificate.public_bytes(serialization.Encoding.PEM).decode(),
                "sha256": hashlib.sha256(der).hexdigest(),
            }
        )
    if adapter.webhook_ed25519_key is not None:
        keys["webhooks_v1a"].append(public_key_for(adapter.webhook_ed25519_key))
    return {
        "cmi": "1.0",
        "firm": adapter.firm,
        "software": f"cmi-sdk/{__version__}",
        "capabilities": {
            "terms": f"{prefix}/cmi/terms",
            "documents": f"{prefix}/cmi/documents",
            "requests": f"{prefix}/cmi/requests",
            "offers": f"{prefix}/cmi/offers/{{id}}",
            "acceptance": f"{prefix}/cmi/offers/{{id}}/acceptance",
            "links": f"{prefix}/cmi/links",
            "openapi": f"{prefix}{OPENAPI_PATH}",
            "timings": list(adapter.policy.timings),
        },
        "authentication": {
            "scheme": "standard-webhooks",
            "signer_headers": ["cmi-intermediary", "cmi-terms"],
            "tolerance_seconds": tolerance,
            "signature_context": REQUEST_SIGNATURE_CONTEXT.decode(),
        },
        "standards": adapter.standards.describe(),
        "terms_policy": json.loads(adapter.policy.model_dump_json()),
        "keys": keys,
        "problem_types": {p.type: p.status for p in Problem},
    }
