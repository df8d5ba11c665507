"""The public surface is deliberate: adding or removing a name is a visible change."""

from __future__ import annotations

import ast
import inspect
import typing

import cmi_sdk
import cmi_sdk.outbox
from cmi_sdk import hookspecs
from mkdocs_hooks import hookspecs as _hookspecs

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
    "DeliveryReport",
    "DeliveryStats",
    "DeliveryWorker",
    "DestinationNotAllowedError",
    "DocumentNotSignedError",
    "DocumentTooDeepError",
    "DocumentTooLargeError",
    "DocumentType",
    "DocumentTypeNotFoundError",
    "DocumentValidationError",
    "Documents",
    "EgressGuard",
    "EgressResolutionError",
    "Emission",
    "FirmSystemError",
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
    "NoAnswerError",
    "NotFoundError",
    "Offer",
    "OfferExpiredError",
    "OfferNotFoundError",
    "OfferSet",
    "OutboxRowNotFoundError",
    "PluginError",
    "PluginFailedError",
    "Prepared",
    "Problem",
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
    "SignaturePlacement",
    "SignatureVerificationError",
    "SignedConsent",
    "StageTimeoutError",
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


def _hook_types() -> dict[str, set[type]]:
    """The SDK classes each hookspec receives or returns, from its resolved annotations."""
    # hookspecs imports its annotation types only for type checking: run that block here.
    ns = dict(vars(hookspecs))
    tree = ast.parse(inspect.getsource(hookspecs))
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            exec(compile(ast.Module(body=node.body, type_ignores=[]), "hookspecs", "exec"), ns)  # noqa: S102
    found: dict[str, set[type]] = {}

    def walk(hint: object, into: set[type]) -> None:
        if isinstance(hint, type) and hint.__module__.split(".")[0] == "cmi_sdk":
            into.add(hint)
        for arg in typing.get_args(hint):
            walk(arg, into)

    for spec in _hookspecs():
        types: set[type] = set()
        for hint in typing.get_type_hints(spec, globalns=ns).values():
            walk(hint, types)
        found[spec.__name__] = types
    return found


def test_every_type_a_hook_receives_or_returns_is_public() -> None:
    found = _hook_types()
    assert cmi_sdk.DeliveryReport in found["cmi_on_delivered"]
    for hook, types in found.items():
        for cls in types:
            assert getattr(cmi_sdk, cls.__name__, None) is cls, f"{hook} uses {cls!r}"
            assert cls.__name__ in cmi_sdk.__all__, f"{hook} uses {cls.__name__}"


def test_store_internals_are_not_public() -> None:
    # Store authors import the contract's rows from cmi_sdk.outbox; the bundled stores'
    # SQL parameter helpers are not even part of that.
    for name in ("NewRow", "OutboxRow", "AttemptResult", "CompletionParams", "offer_row"):
        assert name not in cmi_sdk.__all__
        assert not hasattr(cmi_sdk, name)
    assert "NewRow" in cmi_sdk.outbox.__all__
    assert {"CompletionParams", "offer_row"}.isdisjoint(cmi_sdk.outbox.__all__)
    for name in cmi_sdk.outbox.__all__:
        member = getattr(cmi_sdk.outbox, name)
        if isinstance(member, type):
            assert (member.__doc__ or "").strip(), f"cmi_sdk.outbox.{name} has no docstring"
