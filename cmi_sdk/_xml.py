"""Hardened XML parsing, schema loading and XML-safe text.

Every document that comes into the SDK goes through :class:`HardenedParser`: a byte cap is
applied before parsing; the parser never loads a DTD, never expands an entity, never
touches the network and never opens a file, whatever precedes a DOCTYPE; documents with a
DOCTYPE are refused with one message, whatever it names; nesting is limited; and comments
and processing instructions are left out of the tree values are read from.

Opening nothing is enforced inside libxml2, twice over, not by scanning bytes:

- the options: no DTD loading, no DTD validation, no default attributes, entities not
  substituted, no network; and ID collection left on, because turning it off sets a bit in
  libxml2's ``loadsubset`` (``XML_SKIP_IDS``) that libxml2 before 2.15 takes as leave to
  load external parameter entities and the external subset;
- a resolver registered on every parser that raises for every external reference (DTD,
  entity, anything libxml2 would load), so nothing is opened even if an option regresses.
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
    "DOCTYPE_REFUSED",
    "HardenedParser",
    "find_xml_illegal",
    "load_lxml_schema",
    "new_lxml_parser",
]

DEFAULT_MAX_BYTES: Final = 1024 * 1024
"""The default cap on an incoming document's size: 1 MiB."""

DEFAULT_MAX_DEPTH: Final = 64
"""The default limit on element nesting."""

# Characters XML 1.0 cannot carry, even escaped (section 2.2 of the recommendation).
_XML_ILLEGAL: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


#: What every refused DOCTYPE reads as: one message, whatever the DOCTYPE names and
#: whether that exists, so a refusal tells nothing about the machine.
DOCTYPE_REFUSED: Final = "documents with a DOCTYPE (DTD) are refused"


def find_xml_illegal(text: str) -> re.Match[str] | None:
    """Return the first character of ``text`` that XML 1.0 cannot carry, if there is one."""
    return _XML_ILLEGAL.search(text)


class _ExternalReference(Exception):  # noqa: N818 (never leaves this module)
    """libxml2 asked for an external resource: refused before anything is opened."""


class _RefuseExternal(etree.Resolver):
    """Refuses every external reference: a DTD, an entity, anything libxml2 would load.

    Raising makes lxml hand libxml2 no input at all (it does not fall back to its default
    loader), and the exception comes out of the parse call."""

    def resolve(self, system_url: str | None, public_id: str | None, context: object) -> None:  # noqa: ARG002
        raise _ExternalReference


def new_lxml_parser(*, lossless: bool = True, **options: bool) -> etree.XMLParser:
    """An lxml parser with the hardened options and the resolver that refuses every
    external reference.

    :param lossless: keep comments and processing instructions (for signatures, which must
        see a document as it was written); otherwise comments are left out of the tree
        (:meth:`HardenedParser.parse` then strips processing instructions inside the root).
    :param options: other lxml options; the tests use them to show that the resolver holds
        even when an option would let libxml2 load a DTD.
    """
    settings: dict[str, bool] = {
        "resolve_entities": False,
        "load_dtd": False,
        "dtd_validation": False,
        "attribute_defaults": False,
        "no_network": True,
        "huge_tree": False,
        # Never False: see the module's documentation (XML_SKIP_IDS loads external DTDs).
        "collect_ids": True,
        "remove_comments": not lossless,
        "strip_cdata": True,
    }
    settings.update(options)
    parser: etree.XMLParser = etree.XMLParser(**settings)  # type: ignore[call-overload]
    parser.resolvers.add(_RefuseExternal())
    return parser


def _schema_parser() -> etree.XMLParser:
    # The SDK's own XSDs include and import one another from local files: the resolver that
    # refuses everything is for documents from outside, not for these.
    return etree.XMLParser(resolve_entities=False, load_dtd=False, no_network=True, huge_tree=False)


class _DoctypeSeen(Exception):  # noqa: N818 (never leaves this module)
    """A probe parse reached a DOCTYPE."""


class _DoctypeProbe:
    """A parser target that stops at the first DOCTYPE, or at the root element (after
    which no DOCTYPE can come). Used only when a parse failed, to tell a DOCTYPE that broke
    it from any other fault."""

    def doctype(self, *_: object) -> None:
        raise _DoctypeSeen

    def start(self, *_: object) -> None:
        raise StopIteration

    def close(self) -> None:
        return None


def _has_doctype(data: bytes) -> bool:
    """Whether ``data`` declares a DOCTYPE before its root element (read up to there, with
    the same refusing resolver: the probe opens nothing either)."""
    parser = etree.XMLParser(  # type: ignore[call-overload]
        target=_DoctypeProbe(),
        resolve_entities=False,
        load_dtd=False,
        no_network=True,
        remove_comments=True,
        remove_pis=True,
    )
    parser.resolvers.add(_RefuseExternal())
    try:
        etree.fromstring(data, parser)
    except _DoctypeSeen:
        return True
    except Exception:  # any other stop, or fault, before a DOCTYPE
        return False
    return False


class HardenedParser:
    """The one parser for XML that comes from outside.

    :param max_bytes: documents larger than this are refused before parsing.
    :param max_depth: documents whose elements nest deeper than this are refused.

    Safe to share between threads: each thread gets its own lxml parsers.
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
        """This thread's lossless lxml parser: hardened (no DTD, entities, network or
        files), comments and processing instructions kept.

        Using it directly skips the size, DOCTYPE and depth checks: only for XML the SDK
        produced itself (signing must see every node the signature covers)."""
        parser: etree.XMLParser | None = getattr(self._local, "lossless", None)
        if parser is None:
            parser = self._local.lossless = new_lxml_parser(lossless=True)
        return parser

    def _values_parser(self) -> etree.XMLParser:
        parser: etree.XMLParser | None = getattr(self._local, "values", None)
        if parser is None:
            parser = self._local.values = new_lxml_parser(lossless=False)
        return parser

    def parse(self, data: object, *, lossless: bool = False) -> etree._ElementTree:
        """Parse ``data`` into a tree, or refuse it.

        Nothing the document names is ever opened. The tree holds no comment, and no
        processing instruction inside the root element, so an element's text is all of its
        text: values are read from this tree.

        :param lossless: keep comments and processing instructions, for a signature check,
            which must see the document as it was written. Values are never read from such
            a tree.
        :raises DocumentTooLargeError: ``data`` is over the byte cap.
        :raises MalformedXMLError: ``data`` is not well-formed XML.
        :raises ForbiddenXMLError: ``data`` has a DOCTYPE (and so may declare entities or
            name files); the message is the same whatever it names.
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
        parser = self.lxml_parser() if lossless else self._values_parser()
        try:
            root = etree.fromstring(data, parser)
        except _ExternalReference:
            raise ForbiddenXMLError(DOCTYPE_REFUSED) from None
        except etree.XMLSyntaxError as exc:
            # A DOCTYPE whose content broke the parse is refused as a DOCTYPE, so the
            # message never depends on what it names.
            if _has_doctype(data):
                raise ForbiddenXMLError(DOCTYPE_REFUSED) from None
            line = exc.lineno if exc.lineno else None
            raise MalformedXMLError(f"not well-formed XML: {exc.msg}", line=line) from None
        if not lossless:
            # Processing instructions before the root (the OFX header) stay, for whoever
            # writes the document out again; inside it, they would split a value's text.
            etree.strip_tags(root, etree.ProcessingInstruction)
        tree = root.getroottree()
        docinfo = tree.docinfo
        if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
            raise ForbiddenXMLError(DOCTYPE_REFUSED)
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
        doc = etree.parse(str(path), _schema_parser())
        return etree.XMLSchema(doc)
