"""A reference lender: loan requests answered from a risk-tier table and a daily limit.

A firm copies this plugin and puts its own systems behind the same hooks. The lender:

- lends in one currency, the currency of its ``daily_limit``;
- prices by rate: a loan's APR comes from the risk tier of the customer's credit band,
  which the customer claims (claim type ``credit-band``) with evidence from a credit
  bureau: the HMAC-SHA256 of ``"{customer_ref}:{band}"`` under a key the bureau and the
  lender share (:func:`credit_evidence`);
- never lends more in a UTC day than its daily limit, counting the loans booked that day
  and the holds not yet expired, even when acceptances race each other.

Its state lives in one SQLite file (WAL, one connection per thread)::

    loans (seq, id, acceptance_id, customer_ref, principal_minor, currency, term_months,
           apr, booked_at, booked_on)
    holds (id, acceptance_id, amount_minor, expires_at)

Amounts are kept in the currency's minor units (cents), as integers, so SQLite sums them
exactly. The pipeline's hooks only read that file (WAL: reads never wait for a writer), so
they are marked :func:`~cmi_sdk.nonblocking`.

The lender is configured, so it is registered as an instance, not as an entry point::

    lender = ReferenceLender(database="lender.db", daily_limit=Money(amount="1000000.00",
                             currency="USD"), credit_key=bureau_key)
    adapter = Adapter(plugins=[lender])
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cmi_sdk import (
    Acceptance,
    AcceptanceError,
    Availability,
    Claim,
    ClaimCheck,
    ConfigurationError,
    Hold,
    LineItem,
    LoanDetails,
    LoanProduct,
    LoanWanted,
    Money,
    Offer,
    Quote,
    Request,
    RevenueDecision,
    Transaction,
    hookimpl,
    nonblocking,
)

__all__ = [
    "CREDIT_BAND",
    "DEFAULT_RISK_TIERS",
    "MAX_TERM_MONTHS",
    "RATE_LOCK",
    "LimitReached",
    "ReferenceLender",
    "RiskTier",
    "credit_evidence",
]

CREDIT_BAND = "credit-band"
"""The claim type this lender verifies: the customer's credit band, such as ``B``."""

MAX_TERM_MONTHS = 360
"""The longest term this lender considers at all (30 years)."""

RATE_LOCK = dt.timedelta(hours=24)
"""How long a loan offer may be accepted: the quoted APR is locked for a day."""

# SQLite integers are 64-bit; a limit below this keeps every sum of a day's loans and
# holds (each admitted only under the limit) far from overflowing.
_MAX_LIMIT_MINOR = 2**53


@dataclass(frozen=True, slots=True)
class RiskTier:
    """One row of the lender's rate table: the APR of a credit band, and how much and for
    how long the lender lends to it.

    :param band: the credit band, as claimed (``A`` to ``D`` in the default table).
    :param apr: the annual percentage rate, in percent (``Decimal("6.95")`` is 6.95 %).
    :param max_amount: the largest principal for this band, in the lender's currency;
        None for no maximum but the daily limit.
    :param max_term_months: the longest term for this band, at most
        :data:`MAX_TERM_MONTHS`.
    :raises ConfigurationError: a value out of range (an APR that is not a Decimal from 0
        to 100, a maximum that is not positive, a term outside 1-360 months).
    """

    band: str
    apr: Decimal
    max_amount: Money | None = None
    max_term_months: int = MAX_TERM_MONTHS

    def __post_init__(self) -> None:
        if not self.band or not self.band.strip():
            raise ConfigurationError("a risk tier needs a band, such as 'A'")
        if not isinstance(self.apr, Decimal) or not self.apr.is_finite():
            raise ConfigurationError(f"tier {self.band}: apr must be a finite Decimal")
        if not Decimal(0) <= self.apr <= Decimal(100):
            raise ConfigurationError(f"tier {self.band}: apr must be 0-100 percent")
        if self.max_amount is not None and self.max_amount.amount <= 0:
            raise ConfigurationError(f"tier {self.band}: max_amount must be more than zero")
        if not 1 <= self.max_term_months <= MAX_TERM_MONTHS:
            raise ConfigurationError(
                f"tier {self.band}: max_term_months must be 1-{MAX_TERM_MONTHS}"
            )


def _usd(amount: str) -> Money:
    return Money(amount=Decimal(amount), currency="USD")


DEFAULT_RISK_TIERS: tuple[RiskTier, ...] = (
    RiskTier("A", Decimal("6.95"), _usd("250000.00"), 360),
    RiskTier("B", Decimal("9.45"), _usd("100000.00"), 120),
    RiskTier("C", Decimal("13.90"), _usd("35000.00"), 60),
    RiskTier("D", Decimal("19.90"), _usd("10000.00"), 36),
)
"""An illustrative rate table in USD, from the best band (A) to the riskiest (D). The
rates and maxima are examples for tests and demonstrations, not anyone's lending terms: a
firm passes its own table."""


def credit_evidence(key: bytes, customer_ref: str, band: str) -> str:
    """The evidence a credit bureau issues for a customer's band: the hex HMAC-SHA256 of
    ``"{customer_ref}:{band}"`` under the key it shares with the lender.

    Bound to the customer's pseudonymous reference, so evidence copied from another
    customer's request does not verify.
    """
    message = f"{customer_ref}:{band}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class LimitReached(AcceptanceError):  # noqa: N818 -- the name the hook's callers know it by
    """A hold or a booking would take the day's lending over the daily limit.

    Raised by ``cmi_hold`` (and by ``cmi_book`` when a booking comes without a live hold),
    so the acceptance is refused (``no-longer-available``) and nothing is booked.

    :param requested: the principal asked for.
    :param remaining: what was left of the day's limit.
    """

    def __init__(self, requested: Money, remaining: Money) -> None:
        super().__init__(
            f"today's lending limit is reached: {requested} asked for, {remaining} left",
            problem="no-longer-available",
        )
        self.requested = requested
        """The principal asked for."""
        self.remaining = remaining
        """What was left of the day's limit."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS loans (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    acceptance_id TEXT NOT NULL UNIQUE,
    customer_ref TEXT NOT NULL,
    principal_minor INTEGER NOT NULL,
    currency TEXT NOT NULL,
    term_months INTEGER NOT NULL,
    apr TEXT NOT NULL,
    booked_at TEXT NOT NULL,
    booked_on TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS loans_booked_on ON loans (booked_on, currency);
CREATE TABLE IF NOT EXISTS holds (
    id TEXT PRIMARY KEY,
    acceptance_id TEXT NOT NULL UNIQUE,
    amount_minor INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS holds_expires_at ON holds (expires_at);
"""

_USED = """
SELECT
    (SELECT COALESCE(SUM(principal_minor), 0) FROM loans
        WHERE booked_on = ? AND currency = ?),
    (SELECT COALESCE(SUM(amount_minor), 0) FROM holds WHERE expires_at > ?)
"""


class _Connection:
    """A thread's connection, closed when the thread's locals are dropped (its thread
    ended) or when the lender is closed, whichever comes first."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __del__(self) -> None:
        self.conn.close()


class ReferenceLender:
    """A lender firm's systems behind the request-to-offer hooks: register an instance
    with :class:`~cmi_sdk.Adapter` (``Adapter(plugins=[lender])``).

    Every hook answers None for requests and offers that are not loans in the lender's
    currency, so other plugins can serve them.

    :param database: the SQLite file of loans and holds (created if missing).
    :param firm: the firm's identifier, as its transactions name it.
    :param daily_limit: the most the lender lends in a UTC day, loans booked and holds
        live together; its currency is the only one the lender lends in.
    :param tiers: the rate table, one :class:`RiskTier` per band, in the limit's currency.
    :param default_band: the band of a customer whose credit band is not verified; None
        (the default) makes such requests get no offer.
    :param credit_key: the key shared with the credit bureau that signs credit-band
        evidence; without one, no credit band is verified.
    :param hold_seconds: how long a hold lasts if it is neither booked nor released.
    :param clock: POSIX seconds; tests inject one. Days are UTC days of this clock.
    :raises ConfigurationError: a contradictory configuration (no tiers, a band twice, a
        tier in another currency, an unknown default band, a limit that is not positive).
    """

    def __init__(
        self,
        *,
        database: str | Path,
        firm: str = "bank.example",
        daily_limit: Money,
        tiers: Sequence[RiskTier] = DEFAULT_RISK_TIERS,
        default_band: str | None = None,
        credit_key: bytes | None = None,
        hold_seconds: float = 600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.currency = daily_limit.currency
        """The one currency the lender lends in (ISO 4217)."""
        self._minor_units = daily_limit.minor_units
        self._limit_minor = self._to_minor(daily_limit)
        if not 0 < self._limit_minor < _MAX_LIMIT_MINOR:
            raise ConfigurationError(
                f"daily_limit must be more than zero and less than {_MAX_LIMIT_MINOR} minor"
                f" units, not {daily_limit}"
            )
        if not tiers:
            raise ConfigurationError("a lender needs at least one risk tier")
        by_band: dict[str, RiskTier] = {}
        for tier in tiers:
            if tier.band in by_band:
                raise ConfigurationError(f"band {tier.band!r} has two risk tiers")
            if tier.max_amount is not None and tier.max_amount.currency != self.currency:
                raise ConfigurationError(
                    f"tier {tier.band}'s max_amount is in {tier.max_amount.currency}, but the"
                    f" lender lends in {self.currency} (the daily limit's currency)"
                )
            by_band[tier.band] = tier
        if default_band is not None and default_band not in by_band:
            raise ConfigurationError(
                f"default_band {default_band!r} is not one of the tiers' bands"
                f" ({', '.join(by_band)})"
            )
        if credit_key is not None and not credit_key:
            raise ConfigurationError("credit_key must not be empty (or None for no key)")
        if not hold_seconds > 0:
            raise ConfigurationError("hold_seconds must be more than zero")
        self.path = Path(database)
        """The SQLite file of loans and holds."""
        self.firm = firm
        """The firm's identifier, as its transactions name it."""
        self.daily_limit = daily_limit
        """The most the lender lends in a UTC day."""
        self.tiers: tuple[RiskTier, ...] = tuple(tiers)
        """The rate table."""
        self.default_band = default_band
        """The band of customers whose band is not verified, or None for no offer."""
        self.hold_seconds = hold_seconds
        """How long a hold lasts by itself."""
        self.clock = clock
        """POSIX seconds."""
        self._tiers = by_band
        self._riskiest = max(self.tiers, key=lambda t: t.apr)
        self._credit_key = credit_key
        self._local = threading.local()
        self._open: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._open_lock = threading.Lock()
        # Outside a transaction: executescript commits first. IF NOT EXISTS makes a race
        # with another process creating the same file harmless.
        self._conn().executescript(_SCHEMA)

    def __repr__(self) -> str:
        return f"ReferenceLender(firm={self.firm!r}, daily_limit={str(self.daily_limit)!r})"

    # -- connections ----------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        held: _Connection | None = getattr(self._local, "held", None)
        if held is None:
            # check_same_thread=False only so close() may close every thread's connection;
            # each connection is used by its own thread alone.
            conn = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # money: a commit survives power loss
            held = _Connection(conn)
            self._local.held = held
            with self._open_lock:
                self._open.add(held)
        return held.conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE), so a check of the
        remaining limit and the write that relies on it cannot interleave with another."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """Close every thread's connection. The lender opens new ones if used again."""
        with self._open_lock:
            open_now = list(self._open)
            self._open.clear()
        for held in open_now:
            held.conn.close()
        self._local = threading.local()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- helpers --------------------------------------------------------------------------

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    def _to_minor(self, money: Money) -> int:
        return int(money.amount.scaleb(money.minor_units))

    def _money(self, minor: int) -> Money:
        return Money(amount=Decimal(minor).scaleb(-self._minor_units), currency=self.currency)

    def _wanted(self, request: Request) -> LoanWanted | None:
        """The loan asked for, when it is one this lender could make."""
        wanted = request.wanted
        if not isinstance(wanted, LoanWanted) or wanted.amount.currency != self.currency:
            return None
        return wanted

    def _product(self, offer: Offer) -> LoanProduct | None:
        """The loan offered, when it is one of this lender's."""
        product = offer.product
        if not isinstance(product, LoanProduct) or product.principal.currency != self.currency:
            return None
        return product

    def _check(self, customer_ref: str, claim: Claim) -> ClaimCheck:
        def unverified(reason: str) -> ClaimCheck:
            return ClaimCheck(claim=claim, verified=False, reason=reason)

        if self._credit_key is None:
            return unverified("this lender has no key to check credit-band evidence")
        if claim.evidence is None:
            return unverified("a credit band needs evidence from a credit bureau")
        expected = credit_evidence(self._credit_key, customer_ref, claim.value)
        # Bytes, because compare_digest refuses str with non-ASCII characters.
        if not hmac.compare_digest(claim.evidence.encode(), expected.encode()):
            return unverified("the evidence does not match the credit band claimed")
        if claim.value not in self._tiers:
            return unverified(
                f"band {claim.value!r} is not one this lender prices ({', '.join(self._tiers)})"
            )
        return ClaimCheck(claim=claim, verified=True)

    def _band(self, request: Request) -> str | None:
        """The request's verified credit band, else the default band (perhaps None).

        Evidence is checked again here, because the capacity, revenue and price hooks are
        not given the verdicts of ``cmi_verify_claims``. Of several verified bands, the
        riskiest counts.
        """
        verified = [
            self._tiers[claim.value]
            for claim in request.claims
            if claim.type == CREDIT_BAND and self._check(request.customer_ref, claim).verified
        ]
        if verified:
            return max(verified, key=lambda t: t.apr).band
        return self.default_band

    def _used(self, conn: sqlite3.Connection, now: dt.datetime) -> int:
        """The day's loans and the live holds, in minor units."""
        booked, held = conn.execute(
            _USED, (now.date().isoformat(), self.currency, now.timestamp())
        ).fetchone()
        return int(booked) + int(held)

    def remaining(self) -> Money:
        """What is left of today's (UTC) lending limit, after loans booked today and holds
        not yet expired."""
        return self._money(self._limit_minor - self._used(self._conn(), self._now()))

    def _loan_row(self, conn: sqlite3.Connection, acceptance_id: str) -> Any:
        return conn.execute(
            "SELECT seq, id, customer_ref, principal_minor, term_months, apr, booked_at"
            " FROM loans WHERE acceptance_id = ?",
            (acceptance_id,),
        ).fetchone()

    def _transaction(self, row: Any, total: Money) -> Transaction:
        seq, loan_id, customer_ref, principal_minor, term_months, apr, booked_at = row
        return Transaction(
            id=loan_id,
            kind="loan",
            occurred_at=dt.datetime.fromisoformat(booked_at),
            firm=self.firm,
            customer_ref=customer_ref,
            total=total,
            details=LoanDetails(
                principal=self._money(principal_minor),
                term_months=term_months,
                apr=Decimal(apr),
                account=f"{seq:010d}",
            ),
        )

    # -- the request-to-offer pipeline ----------------------------------------------------

    @hookimpl
    @nonblocking
    def cmi_validate_request(self, request: Request) -> list[str] | None:
        """Refuse loans in another currency, of no amount, or over 360 months."""
        wanted = request.wanted
        if not isinstance(wanted, LoanWanted):
            return None
        problems = []
        if wanted.amount.currency != self.currency:
            problems.append(f"this lender lends in {self.currency}, not {wanted.amount.currency}")
        if wanted.amount.amount <= 0:
            problems.append("the amount of a loan must be more than zero")
        if wanted.term_months > MAX_TERM_MONTHS:
            problems.append(
                f"a term of {wanted.term_months} months is over this lender's maximum of"
                f" {MAX_TERM_MONTHS} months"
            )
        return problems

    @hookimpl
    @nonblocking
    def cmi_verify_claims(self, request: Request) -> list[ClaimCheck] | None:
        """Check every ``credit-band`` claim's evidence (see :func:`credit_evidence`);
        other claims are left to other plugins."""
        if not isinstance(request.wanted, LoanWanted):
            return None
        return [
            self._check(request.customer_ref, claim)
            for claim in request.claims
            if claim.type == CREDIT_BAND
        ]

    @hookimpl
    @nonblocking
    def cmi_check_capacity(self, request: Request) -> Availability | None:
        """Could the lender fund the loan today? One loan is available when the amount
        fits in what is left of the day's limit. The product carries the APR of the
        customer's band, or the riskiest tier's when the band is unknown."""
        wanted = self._wanted(request)
        if wanted is None:
            return None
        band = self._band(request)
        tier = self._riskiest if band is None else self._tiers[band]
        now = self._now()
        remaining = self._limit_minor - self._used(self._conn(), now)
        amount = self._to_minor(wanted.amount)
        return Availability(
            product=LoanProduct(
                principal=wanted.amount, term_months=wanted.term_months, apr=tier.apr
            ),
            available=1 if 0 < amount <= remaining else 0,
            reference=f"lending-{now.date().isoformat()}",
        )

    @hookimpl
    @nonblocking
    def cmi_revenue_decision(
        self, request: Request, availability: Availability
    ) -> RevenueDecision | None:
        """Lend when the customer's band is known, its tier allows the amount and the
        term, and the day's limit has room. No floor: the lender prices by rate."""
        wanted = self._wanted(request)
        if wanted is None:
            return None
        band = self._band(request)
        if band is None:
            return _refuse("no verified credit band: this lender offers loans only with one")
        tier = self._tiers[band]
        if tier.max_amount is not None and wanted.amount.amount > tier.max_amount.amount:
            return _refuse(f"amount over the {band} tier's maximum of {tier.max_amount}")
        if wanted.term_months > tier.max_term_months:
            return _refuse(f"term over the {band} tier's maximum of {tier.max_term_months} months")
        if availability.available < 1:
            return _refuse("today's lending limit is reached")
        return RevenueDecision(accept=True, floor=None)

    @hookimpl
    @nonblocking
    def cmi_price(self, request: Request, decision: RevenueDecision) -> Quote | None:
        """One line item, the principal, and the product at the band's APR."""
        wanted = self._wanted(request)
        if wanted is None or not decision.accept:
            return None
        band = self._band(request)
        if band is None:
            return None
        apr = self._tiers[band].apr
        principal = wanted.amount
        term = wanted.term_months
        item = LineItem(
            description=f"Loan of {principal} over {term} months at {apr:f} % APR",
            quantity=Decimal(1),
            unit_price=principal,
            amount=principal,
        )
        return Quote(
            items=(item,), product=LoanProduct(principal=principal, term_months=term, apr=apr)
        )

    @hookimpl
    @nonblocking
    def cmi_offer_validity(self, offer: Offer) -> dt.timedelta | None:
        """A loan offer's rate is locked for :data:`RATE_LOCK` (24 hours)."""
        if self._product(offer) is None:
            return None
        return RATE_LOCK

    @hookimpl
    def cmi_hold(self, offer: Offer, acceptance: Acceptance) -> Hold | None:
        """Hold the principal against today's limit for ``hold_seconds``.

        The check and the hold are one transaction, so racing acceptances never take the
        day over its limit. A retried acceptance gets its live hold back.

        :raises LimitReached: the principal does not fit in what is left of the limit.
        """
        product = self._product(offer)
        if product is None:
            return None
        now = self._now()
        amount = self._to_minor(product.principal)
        with self._write() as conn:
            conn.execute("DELETE FROM holds WHERE expires_at <= ?", (now.timestamp(),))
            row = conn.execute(
                "SELECT id, expires_at FROM holds WHERE acceptance_id = ?", (acceptance.id,)
            ).fetchone()
            if row is not None:
                return Hold(id=row[0], expires_at=dt.datetime.fromtimestamp(row[1], dt.UTC))
            remaining = self._limit_minor - self._used(conn, now)
            if amount > remaining:
                raise LimitReached(product.principal, self._money(remaining))
            hold_id = f"HOLD-{uuid.uuid4().hex}"
            expires_at = now.timestamp() + self.hold_seconds
            conn.execute(
                "INSERT INTO holds (id, acceptance_id, amount_minor, expires_at)"
                " VALUES (?, ?, ?, ?)",
                (hold_id, acceptance.id, amount, expires_at),
            )
        return Hold(id=hold_id, expires_at=dt.datetime.fromtimestamp(expires_at, dt.UTC))

    @hookimpl
    def cmi_release(self, offer: Offer, hold: Hold) -> None:
        """Let a hold go: its principal is free for other loans at once."""
        if self._product(offer) is None:
            return
        with self._write() as conn:
            conn.execute("DELETE FROM holds WHERE id = ?", (hold.id,))

    @hookimpl
    def cmi_book(
        self, offer: Offer, acceptance: Acceptance, hold: Hold | None
    ) -> Transaction | None:
        """Turn the hold into a loan, with an account number, in one transaction.

        The same acceptance booked again gets the same loan back. Without a live hold
        (none was taken, or it expired), the limit is checked again.

        :raises LimitReached: no live hold, and the principal no longer fits.
        """
        product = self._product(offer)
        if product is None:
            return None
        now = self._now()
        amount = self._to_minor(product.principal)
        with self._write() as conn:
            row = self._loan_row(conn, acceptance.id)
            if row is None:
                conn.execute(
                    "DELETE FROM holds WHERE id = ? OR acceptance_id = ?",
                    (None if hold is None else hold.id, acceptance.id),
                )
                # The hold's amount is free again; the loan takes its place if it fits,
                # which a live hold guarantees.
                remaining = self._limit_minor - self._used(conn, now)
                if amount > remaining:
                    raise LimitReached(product.principal, self._money(remaining))
                conn.execute(
                    "INSERT INTO loans (id, acceptance_id, customer_ref, principal_minor,"
                    " currency, term_months, apr, booked_at, booked_on)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        f"LN-{uuid.uuid4().hex[:20].upper()}",
                        acceptance.id,
                        acceptance.customer_ref,
                        amount,
                        self.currency,
                        product.term_months,
                        str(product.apr),
                        now.isoformat(),
                        now.date().isoformat(),
                    ),
                )
                row = self._loan_row(conn, acceptance.id)
        return self._transaction(row, offer.price)

    @hookimpl
    def cmi_find_booking(self, offer: Offer, acceptance: Acceptance) -> Transaction | None:
        """The loan booked for ``acceptance`` (after a crash during the booking); None
        when none was."""
        if self._product(offer) is None:
            return None
        row = self._loan_row(self._conn(), acceptance.id)
        return None if row is None else self._transaction(row, offer.price)


def _refuse(reason: str) -> RevenueDecision:
    return RevenueDecision(accept=False, floor=None, reason=reason)
