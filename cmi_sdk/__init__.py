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
    CMIError,
    ConfigurationError,
    DestinationNotAllowedError,
    DocumentTooDeepError,
    DocumentTooLargeError,
    DocumentTypeNotFoundError,
    DocumentValidationError,
    EgressResolutionError,
    ForbiddenXMLError,
    InvalidInputError,
    MalformedXMLError,
    MappingError,
    ModelValidationError,
    NotFoundError,
    OutboxRowNotFoundError,
    PluginError,
    RenderError,
    ReplayedMessageError,
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
from cmi_sdk._models import (
    Acceptance,
    Advice,
    BankStatementLineDetails,
    Claim,
    Constraints,
    FlightDetails,
    FlightProduct,
    FlightWanted,
    Identity,
    LineItem,
    LoanDetails,
    LoanProduct,
    LoanWanted,
    Money,
    Offer,
    Request,
    Reward,
    Transaction,
    load_model,
)
from cmi_sdk._standards import DocumentType, Standard, StandardRegistry
from cmi_sdk._terms import (
    ConsentRecord,
    Purpose,
    SharingTerms,
    TermsDecision,
    TermsPolicy,
    TermsProposal,
)
from cmi_sdk._version import __version__
from cmi_sdk._xml import HardenedParser
from cmi_sdk.egress import EgressGuard
from cmi_sdk.hookspecs import hookimpl

__all__ = [
    "DEFAULT_PLUGINS",
    "Acceptance",
    "Adapter",
    "Advice",
    "BankStatementLineDetails",
    "CMIError",
    "Claim",
    "ConfigurationError",
    "ConsentRecord",
    "Constraints",
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
    "Identity",
    "InvalidInputError",
    "LineItem",
    "LoanDetails",
    "LoanProduct",
    "LoanWanted",
    "MalformedXMLError",
    "MappingError",
    "ModelValidationError",
    "Money",
    "NotFoundError",
    "Offer",
    "OutboxRowNotFoundError",
    "PluginError",
    "Purpose",
    "RenderError",
    "ReplayedMessageError",
    "Request",
    "RetrySchedule",
    "Reward",
    "SharingTerms",
    "SignatureVerificationError",
    "SignedConsent",
    "StaleTimestampError",
    "Standard",
    "StandardNotFoundError",
    "StandardRegistry",
    "StoreError",
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
]

# Public classes claim the public module, so tracebacks and docs say cmi_sdk.Adapter rather
# than a private module's path.
for _name in __all__:
    _member = globals()[_name]
    if isinstance(_member, type):
        _member.__module__ = __name__
del _name, _member
