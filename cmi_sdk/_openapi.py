"""The endpoint's OpenAPI 3.1 description of itself, served at ``GET /cmi/openapi.json``.

Intermediaries generate clients from it. It is written here, beside the routes it
describes (a test checks that every route is in it, and that it is a valid OpenAPI 3.1
document), rather than derived from the handlers: the endpoint reads raw bodies itself
(size caps, the hardened XML parser), so no framework sees their shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cmi_sdk._exceptions import Problem
from cmi_sdk._models import TermsProposal
from cmi_sdk._version import __version__

if TYPE_CHECKING:
    from cmi_sdk._adapter import Adapter

__all__ = ["OPENAPI_PATH", "openapi_document"]

OPENAPI_PATH = "/cmi/openapi.json"
"""Where the endpoint serves its description, under its mount prefix."""

_XML = {"application/xml": {"schema": {"type": "string", "contentMediaType": "application/xml"}}}
_JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}


def _problems(*problems: Problem) -> dict[str, Any]:
    """The responses of ``problems``, grouped by status, as RFC 9457 problem details."""
    by_status: dict[int, list[Problem]] = {}
    for problem in problems:
        by_status.setdefault(problem.status, []).append(problem)
    return {
        str(status): {
            "description": "; ".join(f"{p.value}: {p.summary}" for p in members),
            "content": {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}},
                "application/problem+xml": {"schema": {"type": "string"}},
            },
        }
        for status, members in sorted(by_status.items())
    }


_AUTH_PROBLEMS = (
    Problem.UNAUTHORIZED,
    Problem.BAD_SIGNATURE,
    Problem.STALE_TIMESTAMP,
    Problem.REPLAYED,
    Problem.FORBIDDEN,
    Problem.TOO_LARGE,
    Problem.BAD_REQUEST,
    Problem.REQUEST_TIMEOUT,
)
_XML_PROBLEMS = (
    Problem.UNSUPPORTED_MEDIA_TYPE,
    Problem.UNSUPPORTED_STANDARD,
    Problem.MALFORMED_XML,
    Problem.FORBIDDEN_XML,
    Problem.TOO_DEEP,
    Problem.INVALID_DOCUMENT,
)


def _operation(
    operation_id: str,
    summary: str,
    ok: tuple[str, str, dict[str, Any]],
    *,
    problems: tuple[Problem, ...] = (),
    body: dict[str, Any] | None = None,
    parameters: list[dict[str, Any]] | None = None,
    signed: bool = True,
) -> dict[str, Any]:
    status, description, content = ok
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "responses": {
            status: {"description": description, "content": content},
            **_problems(*(_AUTH_PROBLEMS if signed else ()), *problems),
        },
    }
    if signed:
        operation["security"] = [{"webhookSignature": []}]
        operation["parameters"] = [
            {"$ref": f"#/components/parameters/{name}"}
            for name in ("webhookId", "webhookTimestamp", "cmiIntermediary", "cmiTerms")
        ] + (parameters or [])
    elif parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": True, "content": body}
    return operation


def _path_id(name: str, what: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": what,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:\\-]{0,127}$"},
    }


def openapi_document(
    adapter: Adapter, *, prefix: str = "", metrics: bool = False
) -> dict[str, Any]:
    """The OpenAPI 3.1 description of ``adapter``'s endpoint, mounted under ``prefix``
    (``/partners``; empty when served alone): its server URL carries the prefix."""
    offer_id = _path_id("offer_id", "an offer's id, as the offers document gives it")
    terms_id = _path_id("terms_id", "the terms' id")
    link_id = _path_id("link_id", "the link's id")
    paths: dict[str, Any] = {
        "/.well-known/cmi": {
            "get": _operation(
                "getWellKnown",
                "What the firm offers: capabilities, standards, terms policy, public keys",
                ("200", "the firm's CMI description", _JSON_OBJECT),
                signed=False,
            )
        },
        OPENAPI_PATH: {
            "get": _operation(
                "getOpenAPI",
                "This description",
                ("200", "an OpenAPI 3.1 document", _JSON_OBJECT),
                signed=False,
            )
        },
        "/cmi/requests": {
            "post": _operation(
                "postRequest",
                "A customer's request for offers (a cmi request, or a UBL RequestForQuotation)",
                ("200", "the firm's signed answer: an offers document", _XML),
                body=_XML,
                parameters=[
                    {
                        "name": "answer",
                        "in": "query",
                        "required": False,
                        "description": "the standard to answer in (default: the request's)",
                        "schema": {"type": "string"},
                    }
                ],
                problems=(
                    *_XML_PROBLEMS,
                    Problem.INVALID_REQUEST,
                    Problem.DEADLINE_PASSED,
                    Problem.REQUEST_CONFLICT,
                    Problem.DECLINED,
                    Problem.CAPACITY_TIMEOUT,
                    Problem.NO_REVENUE_DECISION,
                    Problem.NO_PRICE,
                    Problem.PRICE_BELOW_FLOOR,
                    Problem.PLUGIN_FAILED,
                ),
            )
        },
        "/cmi/offers/{offer_id}": {
            "get": _operation(
                "getOffer",
                "One offer, signed (to the intermediary that asked for it)",
                ("200", "the offer document, signed", _XML),
                parameters=[offer_id],
                problems=(Problem.NOT_FOUND,),
            )
        },
        "/cmi/offers/{offer_id}/acceptance": {
            "post": _operation(
                "acceptOffer",
                "Accept an offer for a customer: the firm books it",
                ("201", "the booking", {"application/json": {"schema": _BOOKING}}),
                body=_XML,
                parameters=[offer_id],
                problems=(
                    *_XML_PROBLEMS,
                    Problem.NOT_FOUND,
                    Problem.OFFER_EXPIRED,
                    Problem.NO_LONGER_AVAILABLE,
                    Problem.PRICE_CHANGED,
                    Problem.ACCEPTANCE_CONFLICT,
                    Problem.ACCEPTANCE_IN_PROGRESS,
                    Problem.ALREADY_ACCEPTED,
                    Problem.NOT_BOOKED,
                ),
            )
        },
        "/cmi/terms": {
            "post": _operation(
                "proposeTerms",
                "Proffer a customer's sharing terms: accepted, an alternative, or rejected",
                ("200", "the firm's decision, with the signed consent record", _JSON_OBJECT),
                body={"application/json": {"schema": {"$ref": "#/components/schemas/Terms"}}},
                problems=(
                    Problem.UNSUPPORTED_MEDIA_TYPE,
                    Problem.INVALID_INPUT,
                    Problem.TERMS_REFUSED,
                    Problem.DESTINATION_NOT_ALLOWED,
                ),
            ),
            "get": _operation(
                "listTerms",
                "The terms this intermediary registered (or the customer's own)",
                ("200", "terms", _JSON_OBJECT),
                parameters=[
                    {
                        "name": "customer",
                        "in": "query",
                        "required": False,
                        "description": "only this customer_ref's terms",
                        "schema": {"type": "string"},
                    }
                ],
                problems=(Problem.INVALID_INPUT,),
            ),
        },
        "/cmi/terms/{terms_id}": {
            "get": _operation(
                "getTerms",
                "Terms and their consent records",
                ("200", "the terms", _JSON_OBJECT),
                parameters=[terms_id],
                problems=(Problem.NOT_FOUND,),
            ),
            "delete": _operation(
                "revokeTerms",
                "Revoke terms: nothing more goes out under them",
                ("200", "the signed consent record of the revocation", _JSON_OBJECT),
                parameters=[terms_id],
                problems=(Problem.NOT_FOUND, Problem.CONFLICT),
            ),
        },
        "/cmi/documents": {
            "get": _operation(
                "pullDocuments",
                "Documents emitted under terms, after a cursor",
                ("200", "a page of documents and the next cursor", _JSON_OBJECT),
                parameters=[
                    {
                        "name": name,
                        "in": "query",
                        "required": False,
                        "description": what,
                        "schema": {"type": "string"},
                    }
                    for name, what in (
                        ("since", "the cursor of a previous page's next"),
                        ("limit", "the most documents this page holds"),
                        ("terms", "an intermediary names the terms it pulls for"),
                    )
                ],
                problems=(Problem.INVALID_INPUT, Problem.NOT_FOUND),
            )
        },
        "/cmi/links": {
            "post": _operation(
                "redeemLink",
                "Redeem a customer's link code: the answer holds this intermediary's"
                " customer_ref for them",
                ("201", "the link", _JSON_OBJECT),
                body={
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["code"],
                            "properties": {"code": {"type": "string"}},
                            "additionalProperties": False,
                        }
                    }
                },
                problems=(Problem.INVALID_INPUT, Problem.LINK_REFUSED),
            ),
            "get": _operation(
                "listLinks", "This intermediary's active links", ("200", "links", _JSON_OBJECT)
            ),
        },
        "/cmi/links/{link_id}": {
            "delete": _operation(
                "revokeLink",
                "Revoke a link and every terms of its reference",
                ("200", "the revocation, with the consent records", _JSON_OBJECT),
                parameters=[link_id],
                problems=(Problem.NOT_FOUND, Problem.CONFLICT),
            )
        },
    }
    if metrics:
        paths["/metrics"] = {
            "get": _operation(
                "getMetrics",
                "The outbox's health, in the Prometheus text format",
                ("200", "metrics", {"text/plain": {"schema": {"type": "string"}}}),
                signed=False,
                problems=(Problem.METRICS_UNAUTHORIZED,),
            )
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"CMI endpoint of {adapter.firm}",
            "version": __version__,
            "summary": "Customer-managed interactions: requests for offers, acceptances,"
            " sharing terms, links and documents",
        },
        "servers": [{"url": prefix or "/"}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "webhookSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "webhook-signature",
                    "description": "Standard Webhooks: v1,base64(HMAC-SHA256) over"
                    " '{webhook-id}.{webhook-timestamp}.{METHOD target}\\n{body}', with the key"
                    " derived from the signer's whsec_ secret for cmi-request-signature/v1;"
                    " the signer is named by cmi-intermediary or cmi-terms",
                }
            },
            "parameters": {
                "webhookId": _header("webhook-id", "a fresh message id, used once", required=True),
                "webhookTimestamp": _header(
                    "webhook-timestamp", "POSIX seconds, inside the firm's window", required=True
                ),
                "cmiIntermediary": _header(
                    "cmi-intermediary", "sign as this registered intermediary", required=False
                ),
                "cmiTerms": _header(
                    "cmi-terms", "or as the customer holding these terms", required=False
                ),
            },
            "schemas": {
                "Problem": {
                    "type": "object",
                    "description": "RFC 9457 problem details",
                    "required": ["type", "title", "status"],
                    "properties": {
                        "type": {"type": "string", "enum": [p.type for p in Problem]},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                    },
                },
                "Terms": TermsProposal.model_json_schema(
                    ref_template="#/components/schemas/Terms/$defs/{model}"
                ),
            },
        },
    }


def _header(name: str, what: str, *, required: bool) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": required,
        "description": what,
        "schema": {"type": "string"},
    }


_BOOKING: dict[str, Any] = {
    "type": "object",
    "required": ["outcome", "acceptance_id", "offer_id"],
    "properties": {
        "outcome": {"type": "string"},
        "acceptance_id": {"type": "string"},
        "offer_id": {"type": "string"},
        "transaction_id": {"type": "string"},
        "documents": {"type": "array", "items": {"type": "string"}},
        "replayed": {"type": "boolean"},
    },
}
