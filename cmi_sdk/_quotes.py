"""What the firm's systems answer in the request-to-offer pipeline.

Each hook of the pipeline returns one of these (see :mod:`cmi_sdk.hookspecs`): the claims
checked, the capacity found, the revenue-management decision, the priced quote, and the
hold taken on acceptance. They are immutable and validated, so a plugin's mistake is
caught where it is made, with the plugin's name.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Annotated, Self

from pydantic import Field, model_validator

from cmi_sdk._models import (
    Claim,
    Identifier,
    LineItem,
    Money,
    Product,
    Text,
    _check_items_total,
    _Model,
)

__all__ = ["Availability", "ClaimCheck", "Hold", "Quote", "RevenueDecision"]


class ClaimCheck(_Model):
    """The firm's verdict on one claim of a request (``cmi_verify_claims``)."""

    claim: Claim
    verified: bool
    reason: Text | None = None


class Availability(_Model):
    """What the firm could sell for a request (``cmi_check_capacity``).

    Checking capacity reserves nothing: an offer is a quote.
    """

    product: Product
    """The product the firm would offer: a flight in a fare class, a loan."""
    available: Annotated[int, Field(ge=0)]
    """Units the firm could sell now (seats in the class; 1 for a loan it can fund)."""
    reference: Identifier | None = None
    """The firm's own key for the inventory (a flight leg and date, a credit line)."""
    alternatives: tuple[Product, ...] = ()
    """Other products the firm could sell instead (other dates, say), for advice."""


class RevenueDecision(_Model):
    """Revenue management's answer (``cmi_revenue_decision``): sell or not, and the least
    price to sell at."""

    accept: bool
    floor: Money | None = None
    """The bid price or price floor: no offer is made below it, rewards included."""
    reason: Text | None = None
    """Why not, when ``accept`` is false (shown to the customer)."""


class Quote(_Model):
    """The price of what is offered (``cmi_price``): the line items, in one currency."""

    items: Annotated[tuple[LineItem, ...], Field(min_length=1)]
    product: Product | None = None
    """The product as priced, when pricing settles part of it (a loan's APR); otherwise
    the one capacity found."""

    @model_validator(mode="after")
    def _one_currency(self) -> Self:
        _check_items_total(self.items, self.total)
        return self

    @property
    def total(self) -> Money:
        """The sum of the items."""
        amount = sum((i.amount.amount for i in self.items), start=Decimal(0))
        return Money(amount=amount, currency=self.items[0].amount.currency)


class Hold(_Model):
    """Inventory held for an acceptance (``cmi_hold``) until it is booked or released."""

    id: Identifier
    expires_at: dt.datetime
    """When the firm's system lets the hold go by itself."""
