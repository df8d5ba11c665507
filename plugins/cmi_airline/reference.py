"""The reference airline as the ``cmi`` command and the demo run it, found through the
``cmi_sdk.reference_firms`` entry-point group (``cmi serve --reference-firms``, ``cmi demo``)."""

from __future__ import annotations

from pathlib import Path

from cmi_airline.plugin import ReferenceAirline

__all__ = ["reference_firm"]


def reference_firm(*, database: str | Path, firm: str) -> ReferenceAirline:
    """The reference airline selling for ``firm``, its inventory in ``database``."""
    return ReferenceAirline(database=database, firm=firm)
