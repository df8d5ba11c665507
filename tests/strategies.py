"""Hypothesis strategies for valid canonical models, with hostile-looking text."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import get_args

from hypothesis import strategies as st
from ofxtools.models.i18n import ISO4217

import cmi_ofx
from cmi_sdk import (
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
    LoanDetails,
    LoanProduct,
    LoanWanted,
    Money,
    Offer,
    OfferSet,
    Purpose,
    Request,
    Reward,
    Transaction,
)
from cmi_sdk._currencies import MINOR_UNITS
from cmi_sdk._xml import find_xml_illegal

CURRENCIES = sorted(MINOR_UNITS)

_TRICKY = [
    "&",
    "<",
    ">",
    '"',
    "'",
    "]]>",
    "&amp;",
    "\t",
    "\r",
    "\n",
    "\r\n",
    " ",
    "é",
    "日本",
    "🛫",
]


def text(min_size: int = 1, max_size: int = 64) -> st.SearchStrategy[str]:
    """Text XML 1.0 can carry, rich in markup characters, whitespace and non-ASCII."""
    pieces = st.lists(
        st.one_of(st.sampled_from(_TRICKY), st.text(min_size=1, max_size=8)),
        min_size=1,
        max_size=8,
    ).map("".join)
    edges = st.sampled_from(["", "", " ", "\t", "\n", "\r", "\r\n", "  "])
    framed = st.tuples(edges, pieces, edges).map("".join)
    return (
        framed.map(lambda s: s[:max_size])
        .filter(lambda s: len(s) >= min_size)
        .filter(lambda s: find_xml_illegal(s) is None)
    )


identifiers = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,20}", fullmatch=True)
customer_refs = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:\-]{2,30}", fullmatch=True)
airports = st.from_regex(r"[A-Z]{3}", fullmatch=True)
letters = st.from_regex(r"[A-Z]", fullmatch=True)
utc_datetimes = st.datetimes(
    # hypothesis takes naive bounds and applies the timezone itself
    min_value=dt.datetime(1970, 1, 2),  # noqa: DTZ001
    max_value=dt.datetime(2200, 1, 1),  # noqa: DTZ001
    timezones=st.just(dt.UTC),
)
dates = st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2200, 1, 1))


@st.composite
def money(draw: st.DrawFn, currency: str | None = None, *, negative: bool = True) -> Money:
    """Any amount up to 18 integer digits, with exactly the currency's minor digits."""
    code = currency or draw(st.sampled_from(CURRENCIES))
    digits = MINOR_UNITS[code]
    limit = 10 ** (18 + digits) - 1
    minor = draw(
        st.one_of(
            st.integers(min_value=0, max_value=10 ** (digits + 3)),
            st.integers(min_value=0, max_value=limit),
            st.just(limit),
        )
    )
    if negative and draw(st.booleans()):
        minor = -minor
    return Money(amount=Decimal(minor).scaleb(-digits), currency=code)


quantities = st.decimals(
    min_value=Decimal("0.000001"), max_value=Decimal("999999"), places=6, allow_nan=False
).map(lambda d: d.normalize() if d == d.to_integral() else d)


@st.composite
def line_items(draw: st.DrawFn, currency: str) -> LineItem:
    digits = MINOR_UNITS[currency]
    quantity = draw(st.one_of(st.just(Decimal(1)), st.integers(1, 1000).map(Decimal)))
    unit = Money(amount=Decimal(draw(st.integers(0, 10**9))).scaleb(-digits), currency=currency)
    return LineItem(
        description=draw(text(max_size=256)),
        quantity=quantity,
        unit_price=unit,
        amount=Money(amount=quantity * unit.amount, currency=currency),
        sku=draw(st.none() | identifiers),
    )


_FLIGHT_PRODUCT = {
    "origin": airports,
    "destination": airports,
    "date": dates,
    "airline": text(max_size=64),
    "flight": st.from_regex(r"[0-9]{1,4}[A-Z]?", fullmatch=True),
    "fare_class": letters,
}


def flight_products() -> st.SearchStrategy[FlightProduct]:
    return st.builds(FlightProduct, **_FLIGHT_PRODUCT)


def flight_details() -> st.SearchStrategy[FlightDetails]:
    return st.builds(
        FlightDetails,
        **_FLIGHT_PRODUCT,
        ticket_number=st.from_regex(r"[0-9A-Z]{1,20}", fullmatch=True),
        row=st.none() | st.integers(1, 999),
        seat=st.none() | letters,
    )


aprs = st.decimals(min_value=0, max_value=100, places=4, allow_nan=False)


def loan_products() -> st.SearchStrategy[LoanProduct]:
    return st.builds(
        LoanProduct, principal=money(negative=False), term_months=st.integers(1, 600), apr=aprs
    )


def loan_details() -> st.SearchStrategy[LoanDetails]:
    return st.builds(
        LoanDetails,
        principal=money(negative=False),
        term_months=st.integers(1, 600),
        apr=aprs,
        account=st.none() | identifiers,
    )


def bank_lines() -> st.SearchStrategy[BankStatementLineDetails]:
    return st.builds(
        BankStatementLineDetails,
        transaction_type=st.sampled_from(["DEBIT", "CREDIT", "FEE", "POS", "XFER", "OTHER"]),
        posted_at=utc_datetimes,
        payee=text(max_size=64),
        memo=st.none() | text(max_size=256),
        fitid=st.from_regex(r"[\x21-\x7e]{1,40}", fullmatch=True),
    )


@st.composite
def transactions(draw: st.DrawFn, *, kind: str | None = None, items: bool = True) -> Transaction:
    """A valid transaction; ``items=False`` gives none (as a ticket needs)."""
    kind = kind or draw(st.sampled_from(["flight", "bank_statement_line", "loan", "purchase"]))
    details = {
        "flight": flight_details(),
        "bank_statement_line": bank_lines(),
        "loan": loan_details(),
        "purchase": st.none(),
    }[kind]
    if items and draw(st.booleans()):
        currency = draw(st.sampled_from(CURRENCIES))
        lines = draw(st.lists(line_items(currency), min_size=1, max_size=4))
        total = Money(amount=sum((i.amount.amount for i in lines), Decimal(0)), currency=currency)
    else:
        lines = []
        total = draw(money(negative=kind == "bank_statement_line"))
    return Transaction(
        id=draw(identifiers),
        kind=kind,
        occurred_at=draw(utc_datetimes),
        firm=draw(identifiers),
        customer_ref=draw(customer_refs),
        items=tuple(lines),
        total=total,
        details=draw(details),
    )


def tickets() -> st.SearchStrategy[Transaction]:
    """Flight transactions a ticket can carry: no line items, a non-negative price."""
    return transactions(kind="flight", items=False)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    kind = draw(st.sampled_from(["flight", "loan"]))
    if kind == "flight":
        wanted: FlightWanted | LoanWanted = draw(
            st.builds(
                FlightWanted,
                origin=airports,
                destination=airports,
                date=dates,
                cabin=st.sampled_from(["economy", "premium_economy", "business", "first"]),
                passengers=st.integers(1, 9),
            )
        )
    else:
        wanted = LoanWanted(
            amount=draw(money(negative=False)), term_months=draw(st.integers(1, 600))
        )
    created = draw(utc_datetimes)
    earliest = draw(st.none() | dates)
    latest = draw(st.none() | dates)
    if earliest and latest and earliest > latest:
        earliest, latest = latest, earliest
    return Request(
        id=draw(identifiers),
        kind=kind,
        customer_ref=draw(customer_refs),
        reply_to=draw(identifiers),
        created_at=created,
        respond_by=draw(
            st.none() | st.integers(1, 86400).map(lambda s: created + dt.timedelta(seconds=s))
        ),
        wanted=wanted,
        constraints=Constraints(
            max_price=draw(st.none() | money(negative=False)),
            earliest_date=earliest,
            latest_date=latest,
        ),
        claims=tuple(
            draw(
                st.lists(
                    st.builds(
                        Claim,
                        type=identifiers,
                        value=text(max_size=256),
                        evidence=st.none() | text(max_size=200),
                    ),
                    max_size=3,
                )
            )
        ),
    )


@st.composite
def offers(draw: st.DrawFn) -> Offer:
    kind = draw(st.sampled_from(["flight", "loan"]))
    product = draw(flight_products() if kind == "flight" else loan_products())
    currency = draw(st.sampled_from(CURRENCIES))
    lines = draw(st.lists(line_items(currency), min_size=1, max_size=3))
    created = draw(utc_datetimes)
    return Offer(
        id=draw(identifiers),
        request_id=draw(identifiers),
        kind=kind,
        firm=draw(identifiers),
        customer_ref=draw(customer_refs),
        reply_to=draw(identifiers),
        created_at=created,
        valid_from=created,
        valid_until=created + dt.timedelta(seconds=draw(st.integers(1, 86400))),
        product=product,
        items=tuple(lines),
        price=Money(amount=sum((i.amount.amount for i in lines), Decimal(0)), currency=currency),
        rewards=tuple(
            draw(
                st.lists(
                    st.builds(
                        Reward,
                        code=identifiers,
                        description=text(max_size=256),
                        amount=money(currency, negative=False),
                    ),
                    max_size=2,
                )
            )
        ),
        advice=tuple(
            draw(st.lists(st.builds(Advice, code=identifiers, text=text(max_size=256)), max_size=2))
        ),
    )


def acceptances() -> st.SearchStrategy[Acceptance]:
    emails = st.from_regex(r"[a-z0-9._+-]{1,20}@[a-z0-9.-]{1,30}", fullmatch=True)
    return st.builds(
        Acceptance,
        id=identifiers,
        offer_id=identifiers,
        customer_ref=customer_refs,
        accepted_at=utc_datetimes,
        identity=st.none()
        | st.builds(Identity, name=st.none() | text(max_size=256), email=st.none() | emails),
    )


field_names = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)
urls = st.from_regex(
    r"https://[a-z0-9]{1,12}\.example(:[1-9][0-9]{0,3})?/[a-z0-9/_-]{0,20}", fullmatch=True
)
sha256_hex = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
whens = st.sampled_from(["now", "pull", "digest:1h", "digest:6h", "digest:168h"])


def consents() -> st.SearchStrategy[ConsentRecord]:
    return st.builds(
        ConsentRecord,
        id=identifiers,
        event=st.sampled_from(["granted", "revoked"]),
        issued_at=utc_datetimes,
        firm=identifiers,
        customer_ref=customer_refs,
        intermediary=st.none() | identifiers,
        terms_id=identifiers,
        terms_digest=sha256_hex,
        purpose=st.builds(Purpose, code=identifiers, text=text(max_size=256)),
        standard=identifiers,
        document_type=identifiers,
        fields=st.none() | st.lists(field_names, max_size=5).map(tuple),
        when=whens,
        destination=st.none() | urls,
        valid_until=st.none() | utc_datetimes,
        policy_url=st.none() | urls,
        jurisdiction=st.none() | text(max_size=64),
    )


@st.composite
def offer_sets(draw: st.DrawFn) -> OfferSet:
    drawn = draw(st.lists(offers(), max_size=2))
    request_id = draw(identifiers)
    answered = [o.model_copy(update={"request_id": request_id}) for o in drawn]
    return OfferSet(
        request_id=request_id,
        firm=draw(identifiers),
        reply_to=draw(identifiers),
        answered_at=draw(utc_datetimes),
        offers=tuple(answered),
        declined=None if answered else draw(st.none() | text(max_size=256)),
    )


# -- OFX statement lines --------------------------------------------------------------------

TRNTYPES: tuple[str, ...] = get_args(
    BankStatementLineDetails.model_fields["transaction_type"].annotation
)
# ofxtools 1.1 follows OFX 2.0.3: it has no HOLD (OFX 2.2), nor currencies newer than its
# ISO 4217 table.
OFXTOOLS_TRNTYPES = tuple(t for t in TRNTYPES if t != "HOLD")
OFXTOOLS_CURRENCIES = [c for c in CURRENCIES if c in ISO4217]

ms_datetimes = utc_datetimes.map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))


def trimmed_text(max_size: int) -> st.SearchStrategy[str]:
    """Markup-rich text as OFX readers return it: without CR and edge whitespace, which
    OFX readers strip (the specification asks them to)."""
    return (
        text(max_size=max_size)
        .map(lambda t: t.replace("\r", "").strip())
        .filter(lambda t: len(t) >= 1)
    )


@st.composite
def ofx_transactions(draw: st.DrawFn, *, interop: bool = False) -> Transaction:
    """A bank statement line an OFX statement carries: millisecond times, a sign that fits
    DEBIT and CREDIT, a memo OFX's MEMO holds. ``interop``: what ofxtools knows, as it
    reads it."""
    trntype = draw(st.sampled_from(OFXTOOLS_TRNTYPES if interop else TRNTYPES))
    currency = draw(st.sampled_from(OFXTOOLS_CURRENCIES if interop else CURRENCIES))
    amount = draw(money(currency)).amount
    if trntype == "DEBIT":
        amount = -abs(amount)
    elif trntype == "CREDIT":
        amount = abs(amount)
    texts = trimmed_text if interop else lambda n: text(max_size=n)
    posted = draw(ms_datetimes)
    fitid = draw(st.from_regex(r"[\x21-\x7e]{1,40}", fullmatch=True))
    return Transaction(
        id=draw(st.just(cmi_ofx.transaction_id(fitid)) | identifiers),
        kind="bank_statement_line",
        occurred_at=draw(st.just(posted) | ms_datetimes),
        firm=draw(identifiers),
        customer_ref=draw(customer_refs),
        total=Money(amount=amount, currency=currency),
        details=BankStatementLineDetails(
            transaction_type=trntype,
            posted_at=posted,
            payee=draw(texts(64)),
            memo=draw(st.none() | texts(255)),
            fitid=fitid,
        ),
    )
