"""The exceptions cmi-sdk raises.

Every one of them derives from :class:`CMIError`, so a caller can catch them all with one
``except CMIError``. Whose fault an error is decides its branch: those about the caller's
input derive from :class:`ValueError` (4xx over HTTP), those about something that is not
there from :class:`LookupError`, and outages of the firm's own systems from
:class:`FirmSystemError`, never a :class:`ValueError` (5xx over HTTP)::

    CMIError
    ├── ConfigurationError
    ├── PluginError
    ├── StoreError                      the store refused or lost a write
    ├── FirmSystemError                 the firm's systems failed: no offer, no booking
    │   ├── StageTimeoutError           a stage missed its share of the deadline
    │   ├── PluginFailedError           a plugin raised, or answered what it may not
    │   └── NoAnswerError               no plugin answered a hook that must answer
    ├── NotFoundError (LookupError)
    │   ├── StandardNotFoundError
    │   ├── DocumentTypeNotFoundError
    │   ├── TermsNotFoundError
    │   ├── LinkNotFoundError
    │   ├── OfferNotFoundError
    │   ├── OutboxRowNotFoundError
    │   └── IntermediaryNotFoundError
    └── InvalidInputError (ValueError)
        ├── ModelValidationError        data that does not fit a canonical model
        ├── MappingError                a model a document type cannot express
        ├── RenderError                 text that XML 1.0 cannot carry
        ├── XMLInputError               XML refused before validation
        │   ├── DocumentTooLargeError
        │   ├── MalformedXMLError
        │   ├── ForbiddenXMLError       a DOCTYPE (DTDs, entities)
        │   └── DocumentTooDeepError
        ├── DocumentValidationError     XML that breaks its schema
        ├── TermsError                  sharing terms the firm cannot take as they are
        ├── LinkError                   a link code that cannot be redeemed, a link revoked
        ├── RequestRefusedError         a request the firm cannot serve as it is
        ├── AcceptanceError             an acceptance that cannot be booked
        │   ├── OfferExpiredError
        │   └── AcceptanceConflictError an acceptance id reused for another offer
        ├── DestinationNotAllowedError  a destination the egress guard refuses
        │   └── EgressResolutionError   its name did not resolve (retried later)
        └── SignatureVerificationError  a signed message that fails its check
            ├── DocumentNotSignedError  a document that carries no signature
            ├── StaleTimestampError     a timestamp outside the window
            ├── UnknownPartyError       signed by nobody the firm knows
            └── ReplayedMessageError    a message id seen before, inside the window

The same tree is drawn in ``docs/errors.md``; a test keeps the two in step with the code.
An error answered over HTTP names one :class:`Problem`, which says its status.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "AcceptanceConflictError",
    "AcceptanceError",
    "CMIError",
    "ConfigurationError",
    "DestinationNotAllowedError",
    "DocumentNotSignedError",
    "DocumentTooDeepError",
    "DocumentTooLargeError",
    "DocumentTypeNotFoundError",
    "DocumentValidationError",
    "EgressResolutionError",
    "FirmSystemError",
    "ForbiddenXMLError",
    "IntermediaryNotFoundError",
    "InvalidInputError",
    "LinkError",
    "LinkNotFoundError",
    "MalformedXMLError",
    "MappingError",
    "ModelValidationError",
    "NoAnswerError",
    "NotFoundError",
    "OfferExpiredError",
    "OfferNotFoundError",
    "OutboxRowNotFoundError",
    "PluginError",
    "PluginFailedError",
    "Problem",
    "RenderError",
    "ReplayedMessageError",
    "RequestRefusedError",
    "SignatureVerificationError",
    "StageTimeoutError",
    "StaleTimestampError",
    "StandardNotFoundError",
    "StoreError",
    "TermsError",
    "TermsNotFoundError",
    "UnknownPartyError",
    "ValidationIssue",
    "XMLInputError",
]


class Problem(StrEnum):
    """Every problem type the firm's endpoint answers with (RFC 9457).

    A member is its slug (``Problem.CAPACITY_TIMEOUT == "capacity-timeout"``), stable:
    clients rely on it. :attr:`type` is the problem's URI, :attr:`status` its HTTP
    status: 4xx when the caller's input is wrong or the resource's state does not allow
    it, 5xx when the firm's systems failed (:attr:`outage`); :attr:`summary` is the
    problem's title.
    """

    status: int
    summary: str

    def __new__(cls, slug: str, status: int, summary: str) -> Problem:
        member = str.__new__(cls, slug)
        member._value_ = slug
        member.status = status
        member.summary = summary
        return member

    @property
    def type(self) -> str:
        """The problem's ``type`` URI: ``urn:cmi:problem:<slug>``."""
        return f"urn:cmi:problem:{self.value}"

    @classmethod
    def of(cls, slug: str) -> Problem | None:
        """The member whose slug is ``slug``, or None when no problem type has it."""
        return next((member for member in cls if member.value == slug), None)

    @property
    def outage(self) -> bool:
        """Whether the firm's systems failed (a 5xx), rather than the caller's request."""
        return self.status >= 500

    # The caller: who signed, and what it may do.
    UNAUTHORIZED = "unauthorized", 401, "The request is not signed by anyone the firm knows"
    BAD_SIGNATURE = "bad-signature", 401, "The request's signature does not verify"
    STALE_TIMESTAMP = "stale-timestamp", 401, "The request's timestamp is outside the window"
    UNKNOWN_PARTY = "unknown-party", 401, "The request names a signer the firm does not know"
    REPLAYED = "replayed", 401, "The request's message id was already used"
    METRICS_UNAUTHORIZED = (
        "metrics-unauthorized",
        401,
        "GET /metrics needs the metrics bearer token",
    )
    FORBIDDEN = "forbidden", 403, "The signer may not do this"
    # The request's framing and body.
    NOT_FOUND = "not-found", 404, "No such resource"
    METHOD_NOT_ALLOWED = "method-not-allowed", 405, "The resource does not take this method"
    REQUEST_TIMEOUT = "request-timeout", 408, "The request's body did not arrive in time"
    HEADER_TOO_LARGE = "header-too-large", 431, "The request's head is too large"
    TOO_LARGE = "too-large", 413, "The request body is too large"
    UNSUPPORTED_MEDIA_TYPE = (
        "unsupported-media-type",
        415,
        "The request body has the wrong content type",
    )
    INVALID_INPUT = "invalid-input", 422, "The request body is not valid"
    TERMS_REFUSED = "terms-refused", 422, "The terms cannot be registered as they are"
    LINK_REFUSED = "link-refused", 422, "The link code is unknown, used or expired"
    DESTINATION_NOT_ALLOWED = "destination-not-allowed", 422, "The destination is not allowed"
    CONFLICT = "conflict", 409, "The request conflicts with the resource's state"
    BAD_REQUEST = "bad-request", 400, "The request's headers or framing are malformed"
    MALFORMED_XML = "malformed-xml", 400, "The body is not well-formed XML"
    FORBIDDEN_XML = (
        "forbidden-xml",
        400,
        "The XML uses a construct the firm refuses (a DTD, entities)",
    )
    TOO_DEEP = "too-deep", 400, "The XML nests too deeply"
    INVALID_DOCUMENT = "invalid-document", 422, "The document breaks its schema"
    UNSUPPORTED_STANDARD = (
        "unsupported-standard",
        422,
        "The document's standard (its root element) is not one the firm reads",
    )
    # A request for offers the firm cannot serve as it is.
    INVALID_REQUEST = "invalid-request", 422, "The firm's systems cannot serve the request as it is"
    DECLINED = "declined", 422, "The firm makes no offer for this request"
    DEADLINE_PASSED = "deadline-passed", 422, "The request's respond_by has passed"
    REQUEST_CONFLICT = (
        "request-conflict",
        409,
        "The request id was used for another request, whose offers are still valid",
    )
    # The firm's systems failed answering a request: no offer.
    VALIDATION_TIMEOUT = (
        "validation-timeout",
        503,
        "Request validation did not answer in time; no offer",
    )
    CLAIMS_TIMEOUT = "claims-timeout", 503, "Claim verification did not answer in time; no offer"
    CAPACITY_TIMEOUT = "capacity-timeout", 503, "Capacity did not answer in time; no offer"
    REVENUE_TIMEOUT = "revenue-timeout", 503, "Revenue management did not answer in time; no offer"
    PRICING_TIMEOUT = "pricing-timeout", 503, "Pricing did not answer in time; no offer"
    REWARDS_TIMEOUT = "rewards-timeout", 503, "Rewards did not answer in time; no offer"
    ADVICE_TIMEOUT = "advice-timeout", 503, "Advice did not answer in time; no offer"
    VALIDITY_TIMEOUT = "validity-timeout", 503, "Offer validity did not answer in time; no offer"
    OFFER_TIMEOUT = "offer-timeout", 503, "The offer could not be built in time"
    NO_REVENUE_DECISION = (
        "no-revenue-decision",
        503,
        "No revenue-management system answered; no offer",
    )
    NO_PRICE = "no-price", 503, "No pricing system answered; no offer"
    PRICE_BELOW_FLOOR = "price-below-floor", 502, "The price came out below the floor; no offer"
    PLUGIN_FAILED = "plugin-failed", 502, "One of the firm's systems failed; nothing was done"
    # An acceptance the offer's state does not allow: nothing was booked.
    OFFER_EXPIRED = "offer-expired", 410, "The offer's validity window is over"
    NO_LONGER_AVAILABLE = "no-longer-available", 409, "The offer is no longer available"
    PRICE_CHANGED = "price-changed", 409, "The offer's price is no longer available"
    ACCEPTANCE_REFUSED = (
        "acceptance-refused",
        409,
        "The acceptance was refused; nothing was booked",
    )
    ACCEPTANCE_IN_PROGRESS = (
        "acceptance-in-progress",
        409,
        "The acceptance is being booked; retry shortly",
    )
    ACCEPTANCE_CONFLICT = "acceptance-conflict", 409, "The acceptance id was used for another offer"
    ALREADY_ACCEPTED = "already-accepted", 409, "The offer was already accepted"
    # The firm's systems failed booking: nothing was booked, a retry may book.
    NOT_BOOKED = "not-booked", 503, "The firm's booking system failed; nothing was booked"
    ACCEPTANCE_FAILED = (
        "acceptance-failed",
        500,
        "The booking failed unexpectedly; nothing was booked",
    )
    STORE_UNAVAILABLE = (
        "store-unavailable",
        503,
        "The firm's store failed; nothing was written, retry later",
    )
    INTERNAL = "internal", 500, "The firm's endpoint failed"


def _problem(problem: Problem | str, *, outage: bool, kind: str) -> Problem:
    """``problem`` as a member (a slug names one), on the side of the tree that ``kind``
    is: an outage's problem is a 5xx, an input error's a 4xx."""
    found = problem if isinstance(problem, Problem) else Problem.of(problem)
    if found is None:
        raise ValueError(f"no problem type has the slug {problem!r}")
    if found.outage != outage:
        side = "the firm's systems" if outage else "the caller's input"
        raise ValueError(f"{kind} is about {side}; {found.value!r} ({found.status}) is not")
    return found


class CMIError(Exception):
    """The root of every exception cmi-sdk raises."""


class ConfigurationError(CMIError):
    """The adapter's configuration is missing or contradictory."""


class PluginError(CMIError):
    """A plugin could not be loaded, or registered something inconsistent.

    :ivar plugin: the name of the plugin at fault, when it is known.
    """

    def __init__(self, message: str, *, plugin: str | None = None) -> None:
        super().__init__(message)
        self.plugin = plugin


class StoreError(CMIError):
    """The store (SQLite or PostgreSQL) failed: nothing of the failed call was written."""


class FirmSystemError(CMIError):
    """The firm's own systems failed (a plugin, the system behind it): nothing was offered
    or booked, and the same call may succeed later. Never a :class:`ValueError`: nothing
    is wrong with the caller's input. The endpoint answers a 5xx.

    :ivar problem: the :class:`Problem` (a 5xx) the endpoint answers with.
    :ivar plugin: the plugin at fault, when one is known.
    """

    def __init__(self, message: str, *, problem: Problem | str, plugin: str | None = None) -> None:
        super().__init__(message)
        self.problem = _problem(problem, outage=True, kind=type(self).__name__)
        self.plugin = plugin


class StageTimeoutError(FirmSystemError):
    """A stage of the request-to-offer pipeline missed its share of the request's deadline
    (fail closed: no offer is made, and the late answer is dropped).

    :ivar stage: the stage's name (``capacity``, ``pricing``, ...).
    """

    def __init__(self, message: str, *, stage: str, problem: Problem | str) -> None:
        super().__init__(message, problem=problem)
        self.stage = stage


class PluginFailedError(FirmSystemError):
    """A plugin raised an exception that is not an answer (any but the refusals its hook
    documents), or answered with something its hook may not return (the wrong type, a
    price below the floor). The log has the traceback and the plugin's name."""

    def __init__(
        self,
        message: str,
        *,
        plugin: str | None,
        problem: Problem | str = Problem.PLUGIN_FAILED,
    ) -> None:
        super().__init__(message, problem=problem, plugin=plugin)


class NoAnswerError(FirmSystemError):
    """No plugin answered a hook that must be answered (``cmi_revenue_decision``,
    ``cmi_price``, ``cmi_book``): the firm's systems are not all connected.

    :ivar hook: the hook nobody answered.
    """

    def __init__(self, message: str, *, hook: str, problem: Problem | str) -> None:
        super().__init__(message, problem=problem)
        self.hook = hook


class NotFoundError(CMIError, LookupError):
    """Something asked for by name is not installed or not registered."""


class StandardNotFoundError(NotFoundError):
    """No registered standard has the requested name (or claims the document's namespace)."""


class DocumentTypeNotFoundError(NotFoundError):
    """The standard has no document type of that name, or none with that root element."""


class TermsNotFoundError(NotFoundError):
    """No sharing terms have that id (or none the caller may see)."""


class LinkNotFoundError(NotFoundError):
    """No service link has that id (or none the caller may see)."""


class OfferNotFoundError(NotFoundError):
    """No offer has that id."""


class OutboxRowNotFoundError(NotFoundError):
    """No outbox row has that id."""


class IntermediaryNotFoundError(NotFoundError):
    """No active intermediary has that name (never registered, or revoked)."""


class InvalidInputError(CMIError, ValueError):
    """Input was refused; nothing was changed because of it."""


@dataclass(frozen=True, slots=True)
class ValidationIssue:
    """One located problem in a document or a model.

    :ivar reason: what is wrong, in words.
    :ivar path: where: an XPath-like path into the XML, or a dotted field path in a model.
    :ivar line: the 1-based line in the XML source, when known.
    """

    reason: str
    path: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.path}: {self.reason}"


class _IssuesError(InvalidInputError):
    """An error that carries a list of located issues."""

    def __init__(self, message: str, issues: Sequence[ValidationIssue]) -> None:
        self.issues: tuple[ValidationIssue, ...] = tuple(issues)
        detail = "\n".join(f"  {issue}" for issue in self.issues)
        super().__init__(f"{message}\n{detail}" if detail else message)

    @property
    def reason(self) -> str:
        """The first issue's reason (convenient when there is only one)."""
        return self.issues[0].reason if self.issues else str(self)

    @property
    def path(self) -> str:
        """The first issue's path."""
        return self.issues[0].path if self.issues else ""


class ModelValidationError(_IssuesError):
    """Data does not fit a canonical model.

    :ivar issues: one :class:`ValidationIssue` per problem; ``path`` is the dotted field path.
    :ivar model: the name of the model that refused the data.
    """

    def __init__(self, model: str, issues: Sequence[ValidationIssue]) -> None:
        self.model = model
        super().__init__(f"invalid {model}:", issues)


class MappingError(InvalidInputError):
    """A document type cannot express the given model (for example a bank line as a ticket)."""


class RenderError(InvalidInputError):
    """Rendering failed: a value holds a character that XML 1.0 cannot carry.

    :ivar field: the name of the template variable that holds the character, when found.
    :ivar character: the offending character.
    """

    def __init__(self, message: str, *, field: str | None, character: str) -> None:
        super().__init__(message)
        self.field = field
        self.character = character


class XMLInputError(InvalidInputError):
    """XML refused by the hardened parser, before any validation."""


class DocumentTooLargeError(XMLInputError):
    """The document is larger than the configured byte cap.

    :ivar limit: the cap, in bytes.
    """

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class MalformedXMLError(XMLInputError):
    """The bytes are not well-formed XML.

    :ivar line: the 1-based line of the first error, when known.
    """

    def __init__(self, message: str, *, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class ForbiddenXMLError(XMLInputError):
    """The document has a DOCTYPE, which the hardened parser refuses (with it, DTDs and
    entities); the message is the same whatever the DOCTYPE names."""


class DocumentTooDeepError(XMLInputError):
    """Elements are nested deeper than the configured limit.

    :ivar limit: the deepest nesting allowed.
    """

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class DocumentValidationError(_IssuesError):
    """A document breaks its schema.

    :ivar issues: one :class:`ValidationIssue` per problem, with reason, path and line.
    :ivar document: the document's bytes, as given.
    :ivar standard: the standard's name.
    :ivar document_type: the document type's name.
    """

    def __init__(
        self,
        issues: Sequence[ValidationIssue],
        *,
        document: bytes,
        standard: str,
        document_type: str,
    ) -> None:
        self.document = document
        self.standard = standard
        self.document_type = document_type
        super().__init__(f"document is not a valid {standard} {document_type}:", issues)


class SignatureVerificationError(InvalidInputError):
    """A signed message was refused: a missing header, a timestamp outside the window, or no
    valid signature. The message says which, and nothing about the keys."""


class DocumentNotSignedError(SignatureVerificationError):
    """A document that should be verified carries no signature at all: "this document is
    not signed", rather than a verifier's account of what it looked for."""


class TermsError(InvalidInputError):
    """Sharing terms that cannot be registered as they are: contradictory, naming a field or
    standard the firm does not have, or already revoked."""


class LinkError(InvalidInputError):
    """A link code that cannot be redeemed (unknown, used or expired: one error for all
    three, so a code cannot be probed), or a link that is already revoked."""


class DestinationNotAllowedError(InvalidInputError):
    """The egress guard refuses a destination: not https, or an address in a loopback,
    private, link-local or otherwise non-public range (unless explicitly allowed).

    :ivar url: the refused destination.
    """

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class EgressResolutionError(DestinationNotAllowedError):
    """The destination's host name could not be resolved (or resolved to nothing).

    Unlike its parent, this refusal may go away by itself (a DNS outage, a name being set
    up), so delivery retries it later instead of giving up.
    """


class StaleTimestampError(SignatureVerificationError):
    """The message's timestamp is too far from the receiver's clock: late, or a replay of a
    captured message."""


class UnknownPartyError(SignatureVerificationError):
    """The message names a sender (an intermediary, a terms id) the firm does not know."""


class ReplayedMessageError(SignatureVerificationError):
    """The message's id was already accepted inside the timestamp window: a replay."""


class RequestRefusedError(InvalidInputError):
    """The firm cannot serve a request as it is: a plugin found it invalid
    (``cmi_validate_request``), or its ``respond_by`` has passed. No offer is made. An
    outage while answering is a :class:`FirmSystemError` instead.

    :ivar problem: the :class:`Problem` (a 4xx): ``invalid-request``, ``deadline-passed``,
        ``request-conflict``.
    :ivar plugin: the plugin that refused, when one is known.
    """

    def __init__(
        self,
        message: str,
        *,
        problem: Problem | str = Problem.INVALID_REQUEST,
        plugin: str | None = None,
    ) -> None:
        super().__init__(message)
        self.problem = _problem(problem, outage=False, kind=type(self).__name__)
        self.plugin = plugin


class AcceptanceError(InvalidInputError):
    """An acceptance the offer's state does not allow: it expired, is no longer available
    at its price, was already accepted or is being booked, or the firm's systems refused
    it (a limit reached). Nothing was booked. An outage while booking is a
    :class:`FirmSystemError` instead.

    :ivar problem: the :class:`Problem` (a 4xx).
    """

    def __init__(
        self, message: str, *, problem: Problem | str = Problem.ACCEPTANCE_REFUSED
    ) -> None:
        super().__init__(message)
        self.problem = _problem(problem, outage=False, kind=type(self).__name__)


class OfferExpiredError(AcceptanceError):
    """The offer's validity window is over."""

    def __init__(self, message: str) -> None:
        super().__init__(message, problem=Problem.OFFER_EXPIRED)


class AcceptanceConflictError(AcceptanceError):
    """The acceptance id was already used for another offer."""

    def __init__(self, message: str) -> None:
        super().__init__(message, problem=Problem.ACCEPTANCE_CONFLICT)
