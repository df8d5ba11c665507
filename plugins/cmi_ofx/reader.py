"""Reading banks' OFX exports, version 1 (SGML) or 2 (XML), into canonical transactions.

:func:`parse_ofx` is for files a customer downloads from their bank, which are OFX "as banks
write it": it reads what the specification allows and the quirks banks are known for, and
refuses, with a located error, what it cannot read without guessing. The ``statement``
document type's own parser (used by :meth:`cmi_sdk.Adapter.parse`) is the exact one; this
one is lenient.

How a ``STMTTRN`` becomes a :class:`~cmi_sdk.Transaction` of kind ``bank_statement_line``:

- ``id`` is the private tag ``CMI.TRNID`` when the file has one (documents the SDK
  rendered), else :func:`~cmi_ofx.plugin.transaction_id` of the FITID. FITIDs are unique
  within an account: when importing several accounts of one bank, ids can repeat across
  them.
- ``firm`` is the ``firm`` argument, else the FI's ``ORG`` made into an identifier
  (``Wells Fargo`` becomes ``Wells-Fargo``); a file without an ORG needs the argument.
- ``customer_ref`` is the argument: OFX does not name the customer.
- ``occurred_at`` is ``DTUSER`` when given, else ``DTPOSTED``. Times without a zone are UTC,
  as the specification says, unless ``assume_tz`` says otherwise.
- ``total`` is ``TRNAMT`` (signed as the bank wrote it) in the line's ``CURRENCY/CURSYM``
  when it has one, else the statement's ``CURDEF``.
- ``transaction_type`` is ``TRNTYPE``, upper-cased; a type OFX does not define is ``OTHER``.
- ``payee`` is ``EXTDNAME`` when given and up to 64 characters, else ``NAME``, else the
  ``PAYEE`` aggregate's NAME, else the first 64 characters of ``MEMO``. Leading and
  trailing whitespace is stripped from every value (section 3.2.9.1 asks for it, and SGML
  files carry line ends in them); an empty element is an absent one.

Bank and credit card statements (``STMTRS``, ``CCSTMTRS``) are read, every one in the file,
in order; a file with none (an investment statement) gives an empty list.
"""

from __future__ import annotations

import codecs
import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

from lxml import etree
from pydantic import ValidationError

from cmi_ofx.plugin import transaction_id
from cmi_ofx.sgml import MAX_OFX_BYTES, MAX_OFX_DEPTH, parse_sgml_body, read_sgml
from cmi_ofx.values import parse_ofx_amount, parse_ofx_datetime
from cmi_sdk import (
    BankStatementLineDetails,
    DocumentTooLargeError,
    HardenedParser,
    MalformedXMLError,
    MappingError,
    Transaction,
)
from cmi_sdk.mapping import leaf_text

__all__ = ["ParsedOFX", "parse_ofx", "read_ofx"]

_TRNTYPES: Final = frozenset(
    get_args(BankStatementLineDetails.model_fields["transaction_type"].annotation)
)
_NOT_IDENTIFIER: Final = re.compile(r"[^A-Za-z0-9._:\-]+")
_IDENTIFIER: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}")
_PAYEE_CHARS: Final = 64
_MEMO_CHARS: Final = 256


@dataclass(frozen=True, slots=True)
class ParsedOFX:
    """An OFX file, read into an element tree.

    :ivar version: ``1`` (SGML) or ``2`` (XML), as the file's header says.
    :ivar root: the ``OFX`` element; tag names upper-cased and without namespace, text as
        written.
    """

    version: Literal[1, 2]
    root: etree._Element = field(repr=False)


def read_ofx(
    data: bytes, *, max_bytes: int = MAX_OFX_BYTES, max_depth: int = MAX_OFX_DEPTH
) -> ParsedOFX:
    """Read OFX 1 or OFX 2 bytes into an element tree, hardened either way.

    OFX 2 goes through the SDK's :class:`~cmi_sdk.HardenedParser` (no DTD, no entity
    expansion, no network); OFX 1 through :func:`cmi_ofx.sgml.read_sgml`. A file with an
    OFX 2 header whose body is SGML (unclosed elements, ``&nbsp;``), which some banks send,
    is read as SGML.

    :raises XMLInputError: see :func:`cmi_ofx.sgml.read_sgml` and
        :meth:`cmi_sdk.HardenedParser.parse`.
    """
    if len(data) > max_bytes:
        raise DocumentTooLargeError(
            f"OFX file is {len(data)} bytes, over the {max_bytes}-byte limit", limit=max_bytes
        )
    stripped = data.removeprefix(codecs.BOM_UTF8).lstrip()
    if not stripped.startswith((b"<?xml", b"<?OFX", b"<?ofx")):
        return ParsedOFX(1, read_sgml(data, max_bytes=max_bytes, max_depth=max_depth).root)
    parser = HardenedParser(max_bytes=max_bytes, max_depth=max_depth)
    try:
        root = parser.parse(stripped).getroot()
    except MalformedXMLError as exc:
        header_end = _ofx_header_end(stripped)
        if header_end is None:
            raise
        try:
            root = parse_sgml_body(
                stripped[header_end:].decode("utf-8", errors="strict").lstrip(),
                max_depth=max_depth,
            )
        except (MalformedXMLError, UnicodeDecodeError):
            raise exc from None
        return ParsedOFX(2, root)
    for element in root.iter(etree.Element):
        element.tag = etree.QName(element).localname.upper()
    if root.tag != "OFX":
        raise MalformedXMLError(f"not an OFX document: the root element is <{root.tag!s}>")
    return ParsedOFX(2, root)


def _ofx_header_end(data: bytes) -> int | None:
    """Where the first ``<?OFX ...?>`` header in ``data`` ends, if there is one.

    One pass: a regular expression searched from each ``<?OFX`` would scan again to the
    next ``>`` every time, quadratic in a file of ``<?OFX<?OFX...``.
    """
    position = 0
    while (start := data.find(b"<?OFX", position)) >= 0:
        end = data.find(b">", start)
        if end < 0:
            return None
        if data[end - 1 : end] == b"?":
            # Every '<?OFX' before this '>' ends at it: the first that is a whole word.
            while 0 <= start < end:
                after = data[start + 5 : start + 6]
                if not (after.isalnum() or after == b"_"):
                    return end + 1
                start = data.find(b"<?OFX", start + 1, end)
        position = end + 1
    return None


def _text(element: etree._Element | None, path: str) -> str | None:
    """The stripped text at ``path`` under ``element``; None when absent or empty."""
    if element is None:
        return None
    found = element.find(path)
    if found is None:
        return None
    return leaf_text(found).strip() or None


def _firm(root: etree._Element, firm: str | None) -> str:
    if firm is not None:
        return firm
    org = _text(root, "SIGNONMSGSRSV1/SONRS/FI/ORG")
    if org is None:
        raise MappingError("the file names no FI ORG to take the firm from: pass firm=")
    if _IDENTIFIER.fullmatch(org):
        return org
    slug = _NOT_IDENTIFIER.sub("-", org).strip("-._:")[:64]
    if not slug:
        raise MappingError(f"FI ORG {org!r} has no letters or digits: pass firm=")
    return slug


def parse_ofx(
    data: bytes,
    *,
    customer_ref: str,
    firm: str | None = None,
    assume_tz: dt.tzinfo = dt.UTC,
    max_bytes: int = MAX_OFX_BYTES,
    max_depth: int = MAX_OFX_DEPTH,
) -> list[Transaction]:
    """Read the statement lines of an OFX 1 or OFX 2 file as canonical transactions.

    :param customer_ref: the customer's pseudonymous reference (OFX does not name one).
    :param firm: the firm's identifier; by default the FI's ORG, made into an identifier.
    :param assume_tz: the zone of times that name none; UTC, as the specification says.
    :param max_bytes: refuse larger files (16 MiB by default).
    :param max_depth: refuse deeper nesting (32 by default; statements nest about ten).
    :return: one transaction per STMTTRN, in file order.
    :raises XMLInputError: the bytes were refused (too large, too deep, a DTD or entity
        declaration, malformed).
    :raises MappingError: a value cannot be read (a date, an amount, a missing FITID, an
        amount finer than its currency allows), with the line's FITID; or the bank
        reported an error instead of a statement.
    """
    root = read_ofx(data, max_bytes=max_bytes, max_depth=max_depth).root
    for response in root.iter("STMTTRNRS", "CCSTMTTRNRS"):
        if (_text(response, "STATUS/SEVERITY") or "").upper() == "ERROR":
            code = _text(response, "STATUS/CODE") or "?"
            message = _text(response, "STATUS/MESSAGE") or "no message"
            raise MappingError(f"the bank answered with an error ({code}): {message}")
    firm_id: str | None = None  # resolved at the first line: a file without any needs none
    out: list[Transaction] = []
    for stmtrs in root.iter("STMTRS", "CCSTMTRS"):
        curdef = _text(stmtrs, "CURDEF")
        for number, line in enumerate(stmtrs.iterfind("BANKTRANLIST/STMTTRN"), 1):
            if firm_id is None:
                firm_id = _firm(root, firm)
            fitid = _text(line, "FITID")
            where = f"STMTTRN {number}" + (f" (FITID {fitid})" if fitid else "")
            try:
                out.append(
                    _line(
                        line,
                        fitid=fitid,
                        curdef=curdef,
                        firm=firm_id,
                        customer_ref=customer_ref,
                        assume_tz=assume_tz,
                    )
                )
            except MappingError as exc:
                raise MappingError(f"{where}: {exc}") from None
            except ValidationError as exc:
                error = exc.errors(include_url=False)[0]
                path = ".".join(str(p) for p in error["loc"])
                reason = error["msg"].removeprefix("Value error, ")
                raise MappingError(f"{where}: {path}: {reason}") from None
    return out


def _line(
    line: etree._Element,
    *,
    fitid: str | None,
    curdef: str | None,
    firm: str,
    customer_ref: str,
    assume_tz: dt.tzinfo,
) -> Transaction:
    if fitid is None:
        raise MappingError("it has no FITID, which OFX requires to tell lines apart")
    posted_text = _text(line, "DTPOSTED")
    amount_text = _text(line, "TRNAMT")
    if posted_text is None or amount_text is None:
        raise MappingError("it has no " + ("DTPOSTED" if posted_text is None else "TRNAMT"))
    posted = parse_ofx_datetime(posted_text, assume=assume_tz)
    user = _text(line, "DTUSER")
    trntype = (_text(line, "TRNTYPE") or "").upper()
    currency = _text(line, "CURRENCY/CURSYM") or curdef
    if currency is None:
        raise MappingError(
            "neither the line (CURRENCY) nor its statement (CURDEF) names a currency"
        )
    memo = _text(line, "MEMO")
    if memo is not None and len(memo) > _MEMO_CHARS:
        raise MappingError(f"its MEMO is {len(memo)} characters, over {_MEMO_CHARS}")
    extdname = _text(line, "CMI.EXTDNAME") or _text(line, "EXTDNAME")
    if extdname is not None and len(extdname) > _PAYEE_CHARS:
        extdname = None  # OFX allows 100; the model 64: NAME, up to 32, is the payee then
    payee = extdname or _text(line, "NAME") or _text(line, "PAYEE/NAME")
    if payee is None and memo is not None:
        payee = memo[:_PAYEE_CHARS].rstrip()
    if payee is None:
        raise MappingError("it names no payee (NAME, EXTDNAME or PAYEE) and has no MEMO")
    if len(payee) > _PAYEE_CHARS:
        raise MappingError(
            f"its NAME is {len(payee)} characters; OFX allows 32, and the model {_PAYEE_CHARS}"
        )
    return Transaction.model_validate(
        {
            "id": _text(line, "CMI.TRNID") or transaction_id(fitid),
            "kind": "bank_statement_line",
            "occurred_at": posted if user is None else parse_ofx_datetime(user, assume=assume_tz),
            "firm": firm,
            "customer_ref": customer_ref,
            "total": {"amount": parse_ofx_amount(amount_text), "currency": currency.upper()},
            "details": {
                "transaction_type": trntype if trntype in _TRNTYPES else "OTHER",
                "posted_at": posted,
                "payee": payee,
                "memo": memo,
                "fitid": fitid,
            },
        }
    )
