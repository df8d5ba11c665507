"""The reference lender as the ``cmi`` command and the demo run it, found through the
``cmi_sdk.reference_firms`` entry-point group (``cmi serve --reference-firms``, ``cmi demo``)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from cmi_lender.plugin import ReferenceLender
from cmi_sdk import Money

__all__ = ["reference_firm"]


def reference_firm(*, database: str | Path, firm: str) -> ReferenceLender:
    """The reference lender lending for ``firm``, its loans in ``database``: a daily limit
    of a million US dollars, and band B for customers who send no credit evidence."""
    return ReferenceLender(
        database=database,
        firm=firm,
        daily_limit=Money(amount=Decimal("1000000.00"), currency="USD"),
        default_band="B",
    )
