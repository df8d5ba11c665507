"""Signing requests to a firm's CMI endpoint, as an intermediary or as a customer.

Requests are authenticated with the Standard Webhooks scheme, the same one the firm uses
for its deliveries: a ``webhook-id`` (a fresh, single-use message id), a
``webhook-timestamp`` and a ``webhook-signature`` over ``{id}.{timestamp}.{payload}``. Who
signs is named by one header:

- ``cmi-intermediary: NAME``: a registered intermediary, with its ``whsec_`` secret;
- ``cmi-terms: TERMS_ID``: the customer, with the secret of their sharing terms.

The payload is the method and the request target, a line feed, then the body:
``POST /cmi/terms\n{...}``, or ``GET /cmi/documents?since=42\n`` for a request without
one. So a signature covers what is asked of which resource, and cannot be moved to
another method or path. The firm refuses a timestamp outside its window and a message id it has
already accepted from the same signer.

Requests are not signed with the secret itself but with a key derived from it for this one
context (:func:`request_signing_secret`): ``HMAC-SHA256(secret bytes,
"cmi-request-signature/v1")``. The customer's terms secret is also the secret the firm signs
deliveries to the customer's store with, and a Standard Webhooks receiver accepts any body
whose ``{id}.{timestamp}.{body}`` verifies: signed with the same key, a request to the firm
could be posted to the store as a delivery (its body would be ``GET /cmi/documents\n``),
whatever label the payload carried. With the derived key, a request's signature never
verifies as a delivery, and a delivery's never as a request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

from cmi_sdk.webhooks import WebhookSigner

__all__ = [
    "REQUEST_SIGNATURE_CONTEXT",
    "CMIClient",
    "request_signing_secret",
    "signed_headers",
    "signing_payload",
]

REQUEST_SIGNATURE_CONTEXT = b"cmi-request-signature/v1"
"""The context a request signing key is derived for (versioned: a new scheme, a new label)."""


def request_signing_secret(secret: str) -> str:
    """The ``whsec_`` secret that signs requests to the firm for the holder of ``secret``:
    ``whsec_`` + base64 of ``HMAC-SHA256(key=the secret's bytes, msg=b"cmi-request-signature/v1")``.

    Any Standard Webhooks library signs a request with it; a signature made with it never
    verifies under ``secret`` itself, which signs deliveries.

    :raises ConfigurationError: ``secret`` is not a ``whsec_`` secret.
    """
    WebhookSigner(secret=secret)  # refuses a malformed secret
    key = base64.b64decode(secret.removeprefix("whsec_"))
    derived = hmac.new(key, REQUEST_SIGNATURE_CONTEXT, hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(derived).decode()


def signing_payload(method: str, target: str, body: bytes) -> bytes:
    """What the signature covers: ``METHOD target``, a line feed, and the body."""
    return f"{method.upper()} {target}\n".encode() + body


def signed_headers(
    *,
    secret: str,
    method: str,
    target: str,
    body: bytes = b"",
    intermediary: str | None = None,
    terms_id: str | None = None,
    msg_id: str | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    """The authentication headers for one request, signed with the key derived from
    ``secret`` for requests (see :func:`request_signing_secret`).

    :param target: the request's path and query, as sent (``/cmi/documents?since=0``).
    :param intermediary: sign as this registered intermediary (with its secret).
    :param terms_id: or sign as the customer of these terms (with the terms' secret).
    """
    if (intermediary is None) == (terms_id is None):
        raise ValueError("sign as an intermediary or as a terms holder, not both or neither")
    signer = WebhookSigner(secret=request_signing_secret(secret))
    msg = msg_id or f"req_{secrets.token_hex(12)}"
    headers = signer.headers(msg, signing_payload(method, target, body), timestamp=timestamp)
    if intermediary is not None:
        headers["cmi-intermediary"] = intermediary
    else:
        headers["cmi-terms"] = str(terms_id)
    return headers


class CMIClient:
    """A small client of a firm's CMI endpoint (for intermediaries, customers and tests).

    :param base_url: the endpoint's base, such as ``https://firm.example``.
    :param secret: the secret to sign with.
    :param intermediary: act as this registered intermediary.
    :param terms_id: or act as the customer holding these terms.
    :param transport: an httpx transport (tests).
    """

    def __init__(
        self,
        base_url: str,
        *,
        secret: str,
        intermediary: str | None = None,
        terms_id: str | None = None,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._secret = secret
        self._intermediary = intermediary
        self._terms_id = terms_id
        self._prefix = urlsplit(base_url).path.rstrip("/")
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout, transport=transport, follow_redirects=False
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> CMIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send one signed request; ``path`` is relative to the base URL. The body is
        ``json_body`` as JSON, or ``content`` as given (set its content-type in
        ``headers``)."""
        body = content if content is not None else b""
        if json_body is not None:
            body = json.dumps(json_body).encode()
        query = f"?{urlencode(params)}" if params else ""
        target = f"{self._prefix}{path}{query}"
        signed = signed_headers(
            secret=self._secret,
            method=method,
            target=target,
            body=body,
            intermediary=self._intermediary,
            terms_id=self._terms_id,
        )
        if json_body is not None:
            signed["content-type"] = "application/json"
        signed.update(headers or {})
        return self._http.request(method, f"{path}{query}", content=body, headers=signed)

    def post_request(self, xml: bytes) -> httpx.Response:
        """``POST /cmi/requests``: a ``cmi`` request document; the answer is offers XML."""
        return self.request(
            "POST", "/cmi/requests", content=xml, headers={"content-type": "application/xml"}
        )

    def get_offer(self, offer_id: str) -> httpx.Response:
        """``GET /cmi/offers/{id}``: the offer, signed."""
        return self.request("GET", f"/cmi/offers/{offer_id}")

    def accept(self, offer_id: str, xml: bytes) -> httpx.Response:
        """``POST /cmi/offers/{id}/acceptance``: a ``cmi`` acceptance document."""
        return self.request(
            "POST",
            f"/cmi/offers/{offer_id}/acceptance",
            content=xml,
            headers={"content-type": "application/xml"},
        )

    def propose_terms(self, proposal: Mapping[str, Any]) -> httpx.Response:
        """``POST /cmi/terms``."""
        return self.request("POST", "/cmi/terms", json_body=dict(proposal))

    def list_terms(self, customer_ref: str | None = None) -> httpx.Response:
        """``GET /cmi/terms``."""
        params = {"customer": customer_ref} if customer_ref else None
        return self.request("GET", "/cmi/terms", params=params)

    def get_terms(self, terms_id: str) -> httpx.Response:
        """``GET /cmi/terms/{id}``."""
        return self.request("GET", f"/cmi/terms/{terms_id}")

    def revoke_terms(self, terms_id: str) -> httpx.Response:
        """``DELETE /cmi/terms/{id}``."""
        return self.request("DELETE", f"/cmi/terms/{terms_id}")

    def redeem_link(self, code: str) -> httpx.Response:
        """``POST /cmi/links``: redeem the link code a customer gave; the answer's
        ``customer_ref`` is this intermediary's reference for them."""
        return self.request("POST", "/cmi/links", json_body={"code": code})

    def list_links(self) -> httpx.Response:
        """``GET /cmi/links``: this intermediary's active links."""
        return self.request("GET", "/cmi/links")

    def revoke_link(self, link_id: str) -> httpx.Response:
        """``DELETE /cmi/links/{id}``: revoke a link and every terms of its reference."""
        return self.request("DELETE", f"/cmi/links/{link_id}")

    def documents(self, since: str | None = None, limit: int | None = None) -> httpx.Response:
        """``GET /cmi/documents?since=...``."""
        params: dict[str, str] = {}
        if since is not None:
            params["since"] = since
        if limit is not None:
            params["limit"] = str(limit)
        return self.request("GET", "/cmi/documents", params=params or None)
