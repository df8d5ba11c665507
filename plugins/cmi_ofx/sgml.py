"""A hardened reader for OFX 1.x: the SGML files banks still export.

An OFX 1 file is a block of ``NAME:VALUE`` header lines (``OFXHEADER:100``, ``CHARSET:1252``
...) and then SGML in which aggregates are closed (``</STMTTRN>``) but data elements need not
be: ``<TRNAMT>-5.72`` ends where the next tag begins. This reader turns one into an lxml
element tree with upper-case tag names, so the same code reads OFX 1 and OFX 2.

It is no SGML parser and never uses one, nor an XML parser with DTDs. What it accepts:

- the header in any layout banks use (spaces after colons, all on one line, CRLF, none);
- the body in the header's character set (``CHARSET:1252`` is Windows-1252,
  ``ISO-8859-1`` latin-1, ``ENCODING:UTF-8`` or ``UNICODE`` UTF-8), falling back to
  Windows-1252 when bytes do not fit UTF-8 (a common lie in ``CHARSET:NONE`` files);
- tags in any case (``<trnamt>``), data elements closed or not, text on the line after its
  tag, ``<TAG/>``, blank lines, indentation, and a DOS end-of-file mark (Ctrl-Z);
- the references ``&amp; &lt; &gt; &quot; &apos;``, ``&nbsp;`` (which OFX 1 names in its
  section 2.3; read as a space) and numeric character references. Any other ``&name;`` is
  left as written, never expanded, and a bare ``&`` (``AT&T``, as many banks write it) is
  kept as text.

What it refuses, each with an :class:`~cmi_sdk.XMLInputError` that says where:
files over the byte cap (:class:`~cmi_sdk.DocumentTooLargeError`, checked before decoding),
nesting deeper than the limit (:class:`~cmi_sdk.DocumentTooDeepError`), markup declarations
and processing instructions in the body, so no DOCTYPE or ENTITY can be declared
(:class:`~cmi_sdk.ForbiddenXMLError`), and anything malformed: unterminated tags, attributes,
stray end tags, text outside elements, a file that ends inside an aggregate, characters XML
cannot carry (:class:`~cmi_sdk.MalformedXMLError`).
"""

from __future__ import annotations

import codecs
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from lxml import etree

from cmi_sdk import (
    DocumentTooDeepError,
    DocumentTooLargeError,
    ForbiddenXMLError,
    MalformedXMLError,
)

__all__ = ["MAX_OFX_BYTES", "MAX_OFX_DEPTH", "SGMLDocument", "read_sgml"]

MAX_OFX_BYTES: Final = 16 * 1024 * 1024
"""The default cap on an OFX file: 16 MiB (some 50,000 statement lines)."""

MAX_OFX_DEPTH: Final = 32
"""The default nesting limit; OFX statements nest about ten levels deep."""

# Data elements (leaves) that may be left empty and unclosed (``<MEMO>`` then ``<NAME>``):
# without this list an empty, unclosed leaf would swallow its siblings as an aggregate.
LEAVES: Final = frozenset(
    [
        "TRNTYPE",
        "DTPOSTED",
        "DTUSER",
        "DTAVAIL",
        "TRNAMT",
        "FITID",
        "CORRECTFITID",
        "CORRECTACTION",
        "SRVRTID",
        "CHECKNUM",
        "REFNUM",
        "SIC",
        "PAYEEID",
        "NAME",
        "EXTDNAME",
        "MEMO",
        "INV401KSOURCE",
        "CURRATE",
        "CURSYM",
        "CURDEF",
        "BANKID",
        "BRANCHID",
        "ACCTID",
        "ACCTTYPE",
        "ACCTKEY",
        "DTSTART",
        "DTEND",
        "BALAMT",
        "DTASOF",
        "CODE",
        "SEVERITY",
        "MESSAGE",
        "DTSERVER",
        "LANGUAGE",
        "ORG",
        "FID",
        "TRNUID",
        "CLTCOOKIE",
        "USERKEY",
        "DTPROFUP",
        "DTACCTUP",
        "SESSCOOKIE",
        "ACCESSKEY",
        "TSKEYEXPIRE",
        "MKTGINFO",
        "INTU.BID",
        "INTU.USERID",
    ]
)

# Aggregates of bank and card statements: text right after one of them is misplaced, not a
# data element's value (said plainly instead of as a confusing error further on).
AGGREGATES: Final = frozenset(
    [
        "OFX",
        "SIGNONMSGSRSV1",
        "SONRS",
        "STATUS",
        "FI",
        "BANKMSGSRSV1",
        "STMTTRNRS",
        "STMTRS",
        "BANKACCTFROM",
        "BANKTRANLIST",
        "STMTTRN",
        "LEDGERBAL",
        "AVAILBAL",
        "CREDITCARDMSGSRSV1",
        "CCSTMTTRNRS",
        "CCSTMTRS",
        "CCACCTFROM",
        "CURRENCY",
        "ORIGCURRENCY",
        "PAYEE",
        "BANKACCTTO",
        "CCACCTTO",
        "BALLIST",
        "BAL",
    ]
)

# A name starts where no letter precedes it: without the look-behind, a long run of letters
# with no colon is retried from each of its letters, quadratic in the header's length.
_HEADER_FIELD: Final = re.compile(r"(?<![A-Za-z])([A-Za-z]+)[ \t]*:[ \t]*([^\s<]*)")
_TOKEN: Final = re.compile(r"<([^<>]*)>|[^<]+|<")
_DECLARATION: Final = re.compile(r"<[!?]")
_TAG_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
_REFERENCE: Final = re.compile(r"&(#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|[A-Za-z][A-Za-z0-9]{0,15});")
_NAMED: Final[Mapping[str, str]] = {
    "amp": "&",
    "lt": "<",
    "gt": ">",
    "quot": '"',
    "apos": "'",
    "nbsp": " ",
}
# Characters XML 1.0 cannot carry, even escaped (lxml refuses them in text).
_XML_ILLEGAL: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

_CHARSETS: Final[Mapping[str, str]] = {
    "1252": "cp1252",
    "WINDOWS-1252": "cp1252",
    "CP1252": "cp1252",
    "ISO-8859-1": "latin-1",
    "8859-1": "latin-1",
    "ISO8859-1": "latin-1",
    "LATIN-1": "latin-1",
    "LATIN1": "latin-1",
}


@dataclass(frozen=True, slots=True)
class SGMLDocument:
    """An OFX 1.x file, read.

    :ivar header: the header's fields, names upper-cased (``{"VERSION": "102", ...}``);
        empty when the file has no header.
    :ivar encoding: the Python codec the body was decoded with.
    :ivar root: the ``OFX`` element, tag names upper-cased, text as written (not stripped).
    """

    header: Mapping[str, str]
    encoding: str
    root: etree._Element = field(repr=False)


def read_sgml(
    data: bytes, *, max_bytes: int = MAX_OFX_BYTES, max_depth: int = MAX_OFX_DEPTH
) -> SGMLDocument:
    """Read an OFX 1.x file (header and SGML body) into an element tree.

    :raises DocumentTooLargeError: ``data`` is over ``max_bytes``.
    :raises DocumentTooDeepError: elements nest deeper than ``max_depth``.
    :raises ForbiddenXMLError: the body declares something (``<!...>``) or holds a
        processing instruction.
    :raises MalformedXMLError: anything else that is not OFX 1.x.
    """
    if len(data) > max_bytes:
        raise DocumentTooLargeError(
            f"OFX file is {len(data)} bytes, over the {max_bytes}-byte limit", limit=max_bytes
        )
    data = data.removeprefix(codecs.BOM_UTF8).rstrip(b"\x00\x1a \t\r\n")
    start = data.find(b"<")
    if start < 0:
        raise MalformedXMLError("not an OFX file: there is no <OFX> element")
    header = _header(data[:start].decode("ascii", errors="replace"))
    encoding = _codec(header)
    body = data[start:]
    try:
        text = body.decode(encoding)
    except UnicodeError:
        # Banks say UTF-8 or NONE and send Windows-1252; latin-1 decodes any byte at all.
        encoding = "cp1252"
        try:
            text = body.decode(encoding)
        except UnicodeDecodeError:
            encoding = "latin-1"
            text = body.decode(encoding)
    root = parse_sgml_body(text, max_depth=max_depth)
    return SGMLDocument(header=header, encoding=encoding, root=root)


def _header(text: str) -> dict[str, str]:
    if not text.strip():
        return {}
    fields: dict[str, str] = {}
    for name, value in _HEADER_FIELD.findall(text):
        # Said twice, a field could be read one way here and the other way elsewhere.
        if fields.setdefault(name.upper(), value) != value:
            raise MalformedXMLError(
                f"the OFX header gives {name.upper()} twice, differently", line=1
            )
    if "OFXHEADER" not in fields:
        raise MalformedXMLError(
            "not an OFX 1 file: text before the first tag is not an OFXHEADER header", line=1
        )
    if fields.get("COMPRESSION", "NONE").upper() != "NONE":
        raise MalformedXMLError(
            f"compressed OFX (COMPRESSION:{fields['COMPRESSION']}) is not supported"
        )
    return fields


def _codec(header: Mapping[str, str]) -> str:
    encoding = header.get("ENCODING", "").upper()
    if encoding in ("UTF-8", "UTF8", "UNICODE"):
        return "utf-8"  # OFX 1's UNICODE means UTF-8
    charset = header.get("CHARSET", "NONE").upper()
    if charset in ("NONE", ""):
        return "utf-8"  # ASCII, which UTF-8 decodes; anything else falls back to 1252
    codec = _CHARSETS.get(charset)
    if codec is None:
        try:
            info = codecs.lookup(charset)
        except LookupError:
            raise MalformedXMLError(f"unknown OFX CHARSET {charset!r}") from None
        codec = info.name
        if not _reads_ascii_as_ascii(codec):
            # UTF-7 or an escape codec would turn text other readers show into markup;
            # rot13, hex, UTF-16 or EBCDIC are not what an OFX body is written in.
            raise MalformedXMLError(
                f"OFX CHARSET {charset!r} is not a character set OFX files are written in"
            )
    return codec


# ASCII, and the sequences that decode to something else in UTF-7, IDNA and escape codecs.
_ASCII_PROBE: Final = bytes(range(128)) + b"\\u003c\\x3c+ADw-&#60; xn--ls8h.xn--ls8h"


def _reads_ascii_as_ascii(codec: str) -> bool:
    """Whether ``codec`` is a text encoding that reads every ASCII byte, alone or in a
    run, as that character: the markup then means the same to every reader."""
    if not getattr(codecs.lookup(codec), "_is_text_encoding", True):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # escape codecs warn about the probe's backslashes
        try:
            return _ASCII_PROBE.decode(codec) == _ASCII_PROBE.decode("ascii") and all(
                bytes([byte]).decode(codec) == chr(byte) for byte in range(128)
            )
        except (UnicodeError, LookupError, ValueError, Warning):
            return False


def _line(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def _unescape(raw: str, text: str, position: int) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name[0] != "#":
            return _NAMED.get(name.lower(), match.group(0))  # unknown: kept, never expanded
        code = int(name[2:], 16) if name[1] in "xX" else int(name[1:])
        char = chr(code) if code <= 0x10FFFF else "\x00"
        if _XML_ILLEGAL.match(char):
            raise MalformedXMLError(
                f"character reference {match.group(0)} is to a character XML cannot carry",
                line=_line(text, position),
            )
        return char

    value = _REFERENCE.sub(replace, raw)
    bad = _XML_ILLEGAL.search(value)
    if bad is not None:
        raise MalformedXMLError(
            f"control character U+{ord(bad.group()):04X} in the text of an element",
            line=_line(text, position + raw.find(bad.group())),
        )
    return value


_Kind = Literal["start", "end", "empty", "text"]


def _tokens(text: str) -> list[tuple[_Kind, str, int]]:
    declaration = _DECLARATION.search(text)
    if declaration is not None:
        what = (
            "processing instructions"
            if declaration.group() == "<?"
            else ("markup declarations (<!DOCTYPE, <!ENTITY, comments, CDATA)")
        )
        raise ForbiddenXMLError(
            f"{what} are refused in an OFX 1 body (line {_line(text, declaration.start())})"
        )
    tokens: list[tuple[_Kind, str, int]] = []
    for match in _TOKEN.finditer(text):
        position = match.start()
        inner = match.group(1)
        if inner is None:
            if match.group() == "<":
                raise MalformedXMLError(
                    "a tag is not terminated by '>'", line=_line(text, position)
                )
            tokens.append(("text", match.group(), position))
            continue
        kind: _Kind = "start"
        name = inner.strip()
        if name.startswith("/"):
            kind, name = "end", name[1:].strip()
        elif name.endswith("/"):
            kind, name = "empty", name[:-1].strip()
        if not _TAG_NAME.fullmatch(name):
            what = "attributes" if " " in name or "=" in name else "a malformed name"
            raise MalformedXMLError(
                f"tag <{inner[:40]}> has {what}; OFX tags are plain names",
                line=_line(text, position),
            )
        tokens.append((kind, name.upper(), position))
    return tokens


def parse_sgml_body(text: str, *, max_depth: int = MAX_OFX_DEPTH) -> etree._Element:
    """Build the element tree of an OFX 1 body (decoded text, from its first tag).

    :raises DocumentTooDeepError, ForbiddenXMLError, MalformedXMLError: see
        :func:`read_sgml`.
    """
    return _Builder(text, max_depth).build()


class _Builder:
    """Builds the tree token by token; ``open`` holds the aggregates not yet closed."""

    def __init__(self, text: str, max_depth: int) -> None:
        self.text = text
        self.max_depth = max_depth
        self.tokens = _tokens(text)
        self.root: etree._Element | None = None
        self.open: list[tuple[str, etree._Element]] = []

    def error(self, message: str, position: int) -> MalformedXMLError:
        return MalformedXMLError(message, line=_line(self.text, position))

    def build(self) -> etree._Element:
        i = 0
        while i < len(self.tokens):
            kind, value, position = self.tokens[i]
            if kind == "text":
                if value.strip():
                    where = f"<{self.open[-1][0]}>" if self.open else "the document"
                    raise self.error(
                        f"text {value.strip()[:30]!r} directly in {where}, outside any data"
                        " element",
                        position,
                    )
                i += 1
            elif kind == "end":
                self.close(value, position)
                i += 1
            else:
                i = self.start(i, kind, value, position)
        if self.root is None:
            raise MalformedXMLError("not an OFX file: there is no <OFX> element")
        if self.open:
            raise self.error(
                f"the file ends inside <{self.open[-1][0]}>: it is truncated", len(self.text)
            )
        return self.root

    def close(self, name: str, position: int) -> None:
        if not any(tag == name for tag, _ in self.open):
            raise self.error(f"</{name}> closes no open element", position)
        while self.open.pop()[0] != name:
            pass  # unclosed elements inside it end with it, as in SGML

    def start(self, i: int, kind: _Kind, name: str, position: int) -> int:
        """Open the element of token ``i``; return the index of the next token to read."""
        if self.root is not None and not self.open:
            raise self.error(f"<{name}> after the end of the OFX element", position)
        if len(self.open) >= self.max_depth:
            raise DocumentTooDeepError(
                f"OFX elements nest deeper than {self.max_depth} levels", limit=self.max_depth
            )
        if self.root is None:
            if name != "OFX":
                raise self.error(
                    f"not an OFX file: the first element is <{name}>, not <OFX>", position
                )
            element = self.root = etree.Element(name)
        else:
            element = etree.SubElement(self.open[-1][1], name)
        tokens = self.tokens
        i += 1
        if kind == "empty":
            return i
        following = tokens[i] if i < len(tokens) else None
        if following is not None and following[0] == "text" and following[1].strip():
            if name in AGGREGATES:
                raise self.error(
                    f"text {following[1].strip()[:30]!r} directly in <{name}>, outside any"
                    " data element",
                    following[2],
                )
            # A data element: its text runs to the next tag; its end tag is optional.
            element.text = _unescape(following[1], self.text, following[2])
            i += 1
            if i < len(tokens) and tokens[i][0] == "end" and tokens[i][1] == name:
                i += 1
            return i
        after = i + 1 if following is not None and following[0] == "text" else i
        if after < len(tokens) and tokens[after][0] == "end" and tokens[after][1] == name:
            return after + 1  # <MEMO></MEMO>: empty
        if name not in LEAVES:
            self.open.append((name, element))  # an aggregate
        return i
