"""Hardened XML parsing, schema loading and XML-safe text.

Every document that comes into the SDK goes through :class:`HardenedParser`: a byte cap is
applied before parsing, the parser never loads a DTD, never expands an entity and never
touches the network, documents with a DOCTYPE are refused outright, and nesting is limited.
"""

from __future__ import annotations

import re
import threading
from importlib.resources import as_file
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Final

from lxml import etree

from cmi_sdk._exceptions import (
    DocumentTooDeepError,
    DocumentTooLargeError,
    ForbiddenXMLError,
    MalformedXMLError,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_DEPTH",
    "HardenedParser",
    "find_xml_illegal",
    "load_lxml_schema",
]

DEFAULT_MAX_BYTES: Final = 1024 * 1024
"""The default cap on an incoming document's size: 1 MiB."""

DEFAULT_MAX_DEPTH: Final = 64
"""The default limit on element nesting."""

# Characters XML 1.0 cannot carry, even escaped (section 2.2 of the recommendation).
_XML_ILLEGAL: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


# An element's start tag: in the prolog only '<?' and '<!' may appear before the root.
_ELEMENT_START: Final = re.compile(rb"<[^?!]")


def find_xml_illegal(text: str) -> re.Match[str] | None:
    """Return the first character of ``text`` that XML 1.0 cannot carry, if there is one."""
    return _XML_ILLEGAL.search(text)


def _new_lxml_parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        load_dtd=False,
        dtd_validation=False,
        no_network=True,
        huge_tree=False,
        collect_ids=False,
    )


class HardenedParser:
    """The one parser for XML that comes from outside.

    :param max_bytes: documents larger than this are refused before parsing.
    :param max_depth: documents whose elements nest deeper than this are refused.

    Safe to share between threads: each thread gets its own lxml parser.
    """

    def __init__(
        self, *, max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH
    ) -> None:
        if max_bytes < 1 or max_depth < 1:
            raise ValueError("max_bytes and max_depth must be positive")
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        # True when some element sits one level below the limit (the root is depth 1).
        self._too_deep = etree.XPath("boolean(/" + "/".join(["*"] * (max_depth + 1)) + ")")
        self._local = threading.local()

    def lxml_parser(self) -> etree.XMLParser:
        """This thread's lxml parser, configured as hardened (no DTD, entities or network).

        Using it directly skips the size, DOCTYPE and depth checks: only for XML the SDK
        produced itself."""
        parser: etree.XMLParser | None = getattr(self._local, "parser", None)
        if parser is None:
            parser = self._local.parser = _new_lxml_parser()
        return parser

    def parse(self, data: object) -> etree._ElementTree:
        """Parse ``data`` into a tree, or refuse it.

        :raises DocumentTooLargeError: ``data`` is over the byte cap.
        :raises MalformedXMLError: ``data`` is not well-formed XML.
        :raises ForbiddenXMLError: ``data`` has a DOCTYPE (and so may declare entities).
        :raises DocumentTooDeepError: elements nest deeper than the limit.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("parse() takes bytes; encode text first (UTF-8)")
        if not isinstance(data, bytes):
            data = bytes(data)
        if len(data) > self.max_bytes:
            raise DocumentTooLargeError(
                f"document is {len(data)} bytes, over the {self.max_bytes}-byte limit",
                limit=self.max_bytes,
            )
        doctype = data.find(b"<!DOCTYPE")
        if doctype >= 0 and not _ELEMENT_START.search(data, 0, doctype):
            # Refused before libxml2 sees it, so it never tries to fetch an external DTD.
            raise ForbiddenXMLError("documents with a DOCTYPE (DTD) are refused")
        try:
            root = etree.fromstring(data, self.lxml_parser())
        except etree.XMLSyntaxError as exc:
            line = exc.lineno if exc.lineno else None
            raise MalformedXMLError(f"not well-formed XML: {exc.msg}", line=line) from None
        tree = root.getroottree()
        if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
            raise ForbiddenXMLError("documents with a DOCTYPE (DTD) are refused")
        if self._too_deep(tree):
            raise DocumentTooDeepError(
                f"elements nest deeper than {self.max_depth} levels", limit=self.max_depth
            )
        return tree

    def parse_file(self, path: str | Path) -> etree._ElementTree:
        """Read at most one byte past the cap from ``path``, then :meth:`parse` it."""
        with open(path, "rb") as handle:
            data = handle.read(self.max_bytes + 1)
        return self.parse(data)


def load_lxml_schema(schema: Traversable) -> etree.XMLSchema:
    """Compile an XSD with lxml, resolving includes and imports from local files only."""
    with as_file(schema) as path:
        doc = etree.parse(str(path), _new_lxml_parser())
        return etree.XMLSchema(doc)
