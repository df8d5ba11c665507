"""``cmi terms`` and ``cmi links``: the customers' sharing terms and the links that name
them to intermediaries."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cmi_sdk._exceptions import (
    ModelValidationError,
    NotFoundError,
)
from cmi_sdk._models import load_model
from cmi_sdk.cli._common import (
    EXIT_OK,
    InputError,
    UsageError,
    _emitting_adapter,
    _located,
    _print_json,
    _read_secret,
    _until,
    _write,
)


def cmd_terms_add(args: argparse.Namespace) -> int:
    """Register sharing terms for a customer, as the firm's policy answers them."""
    from cmi_sdk._models import TermsProposal  # noqa: PLC0415

    adapter = _emitting_adapter(args)
    try:  # a standard or document type the firm does not have is a usage error (exit 2)
        std = adapter.standards.get(args.standard)
        if args.type is not None:
            std.document_type(args.type)
    except NotFoundError as exc:
        raise UsageError(str(exc)) from None
    data: dict[str, Any] = {
        "customer_ref": args.customer,
        "destination": None if args.destination in (None, "pull") else args.destination,
        "secret": _read_secret(args),
        "standard": args.standard,
        "document_type": args.type,
        "fields": None if args.fields is None else [f for f in args.fields.split(",") if f],
        "when": args.when,
        "purpose": {"code": args.purpose_code, "text": args.purpose},
        "until": _until(args.until),
    }
    try:
        proposal = load_model(TermsProposal, data)
    except ModelValidationError as exc:
        raise _located("terms", exc) from None
    decision = adapter.propose_terms(proposal)
    if decision.outcome == "accepted" and decision.terms is not None:
        if decision.consent is not None:
            print(f"consent record {decision.consent.id} signed", file=sys.stderr)
        _write(f"{decision.terms.id}\n".encode(), None)
        return EXIT_OK
    if decision.outcome == "alternative" and decision.alternative is not None:
        alternative = json.dumps(decision.alternative.public_dict(), default=str)
        raise InputError(
            f"the firm's policy offers an alternative ({decision.reason}): {alternative}"
        )
    raise InputError(f"the firm's policy rejects these terms: {decision.reason}")


def cmd_terms_list(args: argparse.Namespace) -> int:
    """List sharing terms."""
    adapter = _emitting_adapter(args, require_signer=False)
    terms = adapter.list_terms(customer_ref=args.customer, include_revoked=args.all)
    if args.json:
        _print_json([t.public_dict() | {"id": t.id} for t in terms])
        return EXIT_OK
    lines = []
    for t in terms:
        state = "revoked" if t.revoked_at is not None else "active"
        where = t.destination or "(pull)"
        fields = ",".join(t.fields) if t.fields is not None else "*"
        lines.append(
            f"{t.id}  {t.customer_ref}  {state}  {t.standard}  {t.when}  {where}  fields={fields}"
        )
    _write(("\n".join(lines) + "\n").encode() if lines else b"", None)
    return EXIT_OK


def cmd_terms_revoke(args: argparse.Namespace) -> int:
    """Revoke sharing terms."""
    adapter = _emitting_adapter(args)
    consent = adapter.revoke_terms(args.id)
    _write(f"{args.id} revoked; consent record {consent.record.id}\n".encode(), None)
    return EXIT_OK


def cmd_links_create(args: argparse.Namespace) -> int:
    """Make a link code for a signed-in customer's account, to give their intermediary."""
    import datetime as dt  # noqa: PLC0415

    if not 1 <= args.ttl <= 24 * 60:
        raise UsageError("--ttl is 1 to 1440 minutes")
    adapter = _emitting_adapter(args, require_signer=False)
    code = adapter.create_link_code(args.account, ttl=dt.timedelta(minutes=args.ttl))
    expires = code.expires_at.isoformat().replace("+00:00", "Z")
    if args.json:
        _print_json({"code": code.code, "account": code.account, "expires_at": expires})
        return EXIT_OK
    _write(f"{code.code}\nexpires {expires}\n".encode(), None)
    return EXIT_OK


def cmd_links_list(args: argparse.Namespace) -> int:
    """List service links."""
    adapter = _emitting_adapter(args, require_signer=False)
    found = adapter.links(
        account=args.account, intermediary=args.intermediary, include_revoked=args.all
    )
    if args.json:
        _print_json([link.model_dump(mode="json") for link in found])
        return EXIT_OK
    lines = [
        f"{link.id}  {link.account}  {link.intermediary}  {link.customer_ref}  "
        f"{'active' if link.active else 'revoked'}"
        for link in found
    ]
    _write(("\n".join(lines) + "\n").encode() if lines else b"", None)
    return EXIT_OK


def cmd_links_revoke(args: argparse.Namespace) -> int:
    """Revoke a service link and every terms of its reference."""
    adapter = _emitting_adapter(args)
    revocation = adapter.revoke_link(args.id)
    records = ", ".join(c.record.id for c in revocation.consents) or "none"
    _write(
        f"{args.id} revoked; terms revoked: {len(revocation.consents)} (consent records:"
        f" {records}); undelivered documents cancelled: {revocation.cancelled}\n".encode(),
        None,
    )
    return EXIT_OK
