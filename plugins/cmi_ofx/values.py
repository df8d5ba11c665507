"""OFX's formats for times and amounts, written strictly and read leniently.

Times (OFX 2.2, section 3.2.8.2) are ``YYYYMMDDHHMMSS.XXX[gmt offset[:tz name]]``, with
fields omitted from the right allowed when reading. The SDK writes every time in UTC, to the
millisecond: ``20030215070000.000[+0:UTC]``.

Reading follows the specification's rules:

- **The offset defines the zone**; the name after it is informational. ``[-7:MST]`` is seven
  hours behind UTC, whatever the name says.
- **The offset is a decimal number of hours**: the specification formats fractional offsets
  as ``+12.00`` to ``-12.00``, so ``[5.75:NPT]`` is +05:45 and ``[-3.5:NST]`` is -03:30.
  Some writers put minutes after the point instead (``[+5.30:IST]`` for +05:30; ofxtools
  writes offsets that way). Every zone in use is a whole number of quarter hours, and for
  any fraction exactly one of the two readings gives one (.30 hours is 18 minutes; .50 hours
  is 30), so the reader takes the reading that does and refuses a fraction neither explains.
  Offsets run from -12 to +14 hours: the specification says +/-12, but +13 and +14 are real
  (New Zealand summer time, Kiribati).
- **A missing zone is UTC**: the specification's defaults for omitted fields end in GMT, so
  ``20240115`` is midnight UTC and ``20240115143000`` is 14:30 UTC. Callers who know their
  bank writes local times without saying so pass ``assume`` (a ``tzinfo``).
- A zone name without an offset (``[EST]``, ``[:EST]``, or ``[-:EST]`` as one broker writes
  it) is looked up in a short table of unambiguous names; others (``IST``, ``BST``: each is
  several zones) are refused.

Amounts (section 3.2.9.1) have an optional sign, at most 32 characters, and a point or a
comma as the radix, and "should not" group digits: ``1,234`` is read as the specification
says (one point two three four), and an amount with both a point and a comma
(``1,234.56``) is refused rather than guessed at.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Final

from cmi_sdk import MappingError

__all__ = [
    "format_ofx_amount",
    "format_ofx_datetime",
    "parse_ofx_amount",
    "parse_ofx_datetime",
]

_DATETIME: Final = re.compile(
    r"(?P<year>[0-9]{4})(?P<month>[0-9]{2})(?P<day>[0-9]{2})"
    r"(?:(?P<hour>[0-9]{2})(?P<minute>[0-9]{2})"
    r"(?:(?P<second>[0-9]{2})(?:\.(?P<fraction>[0-9]{1,6}))?)?)?"
    r"\s*(?:\[(?P<zone>[^\[\]]{0,40})\])?"
)
_OFFSET: Final = re.compile(r"(?P<sign>[+-])?(?P<hours>[0-9]{1,2})(?:\.(?P<fraction>[0-9]{1,2}))?")
_ZONE_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_+/-]{0,31}")
_AMOUNT: Final = re.compile(r"(?P<sign>[+-])?(?P<whole>[0-9]*)(?:[.,](?P<fraction>[0-9]*))?")

# Zone names OFX writers use without an offset, limited to names that mean one offset only.
_NAMED_ZONES: Final[dict[str, int]] = {  # minutes east of UTC
    "UTC": 0,
    "GMT": 0,
    "Z": 0,
    "WET": 0,
    "WEST": 60,
    "CET": 60,
    "CEST": 120,
    "EET": 120,
    "EEST": 180,
    "MSK": 180,
    "JST": 540,
    "KST": 540,
    "AEST": 600,
    "AEDT": 660,
    "NZST": 720,
    "NZDT": 780,
    "NST": -210,
    "NDT": -150,
    "EST": -300,
    "EDT": -240,
    "CDT": -300,
    "MST": -420,
    "MDT": -360,
    "PST": -480,
    "PDT": -420,
    "AKST": -540,
    "AKDT": -480,
    "HST": -600,
}

_MAX_EAST: Final = 14 * 60
_MAX_WEST: Final = 12 * 60
_AMOUNT_CHARS: Final = 32


def format_ofx_datetime(value: dt.datetime, *, what: str = "time") -> str:
    """``value`` as an OFX datetime in UTC: ``YYYYMMDDHHMMSS.XXX[+0:UTC]``.

    :param what: the field's name, for the error message.
    :raises MappingError: ``value`` is naive, or finer than a millisecond (OFX carries
        milliseconds; like amounts, times are refused rather than rounded).
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise MappingError(f"{what} must be timezone-aware to be written to OFX")
    utc = value.astimezone(dt.UTC)
    if utc.microsecond % 1000:
        raise MappingError(
            f"{what} {utc.isoformat()} is finer than a millisecond, which OFX cannot carry;"
            " truncate it to milliseconds first (the SDK never rounds)"
        )
    return (
        f"{utc.year:04d}{utc.month:02d}{utc.day:02d}"
        f"{utc.hour:02d}{utc.minute:02d}{utc.second:02d}.{utc.microsecond // 1000:03d}[+0:UTC]"
    )


def parse_ofx_datetime(text: str, *, assume: dt.tzinfo = dt.UTC) -> dt.datetime:
    """Read an OFX date or datetime into an aware datetime in UTC.

    :param assume: the zone of a value that names none (UTC, as the specification says).
    :raises MappingError: ``text`` is not an OFX date or datetime, or its zone is unknown.
    """
    value = text.strip()
    match = _DATETIME.fullmatch(value)
    if match is None:
        raise MappingError(f"{value!r} is not an OFX date or datetime (YYYYMMDDHHMMSS.XXX[...])")
    fraction = match["fraction"] or ""
    try:
        local = dt.datetime(
            int(match["year"]),
            int(match["month"]),
            int(match["day"]),
            int(match["hour"] or 0),
            int(match["minute"] or 0),
            int(match["second"] or 0),
            int(fraction.ljust(6, "0")) if fraction else 0,
            tzinfo=dt.UTC,  # replaced below by the value's own zone
        )
    except ValueError as exc:
        raise MappingError(f"{value!r} is not a valid date and time: {exc}") from None
    zone = match["zone"]
    tz = assume if zone is None else _zone(zone, value, assume)
    return local.replace(tzinfo=tz).astimezone(dt.UTC)


def _zone(text: str, value: str, assume: dt.tzinfo) -> dt.tzinfo:
    offset_text, colon, name = text.partition(":")
    offset_text, name = offset_text.strip(), name.strip()
    if not colon and offset_text[:1].isalpha():
        offset_text, name = "", offset_text  # ``[EST]``: a name alone
    if offset_text in ("", "+", "-"):
        # No offset: a name alone (``[EST]``, ``[:EST]``, or ``[-:EST]`` as one broker
        # writes it), or nothing at all (``[]``: the default zone).
        if not name:
            if offset_text:
                raise MappingError(f"{value!r} has a time zone sign without an offset")
            return assume
        minutes = _NAMED_ZONES.get(name.upper())
        if minutes is None:
            raise MappingError(
                f"{value!r} names the time zone {name!r} without an offset, and that name is"
                " not one the reader can tell apart from others"
            )
        return dt.timezone(dt.timedelta(minutes=minutes))
    if name and not _ZONE_NAME.fullmatch(name):
        raise MappingError(f"{value!r} has a malformed time zone name {name!r}")
    match = _OFFSET.fullmatch(offset_text)
    if match is None:
        raise MappingError(f"{value!r} has a malformed time zone offset {offset_text!r}")
    minutes = int(match["hours"]) * 60 + _fraction_minutes(match["fraction"], value)
    if match["sign"] == "-":
        minutes = -minutes
    if not -_MAX_WEST <= minutes <= _MAX_EAST:
        raise MappingError(f"{value!r} has a time zone offset outside -12 to +14 hours")
    return dt.timezone(dt.timedelta(minutes=minutes))


def _fraction_minutes(fraction: str | None, value: str) -> int:
    if not fraction:
        return 0
    as_hours = Decimal("0." + fraction) * 60  # the specification's reading: decimal hours
    if as_hours % 15 == 0:
        return int(as_hours)
    if len(fraction) == 2 and int(fraction) % 15 == 0:
        return int(fraction)  # written as hours.minutes (+5.30 for +05:30)
    raise MappingError(
        f"{value!r} has a fractional time zone offset that is a whole number of quarter"
        " hours neither as a decimal of hours nor as minutes"
    )


def parse_ofx_amount(text: str) -> Decimal:
    """Read an OFX amount: ``-5.72``, ``+5.72``, ``5,72``, ``-.50`` or ``5``.

    :raises MappingError: ``text`` is not an amount, or groups its digits.
    """
    value = text.strip()
    match = _AMOUNT.fullmatch(value)
    if match is None or not (match["whole"] or match["fraction"]) or len(value) > _AMOUNT_CHARS:
        raise MappingError(
            f"{value!r} is not an OFX amount (a sign, digits, and a point or comma for the"
            f" radix; at most {_AMOUNT_CHARS} characters, no digit grouping)"
        )
    fraction = match["fraction"]
    # Built as text, so the Decimal is exact whatever its length (no context rounding).
    return Decimal(
        f"{match['sign'] or ''}{match['whole'] or '0'}{'.' + fraction if fraction else ''}"
    )


def format_ofx_amount(value: Decimal) -> str:
    """A Decimal in plain notation, as OFX amounts are written (never an exponent)."""
    return f"{value:f}"
