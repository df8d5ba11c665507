"""Standard Webhooks signatures: how the SDK signs what it sends and checks what it receives.

The scheme (https://www.standardwebhooks.com): the signed content is
``{webhook-id}.{webhook-timestamp}.{body}``; ``v1`` signatures are HMAC-SHA256 with a shared
secret written ``whsec_<base64>``; ``v1a`` signatures are ed25519 with keys written
``whsk_<base64>`` (secret) and ``whpk_<base64>`` (public). The ``webhook-signature`` header
holds one or more space-separated ``version,base64`` pairs, so a sender can rotate keys by
sending both.

A receiver checks the timestamp against a tolerance window (so a captured request cannot be
replayed later) and keeps the ``webhook-id`` of what it accepted (so one replayed inside the
window is a duplicate, not a second effect).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from cmi_sdk._exceptions import (
    ConfigurationError,
    InvalidInputError,
    SignatureVerificationError,
    StaleTimestampError,
)

__all__ = [
    "DEFAULT_TOLERANCE",
    "SignatureVerificationError",
    "WebhookSigner",
    "WebhookVerifier",
    "generate_secret",
    "public_key_for",
]

DEFAULT_TOLERANCE = 300
"""How far, in seconds, a webhook-timestamp may be from the receiver's clock: 5 minutes."""

# ASCII digits only: str.isdigit() also takes '²' and other scripts' digits, which int()
# then refuses (or reads); fullmatch, as '$' would let a trailing newline through.
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_MIN_SECRET_BYTES = 24  # the scheme asks for 24 to 64 random bytes
_MAX_SECRET_BYTES = 64


def generate_secret() -> str:
    """A new random ``whsec_`` secret of 32 bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def public_key_for(ed25519_key: str) -> str:
    """The ``whpk_`` public key of a ``whsk_`` secret key, for receivers to verify ``v1a``."""
    raw = _decode_key(ed25519_key, "whsk_", "an ed25519 secret key")
    try:
        private = Ed25519PrivateKey.from_private_bytes(raw[:32])
    except ValueError:
        raise ConfigurationError("an ed25519 secret key holds 32 (or 64) bytes") from None
    public = private.public_key().public_bytes_raw()
    return "whpk_" + base64.b64encode(public).decode()


def _decode_key(text: str, prefix: str, what: str) -> bytes:
    if not text.startswith(prefix):
        raise ConfigurationError(f"{what} must start with {prefix!r}")
    try:
        return base64.b64decode(text[len(prefix) :], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"{what} is not valid base64 after {prefix!r}") from None


def _hmac_key(secret: str) -> bytes:
    key = _decode_key(secret, "whsec_", "a webhook secret")
    if not _MIN_SECRET_BYTES <= len(key) <= _MAX_SECRET_BYTES:
        raise ConfigurationError(
            f"a webhook secret must hold {_MIN_SECRET_BYTES} to {_MAX_SECRET_BYTES} bytes"
        )
    return key


def _content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


def _check_id(msg_id: str) -> None:
    # The id is part of the signed content, delimited by '.'; a '.' or whitespace in it would
    # make two different (id, timestamp) pairs sign the same bytes.
    if not msg_id or len(msg_id) > 256 or any(c in msg_id for c in ". \t\r\n,"):
        raise InvalidInputError("webhook-id must be 1-256 characters without '.', ',' or spaces")


@dataclass(frozen=True)
class WebhookSigner:
    """Signs outgoing messages.

    :param secret: the destination's shared ``whsec_`` secret, for ``v1`` signatures.
    :param ed25519_key: optionally a ``whsk_`` secret key; adds a ``v1a`` signature.
    """

    secret: str | None = None
    ed25519_key: str | None = None

    def __post_init__(self) -> None:
        if self.secret is None and self.ed25519_key is None:
            raise ConfigurationError("a WebhookSigner needs a secret or an ed25519 key")
        object.__setattr__(self, "_hmac", None if self.secret is None else _hmac_key(self.secret))
        private = None
        if self.ed25519_key is not None:
            raw = _decode_key(self.ed25519_key, "whsk_", "an ed25519 secret key")
            try:
                private = Ed25519PrivateKey.from_private_bytes(raw[:32])
            except ValueError:
                raise ConfigurationError("an ed25519 secret key holds 32 (or 64) bytes") from None
        object.__setattr__(self, "_ed25519", private)

    def signature(self, msg_id: str, timestamp: int, body: bytes) -> str:
        """The ``webhook-signature`` header value for this message."""
        _check_id(msg_id)
        content = _content(msg_id, timestamp, body)
        parts = []
        key: bytes | None = self._hmac  # type: ignore[attr-defined]
        if key is not None:
            digest = hmac.new(key, content, hashlib.sha256).digest()
            parts.append("v1," + base64.b64encode(digest).decode())
        private: Ed25519PrivateKey | None = self._ed25519  # type: ignore[attr-defined]
        if private is not None:
            parts.append("v1a," + base64.b64encode(private.sign(content)).decode())
        return " ".join(parts)

    def headers(self, msg_id: str, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
        """The three Standard Webhooks headers for ``body``; the timestamp defaults to now."""
        ts = int(time.time()) if timestamp is None else timestamp
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": self.signature(msg_id, ts, body),
        }


@dataclass(frozen=True)
class WebhookVerifier:
    """Checks incoming messages.

    :param secrets: the ``whsec_`` secrets accepted for ``v1`` (several during a rotation).
    :param public_keys: the ``whpk_`` keys accepted for ``v1a``.
    :param tolerance: the largest accepted distance between the timestamp and now, seconds.
    """

    secrets: tuple[str, ...] = ()
    public_keys: tuple[str, ...] = ()
    tolerance: int = DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        if not self.secrets and not self.public_keys:
            raise ConfigurationError("a WebhookVerifier needs a secret or a public key")
        object.__setattr__(self, "_hmac", tuple(_hmac_key(s) for s in self.secrets))
        keys = []
        for text in self.public_keys:
            raw = _decode_key(text, "whpk_", "an ed25519 public key")
            try:
                keys.append(Ed25519PublicKey.from_public_bytes(raw))
            except ValueError:
                raise ConfigurationError("an ed25519 public key holds 32 bytes") from None
        object.__setattr__(self, "_ed25519", tuple(keys))

    def verify(self, headers: Mapping[str, str], body: bytes, *, now: float | None = None) -> str:
        """Check ``body`` against its Standard Webhooks headers; return the webhook-id.

        Header names are matched case-insensitively.

        :raises SignatureVerificationError: a header is missing or malformed, the timestamp
            is outside the tolerance, or no signature matches.
        """
        msg_id = headers.get("webhook-id")
        ts_text = headers.get("webhook-timestamp")
        sig_header = headers.get("webhook-signature")
        if msg_id is None or ts_text is None or sig_header is None:
            # A plain mapping with other capitalizations (a case-insensitive one, such as
            # Starlette's or httpx's headers, has answered already).
            lower = {k.lower(): v for k, v in headers.items()}
            msg_id = lower.get("webhook-id")
            ts_text = lower.get("webhook-timestamp")
            sig_header = lower.get("webhook-signature")
        if not msg_id or not ts_text or not sig_header:
            raise SignatureVerificationError(
                "missing webhook-id, webhook-timestamp or webhook-signature header"
            )
        try:
            _check_id(msg_id)
        except InvalidInputError as exc:
            raise SignatureVerificationError(str(exc)) from None
        if not _TIMESTAMP.fullmatch(ts_text):
            raise SignatureVerificationError("webhook-timestamp must be integer seconds")
        timestamp = int(ts_text)
        clock = time.time() if now is None else now
        if abs(clock - timestamp) > self.tolerance:
            raise StaleTimestampError(
                f"webhook-timestamp is more than {self.tolerance} s from the receiver's clock"
            )
        content = _content(msg_id, timestamp, body)
        for part in sig_header.split():
            version, _, encoded = part.partition(",")
            try:
                given = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                continue
            if version == "v1" and self._v1_ok(content, given):
                return msg_id
            if version == "v1a" and self._v1a_ok(content, given):
                return msg_id
        raise SignatureVerificationError("no valid signature")

    def _v1_ok(self, content: bytes, given: bytes) -> bool:
        keys: tuple[bytes, ...] = self._hmac  # type: ignore[attr-defined]
        return any(
            hmac.compare_digest(hmac.new(k, content, hashlib.sha256).digest(), given) for k in keys
        )

    def _v1a_ok(self, content: bytes, given: bytes) -> bool:
        keys: tuple[Ed25519PublicKey, ...] = self._ed25519  # type: ignore[attr-defined]
        for key in keys:
            try:
                key.verify(given, content)
            except InvalidSignature:
                continue
            return True
        return False
