"""cmi-sdk: customer-managed interactions for firms.

With every transaction, the firm emits a standardized XML document under the customer's own
terms; customers send requests for offers, and the firm answers from its own systems,
connected through pluggy hooks. Start with :class:`Adapter`.
"""

from __future__ import annotations

from cmi_sdk._adapter import DEFAULT_PLUGINS, Adapter, ValidatedDocument
from cmi_sdk._delivery import DeliveryStats, DeliveryWorker, RetrySchedule
from cmi_sdk._emit import Emission, SignedConsent
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
    EgressResolutionError,
    ForbiddenXMLError,
    IntermediaryNotFoundError,
    InvalidInputError,
    LinkError,
    LinkNotFoundError,
    MalformedXMLError,
    MappingError,
    ModelValidationError,
    NotFoundError,
    OfferExpiredError,
    OfferNotFoundError,
    OutboxRowNotFoundError,
    PluginError,
    RenderError,
    ReplayedMessageError,
    RequestRefusedError,
    SignatureVerificationError,
    StaleTimestampError,
    StandardNotFoundError,
    StoreError,
    TermsError,
    TermsNotFoundError,
    UnknownPartyError,
    ValidationIssue,
    XMLInputError,
)
from cmi_sdk._limits import ServerLimits
from cmi_sdk._links import LinkCode, LinkRevocation
from cmi_sdk._models import (
    Acceptance,
    Advice,
    BankStatementLineDetails,
    Claim,
    ConsentRecord,
    Constraints,
    FlightDetails,
    FlightProduct,
    FlightWanted,
    Identity,
    LineItem,
    Link,
    LoanDetails,
    LoanProduct,
    LoanWanted,
    Money,
    Offer,
    OfferSet,
    Purpose,
    Request,
    Reward,
    SharingTerms,
    TermsDecision,
    TermsPolicy,
    TermsProposal,
    Transaction,
    load_model,
)
from cmi_sdk._offers import AcceptanceResult, Answer
from cmi_sdk._quotes import Availability, ClaimCheck, Hold, Quote, RevenueDecision
from cmi_sdk._secrets import SecretsKeyring
from cmi_sdk._standards import DocumentType, Standard, StandardRegistry
from cmi_sdk._version import __version__
from cmi_sdk._xml import HardenedParser
from cmi_sdk.egress import EgressGuard
from cmi_sdk.hookspecs import hookimpl, nonblocking
from cmi_sdk.outbox import DeliveryReport, StoredOffer
from cmi_sdk.outbox._intermediaries import Intermediary

__all__ = [
    "DEFAULT_PLUGINS",
    "Acceptance",
    "AcceptanceConflictError",
    "AcceptanceError",
    "AcceptanceResult",
    "Adapter",
    "Advice",
    "Answer",
    "Availability",
    "BankStatementLineDetails",
    "CMIError",
    "Claim",
    "ClaimCheck",
    "ConfigurationError",
    "ConsentRecord",
    "Constraints",
    "DeliveryReport",
    "DeliveryStats",
    "DeliveryWorker",
    "DestinationNotAllowedError",
    "DocumentTooDeepError",
    "DocumentTooLargeError",
    "DocumentType",
    "DocumentTypeNotFoundError",
    "DocumentValidationError",
    "EgressGuard",
    "EgressResolutionError",
    "Emission",
    "FlightDetails",
    "FlightProduct",
    "FlightWanted",
    "ForbiddenXMLError",
    "HardenedParser",
    "Hold",
    "Identity",
    "Intermediary",
    "IntermediaryNotFoundError",
    "InvalidInputError",
    "LineItem",
    "Link",
    "LinkCode",
    "LinkError",
    "LinkNotFoundError",
    "LinkRevocation",
    "LoanDetails",
    "LoanProduct",
    "LoanWanted",
    "MalformedXMLError",
    "MappingError",
    "ModelValidationError",
    "Money",
    "NotFoundError",
    "Offer",
    "OfferExpiredError",
    "OfferNotFoundError",
    "OfferSet",
    "OutboxRowNotFoundError",
    "PluginError",
    "Purpose",
    "Quote",
    "RenderError",
    "ReplayedMessageError",
    "Request",
    "RequestRefusedError",
    "RetrySchedule",
    "RevenueDecision",
    "Reward",
    "SecretsKeyring",
    "ServerLimits",
    "SharingTerms",
    "SignatureVerificationError",
    "SignedConsent",
    "StaleTimestampError",
    "Standard",
    "StandardNotFoundError",
    "StandardRegistry",
    "StoreError",
    "StoredOffer",
    "TermsDecision",
    "TermsError",
    "TermsNotFoundError",
    "TermsPolicy",
    "TermsProposal",
    "Transaction",
    "UnknownPartyError",
    "ValidatedDocument",
    "ValidationIssue",
    "XMLInputError",
    "__version__",
    "hookimpl",
    "load_model",
    "nonblocking",
]

# Public classes claim the public module, so tracebacks and docs say cmi_sdk.Adapter rather
# than a private module's path.
for _name in __all__:
    _member = globals()[_name]
    if isinstance(_member, type):
        _member.__module__ = __name__
del _name, _member
