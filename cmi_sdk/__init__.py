"""cmi-sdk: customer-managed interactions for firms.

With every transaction, the firm emits a standardized XML document under the customer's own
terms; customers send requests for offers, and the firm answers from its own systems,
connected through pluggy hooks. Start with :class:`Adapter`.
"""

from __future__ import annotations

from cmi_sdk._adapter import DEFAULT_PLUGINS, Adapter, ValidatedDocument
from cmi_sdk._exceptions import (
    CMIError,
    ConfigurationError,
    DocumentTooDeepError,
    DocumentTooLargeError,
    DocumentTypeNotFoundError,
    DocumentValidationError,
    ForbiddenXMLError,
    InvalidInputError,
    MalformedXMLError,
    MappingError,
    ModelValidationError,
    NotFoundError,
    PluginError,
    RenderError,
    SignatureVerificationError,
    StandardNotFoundError,
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
from cmi_sdk._xml import HardenedParser
from cmi_sdk.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PLUGINS",
    "Acceptance",
    "Adapter",
    "Advice",
    "BankStatementLineDetails",
    "CMIError",
    "Claim",
    "ConfigurationError",
    "Constraints",
    "DocumentTooDeepError",
    "DocumentTooLargeError",
    "DocumentType",
    "DocumentTypeNotFoundError",
    "DocumentValidationError",
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
    "PluginError",
    "RenderError",
    "Request",
    "Reward",
    "SignatureVerificationError",
    "Standard",
    "StandardNotFoundError",
    "StandardRegistry",
    "Transaction",
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
