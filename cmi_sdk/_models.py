"""The models: the canonical vocabulary every standard maps from and to, and the records
the firm keeps about customers' consent (sharing terms, consent records, links).

The stores persist these models and depend on this module only, never on the flows that
produce them (emission, offers, links).

Money is :class:`~decimal.Decimal` with an ISO 4217 code, and never a float. Times are
timezone-aware and kept in UTC. References to customers are pseudonymous tokens, never a
name or an e-mail address. Every model is immutable and refuses unknown fields.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any, Literal, Self, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cmi_sdk._currencies import MINOR_UNITS
from cmi_sdk._exceptions import ModelValidationError, ValidationIssue

__all__ = [
    "TRANSACTION_KINDS",
    "Acceptance",
    "Advice",
    "BankStatementLineDetails",
    "Claim",
    "ConsentRecord",
    "Constraints",
    "FlightDetails",
    "FlightProduct",
    "FlightWanted",
    "Identity",
    "LineItem",
    "Link",
    "LoanDetails",
    "LoanProduct",
    "LoanWanted",
    "Money",
    "Offer",
    "OfferSet",
    "Purpose",
    "Request",
    "Reward",
    "SharingTerms",
    "TermsDecision",
    "TermsPolicy",
    "TermsProposal",
    "Transaction",
    "load_model",
]

#: The largest magnitude an amount may have: 18 digits before the decimal point.
MAX_AMOUNT = Decimal(10) ** 18

# Enough precision for 18 integer digits and 4 minor-unit digits, with room to spare, so
# quantizing never raises or rounds in the default 28-digit context's place.
_MONEY_CONTEXT = decimal.Context(prec=60, traps=[decimal.InvalidOperation])


def _refuse_float(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("a boolean is not an amount")
    if isinstance(value, float):
        raise ValueError(
            'floats are refused: they cannot hold money exactly; pass a string such as "451.89"'
            " or a Decimal"
        )
    return value


def utc_at(timestamp: float) -> dt.datetime:
    """A POSIX timestamp (the stores' and clocks' times) as an aware UTC datetime."""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC)


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise ValueError("must be timezone-aware (for example 2003-07-01T12:00:00Z)")
    return value.astimezone(dt.UTC)


UtcDatetime = Annotated[dt.datetime, AfterValidator(_utc)]
"""A timezone-aware datetime, converted to UTC; naive datetimes are refused."""

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}$")]
"""An opaque identifier: 1-64 letters, digits, '.', '_', ':' or '-', starting alphanumeric."""

_CUSTOMER_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{2,127}")


def _pseudonymous(value: str) -> str:
    if not _CUSTOMER_REF.fullmatch(value):
        raise ValueError(
            "must be a pseudonymous token of 3-128 letters, digits, '.', '_', ':' or '-',"
            " never a name or an e-mail address"
        )
    return value


CustomerRef = Annotated[str, AfterValidator(_pseudonymous)]
"""A pseudonymous, per-relationship reference to a customer: a 3-128 character token of
letters, digits, '.', '_', ':' or '-'. It has no room for spaces or '@', so neither a
name nor an e-mail address fits."""

IataAirport = Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
"""A three-letter IATA airport (location) code, such as ATL."""

Text = Annotated[str, Field(min_length=1, max_length=256)]
"""Free text of 1-256 characters."""

ShortText = Annotated[str, Field(min_length=1, max_length=64)]
"""Free text of 1-64 characters."""

Quantity = Annotated[
    Decimal,
    BeforeValidator(_refuse_float),
    Field(gt=0, max_digits=18, decimal_places=6, allow_inf_nan=False),
]
"""A positive quantity with at most 6 decimal places."""


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        validate_default=True,
        ser_json_timedelta="iso8601",
    )


class Money(_Model):
    """An amount of money in one currency.

    The amount is kept with exactly the currency's minor units (USD 2, JPY 0, KWD 3):
    ``Money(amount="5.7", currency="USD")`` holds ``5.70``. An amount finer than the
    currency allows is refused, never rounded; so are floats.
    """

    amount: Decimal
    """The amount, exact, with the currency's number of decimal places."""
    currency: str
    """The ISO 4217 alphabetic code, such as USD."""

    @field_validator("amount", mode="before")
    @classmethod
    def _no_floats(cls, value: object) -> object:
        return _refuse_float(value)

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        if value not in MINOR_UNITS:
            raise ValueError(f"{value!r} is not an ISO 4217 currency code (such as USD)")
        return value

    @model_validator(mode="after")
    def _minor_units(self) -> Self:
        amount = self.amount
        if not amount.is_finite():
            raise ValueError("amount must be a finite number")
        if abs(amount) >= MAX_AMOUNT:
            raise ValueError("amount must be smaller than 10**18 in magnitude")
        digits = MINOR_UNITS[self.currency]
        exact = amount.quantize(Decimal(1).scaleb(-digits), context=_MONEY_CONTEXT)
        if exact != amount:
            raise ValueError(
                f"amount {amount} has more decimal places than {self.currency} allows "
                f"({digits}); round it yourself, the SDK never does"
            )
        if exact.is_zero():
            exact = abs(exact)  # -0.00 and 0.00 are one amount
        object.__setattr__(self, "amount", exact)
        return self

    @property
    def minor_units(self) -> int:
        """The number of decimal places of this currency."""
        return MINOR_UNITS[self.currency]

    def __str__(self) -> str:
        return f"{self.amount:f} {self.currency}"

    def __add__(self, other: Money) -> Money:
        if not isinstance(other, Money):
            return NotImplemented
        if other.currency != self.currency:
            raise ValueError(f"cannot add {other.currency} to {self.currency}")
        return Money(amount=self.amount + other.amount, currency=self.currency)


class LineItem(_Model):
    """One line of a transaction or an offer: quantity * unit price = amount, exactly."""

    description: Text
    quantity: Quantity = Decimal(1)
    unit_price: Money
    amount: Money
    sku: Identifier | None = None
    """The firm's own code for what is sold, when it has one."""

    @model_validator(mode="after")
    def _amount_is_quantity_times_price(self) -> Self:
        if self.amount.currency != self.unit_price.currency:
            raise ValueError("amount and unit_price must be in the same currency")
        expected = self.quantity * self.unit_price.amount
        if expected != self.amount.amount:
            raise ValueError(
                f"amount {self.amount.amount} is not quantity * unit_price ({expected:f})"
            )
        return self


class FlightProduct(_Model):
    """A seat on a flight, as offered (before a ticket exists)."""

    kind: Literal["flight"] = Field(default="flight", exclude=True)
    origin: IataAirport
    destination: IataAirport
    date: dt.date
    """The local departure date."""
    airline: ShortText
    flight: Annotated[str, Field(pattern=r"^[0-9]{1,4}[A-Z]?$")]
    """The flight number without the airline code, such as 2231."""
    fare_class: Annotated[str, Field(pattern=r"^[A-Z]$")]
    """The one-letter booking class, such as B."""


class FlightDetails(FlightProduct):
    """What a flight transaction adds to a product: the ticket and the seat."""

    ticket_number: Annotated[str, Field(pattern=r"^[0-9A-Z]{1,20}$")]
    row: Annotated[int, Field(ge=1, le=999)] | None = None
    seat: Annotated[str, Field(pattern=r"^[A-Z]$")] | None = None


BankTransactionType = Literal[
    "CREDIT",
    "DEBIT",
    "INT",
    "DIV",
    "FEE",
    "SRVCHG",
    "DEP",
    "ATM",
    "POS",
    "XFER",
    "CHECK",
    "PAYMENT",
    "CASH",
    "DIRECTDEP",
    "DIRECTDEBIT",
    "REPEATPMT",
    "HOLD",
    "OTHER",
]
"""The transaction types OFX names in TRNTYPE."""


class BankStatementLineDetails(_Model):
    """A line of a bank statement: what OFX calls a STMTTRN."""

    kind: Literal["bank_statement_line"] = Field(default="bank_statement_line", exclude=True)
    transaction_type: BankTransactionType
    posted_at: UtcDatetime
    """When the bank posted the line."""
    payee: Annotated[str, Field(min_length=1, max_length=64)]
    """Who was paid or who paid (OFX NAME)."""
    memo: Text | None = None
    fitid: Annotated[str, Field(pattern=r"^[\x21-\x7e]{1,255}$")]
    """The financial institution's stable id for this line (OFX FITID)."""


class LoanProduct(_Model):
    """A loan, as offered."""

    kind: Literal["loan"] = Field(default="loan", exclude=True)
    principal: Money
    term_months: Annotated[int, Field(ge=1, le=600)]
    apr: Annotated[
        Decimal,
        BeforeValidator(_refuse_float),
        Field(ge=0, le=100, max_digits=7, decimal_places=4, allow_inf_nan=False),
    ]
    """Annual percentage rate, in percent (6.95 means 6.95 %)."""


class LoanDetails(LoanProduct):
    """A loan that was taken out."""

    account: Identifier | None = None
    """The firm's account number for the loan, when it shares one."""


TransactionKind = Literal["flight", "bank_statement_line", "loan", "purchase"]
"""What a transaction is about; ``purchase`` is a plain sale of line items."""

TRANSACTION_KINDS: tuple[TransactionKind, ...] = get_args(TransactionKind)
"""Every kind of transaction, in the order :data:`TransactionKind` names them: what an
adapter emits unless told otherwise (``Adapter(transaction_kinds=...)``)."""

Details = Annotated[
    FlightDetails | BankStatementLineDetails | LoanDetails, Field(discriminator="kind")
]
_DETAILS_FOR_KIND: dict[str, type[_Model] | None] = {
    "flight": FlightDetails,
    "bank_statement_line": BankStatementLineDetails,
    "loan": LoanDetails,
    "purchase": None,
}

_M = TypeVar("_M", bound=BaseModel)


def _inject_kind(data: Any, field: str, kind_field: str = "kind") -> Any:
    """Give a nested discriminated value the kind its parent names, so JSON states it once."""
    if isinstance(data, Mapping) and isinstance(data.get(field), Mapping):
        kind = data.get(kind_field)
        nested = data[field]
        if kind is not None and "kind" not in nested:
            return {**data, field: {**nested, "kind": kind}}
    return data


class Transaction(_Model):
    """Something the firm did with a customer, from which documents are rendered."""

    id: Identifier
    """The firm's id for the transaction; stable, so documents about it are too."""
    kind: TransactionKind
    occurred_at: UtcDatetime
    firm: Identifier
    """The firm's identifier (a domain name or a code)."""
    customer_ref: CustomerRef
    items: tuple[LineItem, ...] = ()
    total: Money
    """What the transaction comes to (negative for money leaving the customer's account
    in a bank-statement line)."""
    details: Details | None = None
    """The typed details of the kind: required for flight, bank_statement_line and loan;
    absent for purchase."""

    @model_validator(mode="before")
    @classmethod
    def _details_kind(cls, data: Any) -> Any:
        return _inject_kind(data, "details")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        expected = _DETAILS_FOR_KIND[self.kind]
        if expected is None and self.details is not None:
            raise ValueError(f"a {self.kind} transaction has no details")
        if expected is not None and not isinstance(self.details, expected):
            raise ValueError(f"a {self.kind} transaction needs {expected.__name__}")
        _check_items_total(self.items, self.total)
        return self


def _check_items_total(items: tuple[LineItem, ...], total: Money) -> None:
    if not items:
        return
    if any(item.amount.currency != total.currency for item in items):
        raise ValueError(f"every line item must be in the total's currency ({total.currency})")
    added = sum((item.amount.amount for item in items), Decimal(0))
    if added != total.amount:
        raise ValueError(f"total {total.amount} is not the sum of the line items ({added:f})")


class FlightWanted(_Model):
    """Seats on a flight from one airport to another on a date."""

    kind: Literal["flight"] = Field(default="flight", exclude=True)
    origin: IataAirport
    destination: IataAirport
    date: dt.date
    cabin: Literal["economy", "premium_economy", "business", "first"] = "economy"
    passengers: Annotated[int, Field(ge=1, le=9)] = 1


class LoanWanted(_Model):
    """A loan of an amount over a term."""

    kind: Literal["loan"] = Field(default="loan", exclude=True)
    amount: Money
    term_months: Annotated[int, Field(ge=1, le=600)]


Wanted = Annotated[FlightWanted | LoanWanted, Field(discriminator="kind")]


class Constraints(_Model):
    """Limits the customer puts on acceptable offers."""

    max_price: Money | None = None
    earliest_date: dt.date | None = None
    latest_date: dt.date | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.earliest_date and self.latest_date and self.earliest_date > self.latest_date:
            raise ValueError("earliest_date is after latest_date")
        return self


class Claim(_Model):
    """Something the customer states about themselves, for the firm to verify and reward.

    ``evidence`` is an opaque token (a signed statement from a third party, say) that the
    firm's verification hook knows how to check.
    """

    type: Identifier
    """What is claimed, such as ``loyalty-tier`` or ``credit-band``."""
    value: Text
    evidence: Annotated[str, Field(min_length=1, max_length=4096)] | None = None


class Request(_Model):
    """A customer's request for offers, relayed by an intermediary without their identity."""

    id: Identifier
    kind: Literal["flight", "loan"]
    customer_ref: CustomerRef
    reply_to: Identifier
    """The intermediary's reference that offers must quote, so it can relay them."""
    created_at: UtcDatetime
    respond_by: UtcDatetime | None = None
    """The deadline for offers; the firm's pipeline budgets its stages from it."""
    wanted: Wanted
    constraints: Constraints = Constraints()
    claims: tuple[Claim, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _wanted_kind(cls, data: Any) -> Any:
        return _inject_kind(data, "wanted")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.wanted.kind != self.kind:
            raise ValueError(f"a {self.kind} request cannot want a {self.wanted.kind}")
        if self.respond_by is not None and self.respond_by <= self.created_at:
            raise ValueError("respond_by must be after created_at")
        return self


class Advice(_Model):
    """A recommendation the firm attaches to an offer (another date, a better product)."""

    code: Identifier
    text: Text


class Reward(_Model):
    """A reward applied to an offer's price; ``amount`` is what it takes off."""

    code: Identifier
    description: Text
    amount: Money


Product = Annotated[FlightProduct | LoanProduct, Field(discriminator="kind")]


class Offer(_Model):
    """A firm's answer to a request: a priced quote, valid for a window of time.

    Making an offer does not reserve anything; accepting it does.
    """

    id: Identifier
    request_id: Identifier
    kind: Literal["flight", "loan"]
    firm: Identifier
    customer_ref: CustomerRef
    reply_to: Identifier
    created_at: UtcDatetime
    valid_from: UtcDatetime
    valid_until: UtcDatetime
    product: Product
    items: Annotated[tuple[LineItem, ...], Field(min_length=1)]
    price: Money
    """The total the customer pays: the sum of the items."""
    rewards: tuple[Reward, ...] = ()
    """Rewards already applied to the items (for the customer's information)."""
    advice: tuple[Advice, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _product_kind(cls, data: Any) -> Any:
        return _inject_kind(data, "product")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.product.kind != self.kind:
            raise ValueError(f"a {self.kind} offer cannot carry a {self.product.kind} product")
        if self.valid_until <= self.valid_from:
            raise ValueError("valid_until must be after valid_from")
        _check_items_total(self.items, self.price)
        return self


class OfferSet(_Model):
    """A firm's answer to a request: the offers it makes, or none and why."""

    request_id: Identifier
    firm: Identifier
    reply_to: Identifier
    answered_at: UtcDatetime
    offers: tuple[Offer, ...] = ()
    declined: Text | None = None
    """Why no offer is made, when none is."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        for offer in self.offers:
            if offer.request_id != self.request_id:
                raise ValueError(f"offer {offer.id} answers another request")
        if self.offers and self.declined is not None:
            raise ValueError("an answer with offers is not declined")
        return self


class Identity(_Model):
    """Who the customer is: given only with an acceptance, and only if they choose to."""

    name: Text | None = None
    email: Annotated[str, Field(pattern=r"^[^@\s]{1,64}@[^@\s]{1,255}$")] | None = None


class Acceptance(_Model):
    """The customer's acceptance of an offer. ``id`` is the idempotency key: a retried
    acceptance with the same id books once."""

    id: Identifier
    offer_id: Identifier
    customer_ref: CustomerRef
    accepted_at: UtcDatetime
    identity: Identity | None = None


# Sharing terms and consent. A customer (or an intermediary acting for them) proffers terms,
# a TermsProposal; the firm judges it against its TermsPolicy and accepts it, offers one
# alternative, or rejects it, the way IEEE 7012 ("MyTerms") agreements work. Accepted terms
# become SharingTerms; every acceptance and revocation yields a ConsentRecord, in the spirit
# of the Kantara consent receipt. The flow that does this lives in the adapter and emitter.

_WHEN = re.compile(r"now|pull|digest:([1-9][0-9]{0,2})h")
_SECRET = re.compile(r"whsec_[A-Za-z0-9+/]{32,88}={0,2}")
_FIELD = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _when(value: str) -> str:
    if not _WHEN.fullmatch(value):
        raise ValueError("must be 'now', 'pull' or 'digest:<hours>h' (for example digest:6h)")
    return value


def _secret(value: str) -> str:
    if not _SECRET.fullmatch(value):
        raise ValueError("must be a Standard Webhooks secret: whsec_ and 24-64 bytes of base64")
    return value


def _destination(value: str) -> str:
    # The egress guard judges the address when terms are reviewed and before every delivery;
    # here only the shape is checked.
    if len(value) > 2048 or not re.fullmatch(r"https?://[^\s]+", value):
        raise ValueError("must be an http(s) URL of at most 2048 characters")
    return value


def _field_name(value: str) -> str:
    if not _FIELD.fullmatch(value):
        raise ValueError(f"{value!r} is not a field name (lower case, digits and '_')")
    return value


When = Annotated[str, AfterValidator(_when)]
"""``now`` (each document at once), ``digest:<N>h`` (held, then sent together every N
hours) or ``pull`` (never pushed: the customer fetches documents when they choose)."""

WebhookSecret = Annotated[str, AfterValidator(_secret)]
FieldName = Annotated[str, AfterValidator(_field_name)]
Destination = Annotated[str, AfterValidator(_destination)]


class Purpose(_Model):
    """Why the customer shares: a code the firm's policy knows, and words for people."""

    code: Identifier
    """Such as ``bookkeeping``, ``travel-planning`` or ``tax``."""
    text: Text


class TermsProposal(_Model):
    """Terms as a customer proffers them.

    ``fields`` lists what may be shared; everything else a document type can withhold is
    removed before signing. ``None`` shares every field.
    """

    customer_ref: CustomerRef
    destination: Destination | None = None
    """Where documents are pushed; ``None`` for pull-only terms."""
    secret: WebhookSecret = Field(repr=False)
    """The destination's Standard Webhooks secret; also authenticates the customer's pulls."""
    standard: Identifier = "cmi"
    document_type: Identifier | None = None
    """Required only when the standard has several document types for transactions."""
    fields: tuple[FieldName, ...] | None = None
    when: When = "now"
    purpose: Purpose
    until: UtcDatetime | None = None
    """When the terms lapse; ``None`` for until revoked (if the firm's policy allows)."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.when == "pull" and self.destination is not None:
            raise ValueError("pull-only terms have no destination")
        if self.when != "pull" and self.destination is None:
            raise ValueError("terms that push (now or digest) need a destination")
        if self.fields is not None:
            object.__setattr__(self, "fields", tuple(sorted(set(self.fields))))
        return self

    @property
    def digest_hours(self) -> int | None:
        """The digest interval in hours, for ``digest:<N>h`` terms."""
        match = _WHEN.fullmatch(self.when)
        return int(match.group(1)) if match and match.group(1) else None

    def public_dict(self) -> dict[str, object]:
        """The terms as JSON-ready data, without the secret."""
        return self.model_dump(mode="json", exclude={"secret"})


class SharingTerms(TermsProposal):
    """Terms the firm accepted: they hold until ``until`` or until revoked."""

    id: Identifier
    created_at: UtcDatetime
    intermediary: Identifier | None = None
    """The intermediary that registered them for the customer, if any."""
    revoked_at: UtcDatetime | None = None

    def active(self, now: dt.datetime) -> bool:
        """Whether documents may go out under these terms at ``now``."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return False
        return self.until is None or now < self.until

    def digest(self) -> str:
        """SHA-256 of the terms' canonical JSON (without the secret): what consent refers to."""
        data = self.public_dict()
        data.pop("revoked_at", None)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


Timing = Literal["now", "digest", "pull"]


class TermsPolicy(_Model):
    """The terms a firm accepts, published at ``/.well-known/cmi``.

    Proposals inside the policy are accepted; those that can be brought inside it (a
    shorter period, a digest interval in range, a standard the firm offers) get one
    alternative; the rest are rejected.
    """

    standards: tuple[Identifier, ...] | None = None
    """The standards documents may be sent in; ``None`` offers every installed standard
    that can express a transaction. The first is the one an alternative proposes."""
    timings: tuple[Timing, ...] = ("now", "digest", "pull")
    min_digest_hours: Annotated[int, Field(ge=1, le=999)] = 1
    max_digest_hours: Annotated[int, Field(ge=1, le=999)] = 168
    purposes: tuple[Identifier, ...] | None = None
    """The purpose codes the firm accepts; ``None`` accepts any."""
    max_duration_days: Annotated[int, Field(ge=1)] | None = None
    """The longest the firm keeps terms; when set, open-ended or longer terms get an
    alternative ending then. ``None``: terms hold until they lapse or are revoked."""
    policy_url: Annotated[str, Field(max_length=2048)] | None = None
    """Where people read the firm's privacy and sharing policy."""
    jurisdiction: Annotated[str, Field(max_length=64)] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min_digest_hours > self.max_digest_hours:
            raise ValueError("min_digest_hours is above max_digest_hours")
        if not self.timings:
            raise ValueError("a policy offers at least one timing")
        return self


class ConsentRecord(_Model):
    """A record of consent given or withdrawn, kept by the firm and returned to the customer.

    Its fields follow the Kantara consent receipt's spirit: an id and version, the time,
    the parties (the firm as controller, the customer's pseudonymous reference, the
    intermediary), the purpose, and a reference to the terms with their digest. It is
    rendered as a ``cmi`` ``consent`` document and signed like every other document.
    """

    id: Identifier
    version: Literal["1.0"] = "1.0"
    event: Literal["granted", "revoked"]
    issued_at: UtcDatetime
    firm: Identifier
    customer_ref: CustomerRef
    intermediary: Identifier | None = None
    terms_id: Identifier
    terms_digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    purpose: Purpose
    standard: Identifier
    document_type: Identifier
    fields: tuple[FieldName, ...] | None = None
    when: When
    destination: Destination | None = None
    valid_until: UtcDatetime | None = None
    policy_url: Annotated[str, Field(max_length=2048)] | None = None
    jurisdiction: Annotated[str, Field(max_length=64)] | None = None


class TermsDecision(_Model):
    """The firm's answer to proffered terms.

    :ivar outcome: ``accepted``, ``alternative`` (the firm proposes ``alternative``
        instead; proffer it to accept it) or ``rejected``.
    :ivar reason: why, in words, when not simply accepted.
    :ivar terms: the registered terms, when accepted.
    :ivar alternative: the one alternative the firm offers.
    :ivar consent: the consent record, when accepted.
    :ivar consent_xml: the signed consent record document, when accepted.
    """

    outcome: Literal["accepted", "alternative", "rejected"]
    reason: str | None = None
    terms: SharingTerms | None = None
    alternative: TermsProposal | None = None
    consent: ConsentRecord | None = None
    consent_xml: bytes | None = Field(default=None, repr=False)


# Service links: how a customer lets one intermediary act for them (the flow is in _links).


class Link(_Model):
    """A customer's link to one intermediary.

    :ivar id: the link's id.
    :ivar account: the firm's own account id for the customer; it never leaves the firm.
    :ivar intermediary: the registered intermediary the customer linked.
    :ivar customer_ref: the intermediary's reference for the customer: random, pairwise.
    :ivar created_at: when the code was redeemed.
    :ivar revoked_at: when the link was revoked, if it was.
    """

    id: Identifier
    account: CustomerRef
    intermediary: Identifier
    customer_ref: CustomerRef
    created_at: UtcDatetime
    revoked_at: UtcDatetime | None = None

    @property
    def active(self) -> bool:
        """Whether documents for the account still go to the link's terms."""
        return self.revoked_at is None

    def public_dict(self) -> dict[str, Any]:
        """What the intermediary is told about its link: never the account."""
        return {
            "id": self.id,
            "customer_ref": self.customer_ref,
            "created_at": self.created_at.isoformat().replace("+00:00", "Z"),
        }


def load_model(model: type[_M], data: bytes | str | Mapping[str, Any]) -> _M:
    """Validate JSON text or a mapping into ``model``.

    :raises ModelValidationError: with one issue per problem, naming the field's dotted path
        and the reason; the same for text that is not JSON.
    """
    try:
        if isinstance(data, Mapping):
            return model.model_validate(data)
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        # json.loads reads 451.89 as a float, which Money then refuses with its own message.
        return model.model_validate(json.loads(data))
    except ValidationError as exc:
        raise _model_error(model.__name__, exc) from None
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError and UnicodeDecodeError, and what json refuses beyond its limits:
        # an integer of over 4,300 digits (ValueError), nesting too deep (RecursionError).
        reason = str(exc) if not isinstance(exc, RecursionError) else "JSON nested too deeply"
        raise ModelValidationError(model.__name__, [ValidationIssue(reason, "")]) from None


def _model_error(model: str, exc: ValidationError) -> ModelValidationError:
    issues = []
    for err in exc.errors(include_url=False):
        path = ".".join(str(part) for part in err["loc"]) or "(root)"
        reason = err["msg"].removeprefix("Value error, ")
        issues.append(ValidationIssue(reason, path))
    return ModelValidationError(model, issues)
