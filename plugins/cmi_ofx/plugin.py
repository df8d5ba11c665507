"""The ``ofx`` standard plugin: a bank's transaction as an OFX statement.

Two document types, made from a :class:`~cmi_sdk.Transaction` of kind
``bank_statement_line``, with the same content:

- ``statement``: a complete OFX 2.2 response (XML: the ``<?OFX ...?>`` header, a sign-on
  response, and a bank statement response) whose one ``STMTTRN`` is the transaction;
- ``statement-sgml``: the same response as OFX 1.0.2 (SGML: the ``OFXHEADER:100`` header
  with ``ENCODING:UTF-8`` and ``CHARSET:NONE``, data elements not closed), for customers
  whose software reads only OFX 1 (Quicken-era packages, and most banks' exports). It is
  validated by reading it with the plugin's hardened OFX 1 reader (:func:`read_sgml`) and
  checking that tree against the same schema.

OFX readers (Quicken, GnuCash through libofx, ofxtools, ofxparse) import both.
:func:`render_digest` puts many transactions of one customer into one statement, for digest
terms, with the same template and schema.

The mapping (OFX 2.2, section 11.4.3)::

    TRNTYPE       details.transaction_type
    DTPOSTED      details.posted_at, in UTC: 20030215070000.000[+0:UTC]
    DTUSER        occurred_at, when it is not the posted time
    TRNAMT        total.amount: negative for money leaving the account
    FITID         details.fitid
    NAME          details.payee, up to 32 characters (OFX's limit)
    CMI.EXTDNAME  details.payee, when longer than 32 characters (see below)
    MEMO          details.memo (at most 255 characters, OFX's limit)
    CMI.TRNID     id, when it is not the FITID (an OFX private tag)
    CURDEF        total.currency
    FI/ORG        firm (at most 32 characters, OFX's limit)
    (none)        customer_ref: OFX has no place for it (see below)

Decisions:

- **NAME** holds 32 characters and the model's payee 64. A longer payee is written whole in
  the private tag ``CMI.EXTDNAME`` and its first 32 characters in ``NAME``, so readers show
  the name OFX holds and nothing is lost: the payee is read back from CMI.EXTDNAME (or the
  EXTDNAME of a statement sent by an earlier release) when present. OFX 2.2's own
  ``EXTDNAME`` is not written: libofx, the reader GnuCash uses, refuses it. Nothing is
  moved into MEMO, which has its own meaning.
- **Times** are written in UTC to the millisecond. A time finer than a millisecond is
  refused (:class:`~cmi_sdk.MappingError`), as amounts finer than their currency are: OFX
  cannot carry it, and the SDK never rounds.
- **Signs**: a ``DEBIT`` takes money out and a ``CREDIT`` puts it in (OFX section 3.2.9.2:
  amounts are signed from the customer's side), so a DEBIT with a positive total or a
  CREDIT with a negative one is refused; other types carry whichever sign they have.
- **The firm's transaction id**, when it is not the FITID, travels in the private tag
  ``<CMI.TRNID>``: OFX reserves dotted names for such extensions (as banks' ``INTU.BID``)
  and readers skip them.
- **The customer's reference** is not written: OFX has no place for it, and the sharing
  terms a statement is sent under identify the customer to their own store. Read back, a
  statement's ``customer_ref`` is its account's ``ACCTID`` (or the ``CMI.CUSTOMER`` private
  tag of a statement sent by an earlier release), unless the reader is told the customer
  (:func:`read_statement`'s ``customer_ref``).
- **Signatures** are detached: OFX has no place for an XML-DSig signature (OFX readers such
  as libofx refuse one inside the document), so the statement goes out byte for byte as
  rendered, with a detached signature over its exact bytes beside it (see
  :class:`~cmi_sdk.SignaturePlacement`).
- **Minimizing**: none. The SDK records withheld fields in a ``withheld`` attribute on the
  root, and OFX readers refuse attributes; so the document type lists no fields, and terms
  that name fields are refused for ``ofx`` rather than sent more than they allow.

**Synthetic content.** A transaction says nothing about the account it was posted to, so the
statement's account, balance and envelope come from :class:`OFXSettings` and from the
transactions themselves, and are documented as such:

- ``BANKACCTFROM`` (BANKID, ACCTID, ACCTTYPE) and the FI's ``FID`` come from the settings.
  The defaults are placeholders (BANKID ``000000000``, ACCTID ``000000000000``,
  ``CHECKING``, no FID): a bank sets its own with :class:`OFXPlugin`.
- ``LEDGERBAL/BALAMT`` is the sum of the statement's transactions (the account's balance
  counting only these lines) unless :func:`render_digest` is given the real balance;
  ``DTASOF`` is ``DTEND``.
- ``DTSTART`` and ``DTEND`` are the earliest and latest posted times; ``DTSERVER`` is the
  latest time in the statement; ``TRNUID`` is a UUID derived from the firm, the customer
  and the transaction ids; statuses are ``0 INFO``; ``LANGUAGE`` comes from the settings
  (``ENG``). None of them is "now": the same transactions always render the same bytes, so
  the emit pipeline's content-derived message ids stay stable.
"""

from __future__ import annotations

import decimal
import hashlib
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

from lxml import etree
from markupsafe import Markup
from pydantic import ValidationError

from cmi_ofx.sgml import read_sgml
from cmi_ofx.values import format_ofx_amount, format_ofx_datetime, parse_ofx_datetime
from cmi_sdk import (
    BankStatementLineDetails,
    ConfigurationError,
    Documents,
    DocumentType,
    DocumentValidationError,
    MappingError,
    Money,
    SignaturePlacement,
    Standard,
    StandardRegistry,
    Transaction,
    ValidationIssue,
    hookimpl,
)
from cmi_sdk.mapping import Reader

if TYPE_CHECKING:
    from cmi_sdk import Adapter

__all__ = [
    "STANDARD",
    "STANDARD_NAME",
    "STATEMENT",
    "STATEMENT_SGML",
    "AccountType",
    "OFXPlugin",
    "OFXSettings",
    "SGMLStatementMapping",
    "StatementMapping",
    "cmi_register_standards",
    "make_standard",
    "parse_digest",
    "read_sgml_statement",
    "read_statement",
    "render_digest",
    "statement",
    "transaction_id",
]

STANDARD_NAME: Final = "ofx"
"""The standard's name."""

AccountType = Literal["CHECKING", "SAVINGS", "MONEYMRKT", "CREDITLINE", "CD"]
"""OFX's bank account types (ACCTTYPE)."""

NAME_CHARS: Final = 32
MEMO_CHARS: Final = 255
ORG_CHARS: Final = 32

_IDENTIFIER: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}")
_TRNUID_NAMESPACE: Final = uuid.UUID("6c1f2e0a-3a52-5b1e-9d4e-0f6a0c3e7b21")
_XML_ILLEGAL: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_HERE = files(__package__)


@dataclass(frozen=True, kw_only=True)
class OFXSettings:
    """What a statement needs that a transaction does not say: the account and the FI.

    Every default is a documented placeholder; a bank passes its own to :class:`OFXPlugin`.

    :param bank_id: BANKID, the routing and transit number (1-9 characters).
    :param account_id: ACCTID (1-22 characters), or a function from a transaction to it,
        for a bank with more than one account per customer. Placeholder: ``000000000000``.
    :param account_type: ACCTTYPE.
    :param fid: the FI's FID (1-32 characters), written under ``FI`` after ``ORG`` when
        given.
    :param language: the sign-on response's LANGUAGE, an ISO 639-2 code.
    :raises ConfigurationError: a value OFX cannot carry.
    """

    bank_id: str = "000000000"
    account_id: str | Callable[[Transaction], str] = "000000000000"
    account_type: AccountType = "CHECKING"
    fid: str | None = None
    language: str = "ENG"

    def __post_init__(self) -> None:
        _check_text("bank_id", self.bank_id, 9, ConfigurationError)
        if isinstance(self.account_id, str):
            _check_text("account_id", self.account_id, 22, ConfigurationError)
        if self.account_type not in get_args(AccountType):
            raise ConfigurationError(
                f"account_type must be one of {', '.join(get_args(AccountType))}"
            )
        if self.fid is not None:
            _check_text("fid", self.fid, 32, ConfigurationError)
        if not re.fullmatch(r"[A-Z]{3}", self.language):
            raise ConfigurationError("language must be a three-letter ISO 639-2 code (ENG)")

    def account_for(self, tx: Transaction) -> str:
        """The ACCTID for ``tx``.

        :raises MappingError: the settings' function returned something OFX cannot carry.
        """
        if isinstance(self.account_id, str):
            return self.account_id
        account = self.account_id(tx)
        _check_text("the account_id function's result", account, 22, MappingError)
        return account


def _check_text(what: str, value: object, limit: int, error: type[Exception]) -> None:
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= limit
        or value != value.strip()
        or _XML_ILLEGAL.search(value)
    ):
        raise error(f"{what} must be 1-{limit} characters without edge whitespace: {value!r}")


def transaction_id(fitid: str) -> str:
    """The transaction id the reader gives a line with this FITID (when the document does
    not carry one): the FITID itself when it is a valid identifier, else ``ofx-`` and 32
    hex digits of its SHA-256 (stable, so a line read twice has one id)."""
    if _IDENTIFIER.fullmatch(fitid):
        return fitid
    return "ofx-" + hashlib.sha256(fitid.encode()).hexdigest()[:32]


def _xml(value: str) -> Markup:
    # Escape only what element content needs. Autoescaping would also write ' and " as
    # &#39; and &#34;, which OFX readers that unescape only named entities (ofxtools among
    # them) would show as written.
    return Markup(value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))  # noqa: S704


def _details(tx: Transaction) -> BankStatementLineDetails:
    details = tx.details
    if not isinstance(details, BankStatementLineDetails):
        raise MappingError(
            f"an OFX statement is made from a bank_statement_line transaction, not a {tx.kind}"
        )
    return details


def _check_sign(trntype: str, amount: Decimal, fitid: str) -> None:
    if trntype == "DEBIT" and amount > 0:
        raise MappingError(
            f"line {fitid}: a DEBIT takes money out of the account, so its amount cannot be"
            f" positive ({amount:f}); OFX signs amounts from the customer's side"
        )
    if trntype == "CREDIT" and amount < 0:
        raise MappingError(
            f"line {fitid}: a CREDIT puts money into the account, so its amount cannot be"
            f" negative ({amount:f}); OFX signs amounts from the customer's side"
        )


class StatementMapping:
    """The ``statement`` document type's mapping, with the settings it fills gaps from.

    Called with one transaction (as the SDK calls ``to_context``), or through
    :meth:`context` with several.
    """

    def __init__(self, settings: OFXSettings) -> None:
        self.settings = settings

    def __call__(self, tx: Transaction) -> dict[str, Any]:
        return self.context([tx])

    def context(
        self, transactions: Sequence[Transaction], *, balance: Decimal | None = None
    ) -> dict[str, Any]:
        """The template's variables for a statement of ``transactions``.

        :param balance: the account's ledger balance; by default the transactions' sum.
        :raises MappingError: no transactions; transactions of several firms, customers,
            currencies or accounts; a repeated FITID; or a transaction OFX cannot express.
        """
        if not transactions:
            raise MappingError("a statement needs at least one transaction")
        first = transactions[0]
        account = self.settings.account_for(first)
        seen: set[str] = set()
        lines = []
        for tx in transactions:
            line = self._line(tx)
            for what, value, expected in (
                ("firm", tx.firm, first.firm),
                ("customer", tx.customer_ref, first.customer_ref),
                ("currency", tx.total.currency, first.total.currency),
            ):
                if value != expected:
                    raise MappingError(
                        f"a statement is of one {what}: {value} and {expected} are both here"
                    )
            if self.settings.account_for(tx) != account:
                raise MappingError("a statement is of one account; these transactions are not")
            fitid = _details(tx).fitid
            if fitid in seen:
                raise MappingError(f"FITID {fitid} appears twice in one statement")
            seen.add(fitid)
            lines.append(line)
        if len(first.firm) > ORG_CHARS:
            raise MappingError(
                f"firm {first.firm!r} is longer than the {ORG_CHARS} characters OFX's FI ORG holds"
            )
        currency = first.total.currency
        if balance is None:
            with decimal.localcontext(prec=60):  # exact: the default 28 digits could round
                balance = sum((tx.total.amount for tx in transactions), Decimal(0))
        else:
            try:
                balance = Money(amount=balance, currency=currency).amount
            except ValidationError as exc:
                raise MappingError(f"balance: {exc.errors()[0]['msg']}") from None
        posted = [_details(tx).posted_at for tx in transactions]
        latest = max([*posted, *(tx.occurred_at for tx in transactions)])
        trnuid = uuid.uuid5(
            _TRNUID_NAMESPACE,
            "\x1f".join([first.firm, first.customer_ref, *(tx.id for tx in transactions)]),
        )
        dtend = format_ofx_datetime(max(posted), what="posted_at")
        return {
            "dtserver": format_ofx_datetime(latest, what="occurred_at"),
            "language": self.settings.language,
            "org": _xml(first.firm),
            "fid": None if self.settings.fid is None else _xml(self.settings.fid),
            "trnuid": str(trnuid),
            "curdef": currency,
            "bankid": _xml(self.settings.bank_id),
            "acctid": _xml(account),
            "accttype": self.settings.account_type,
            "dtstart": format_ofx_datetime(min(posted), what="posted_at"),
            "dtend": dtend,
            "lines": lines,
            "balamt": format_ofx_amount(balance),
            "dtasof": dtend,
        }

    @staticmethod
    def _line(tx: Transaction) -> dict[str, Any]:
        details = _details(tx)
        if tx.items:
            raise MappingError(
                "a statement line carries one amount, not line items; use the cmi transaction"
                " document for an itemized transaction"
            )
        amount = tx.total.amount
        _check_sign(details.transaction_type, amount, details.fitid)
        memo = details.memo
        if memo is not None and len(memo) > MEMO_CHARS:
            raise MappingError(f"memo is {len(memo)} characters; OFX's MEMO holds {MEMO_CHARS}")
        payee = details.payee
        long_name = len(payee) > NAME_CHARS
        dtuser = None
        if tx.occurred_at != details.posted_at:
            dtuser = format_ofx_datetime(tx.occurred_at, what="occurred_at")
        return {
            "trntype": details.transaction_type,
            "dtposted": format_ofx_datetime(details.posted_at, what="posted_at"),
            "dtuser": dtuser,
            "trnamt": format_ofx_amount(amount),
            "fitid": _xml(details.fitid),
            "name": _xml(payee[:NAME_CHARS]),
            "extdname": _xml(payee) if long_name else None,
            "memo": None if memo is None else _xml(memo),
            "trnid": None if tx.id == transaction_id(details.fitid) else _xml(tx.id),
        }


class SGMLStatementMapping(StatementMapping):
    """The ``statement-sgml`` document type's mapping: :class:`StatementMapping`, refusing
    what OFX 1's SGML cannot carry. A data element's text runs to the next tag, and readers
    strip it, so a value of only whitespace would arrive as no value at all."""

    def context(
        self, transactions: Sequence[Transaction], *, balance: Decimal | None = None
    ) -> dict[str, Any]:
        """As :meth:`StatementMapping.context`.

        :raises MappingError: also for a payee, memo or FITID of only whitespace.
        """
        for tx in transactions:
            details = _details(tx)
            for what, value in (
                ("payee", details.payee),
                ("memo", details.memo),
                ("fitid", details.fitid),
            ):
                if value is not None and not value.strip():
                    raise MappingError(
                        f"line {details.fitid!r}: OFX 1 cannot carry a {what} of only whitespace"
                    )
        return super().context(transactions, balance=balance)


def read_statement(root: etree._Element, *, customer_ref: str | None = None) -> list[Transaction]:
    """Read every line of a schema-valid ``statement`` document (one, or a digest's many)
    back into transactions, exactly as they were rendered but for the customer's reference,
    which OFX has no place for.

    :param customer_ref: the customer, when the caller knows it (a store knows whose terms
        a statement came under); by default the account's ACCTID (or the ``CMI.CUSTOMER``
        private tag of a statement sent by an earlier release).

    :raises MappingError: a line breaks a rule the schema cannot express (a DEBIT with a
        positive amount).
    :raises pydantic.ValidationError: a value the canonical model refuses (an amount finer
        than its currency).
    """
    r = Reader(root, "")
    firm = r.require("SIGNONMSGSRSV1").require("SONRS").require("FI").text("ORG")
    stmtrs = r.require("BANKMSGSRSV1").require("STMTTRNRS").require("STMTRS")
    currency = stmtrs.text("CURDEF")
    customer = (
        customer_ref
        or stmtrs.optional("CMI.CUSTOMER")
        or stmtrs.require("BANKACCTFROM").text("ACCTID")
    )
    out = []
    for line in stmtrs.require("BANKTRANLIST").children("STMTTRN"):
        trntype = line.text("TRNTYPE")
        fitid = line.text("FITID")
        amount = Decimal(line.text("TRNAMT"))
        _check_sign(trntype, amount, fitid)
        posted = parse_ofx_datetime(line.text("DTPOSTED"))
        dtuser = line.optional("DTUSER")
        out.append(
            Transaction.model_validate(
                {
                    "id": line.optional("CMI.TRNID") or transaction_id(fitid),
                    "kind": "bank_statement_line",
                    "occurred_at": posted if dtuser is None else parse_ofx_datetime(dtuser),
                    "firm": firm,
                    "customer_ref": customer,
                    "total": {"amount": amount, "currency": currency},
                    "details": {
                        "transaction_type": trntype,
                        "posted_at": posted,
                        "payee": (
                            line.optional("CMI.EXTDNAME")
                            or line.optional("EXTDNAME")
                            or line.text("NAME")
                        ),
                        "memo": line.optional("MEMO"),
                        "fitid": fitid,
                    },
                }
            )
        )
    return out


def statement_from_xml(root: etree._Element) -> Transaction:
    """The ``statement`` document type's parser: its one line, as a transaction.

    :raises MappingError: the document is a digest (several lines); read it with
        :func:`parse_digest`.
    """
    lines = read_statement(root)
    if len(lines) != 1:
        raise MappingError(
            f"this statement has {len(lines)} lines, a digest: read it with"
            " cmi_ofx.parse_digest(), which returns every transaction"
        )
    return lines[0]


def read_sgml_statement(data: bytes) -> etree._Element:
    """The element tree of a ``statement-sgml`` document, read with the hardened OFX 1
    reader: what it is validated and parsed from.

    The line end that closes a data element in the SGML (``<TRNAMT>-5.72`` then a new line)
    is layout, not data, and is left out of the element's text.

    :raises XMLInputError: the reader refused the bytes (see :func:`read_sgml`).
    """
    root = read_sgml(data).root
    for element in root.iter():
        if element.text is not None and len(element) == 0:
            element.text = element.text.removesuffix("\n")
    return root


def make_standard(settings: OFXSettings) -> Standard:
    """The ``ofx`` standard, filling what transactions do not say from ``settings``."""
    mapping = StatementMapping(settings)
    statement_type: DocumentType[Transaction] = DocumentType(
        name="statement",
        root="OFX",
        model=Transaction,
        schema=_HERE / "schemas" / "ofx-statement-1.0.xsd",
        template="statement.ofx.j2",
        to_context=mapping,
        from_xml=statement_from_xml,
        description=(
            "A bank statement line as a complete OFX 2.2 statement response (STMTTRN);"
            " cmi_ofx.render_digest puts many in one."
        ),
        kinds=("bank_statement_line",),
        # OFX has no place for a signature: it travels beside the statement.
        signature=SignaturePlacement.DETACHED,
        media_type="application/x-ofx",
        extension="ofx",
        # OFX has no way to say a field was withheld: nothing can be, see the module doc.
        fields={},
        kept=(),
        # Digest terms get one statement of all the window's lines (see render_digest).
        digest=mapping.context,
    )
    sgml_mapping = SGMLStatementMapping(settings)
    sgml_type: DocumentType[Transaction] = DocumentType(
        name="statement-sgml",
        root="OFX",
        model=Transaction,
        schema=_HERE / "schemas" / "ofx-statement-1.0.xsd",
        template="statement.sgml.j2",
        to_context=sgml_mapping,
        from_xml=statement_from_xml,
        description=(
            "The same statement as OFX 1.0.2 (SGML, UTF-8), for software that reads only OFX 1."
        ),
        kinds=("bank_statement_line",),
        signature=SignaturePlacement.DETACHED,
        media_type="application/x-ofx",
        extension="ofx",
        reader=read_sgml_statement,
        magic=b"OFXHEADER:",
        fields={},
        kept=(),
        digest=sgml_mapping.context,
    )
    return Standard(
        name=STANDARD_NAME,
        version="2.2",
        title="Open Financial Exchange (OFX) bank statements",
        description=(
            "Bank transactions as OFX 2.2 statement responses that Quicken, GnuCash and"
            " every OFX reader import; the schema is cmi-sdk's own, for what it emits."
        ),
        templates=_HERE / "templates",
        document_types=(statement_type, sgml_type),
        # Terms and callers that name no type get OFX 2.2, as before OFX 1 was added.
        default_document_type="statement",
    )


STANDARD: Final = make_standard(OFXSettings())
"""The ``ofx`` standard with placeholder account settings (see :class:`OFXSettings`)."""

STATEMENT: Final[DocumentType[Transaction]] = STANDARD.document_types[0]
"""Its document type ``statement`` (OFX 2.2, XML)."""

STATEMENT_SGML: Final[DocumentType[Transaction]] = STANDARD.document_types[1]
"""Its document type ``statement-sgml`` (OFX 1.0.2, SGML)."""


@hookimpl
def cmi_register_standards(register: StandardRegistry) -> None:
    """Register the ``ofx`` standard with placeholder account settings."""
    register.add(STANDARD)


@dataclass(frozen=True, eq=False)
class OFXPlugin:
    """The ``ofx`` standard with a bank's own settings, as a plugin object.

    The installed plugin (entry point ``ofx``) uses placeholders; block it and register
    this instead::

        adapter = Adapter(
            plugins=[OFXPlugin(OFXSettings(bank_id="121000248", account_id=account_of))],
            block=["ofx"],
        )
    """

    settings: OFXSettings
    standard: Standard = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "standard", make_standard(self.settings))

    @hookimpl
    def cmi_register_standards(self, register: StandardRegistry) -> None:
        """Register the ``ofx`` standard with this plugin's settings."""
        register.add(self.standard)


# The SDK's document pipeline with no adapter behind it, for statement(): it needs no
# registry (it is given the standard) and signs nothing.
_DOCUMENTS: Final = Documents()


def _mapping(std: Standard) -> StatementMapping:
    mapping = std.document_type("statement").to_context
    if not isinstance(mapping, StatementMapping):
        raise MappingError(f"standard {std.name!r} is not cmi_ofx's statement standard")
    return mapping


def statement(
    transactions: Sequence[Transaction],
    settings: OFXSettings | None = None,
    *,
    balance: Decimal | None = None,
) -> bytes:
    """Render ``transactions`` as one OFX statement and validate it; no adapter needed.

    :param settings: the account and FI; placeholders by default.
    :param balance: the ledger balance; by default the transactions' sum.
    :raises MappingError: see :meth:`StatementMapping.context`.
    :raises RenderError: a value holds a character XML 1.0 cannot carry.
    """
    std = STANDARD if settings is None else make_standard(settings)
    context = _mapping(std).context(transactions, balance=balance)
    return _DOCUMENTS.render_context(context, standard=std, document_type="statement")


def render_digest(
    adapter: Adapter,
    transactions: Sequence[Transaction],
    *,
    balance: Decimal | None = None,
    document_type: str = "statement",
) -> bytes:
    """Render a digest: ``transactions`` (one customer's, of one firm, account and currency)
    as one OFX statement with a ``STMTTRN`` each, in the order given, with the settings of
    the adapter's ``ofx`` standard. It is validated against the same schema as a single
    statement. OFX has no place for a signature: its detached signature is
    ``adapter.documents.detached_signature(xml, standard="ofx", document_type=...)``.

    :param balance: the ledger balance; by default the transactions' sum.
    :param document_type: ``statement`` (OFX 2.2) or ``statement-sgml`` (OFX 1.0.2).
    :raises StandardNotFoundError: the adapter has no ``ofx`` standard.
    :raises MappingError: see :meth:`StatementMapping.context`.
    """
    std = adapter.standards.get(STANDARD_NAME)
    mapping = std.document_type(document_type).to_context
    if not isinstance(mapping, StatementMapping):
        raise MappingError(f"standard {std.name!r} is not cmi_ofx's statement standard")
    context = mapping.context(transactions, balance=balance)
    return adapter.documents.render_context(context, standard=std, document_type=document_type)


def parse_digest(adapter: Adapter, xml: bytes) -> list[Transaction]:
    """Validate a statement (a digest or a single one; OFX 2 or OFX 1) and return all its
    transactions.

    :raises XMLInputError: refused by the hardened parser.
    :raises DocumentValidationError: the document breaks the schema, or a line breaks a
        rule the schema cannot express.
    """
    # No type named: OFX 2 (XML) or OFX 1 (SGML), as the bytes say.
    doc = adapter.validate(xml, standard=STANDARD_NAME)
    root = doc.tree.getroot()
    try:
        return read_statement(root)
    except (MappingError, ValidationError) as exc:
        reason = str(exc) if isinstance(exc, MappingError) else exc.errors()[0]["msg"]
        raise DocumentValidationError(
            [ValidationIssue(reason, "/OFX", root.sourceline)],
            document=xml,
            standard=STANDARD_NAME,
            document_type=doc.document_type.name,
        ) from None
