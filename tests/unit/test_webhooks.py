"""Standard Webhooks signing and verification."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cmi_sdk import CMIError, ConfigurationError
from cmi_sdk.webhooks import (
    SignatureVerificationError,
    WebhookSigner,
    WebhookVerifier,
    generate_secret,
)

# The example published with the Standard Webhooks specification.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # noqa: S105 (published example)
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_matches_the_specification_example() -> None:
    assert WebhookSigner(secret=SPEC_SECRET).signature(SPEC_ID, SPEC_TS, SPEC_BODY) == (
        SPEC_SIGNATURE
    )
    headers = {
        "Webhook-Id": SPEC_ID,
        "Webhook-Timestamp": str(SPEC_TS),
        "Webhook-Signature": SPEC_SIGNATURE,
    }
    assert WebhookVerifier(secrets=(SPEC_SECRET,)).verify(headers, SPEC_BODY, now=SPEC_TS) == (
        SPEC_ID
    )


def test_round_trip_with_generated_secret() -> None:
    secret = generate_secret()
    headers = WebhookSigner(secret=secret).headers("msg_1", b"<x/>")
    assert WebhookVerifier(secrets=(secret,)).verify(headers, b"<x/>") == "msg_1"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda h, b: (h, b + b" "), "no valid signature"),
        (lambda h, b: ({**h, "webhook-id": "msg_2"}, b), "no valid signature"),
        (lambda h, b: ({**h, "webhook-timestamp": str(SPEC_TS + 1)}, b), "no valid signature"),
        (lambda h, b: ({**h, "webhook-signature": "v1,AAAA"}, b), "no valid signature"),
        (lambda h, b: ({**h, "webhook-signature": "v2," + h["webhook-signature"][3:]}, b), "no"),
        (lambda h, b: ({k: v for k, v in h.items() if k != "webhook-id"}, b), "missing"),
        (lambda h, b: ({**h, "webhook-timestamp": "soon"}, b), "integer seconds"),
        (lambda h, b: ({**h, "webhook-id": "a.b"}, b), "without '.'"),
    ],
)
def test_any_change_is_refused(change: object, reason: str) -> None:
    headers = WebhookSigner(secret=SPEC_SECRET).headers(SPEC_ID, SPEC_BODY, timestamp=SPEC_TS)
    new_headers, new_body = change(headers, SPEC_BODY)  # type: ignore[operator]
    verifier = WebhookVerifier(secrets=(SPEC_SECRET,))
    with pytest.raises(SignatureVerificationError, match=reason):
        verifier.verify(new_headers, new_body, now=SPEC_TS)


@pytest.mark.parametrize("skew", [-301, 301, 10**6])
def test_timestamps_outside_the_window_are_refused(skew: int) -> None:
    headers = WebhookSigner(secret=SPEC_SECRET).headers(SPEC_ID, SPEC_BODY, timestamp=SPEC_TS)
    with pytest.raises(SignatureVerificationError, match="from the receiver's clock"):
        WebhookVerifier(secrets=(SPEC_SECRET,)).verify(headers, SPEC_BODY, now=SPEC_TS + skew)


def test_window_edges_are_accepted() -> None:
    headers = WebhookSigner(secret=SPEC_SECRET).headers(SPEC_ID, SPEC_BODY, timestamp=SPEC_TS)
    verifier = WebhookVerifier(secrets=(SPEC_SECRET,), tolerance=300)
    for skew in (-300, 0, 300):
        assert verifier.verify(headers, SPEC_BODY, now=SPEC_TS + skew) == SPEC_ID


def test_rotation_accepts_any_listed_secret() -> None:
    old, new = generate_secret(), generate_secret()
    headers = WebhookSigner(secret=old).headers("msg_1", b"body")
    assert WebhookVerifier(secrets=(new, old)).verify(headers, b"body") == "msg_1"
    with pytest.raises(SignatureVerificationError):
        WebhookVerifier(secrets=(new,)).verify(headers, b"body")


def _ed25519_pair() -> tuple[str, str]:
    private = Ed25519PrivateKey.generate()
    raw_private = private.private_bytes_raw()
    raw_public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return (
        "whsk_" + base64.b64encode(raw_private).decode(),
        "whpk_" + base64.b64encode(raw_public).decode(),
    )


def test_v1a_ed25519_alongside_v1() -> None:
    secret_key, public_key = _ed25519_pair()
    signer = WebhookSigner(secret=SPEC_SECRET, ed25519_key=secret_key)
    headers = signer.headers("msg_1", b"body")
    versions = [part.split(",")[0] for part in headers["webhook-signature"].split()]
    assert versions == ["v1", "v1a"]
    assert WebhookVerifier(public_keys=(public_key,)).verify(headers, b"body") == "msg_1"
    _, other_public = _ed25519_pair()
    with pytest.raises(SignatureVerificationError):
        WebhookVerifier(public_keys=(other_public,)).verify(headers, b"body")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"secret": "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
        {"secret": "whsec_not base64!"},
        {"secret": "whsec_" + base64.b64encode(b"short").decode()},
        {"ed25519_key": "whpk_" + base64.b64encode(b"x" * 32).decode()},
    ],
)
def test_bad_keys_are_configuration_errors(kwargs: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError):
        WebhookSigner(**kwargs)


def test_errors_are_cmi_errors_and_value_errors() -> None:
    assert issubclass(SignatureVerificationError, CMIError)
    assert issubclass(SignatureVerificationError, ValueError)
