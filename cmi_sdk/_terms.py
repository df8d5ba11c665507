"""Sharing terms: what a customer lets the firm send, to whom, when and why.

A customer (or an intermediary acting for them) *proffers* terms, a :class:`TermsProposal`.
The firm answers the way IEEE 7012 ("MyTerms") agreements work: it accepts them, offers one
alternative, or rejects them, judged against the :class:`TermsPolicy` it publishes. Accepted
terms become :class:`SharingTerms` with an id; every acceptance and every revocation
produces a signed :class:`ConsentRecord`, in the spirit of the Kantara consent receipt.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, Field, model_validator

from cmi_sdk._models import CustomerRef, Identifier, Text, UtcDatetime, _Model

__all__ = [
    "ConsentRecord",
    "Purpose",
    "SharingTerms",
    "TermsDecision",
    "TermsPolicy",
    "TermsProposal",
]

_WHEN = re.compile(r"now|pull|digest:([1-9][0-9]{0,2})h")
_SECRET = re.compile(r"whsec_[A-Za-z0-9+/]{32,88}={0,2}")
_FIELD = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _when(value: str) -> str:
    if not _WHEN.fullmatch(value):
        raise ValueError("must be 'now', 'pull' or 'digest:<hours>h' (for example digest:6h)")
    return value


def _secret(value: str) -> str:
    if not _SECRET.fullmatch(value):
        raise ValueError("must be a Standard Webhooks secret: whsec_ and 24-64 bytes of base64")
    return value


def _destination(value: str) -> str:
    # The egress guard judges the address when terms are reviewed and before every delivery;
    # here only the shape is checked.
    if len(value) > 2048 or not re.fullmatch(r"https?://[^\s]+", value):
        raise ValueError("must be an http(s) URL of at most 2048 characters")
    return value


def _field_name(value: str) -> str:
    if not _FIELD.fullmatch(value):
        raise ValueError(f"{value!r} is not a field name (lower case, digits and '_')")
    return value


When = Annotated[str, AfterValidator(_when)]
"""``now`` (each document at once), ``digest:<N>h`` (held, then sent together every N
hours) or ``pull`` (never pushed: the customer fetches documents when they choose)."""

WebhookSecret = Annotated[str, AfterValidator(_secret)]
FieldName = Annotated[str, AfterValidator(_field_name)]
Destination = Annotated[str, AfterValidator(_destination)]


class Purpose(_Model):
    """Why the customer shares: a code the firm's policy knows, and words for people."""

    code: Identifier
    """Such as ``bookkeeping``, ``travel-planning`` or ``tax``."""
    text: Text


class TermsProposal(_Model):
    """Terms as a customer proffers them.

    ``fields`` lists what may be shared; everything else a document type can withhold is
    removed before signing. ``None`` shares every field.
    """

    customer_ref: CustomerRef
    destination: Destination | None = None
    """Where documents are pushed; ``None`` for pull-only terms."""
    secret: WebhookSecret = Field(repr=False)
    """The destination's Standard Webhooks secret; also authenticates the customer's pulls."""
    standard: Identifier = "cmi"
    document_type: Identifier | None = None
    """Required only when the standard has several document types for transactions."""
    fields: tuple[FieldName, ...] | None = None
    when: When = "now"
    purpose: Purpose
    until: UtcDatetime | None = None
    """When the terms lapse; ``None`` for until revoked (if the firm's policy allows)."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.when == "pull" and self.destination is not None:
            raise ValueError("pull-only terms have no destination")
        if self.when != "pull" and self.destination is None:
            raise ValueError("terms that push (now or digest) need a destination")
        if self.fields is not None:
            object.__setattr__(self, "fields", tuple(sorted(set(self.fields))))
        return self

    @property
    def digest_hours(self) -> int | None:
        """The digest interval in hours, for ``digest:<N>h`` terms."""
        match = _WHEN.fullmatch(self.when)
        return int(match.group(1)) if match and match.group(1) else None

    def public_dict(self) -> dict[str, object]:
        """The terms as JSON-ready data, without the secret."""
        return self.model_dump(mode="json", exclude={"secret"})


class SharingTerms(TermsProposal):
    """Terms the firm accepted: they hold until ``until`` or until revoked."""

    id: Identifier
    created_at: UtcDatetime
    intermediary: Identifier | None = None
    """The intermediary that registered them for the customer, if any."""
    revoked_at: UtcDatetime | None = None

    def active(self, now: dt.datetime) -> bool:
        """Whether documents may go out under these terms at ``now``."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return False
        return self.until is None or now < self.until

    def digest(self) -> str:
        """SHA-256 of the terms' canonical JSON (without the secret): what consent refers to."""
        data = self.public_dict()
        data.pop("revoked_at", None)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


Timing = Literal["now", "digest", "pull"]


class TermsPolicy(_Model):
    """The terms a firm accepts, published at ``/.well-known/cmi``.

    Proposals inside the policy are accepted; those that can be brought inside it (a
    shorter period, a digest interval in range, a standard the firm offers) get one
    alternative; the rest are rejected.
    """

    standards: tuple[Identifier, ...] | None = None
    """The standards documents may be sent in; ``None`` offers every installed standard
    that can express a transaction. The first is the one an alternative proposes."""
    timings: tuple[Timing, ...] = ("now", "digest", "pull")
    min_digest_hours: Annotated[int, Field(ge=1, le=999)] = 1
    max_digest_hours: Annotated[int, Field(ge=1, le=999)] = 168
    purposes: tuple[Identifier, ...] | None = None
    """The purpose codes the firm accepts; ``None`` accepts any."""
    max_duration_days: Annotated[int, Field(ge=1)] | None = None
    """The longest the firm keeps terms; when set, open-ended or longer terms get an
    alternative ending then. ``None``: terms hold until they lapse or are revoked."""
    policy_url: Annotated[str, Field(max_length=2048)] | None = None
    """Where people read the firm's privacy and sharing policy."""
    jurisdiction: Annotated[str, Field(max_length=64)] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min_digest_hours > self.max_digest_hours:
            raise ValueError("min_digest_hours is above max_digest_hours")
        if not self.timings:
            raise ValueError("a policy offers at least one timing")
        return self


class ConsentRecord(_Model):
    """A record of consent given or withdrawn, kept by the firm and returned to the customer.

    Its fields follow the Kantara consent receipt's spirit: an id and version, the time,
    the parties (the firm as controller, the customer's pseudonymous reference, the
    intermediary), the purpose, and a reference to the terms with their digest. It is
    rendered as a ``cmi`` ``consent`` document and signed like every other document.
    """

    id: Identifier
    version: Literal["1.0"] = "1.0"
    event: Literal["granted", "revoked"]
    issued_at: UtcDatetime
    firm: Identifier
    customer_ref: CustomerRef
    intermediary: Identifier | None = None
    terms_id: Identifier
    terms_digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    purpose: Purpose
    standard: Identifier
    document_type: Identifier
    fields: tuple[FieldName, ...] | None = None
    when: When
    destination: Destination | None = None
    valid_until: UtcDatetime | None = None
    policy_url: Annotated[str, Field(max_length=2048)] | None = None
    jurisdiction: Annotated[str, Field(max_length=64)] | None = None


class TermsDecision(_Model):
    """The firm's answer to proffered terms.

    :ivar outcome: ``accepted``, ``alternative`` (the firm proposes ``alternative``
        instead; proffer it to accept it) or ``rejected``.
    :ivar reason: why, in words, when not simply accepted.
    :ivar terms: the registered terms, when accepted.
    :ivar alternative: the one alternative the firm offers.
    :ivar consent: the consent record, when accepted.
    :ivar consent_xml: the signed consent record document, when accepted.
    """

    outcome: Literal["accepted", "alternative", "rejected"]
    reason: str | None = None
    terms: SharingTerms | None = None
    alternative: TermsProposal | None = None
    consent: ConsentRecord | None = None
    consent_xml: bytes | None = Field(default=None, repr=False)
