"""A reference airline firm: EMSR-b revenue management behind the request-to-offer hooks.

Register a :class:`ReferenceAirline` with an :class:`~cmi_sdk.Adapter`; copy it to
connect a real airline's inventory, pricing and revenue-management systems.
"""

from __future__ import annotations

from cmi_airline.emsr import bid_price, booking_limits, marginal_seat_revenue, protection_levels
from cmi_airline.plugin import (
    AirlineError,
    AirlineUnavailableError,
    HoldExpiredError,
    ReferenceAirline,
    SoldOutError,
)

__all__ = [
    "AirlineError",
    "AirlineUnavailableError",
    "HoldExpiredError",
    "ReferenceAirline",
    "SoldOutError",
    "bid_price",
    "booking_limits",
    "marginal_seat_revenue",
    "protection_levels",
]
