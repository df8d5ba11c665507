"""``cmi request`` and ``cmi accept``: an intermediary's side of the endpoint."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import secrets
from typing import Any

from cmi_sdk._display import format_offers
from cmi_sdk._exceptions import CMIError, ModelValidationError
from cmi_sdk._models import load_model
from cmi_sdk.cli._common import (
    EXIT_OK,
    InputError,
    UsageError,
    _adapter,
    _answer_problem,
    _client,
    _located,
    _reaching,
    _read,
    _write,
)


def cmd_request(args: argparse.Namespace) -> int:
    """Act as an intermediary: sign and post a request, print the offers."""
    from cmi_sdk._models import Request  # noqa: PLC0415

    adapter = _adapter(args)
    data = _read(args.file, adapter.parser.max_bytes)
    if data.lstrip()[:1] == b"<":
        if args.date is not None:
            raise UsageError("--date applies to a canonical request (JSON), not to XML")
        xml = data
        adapter.validate(xml, standard="cmi", document_type="request")
    else:
        try:
            model = load_model(Request, _filled_in(args.file, data, args.date))
        except ModelValidationError as exc:
            raise _located(args.file, exc) from None
        xml = adapter.render(model, standard="cmi", document_type="request")
    with _client(args) as client, _reaching(args.to):
        response = client.post_request(xml)
    if response.status_code != 200:
        raise _answer_problem(response)
    try:
        answer = adapter.parse(response.content, standard="cmi", document_type="offers")
    except CMIError as exc:
        raise InputError(
            f"{response.request.url} answered {response.status_code}, but not with CMI"
            f" offers: {str(exc).splitlines()[0]}"
        ) from None
    if args.ids:
        offers = getattr(answer, "offers", ())  # an OfferSet, as the document type says
        _write("".join(f"{offer.id}\n" for offer in offers).encode(), None)
    elif args.xml:
        _write(response.content, args.output)
    else:
        _write(("\n".join(format_offers(answer)) + "\n").encode(), None)
    return EXIT_OK


def cmd_accept(args: argparse.Namespace) -> int:
    """Act as an intermediary: accept an offer for a customer; print the booking.

    Without ``--id``, the acceptance id is derived from the intermediary, the offer and
    the customer, so running the command again is a retry of the same acceptance: it gets
    the first answer and books nothing more."""

    from cmi_sdk._models import Acceptance  # noqa: PLC0415

    adapter = _adapter(args)
    identity = None
    if args.name or args.email:
        identity = {"name": args.name, "email": args.email}
    try:
        acceptance = load_model(
            Acceptance,
            {
                "id": args.id or _acceptance_id(args.intermediary, args.offer_id, args.customer),
                "offer_id": args.offer_id,
                "customer_ref": args.customer,
                "accepted_at": dt.datetime.now(dt.UTC).isoformat(),
                "identity": identity,
            },
        )
    except ModelValidationError as exc:
        raise _located("acceptance", exc) from None
    xml = adapter.render(acceptance, standard="cmi", document_type="acceptance")
    with _client(args) as client, _reaching(args.to):
        response = client.accept(args.offer_id, xml)
    if response.status_code != 201:
        raise _answer_problem(response)
    try:
        result = response.json()
        result["outcome"]
    except (ValueError, KeyError, TypeError):
        raise InputError(
            f"{response.request.url} answered {response.status_code}, but not with a CMI booking"
        ) from None
    documents = ", ".join(result.get("documents", [])) or "none"
    if result.get("replayed"):
        line = (
            f"already {result['outcome']}: offer {result['offer_id']} as"
            f" {result['transaction_id']} (acceptance {result['acceptance_id']}, accepted"
            f" before; nothing more was booked; documents: {documents})"
        )
    else:
        line = (
            f"{result['outcome']}: offer {result['offer_id']} as {result['transaction_id']}"
            f" (acceptance {result['acceptance_id']}; documents: {documents})"
        )
    _write(f"{line}\n".encode(), None)
    return EXIT_OK


def _acceptance_id(intermediary: str, offer_id: str, customer: str) -> str:
    """A stable acceptance id: the same command run again retries the same acceptance."""
    import hashlib  # noqa: PLC0415

    digest = hashlib.sha256("\x1f".join((intermediary, offer_id, customer)).encode())
    return f"acc_{digest.hexdigest()[:24]}"


def travel_date(text: str, *, today: dt.date | None = None) -> dt.date:
    """``--date``: a date (``2027-03-01``) or days from today, UTC (``+30d``, ``+30``)."""
    today = today or dt.datetime.now(dt.UTC).date()
    match = re.fullmatch(r"\+(\d{1,4})d?", text.strip())
    if match is not None:
        return today + dt.timedelta(days=int(match.group(1)))
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date (2027-03-01) or days from today (+30d)"
        ) from None


def _filled_in(source: str, data: bytes, date: dt.date | None) -> dict[str, Any]:
    """The request of ``data`` with what a file may leave out filled in at send time: a
    fresh ``id`` and ``created_at`` (now); and ``--date`` as the wanted date. A file that
    gives them keeps them: an example never expires, and a file sent again is a retry."""
    try:
        request = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{source}: not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise InputError(f"{source}: a request is a JSON object")
    request.setdefault("id", f"req_{secrets.token_hex(8)}")
    request.setdefault("created_at", dt.datetime.now(dt.UTC).isoformat())
    if date is not None:
        wanted = request.get("wanted")
        if request.get("kind") != "flight" or not isinstance(wanted, dict):
            raise UsageError("--date applies to a flight request (its wanted date)")
        request["wanted"] = {**wanted, "date": date.isoformat()}
    return request
