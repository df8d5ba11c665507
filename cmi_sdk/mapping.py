"""Helpers for standard plugins: writing canonical values into XML and reading them back.

A standard's mapping (model to template variables) and parser (XML back to model) use these
so that every standard writes times, dates and amounts the same way.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from lxml import etree

from cmi_sdk._exceptions import MappingError

__all__ = [
    "MappingError",
    "Reader",
    "leaf_text",
    "xml_date",
    "xml_datetime",
    "xml_decimal",
]


def xml_datetime(value: dt.datetime) -> str:
    """An aware datetime as an xs:dateTime in UTC, written with ``Z``."""
    if value.tzinfo is None:
        raise MappingError("datetimes written to XML must be timezone-aware")
    text = value.astimezone(dt.UTC).isoformat()
    return text.removesuffix("+00:00") + "Z"


def xml_date(value: dt.date) -> str:
    """A date as an xs:date."""
    return value.isoformat()


def xml_decimal(value: Decimal) -> str:
    """A Decimal in plain notation (never exponent notation, which xs:decimal refuses)."""
    return f"{value:f}"


def leaf_text(element: etree._Element) -> str:
    """The whole text of ``element``, an element the schema says holds text only.

    All of its text, character references and CDATA sections included ('' when empty): the
    value the element's canonical form, and so its signature, carries. An element that
    holds anything but text (a child element, a comment, a processing instruction) is
    refused rather than read in part: reading only the text before a comment is how a
    value could differ from the one signed.

    :raises MappingError: the element holds something other than text.
    """
    if len(element):
        held = element[0]
        what = (
            "a comment"
            if isinstance(held, etree._Comment)
            else "a processing instruction"
            if isinstance(held, etree._ProcessingInstruction)
            else f"the element <{etree.QName(held).localname}>"
            if isinstance(held.tag, str)
            else "an entity reference"
        )
        raise MappingError(f"<{etree.QName(element).localname}> holds {what} where text belongs")
    return element.text or ""


class Reader:
    """Reads the children of one element in one namespace, for a parser back to a model.

    ``Reader(root, "urn:example:1.0").text("price")`` is the text of the ``price`` child in
    that namespace. Parsers run on documents already valid against their XSD, so required
    elements are there; the reader still says clearly which one is missing if not.
    """

    __slots__ = ("_element", "_ns")

    def __init__(self, element: etree._Element, namespace: str) -> None:
        self._element = element
        self._ns = "{" + namespace + "}" if namespace else ""

    @property
    def element(self) -> etree._Element:
        """The element being read."""
        return self._element

    def tag(self, local: str) -> str:
        """The Clark-notation name of ``local`` in this reader's namespace."""
        return self._ns + local

    def child(self, local: str) -> Reader | None:
        """A reader for the first child called ``local``, or None."""
        found = self._element.find(self._ns + local)
        return None if found is None else Reader(found, self._ns[1:-1])

    def require(self, local: str) -> Reader:
        """A reader for the first child called ``local``; MappingError when it is absent."""
        found = self.child(local)
        if found is None:
            parent = etree.QName(self._element).localname
            raise MappingError(f"<{local}> is missing under <{parent}>")
        return found

    def money(self, local: str) -> dict[str, str]:
        """The child ``local`` written as ``<local currency="USD">1.00</local>``, as the
        mapping Money validates from."""
        child = self.require(local)
        return {"amount": leaf_text(child.element), "currency": child.attr("currency")}

    def children(self, local: str) -> list[Reader]:
        """Readers for every child called ``local``, in document order."""
        return [Reader(e, self._ns[1:-1]) for e in self._element.iterfind(self._ns + local)]

    def text(self, local: str) -> str:
        """The text of the required child ``local`` ('' when it is empty)."""
        found = self._element.find(self._ns + local)
        if found is None:
            raise MappingError(
                f"<{local}> is missing under <{etree.QName(self._element).localname}>"
            )
        return leaf_text(found)

    def optional(self, local: str) -> str | None:
        """The text of the optional child ``local``, or None when it is absent."""
        found = self._element.find(self._ns + local)
        return None if found is None else leaf_text(found)

    def attr(self, name: str) -> str:
        """The value of the required, unqualified attribute ``name``."""
        value = self._element.get(name)
        if value is None:
            raise MappingError(f"attribute {name!r} is missing")
        return value
