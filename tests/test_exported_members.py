"""The public surface is deliberate: adding or removing a name is a visible change."""

from __future__ import annotations

import cmi_sdk

EXPECTED = [
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


def test_all_is_pinned() -> None:
    assert cmi_sdk.__all__ == EXPECTED


def _isort_key(name: str) -> tuple[int, str]:
    # Constants, then classes, then functions and the rest: the order ruff keeps __all__ in.
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_all_is_sorted() -> None:
    assert cmi_sdk.__all__ == sorted(cmi_sdk.__all__, key=_isort_key)


def test_every_name_exists_and_is_documented() -> None:
    for name in cmi_sdk.__all__:
        member = getattr(cmi_sdk, name)
        if callable(member) and not name.startswith("_"):
            assert (member.__doc__ or "").strip(), f"{name} has no docstring"


def test_public_members_claim_the_public_module() -> None:
    # Users should see cmi_sdk.Adapter in tracebacks and docs, not a private module path.
    for name in cmi_sdk.__all__:
        member = getattr(cmi_sdk, name)
        if isinstance(member, type):
            assert member.__module__ == "cmi_sdk", f"{name}.__module__ is {member.__module__}"
