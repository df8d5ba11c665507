"""A reference airline: the request-to-offer pipeline's hooks over its own SQLite inventory.

:class:`ReferenceAirline` is what a firm's integration looks like end to end: capacity from
nested EMSR-b booking limits, a revenue decision whose floor is EMSR-b's displacement
cost, a fare ladder for the price, loyalty tiers checked with an HMAC, and holds and
bookings that are safe under concurrency (one SQLite write transaction each). Its pipeline
hooks read only memory and its own SQLite file (WAL, where reads never wait for a writer),
so they are marked :func:`~cmi_sdk.nonblocking` and requests are answered on the caller's
thread. Register an instance with the adapter::

    airline = ReferenceAirline(database="airline.db", loyalty_key=b"...")
    airline.seed_demo()
    adapter = Adapter(plugins=[airline])

Exceptions::

    AirlineError
    ├── SoldOutError      the seats are no longer there (hold or book)
    └── HoldExpiredError  the hold to book is gone (expired, released or never taken)

The SDK turns any of them, raised from ``cmi_hold`` or ``cmi_book``, into a refused
acceptance; nothing is booked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Self

from pydantic import ValidationError

from cmi_airline.emsr import booking_limits, marginal_seat_revenue, protection_levels
from cmi_sdk import (
    Acceptance,
    AcceptanceError,
    Advice,
    Availability,
    ClaimCheck,
    ConfigurationError,
    FirmSystemError,
    FlightDetails,
    FlightProduct,
    FlightWanted,
    Hold,
    LineItem,
    Money,
    Offer,
    Problem,
    Quote,
    Request,
    RevenueDecision,
    Reward,
    Transaction,
    hookimpl,
    nonblocking,
)

__all__ = [
    "AirlineError",
    "AirlineUnavailableError",
    "HoldExpiredError",
    "ReferenceAirline",
    "SoldOutError",
]


class AirlineError(AcceptanceError):
    """The root of the reference airline's refusals: each refuses an acceptance (an
    :class:`~cmi_sdk.AcceptanceError`, the caller's request that cannot be served), so the
    SDK answers it with its problem type and books nothing. Outages are
    :class:`AirlineUnavailableError`, never one of these."""

    def __init__(self, message: str, *, problem: str = "no-longer-available") -> None:
        super().__init__(message, problem=problem)


class AirlineUnavailableError(FirmSystemError):
    """The airline's own system cannot answer (its database is closed): an outage, not a
    refusal, so an acceptance is released for a retry rather than refused, and the
    endpoint answers a 5xx."""

    def __init__(self, message: str) -> None:
        super().__init__(message, problem=Problem.PLUGIN_FAILED, plugin="cmi_airline")


class SoldOutError(AirlineError):
    """The seats an offer needs are no longer for sale (sold, held, or the class closed)."""


class HoldExpiredError(AirlineError):
    """The hold to book is gone: it expired, was released, or was never taken."""

    def __init__(self, message: str) -> None:
        # Refused, not an outage: the seats the offer held may be gone (not-booked is the
        # firm's booking system failing, a 5xx).
        super().__init__(message, problem="no-longer-available")


#: The reference airline sells one cabin.
CABIN = "economy"

#: How far either side of the wanted date alternatives are looked for, in days.
ALTERNATIVE_DAYS = 3

#: At most this many pieces of advice go with an offer.
MAX_ADVICE = 3

#: Loyalty tiers and the share of the price each takes off.
LOYALTY_REWARDS: dict[str, Decimal] = {"gold": Decimal("0.05"), "silver": Decimal("0.02")}

_FIRST_ROW = 10
_SEAT_LETTERS = "ABCDEF"
_MAX_CAPACITY = (999 - _FIRST_ROW + 1) * len(_SEAT_LETTERS)  # rows 10..999 (FlightDetails)

_IATA = re.compile(r"[A-Z]{3}")
_FLIGHT_NUMBER = re.compile(r"[0-9]{1,4}[A-Z]?")
_AIRLINE_CODE = re.compile(r"[A-Z0-9]{2}")
_TICKET_PREFIX = re.compile(r"[0-9]{3}")
_CLASS_LETTER = re.compile(r"[A-Z]")
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS flights (
    id TEXT PRIMARY KEY,
    origin TEXT NOT NULL,
    destination TEXT NOT NULL,
    date TEXT NOT NULL,
    airline TEXT NOT NULL,
    flight TEXT NOT NULL,
    capacity INTEGER NOT NULL CHECK (capacity > 0),
    UNIQUE (airline, flight, date)
);
CREATE INDEX IF NOT EXISTS flights_by_route ON flights (origin, destination, date);
CREATE TABLE IF NOT EXISTS fare_classes (
    flight_id TEXT NOT NULL REFERENCES flights (id),
    letter TEXT NOT NULL,
    rank INTEGER NOT NULL,
    fare TEXT NOT NULL,
    currency TEXT NOT NULL,
    mean REAL NOT NULL,
    sd REAL NOT NULL,
    PRIMARY KEY (flight_id, letter),
    UNIQUE (flight_id, rank)
);
CREATE TABLE IF NOT EXISTS bookings (
    serial INTEGER PRIMARY KEY AUTOINCREMENT,
    acceptance_id TEXT NOT NULL UNIQUE,
    flight_id TEXT NOT NULL REFERENCES flights (id),
    letter TEXT NOT NULL,
    ticket_number TEXT NOT NULL UNIQUE,
    customer_ref TEXT NOT NULL,
    total TEXT NOT NULL,
    currency TEXT NOT NULL,
    booked_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sold_seats (
    flight_id TEXT NOT NULL REFERENCES flights (id),
    letter TEXT NOT NULL,
    seat_row INTEGER NOT NULL,
    seat_letter TEXT NOT NULL,
    ticket_number TEXT NOT NULL,
    acceptance_id TEXT NOT NULL,
    PRIMARY KEY (flight_id, seat_row, seat_letter)
);
CREATE TABLE IF NOT EXISTS holds (
    id TEXT PRIMARY KEY,
    flight_id TEXT NOT NULL REFERENCES flights (id),
    letter TEXT NOT NULL,
    seats INTEGER NOT NULL CHECK (seats > 0),
    acceptance_id TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS holds_by_flight ON holds (flight_id, expires_at);
"""

# Talluri & van Ryzin's four-class example (see cmi_airline.emsr), as economy classes.
_DEMO_LADDER: tuple[tuple[str, Decimal, float, float], ...] = (
    ("Y", Decimal("1050.00"), 17.3, 5.8),
    ("B", Decimal("567.00"), 45.1, 15.0),
    ("M", Decimal("534.00"), 39.6, 13.2),
    ("Q", Decimal("520.00"), 34.0, 11.3),
)
_DEMO_RETURN_LADDER: tuple[tuple[str, Decimal, float, float], ...] = (
    ("Y", Decimal("980.00"), 14.0, 5.0),
    ("B", Decimal("545.00"), 40.0, 13.0),
    ("M", Decimal("505.00"), 36.0, 12.0),
    ("Q", Decimal("470.00"), 30.0, 10.0),
)


@dataclass(frozen=True, slots=True)
class _FareClass:
    letter: str
    fare: Decimal
    currency: str
    mean: float
    sd: float


@dataclass(frozen=True, slots=True)
class _Flight:
    id: str
    origin: str
    destination: str
    date: dt.date
    airline: str
    flight: str
    capacity: int


@dataclass(frozen=True, slots=True)
class _Fixed:
    """What never changes about a flight once added: the flight, its fare ladder, the
    ladder's EMSR-b protection levels, each class's product and index by letter, and
    the quotes of its classes by class index and passengers (built when first asked)."""

    flight: _Flight
    ladder: tuple[_FareClass, ...]
    levels: tuple[float, ...]
    products: tuple[FlightProduct, ...]
    classes: dict[str, int]
    quotes: dict[tuple[int, int], Quote] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _State:
    """A flight's inventory at one moment: seats left and each class's booking limit.

    It holds from ``since`` until ``until``, when the first live hold on the flight
    expires (infinity when there is none), unless the database changes meanwhile. The
    revenue decisions worked out from it, by class index and passengers, are kept with
    it: a bid-price table for the seats left.
    """

    fixed: _Fixed
    remaining: int
    limits: tuple[int, ...]
    since: float
    until: float
    decisions: dict[tuple[int, int], RevenueDecision] = field(default_factory=dict)

    @property
    def flight(self) -> _Flight:
        return self.fixed.flight

    @property
    def ladder(self) -> tuple[_FareClass, ...]:
        return self.fixed.ladder

    def holds_at(self, now: float) -> bool:
        """Whether the state is still the flight's at ``now`` (as far as time goes)."""
        return self.since <= now < self.until

    def lowest_open(self, seats: int) -> int | None:
        """The index of the cheapest class that can still sell ``seats``, if any."""
        # Nested limits never increase down the ladder, so the open classes are a prefix.
        open_ = [i for i, limit in enumerate(self.limits) if limit >= seats]
        return open_[-1] if open_ else None


@dataclass(frozen=True, slots=True)
class _Answer:
    """Capacity's and advice's answer to one kind of request, and when it holds."""

    availability: Availability | None
    advice: tuple[Advice, ...]
    since: float
    until: float


#: (origin, destination, date, passengers, earliest date, latest date): all an answer
#: depends on besides the inventory.
_AnswerKey = tuple[str, str, dt.date, int, dt.date | None, dt.date | None]


#: How long after its capacity check a request's later stages may go on from the
#: reading that check confirmed, in seconds.
_ONE_READING = 1.0

#: A snapshot holding more answers and days than this starts afresh: requests for ever
#: new dates or constraints must not grow it without bound while nothing is booked.
_SNAPSHOT_LIMIT = 10_000


@dataclass(slots=True)
class _Snapshot:
    """One thread's copy of the inventory it has read, for its connection's
    ``PRAGMA data_version`` ``version``: any other connection's commit changes that
    number, and the snapshot is then dropped whole."""

    version: int
    states: dict[str, _State] = field(default_factory=dict)
    """Each flight's state, by flight id."""
    days: dict[tuple[str, str, dt.date], tuple[str, ...]] = field(default_factory=dict)
    """The ids of the airline's flights on a route and date, by flight number."""
    answers: dict[_AnswerKey, _Answer] = field(default_factory=dict)
    request: Request | None = None
    """The request whose capacity check last asked for the version (see _snapshot)."""
    asked_at: float = -math.inf

    def full(self) -> bool:
        return len(self.answers) + len(self.days) > _SNAPSHOT_LIMIT


# Every flight the WHERE clause picks, with what its state is worked out from: the seats
# sold, the seats of live holds, and when the first live hold expires.
_STATES = """
SELECT f.id, f.origin, f.destination, f.date, f.airline, f.flight, f.capacity,
    (SELECT COUNT(*) FROM sold_seats WHERE flight_id = f.id) AS sold,
    (SELECT COALESCE(SUM(seats), 0) FROM holds WHERE flight_id = f.id AND expires_at > :now)
        AS held,
    (SELECT MIN(expires_at) FROM holds WHERE flight_id = f.id AND expires_at > :now)
        AS next_expiry
FROM flights AS f
WHERE {where}
ORDER BY f.date, f.flight
"""
_STATES_ON_ROUTE = _STATES.format(
    where="f.origin = :origin AND f.destination = :destination AND f.airline = :airline"
    " AND f.date BETWEEN :first AND :last"
)
_STATE_BY_ID = _STATES.format(where="f.id = :id")
_STATE_OF_PRODUCT = _STATES.format(
    where="f.airline = :airline AND f.flight = :flight AND f.date = :date"
    " AND f.origin = :origin AND f.destination = :destination"
)


_FLOAT_NOISE = Decimal("0.000001")  # a millionth of a currency unit: beyond any minor unit


def _quantum(currency: str) -> Decimal:
    return Decimal(1).scaleb(-Money(amount=Decimal(0), currency=currency).minor_units)


def _around(date: dt.date) -> list[dt.date]:
    """``date``, then the days within ``ALTERNATIVE_DAYS`` of it, nearest first and the
    earlier of two equally near first (days beyond the calendar's ends left out)."""
    days = [date]
    for distance in range(1, ALTERNATIVE_DAYS + 1):
        for sign in (-1, 1):
            try:
                days.append(date + dt.timedelta(days=sign * distance))
            except OverflowError:
                continue
    return days


def _best(states: Sequence[_State], passengers: int) -> tuple[_State, int] | None:
    """The flight of ``states`` with the cheapest class open for the passengers, and
    the class's index (the first such flight when fares tie)."""
    best: tuple[_State, int] | None = None
    for state in states:
        i = state.lowest_open(passengers)
        if i is not None and (best is None or state.ladder[i].fare < best[0].ladder[best[1]].fare):
            best = (state, i)
    return best


def _decide(state: _State, i: int, passengers: int) -> RevenueDecision:
    """Whether to sell class ``i`` of ``state`` to ``passengers`` who fit in it, and the
    floor: their seats' displacement cost (see ``cmi_revenue_decision``)."""
    fare_class = state.ladder[i]
    fares = [c.fare for c in state.ladder]
    means = [c.mean for c in state.ladder]
    sds = [c.sd for c in state.ladder]
    # The seats go one by one, each with fewer left; the top class, having no class
    # above it, is weighed against its own later demand.
    # Each seat's value is a float; its last bits are noise (3971.0000000000005 for
    # 3971), which rounding up to the cent would turn into a floor above the fare.
    value = sum(
        (
            Decimal(marginal_seat_revenue(fares, means, sds, seats, nest=max(i, 1))).quantize(
                _FLOAT_NOISE
            )
            for seats in range(state.remaining, state.remaining - passengers, -1)
        ),
        start=Decimal(0),
    )
    floor = value.quantize(_quantum(fare_class.currency), rounding=ROUND_CEILING)
    if floor > fare_class.fare * passengers:
        return RevenueDecision(
            accept=False,
            reason=f"class {fare_class.letter} seats are worth more kept for dearer fares",
        )
    return RevenueDecision(accept=True, floor=Money(amount=floor, currency=fare_class.currency))


class ReferenceAirline:
    """A reference airline firm: register an instance as an adapter plugin.

    Its inventory lives in its own SQLite file (WAL mode): flights, each flight's fare
    ladder with the demand forecast of every class, holds and sold seats. Every thread
    gets its own connection; holds and bookings each run in one ``BEGIN IMMEDIATE``
    transaction, so two acceptances can never take the same last seat.

    Requests are answered from a snapshot of the inventory each thread keeps (flights,
    seats sold and held, booking limits, and the answers worked out from them), as
    real availability systems answer most requests from a cache: a request costs one
    ``PRAGMA data_version`` while nothing changes. Any other connection's commit
    (another thread's, another instance's, another process's) changes that number and
    the snapshot starts afresh; the airline's own writes drop it; a flight's state
    lasts only until its first live hold expires. Holds and bookings never use it.

    :param database: the SQLite file (created if missing; not ``:memory:``, which every
        connection would see empty).
    :param airline: the airline's name, as products and tickets carry it.
    :param airline_code: its two-character IATA designator, which prefixes flight numbers
        in descriptions and transaction ids (``DL-0060000000001``).
    :param firm: the firm's identifier on transactions.
    :param hold_seconds: how long a hold keeps seats before they are for sale again.
    :param loyalty_key: the HMAC key loyalty-tier evidence is signed with; without one,
        no tier can be verified.
    :param ticket_prefix: the three-digit airline accounting code ticket numbers start
        with (Delta's is 006).
    :param clock: POSIX seconds; tests inject one.
    :raises ValueError: an option is malformed.
    """

    def __init__(
        self,
        *,
        database: str | Path,
        airline: str = "Delta",
        airline_code: str = "DL",
        firm: str = "delta.com",
        hold_seconds: float = 600,
        loyalty_key: bytes | None = None,
        ticket_prefix: str = "006",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if str(database) == ":memory:" or not str(database):
            raise ValueError("database must be a file: each thread opens its own connection")
        if not 1 <= len(airline) <= 64:
            raise ValueError("airline must be a name of 1-64 characters")
        if not _AIRLINE_CODE.fullmatch(airline_code):
            raise ValueError(
                f"airline_code must be a two-character IATA code, not {airline_code!r}"
            )
        if not _IDENTIFIER.fullmatch(firm):
            raise ValueError(f"firm must be an identifier such as delta.com, not {firm!r}")
        if not (math.isfinite(hold_seconds) and hold_seconds > 0):
            raise ValueError(f"hold_seconds must be positive, not {hold_seconds!r}")
        if not _TICKET_PREFIX.fullmatch(ticket_prefix):
            raise ValueError(f"ticket_prefix must be three digits, not {ticket_prefix!r}")
        if loyalty_key is not None and not loyalty_key:
            raise ValueError("loyalty_key must not be empty (pass None for no key)")
        self.database = Path(database)
        """The SQLite file."""
        self.airline = airline
        """The airline's name."""
        self.airline_code = airline_code
        """The IATA designator."""
        self.firm = firm
        """The firm's identifier."""
        self.hold_seconds = hold_seconds
        """How long a hold lasts."""
        self.clock = clock
        """POSIX seconds."""
        self._loyalty_key = loyalty_key
        self._ticket_prefix = ticket_prefix
        self._local = threading.local()
        self._lock = threading.Lock()
        # Flights and ladders never change once added: shared by every thread. What does
        # change (seats sold and held) is in each thread's snapshot (see _snapshot).
        self._fixed: dict[str, _Fixed] = {}
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        conn = self._connection()
        # WAL lets readers (capacity checks) go on while one writer holds or books.
        conn.execute("PRAGMA journal_mode = WAL")
        with self._transaction(write=True) as tx:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    tx.execute(statement)

    # -- connections ---------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise AirlineUnavailableError("the airline's database is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            with self._lock:
                if self._closed:
                    raise AirlineUnavailableError("the airline's database is closed")
                # check_same_thread=False only so close() can close every thread's
                # connection; each is still used by the thread that opened it.
                conn = sqlite3.connect(
                    self.database, timeout=30, isolation_level=None, check_same_thread=False
                )
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA foreign_keys = ON")
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        # IMMEDIATE takes the write lock up front, so the check and the insert that
        # depends on it cannot interleave with another writer's.
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")
        finally:
            if write:
                # data_version moves for other connections' commits, never for this
                # connection's own: this thread's snapshot must go by hand.
                self._local.snapshot = None

    def close(self) -> None:
        """Close every thread's connection; the airline cannot be used afterwards."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- inventory -------------------------------------------------------------------------

    def add_flight(
        self,
        *,
        origin: str,
        destination: str,
        date: dt.date,
        flight: str,
        capacity: int,
        fares: Sequence[tuple[str, Decimal, float, float]],
        currency: str = "USD",
    ) -> str:
        """Add a flight and its fare ladder; return the flight's id (``DL2231-2026-07-01``).

        :param origin: the IATA airport it leaves from.
        :param destination: the IATA airport it goes to.
        :param date: the local departure date.
        :param flight: the flight number without the airline code (``2231``).
        :param capacity: the seats for sale (1 to 5940: rows 10 to 999, seats A to F).
        :param fares: the fare classes, highest fare first, as ``(letter, fare, mean
            demand, standard deviation of demand)``; the fare is a Decimal with the
            currency's minor units.
        :param currency: the ISO 4217 code of the fares.
        :raises ValueError: a value is malformed, the fares do not strictly decrease, or
            the flight exists already.
        """
        if not (_IATA.fullmatch(origin) and _IATA.fullmatch(destination)):
            raise ValueError("origin and destination must be three-letter IATA codes (ATL)")
        if origin == destination:
            raise ValueError("origin and destination must differ")
        if isinstance(date, dt.datetime) or not isinstance(date, dt.date):
            raise ValueError(f"date must be a datetime.date, not {date!r}")
        if not _FLIGHT_NUMBER.fullmatch(flight):
            raise ValueError(f"flight must be a flight number such as 2231, not {flight!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise ValueError(f"capacity must be a whole number of seats, not {capacity!r}")
        if not 1 <= capacity <= _MAX_CAPACITY:
            raise ValueError(f"capacity must be from 1 to {_MAX_CAPACITY} seats, not {capacity}")
        letters = [fare[0] for fare in fares]
        if len(set(letters)) != len(letters):
            raise ValueError(f"fare class letters must be unique: {letters}")
        ladder = []
        for letter, fare, mean, sd in fares:
            if not _CLASS_LETTER.fullmatch(letter):
                raise ValueError(f"a fare class is one capital letter, not {letter!r}")
            if not isinstance(fare, Decimal):
                raise ValueError(f"the fare of class {letter} must be a Decimal, not {fare!r}")
            try:
                money = Money(amount=fare, currency=currency)
            except ValidationError as exc:
                reason = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
                raise ValueError(f"the fare of class {letter}: {reason}") from None
            ladder.append(_FareClass(letter, money.amount, currency, float(mean), float(sd)))
        # Checks the order, the demand forecasts and that there is at least one class.
        protection_levels(
            [c.fare for c in ladder], [c.mean for c in ladder], [c.sd for c in ladder]
        )
        flight_id = f"{self.airline_code}{flight}-{date.isoformat()}"
        with self._transaction(write=True) as conn:
            if conn.execute("SELECT 1 FROM flights WHERE id = ?", (flight_id,)).fetchone():
                raise ValueError(f"flight {flight_id} exists already")
            conn.execute(
                "INSERT INTO flights (id, origin, destination, date, airline, flight, capacity)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (flight_id, origin, destination, date.isoformat(), self.airline, flight, capacity),
            )
            conn.executemany(
                "INSERT INTO fare_classes (flight_id, letter, rank, fare, currency, mean, sd)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (flight_id, c.letter, rank, str(c.fare), c.currency, c.mean, c.sd)
                    for rank, c in enumerate(ladder)
                ],
            )
        return flight_id

    def seed_demo(self) -> list[str]:
        """Add the demo schedule, skipping flights that exist; return every demo flight's id.

        DL2231 ATL-CDG, 100 seats in classes Y, B, M, Q at Talluri & van Ryzin's fares
        and demand (USD), daily from 2026-06-28 to 2026-07-04; and DL2232 CDG-ATL, its
        return, on the same days, priced in EUR.
        """
        ids = []
        for offset in range(-3, 4):
            day = dt.date(2026, 7, 1) + dt.timedelta(days=offset)
            for origin, destination, number, ladder, currency in (
                ("ATL", "CDG", "2231", _DEMO_LADDER, "USD"),
                ("CDG", "ATL", "2232", _DEMO_RETURN_LADDER, "EUR"),
            ):
                flight_id = f"{self.airline_code}{number}-{day.isoformat()}"
                with self._transaction(write=False) as conn:
                    exists = conn.execute(
                        "SELECT 1 FROM flights WHERE id = ?", (flight_id,)
                    ).fetchone()
                if not exists:
                    self.add_flight(
                        origin=origin,
                        destination=destination,
                        date=day,
                        flight=number,
                        capacity=100,
                        fares=ladder,
                        currency=currency,
                    )
                ids.append(flight_id)
        return ids

    def sold(self, flight_id: str) -> int:
        """The seats sold on a flight (holds not included).

        :raises KeyError: no such flight.
        """
        with self._transaction(write=False) as conn:
            if self._flight(conn, flight_id) is None:
                raise KeyError(flight_id)
            return int(
                conn.execute(
                    "SELECT COUNT(*) FROM sold_seats WHERE flight_id = ?", (flight_id,)
                ).fetchone()[0]
            )

    def loyalty_evidence(self, customer_ref: str, tier: str) -> str:
        """The evidence that ``customer_ref`` holds loyalty ``tier``: the hex HMAC-SHA256 of
        ``f"{customer_ref}:{tier}"`` under the loyalty key (what the loyalty programme
        gives its members to present with a ``loyalty-tier`` claim).

        :raises ConfigurationError: the airline was made without a loyalty key.
        """
        if self._loyalty_key is None:
            raise ConfigurationError("the airline has no loyalty key to sign evidence with")
        message = f"{customer_ref}:{tier}".encode()
        return hmac.new(self._loyalty_key, message, hashlib.sha256).hexdigest()

    # -- reading the inventory -------------------------------------------------------------

    @staticmethod
    def _flight_from_row(row: sqlite3.Row) -> _Flight:
        return _Flight(
            id=row["id"],
            origin=row["origin"],
            destination=row["destination"],
            date=dt.date.fromisoformat(row["date"]),
            airline=row["airline"],
            flight=row["flight"],
            capacity=row["capacity"],
        )

    def _flight(self, conn: sqlite3.Connection, flight_id: str) -> _Flight | None:
        row = conn.execute("SELECT * FROM flights WHERE id = ?", (flight_id,)).fetchone()
        return None if row is None else self._flight_from_row(row)

    def _flight_of(self, conn: sqlite3.Connection, product: FlightProduct) -> _Flight | None:
        row = conn.execute(
            "SELECT * FROM flights WHERE airline = ? AND flight = ? AND date = ?"
            " AND origin = ? AND destination = ?",
            (
                product.airline,
                product.flight,
                product.date.isoformat(),
                product.origin,
                product.destination,
            ),
        ).fetchone()
        return None if row is None else self._flight_from_row(row)

    def _fixed_of(self, conn: sqlite3.Connection, row: sqlite3.Row) -> _Fixed:
        # add_flight refuses a flight that exists, so a flight read once is read for good.
        fixed = self._fixed.get(row["id"])
        if fixed is None:
            flight = self._flight_from_row(row)
            ladder = tuple(
                _FareClass(r["letter"], Decimal(r["fare"]), r["currency"], r["mean"], r["sd"])
                for r in conn.execute(
                    "SELECT * FROM fare_classes WHERE flight_id = ? ORDER BY rank", (flight.id,)
                )
            )
            levels = protection_levels(
                [c.fare for c in ladder], [c.mean for c in ladder], [c.sd for c in ladder]
            )
            products = tuple(
                FlightProduct(
                    origin=flight.origin,
                    destination=flight.destination,
                    date=flight.date,
                    airline=flight.airline,
                    flight=flight.flight,
                    fare_class=c.letter,
                )
                for c in ladder
            )
            classes = {c.letter: i for i, c in enumerate(ladder)}
            # Threads racing here build equal values; whichever lands last is kept.
            fixed = self._fixed[flight.id] = _Fixed(
                flight, ladder, tuple(levels), products, classes
            )
        return fixed

    def _read_states(
        self, conn: sqlite3.Connection, query: str, params: dict[str, object], now: float
    ) -> list[_State]:
        """The states of the flights ``query`` (one of the ``_STATE*`` queries) picks, as
        they are at ``now``, in one statement: one consistent reading of all of them."""
        rows = conn.execute(query, {**params, "now": now}).fetchall()
        states = []
        for row in rows:
            fixed = self._fixed_of(conn, row)
            # An expired hold never counts, gone or not.
            remaining = max(0, fixed.flight.capacity - row["sold"] - row["held"])
            # The forecasts are for the flight's whole selling period and are not drawn
            # down as seats sell: a reference model, re-optimized on the seats left.
            limits = tuple(booking_limits(remaining, fixed.levels))
            expiry = row["next_expiry"]
            states.append(
                _State(fixed, remaining, limits, now, math.inf if expiry is None else expiry)
            )
        return states

    def _snapshot(self, request: Request, now: float, *, first: bool) -> _Snapshot:
        """This thread's snapshot of the inventory, started afresh when another
        connection (another thread's, another airline instance's, another process's)
        has committed since it was taken; the airline's own writes drop it (see
        :meth:`_transaction`).

        A request is answered from one reading of the inventory: capacity (``first``)
        always asks whether anything changed; revenue management, pricing and advice for
        the same request, within a second, go on from what capacity saw (holds expiring
        meanwhile still count as expired).
        """
        snapshot: _Snapshot | None = getattr(self._local, "snapshot", None)
        if (
            not first
            and not self._closed
            and snapshot is not None
            and snapshot.request is request
            and 0 <= now - snapshot.asked_at < _ONE_READING
        ):
            return snapshot
        # Asked before anything is read: a commit landing after this question but before
        # a read only makes the next question start afresh again.
        version: int = self._connection().execute("PRAGMA data_version").fetchone()[0]
        if snapshot is None or snapshot.version != version or snapshot.full():
            snapshot = self._local.snapshot = _Snapshot(version)
        snapshot.request, snapshot.asked_at = request, now
        return snapshot

    def _window(
        self, snapshot: _Snapshot, wanted: FlightWanted, now: float
    ) -> list[tuple[dt.date, tuple[_State, ...]]]:
        """The states of the flights on the wanted date and on the days around it, the
        wanted date first and then the others nearest first (earlier before later).

        When the snapshot lacks any of them, or one has outlived a hold, the whole window
        is read again in one query."""
        dates = _around(wanted.date)
        route = (wanted.origin, wanted.destination)
        window = []
        for date in dates:
            ids = snapshot.days.get((*route, date))
            if ids is None:
                break
            states = tuple(snapshot.states[flight_id] for flight_id in ids)
            if not all(state.holds_at(now) for state in states):
                break
            window.append((date, states))
        else:
            return window
        read = self._read_states(
            self._connection(),
            _STATES_ON_ROUTE,
            {
                "origin": wanted.origin,
                "destination": wanted.destination,
                "airline": self.airline,
                "first": min(dates).isoformat(),
                "last": max(dates).isoformat(),
            },
            now,
        )
        on: dict[dt.date, list[_State]] = {date: [] for date in dates}
        for state in read:
            on[state.flight.date].append(state)
            snapshot.states[state.flight.id] = state
        for date, states_on in on.items():
            snapshot.days[(*route, date)] = tuple(state.flight.id for state in states_on)
        return [(date, tuple(on[date])) for date in dates]

    def _answer(self, request: Request, wanted: FlightWanted, *, first: bool) -> _Answer:
        """What capacity (``first``) and advice answer ``request`` with, from the
        snapshot."""
        now = self.clock()
        snapshot = self._snapshot(request, now, first=first)
        constraints = request.constraints
        key = (
            wanted.origin,
            wanted.destination,
            wanted.date,
            wanted.passengers,
            constraints.earliest_date,
            constraints.latest_date,
        )
        answer = snapshot.answers.get(key)
        if answer is None or not answer.since <= now < answer.until:
            answer = snapshot.answers[key] = self._work_out(snapshot, request, wanted, now)
        return answer

    def _work_out(
        self, snapshot: _Snapshot, request: Request, wanted: FlightWanted, now: float
    ) -> _Answer:
        (_, flights), *around = self._window(snapshot, wanted, now)
        constraints = request.constraints
        alternatives: list[tuple[FlightProduct, _FareClass, int]] = []
        for date, states in around:
            if constraints.earliest_date is not None and date < constraints.earliest_date:
                continue
            if constraints.latest_date is not None and date > constraints.latest_date:
                continue
            best = _best(states, wanted.passengers)
            if best is not None:
                state, i = best
                alternatives.append((state.fixed.products[i], state.ladder[i], state.limits[i]))
        availability = None
        if flights:
            best = _best(flights, wanted.passengers)
            if best is None:
                state, i = flights[0], 0
            else:
                state, i = best
            availability = Availability(
                product=state.fixed.products[i],
                available=state.limits[i],
                reference=state.flight.id,
                alternatives=tuple(product for product, _, _ in alternatives),
            )
        advice = tuple(
            Advice(
                code="alternative-date",
                text=(
                    f"{self.airline_code}{product.flight} on {product.date.isoformat()} has"
                    f" {seats} seat{'' if seats == 1 else 's'} in class {product.fare_class}"
                    f" at {fare_class.fare} {fare_class.currency} a passenger."
                ),
            )
            for product, fare_class, seats in alternatives[:MAX_ADVICE]
        )
        # The answer holds as long as every state it was worked out from.
        everything = [*flights, *(state for _, states in around for state in states)]
        return _Answer(
            availability,
            advice,
            since=max((state.since for state in everything), default=now),
            until=min((state.until for state in everything), default=math.inf),
        )

    def _wanted(self, request: Request) -> FlightWanted | None:
        wanted = request.wanted
        if request.kind != "flight" or not isinstance(wanted, FlightWanted):
            return None
        return wanted if wanted.cabin == CABIN else None

    def _ours(self, product: object) -> FlightProduct | None:
        if isinstance(product, FlightProduct) and product.airline == self.airline:
            return product
        return None

    def _offered(
        self, request: Request, availability: Availability
    ) -> tuple[FlightWanted, _State, int] | None:
        """What revenue management and pricing work from: the seats wanted, and the
        flight's state as it is now and the class of an availability of ours (None when
        not ours)."""
        wanted = self._wanted(request)
        if wanted is None:
            return None
        product = self._ours(availability.product)
        reference = availability.reference
        if product is None or reference is None:
            return None
        now = self.clock()
        snapshot = self._snapshot(request, now, first=False)
        state = snapshot.states.get(reference)
        if state is None or not state.holds_at(now):
            read = self._read_states(self._connection(), _STATE_BY_ID, {"id": reference}, now)
            if not read:
                return None
            state = snapshot.states[reference] = read[0]
        flight = state.flight
        named = (product.airline, product.flight, product.date, product.origin, product.destination)
        if named != (flight.airline, flight.flight, flight.date, flight.origin, flight.destination):
            return None
        i = state.fixed.classes.get(product.fare_class)
        return None if i is None else (wanted, state, i)

    # -- the pipeline ----------------------------------------------------------------------

    @hookimpl
    @nonblocking
    def cmi_verify_claims(self, request: Request) -> list[ClaimCheck] | None:
        """Verify ``loyalty-tier`` claims: the evidence must be the HMAC of
        ``customer_ref:tier`` under the loyalty key (see :meth:`loyalty_evidence`)."""
        checks = []
        for claim in request.claims:
            if claim.type != "loyalty-tier":
                continue
            if self._loyalty_key is None:
                checks.append(
                    ClaimCheck(
                        claim=claim,
                        verified=False,
                        reason="the airline cannot check loyalty tiers (it has no key)",
                    )
                )
            elif claim.evidence is None:
                checks.append(
                    ClaimCheck(claim=claim, verified=False, reason="the claim carries no evidence")
                )
            else:
                expected = self.loyalty_evidence(request.customer_ref, claim.value)
                verified = hmac.compare_digest(expected, claim.evidence.strip().lower())
                checks.append(
                    ClaimCheck(
                        claim=claim,
                        verified=verified,
                        reason=None if verified else "the evidence does not match the tier",
                    )
                )
        return checks or None

    @hookimpl
    @nonblocking
    def cmi_check_capacity(self, request: Request) -> Availability | None:
        """The cheapest fare class still open on the wanted flight, by EMSR-b's nested
        booking limits over the seats left (capacity less sold and held).

        None when the request is not for an economy seat on one of this airline's flights
        on that route and date. When no class can seat every passenger, the availability
        names the top class and the seats it has left (0 when sold out).
        """
        wanted = self._wanted(request)
        if wanted is None:
            return None
        return self._answer(request, wanted, first=True).availability

    @hookimpl
    @nonblocking
    def cmi_revenue_decision(
        self, request: Request, availability: Availability
    ) -> RevenueDecision | None:
        """Sell if the class has a seat for every passenger, at no less than the seats'
        displacement cost.

        The floor is the sum, over the seats sold, of EMSR-b's marginal seat revenue of
        the classes above the one sold (of the top class itself when the top class is
        sold), each at the number of seats left when it goes, rounded up to the
        currency's minor units. It never exceeds the fare of a class the booking limits
        leave open; if rounding were ever to push it there, the airline does not sell.
        """
        offered = self._offered(request, availability)
        if offered is None:
            return None
        wanted, state, i = offered
        fare_class = state.ladder[i]
        passengers = wanted.passengers
        if availability.available < passengers or state.remaining < passengers:
            seats = min(availability.available, state.remaining)
            return RevenueDecision(
                accept=False,
                reason=(
                    f"{self.airline_code}{state.flight.flight} on {state.flight.date} has"
                    f" {seats} seat{'' if seats == 1 else 's'} for sale in class"
                    f" {fare_class.letter}, not {passengers}"
                ),
            )
        # The decision depends on nothing but the state, the class and the passengers, so
        # it is worked out once a state (per thread, as the state is).
        decision = state.decisions.get((i, passengers))
        if decision is None:
            decision = state.decisions[i, passengers] = _decide(state, i, passengers)
        return decision

    @hookimpl
    @nonblocking
    def cmi_price(
        self, request: Request, availability: Availability, decision: RevenueDecision
    ) -> Quote | None:
        """The fare ladder: the fare of the product's class for each passenger.

        Prices only: the customer's ``max_price`` is not applied here.
        """
        offered = self._offered(request, availability) if decision.accept else None
        if offered is None:
            return None
        wanted, state, i = offered
        # A quote depends on nothing but the flight, the class and the passengers, none of
        # which ever changes: built once, shared by every thread (and immutable).
        quote = state.fixed.quotes.get((i, wanted.passengers))
        if quote is None:
            quote = state.fixed.quotes[i, wanted.passengers] = self._quote(
                state.fixed, i, wanted.passengers
            )
        return quote

    def _quote(self, fixed: _Fixed, i: int, passengers: int) -> Quote:
        fare_class = fixed.ladder[i]
        flight = fixed.flight
        quantity = Decimal(passengers)
        item = LineItem(
            description=(
                f"{flight.origin}-{flight.destination} {self.airline_code}{flight.flight}"
                f" class {fare_class.letter}"
            ),
            quantity=quantity,
            unit_price=Money(amount=fare_class.fare, currency=fare_class.currency),
            amount=Money(amount=fare_class.fare * quantity, currency=fare_class.currency),
            sku=f"{flight.id}.{fare_class.letter}",
        )
        return Quote(items=(item,), product=fixed.products[i])

    @hookimpl
    @nonblocking
    def cmi_rewards(self, quote: Quote, claims: list[ClaimCheck]) -> list[Reward] | None:
        """A verified loyalty tier takes a share off the price: gold 5 %, silver 2 %
        (rounded down to the currency's minor units; the best tier claimed counts)."""
        if self._ours(quote.product) is None:
            return None
        shares = [
            (LOYALTY_REWARDS[check.claim.value.lower()], check.claim.value.lower())
            for check in claims
            if check.verified
            and check.claim.type == "loyalty-tier"
            and check.claim.value.lower() in LOYALTY_REWARDS
        ]
        if not shares:
            return None
        share, tier = max(shares)
        total = quote.total
        amount = (total.amount * share).quantize(_quantum(total.currency), rounding=ROUND_FLOOR)
        if amount <= 0:
            return None
        return [
            Reward(
                code=f"loyalty-{tier}",
                description=f"{tier.capitalize()} member: {(share * 100).normalize():f} % off",
                amount=Money(amount=amount, currency=total.currency),
            )
        ]

    @hookimpl
    @nonblocking
    def cmi_advise(self, request: Request) -> list[Advice] | None:
        """Up to three other dates (within three days, and the customer's date range) with
        seats for every passenger, nearest first."""
        wanted = self._wanted(request)
        if wanted is None:
            return None
        return list(self._answer(request, wanted, first=False).advice) or None

    @hookimpl
    @nonblocking
    def cmi_offer_validity(self, offer: Offer) -> dt.timedelta | None:
        """The airline's offers may be accepted for ten minutes."""
        if self._ours(offer.product) is None:
            return None
        return dt.timedelta(minutes=10)

    @hookimpl
    def cmi_hold(self, offer: Offer, acceptance: Acceptance) -> Hold | None:
        """Hold the offer's seats for ``hold_seconds``, if its class still has them.

        One write transaction checks the booking limit of the offer's class (expired holds
        not counted) and inserts the hold, so of several acceptances racing for the last
        seats only as many as fit get a hold. A retried acceptance gets its hold back.

        :raises SoldOutError: the class no longer has a seat for every passenger.
        :raises AirlineError: the flight or class is not the airline's, or the first line
            item's quantity is not a whole number of passengers.
        """
        product = self._ours(offer.product)
        if offer.kind != "flight" or product is None:
            return None
        seats = self._passengers(offer)
        with self._transaction(write=True) as conn:
            now = self.clock()
            conn.execute("DELETE FROM holds WHERE expires_at <= ?", (now,))
            row = conn.execute(
                "SELECT id, expires_at FROM holds WHERE acceptance_id = ?", (acceptance.id,)
            ).fetchone()
            if row is not None:
                return Hold(
                    id=row["id"], expires_at=dt.datetime.fromtimestamp(row["expires_at"], dt.UTC)
                )
            # Read afresh inside the write transaction, never from a snapshot: this is
            # what keeps the last seat from being held twice.
            read = self._read_states(
                conn,
                _STATE_OF_PRODUCT,
                {
                    "airline": product.airline,
                    "flight": product.flight,
                    "date": product.date.isoformat(),
                    "origin": product.origin,
                    "destination": product.destination,
                },
                now,
            )
            if not read:
                raise AirlineError(
                    f"{product.airline} has no flight {product.flight} on {product.date}"
                )
            state = read[0]
            flight = state.flight
            i = state.fixed.classes.get(product.fare_class)
            if i is None:
                raise AirlineError(f"flight {flight.id} has no class {product.fare_class}")
            if state.limits[i] < seats:
                raise SoldOutError(
                    f"{flight.id} class {product.fare_class} has {state.limits[i]} seats for"
                    f" sale, not {seats}"
                )
            hold_id = f"hold-{uuid.uuid4().hex}"
            expires_at = now + self.hold_seconds
            conn.execute(
                "INSERT INTO holds (id, flight_id, letter, seats, acceptance_id, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (hold_id, flight.id, product.fare_class, seats, acceptance.id, expires_at),
            )
        return Hold(id=hold_id, expires_at=dt.datetime.fromtimestamp(expires_at, dt.UTC))

    @hookimpl
    def cmi_release(self, offer: Offer, hold: Hold) -> None:
        """Let the hold's seats go."""
        if self._ours(offer.product) is None:
            return
        with self._transaction(write=True) as conn:
            conn.execute("DELETE FROM holds WHERE id = ?", (hold.id,))

    @hookimpl
    def cmi_book(
        self, offer: Offer, acceptance: Acceptance, hold: Hold | None
    ) -> Transaction | None:
        """Turn the hold into sold seats and issue the ticket, in one write transaction.

        Seats are given from row 10, A to F, the lowest free first. One ticket number
        (the accounting prefix and a ten-digit serial) covers the booking; with several
        passengers, the transaction's details name the first seat. Booking an acceptance
        again returns the transaction it booked.

        :raises HoldExpiredError: there is no hold, or it expired or was released.
        :raises AirlineError: the hold is for another flight or class.
        """
        product = self._ours(offer.product)
        if offer.kind != "flight" or product is None:
            return None
        with self._transaction(write=True) as conn:
            booked = conn.execute(
                "SELECT * FROM bookings WHERE acceptance_id = ?", (acceptance.id,)
            ).fetchone()
            if booked is not None:
                return self._booked(conn, booked)
            if hold is None:
                raise HoldExpiredError(f"acceptance {acceptance.id} has no hold to book")
            now = self.clock()
            row = conn.execute("SELECT * FROM holds WHERE id = ?", (hold.id,)).fetchone()
            if row is None or row["expires_at"] <= now:
                raise HoldExpiredError(
                    f"hold {hold.id} expired or was released; the seats may be gone"
                )
            flight = self._flight_of(conn, product)
            if (
                flight is None
                or row["flight_id"] != flight.id
                or row["letter"] != product.fare_class
            ):
                raise AirlineError(
                    f"hold {hold.id} is not for {product.flight} class {product.fare_class}"
                )
            taken = {
                (r["seat_row"], r["seat_letter"])
                for r in conn.execute(
                    "SELECT seat_row, seat_letter FROM sold_seats WHERE flight_id = ?", (flight.id,)
                )
            }
            free = (
                (_FIRST_ROW + n // len(_SEAT_LETTERS), _SEAT_LETTERS[n % len(_SEAT_LETTERS)])
                for n in range(flight.capacity)
            )
            seats = [seat for seat in free if seat not in taken][: row["seats"]]
            if len(seats) < row["seats"]:  # the hold counted them: only a corrupted file
                raise SoldOutError(f"{flight.id} has {len(seats)} seats left, not {row['seats']}")
            cursor = conn.execute(
                "INSERT INTO bookings (acceptance_id, flight_id, letter, ticket_number,"
                " customer_ref, total, currency, booked_at) VALUES (?, ?, ?, '', ?, ?, ?, ?)",
                (
                    acceptance.id,
                    flight.id,
                    product.fare_class,
                    acceptance.customer_ref,
                    str(offer.price.amount),
                    offer.price.currency,
                    now,
                ),
            )
            serial = cursor.lastrowid
            ticket = f"{self._ticket_prefix}{serial:010d}"
            conn.execute("UPDATE bookings SET ticket_number = ? WHERE serial = ?", (ticket, serial))
            conn.executemany(
                "INSERT INTO sold_seats (flight_id, letter, seat_row, seat_letter,"
                " ticket_number, acceptance_id) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (flight.id, product.fare_class, seat_row, letter, ticket, acceptance.id)
                    for seat_row, letter in seats
                ],
            )
            conn.execute("DELETE FROM holds WHERE id = ?", (hold.id,))
            booking = conn.execute("SELECT * FROM bookings WHERE serial = ?", (serial,)).fetchone()
            return self._booked(conn, booking)

    @hookimpl
    def cmi_find_booking(self, offer: Offer, acceptance: Acceptance) -> Transaction | None:
        """The ticket booked for ``acceptance``, read from the bookings table (after a
        crash during the booking); None when none was."""
        if offer.kind != "flight" or self._ours(offer.product) is None:
            return None
        with self._transaction(write=False) as conn:
            booked = conn.execute(
                "SELECT * FROM bookings WHERE acceptance_id = ?", (acceptance.id,)
            ).fetchone()
            return None if booked is None else self._booked(conn, booked)

    def _booked(self, conn: sqlite3.Connection, booking: sqlite3.Row) -> Transaction:
        flight = self._flight(conn, booking["flight_id"])
        assert flight is not None  # noqa: S101 (a foreign key)
        first = conn.execute(
            "SELECT seat_row, seat_letter FROM sold_seats WHERE acceptance_id = ?"
            " ORDER BY seat_row, seat_letter LIMIT 1",
            (booking["acceptance_id"],),
        ).fetchone()
        ticket = booking["ticket_number"]
        return Transaction(
            id=f"{self.airline_code}-{ticket}",
            kind="flight",
            occurred_at=dt.datetime.fromtimestamp(booking["booked_at"], dt.UTC),
            firm=self.firm,
            customer_ref=booking["customer_ref"],
            total=Money(amount=Decimal(booking["total"]), currency=booking["currency"]),
            details=FlightDetails(
                origin=flight.origin,
                destination=flight.destination,
                date=flight.date,
                airline=flight.airline,
                flight=flight.flight,
                fare_class=booking["letter"],
                ticket_number=ticket,
                row=first["seat_row"],
                seat=first["seat_letter"],
            ),
        )

    @staticmethod
    def _passengers(offer: Offer) -> int:
        quantity = offer.items[0].quantity
        if quantity != quantity.to_integral_value() or quantity < 1:
            raise AirlineError(
                f"the offer's first item is for {quantity} seats, not a whole number"
            )
        return int(quantity)
