"""The exceptions cmi-sdk raises.

Every one of them derives from :class:`CMIError`, so a caller can catch them all with one
``except CMIError``. Those about bad input also derive from :class:`ValueError`, and those
about something that is not there from :class:`LookupError`::

    CMIError
    ├── ConfigurationError
    ├── PluginError
    ├── StoreError                      the store refused or lost a write
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
        ├── RequestRefusedError         a request the firm's systems will not answer
        ├── AcceptanceError             an acceptance that cannot be booked
        │   ├── OfferExpiredError
        │   └── AcceptanceConflictError an acceptance id reused for another offer
        ├── DestinationNotAllowedError  a destination the egress guard refuses
        │   └── EgressResolutionError   its name did not resolve (retried later)
        └── SignatureVerificationError  a signed message that fails its check
            ├── StaleTimestampError     a timestamp outside the window
            ├── UnknownPartyError       signed by nobody the firm knows
            └── ReplayedMessageError    a message id seen before, inside the window

The same tree is drawn in ``docs/errors.md``; a test keeps the two in step with the code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "AcceptanceConflictError",
    "AcceptanceError",
    "CMIError",
    "ConfigurationError",
    "DestinationNotAllowedError",
    "DocumentTooDeepError",
    "DocumentTooLargeError",
    "DocumentTypeNotFoundError",
    "DocumentValidationError",
    "EgressResolutionError",
    "ForbiddenXMLError",
    "IntermediaryNotFoundError",
    "InvalidInputError",
    "LinkError",
    "LinkNotFoundError",
    "MalformedXMLError",
    "MappingError",
    "ModelValidationError",
    "NotFoundError",
    "OfferExpiredError",
    "OfferNotFoundError",
    "OutboxRowNotFoundError",
    "PluginError",
    "RenderError",
    "ReplayedMessageError",
    "RequestRefusedError",
    "SignatureVerificationError",
    "StaleTimestampError",
    "StandardNotFoundError",
    "StoreError",
    "TermsError",
    "TermsNotFoundError",
    "UnknownPartyError",
    "ValidationIssue",
    "XMLInputError",
]


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
    """The pipeline made no offer: a plugin found the request invalid, a stage missed its
    budget, or a plugin failed (fail closed).

    :ivar problem: the stable problem slug (``invalid-request``, ``capacity-timeout``, ...).
    :ivar plugin: the plugin at fault, when one is.
    """

    def __init__(self, message: str, *, problem: str, plugin: str | None = None) -> None:
        super().__init__(message)
        self.problem = problem
        self.plugin = plugin


class AcceptanceError(InvalidInputError):
    """An acceptance was refused: the offer is no longer available, the hold or the booking
    failed. Nothing was booked.

    :ivar problem: the stable problem slug.
    """

    def __init__(self, message: str, *, problem: str = "acceptance-refused") -> None:
        super().__init__(message)
        self.problem = problem


class OfferExpiredError(AcceptanceError):
    """The offer's validity window is over."""

    def __init__(self, message: str) -> None:
        super().__init__(message, problem="offer-expired")


class AcceptanceConflictError(AcceptanceError):
    """The acceptance id was already used for another offer."""

    def __init__(self, message: str) -> None:
        super().__init__(message, problem="acceptance-conflict")
