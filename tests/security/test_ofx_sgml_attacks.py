"""The hand-written OFX 1 reader, attacked with crafted files.

A file from outside (a bank's export given to ``cmi_ofx.parse_ofx``, a statement given to
``cmi validate`` or ``cmi parse``) costs time in proportion to its size, whatever its
header holds; the header's character set is one of those OFX files are written in, so
bytes another OFX reader shows as text never become markup here; and a header that says
two things is refused rather than read one way here and another way elsewhere.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import cmi_ofx
from cmi_sdk import Adapter, DocumentTooDeepError, MalformedXMLError, XMLInputError

HEADER = (
    b"OFXHEADER:100\r\nDATA:OFXSGML\r\nVERSION:102\r\nSECURITY:NONE\r\nENCODING:USASCII\r\n"
    b"CHARSET:%s\r\nCOMPRESSION:NONE\r\nOLDFILEUID:NONE\r\nNEWFILEUID:NONE\r\n\r\n"
)
BODY = (
    b"<OFX><SIGNONMSGSRSV1><SONRS><STATUS><CODE>0<SEVERITY>INFO</STATUS></SONRS>"
    b"</SIGNONMSGSRSV1>%s</OFX>"
)


# -- time in proportion to size ----------------------------------------------------------------

# Each runs in a process of its own, killed at the deadline: a regular expression that
# backtracks holds the interpreter in C, where no signal or thread can stop it. Read
# linearly, each megabyte takes milliseconds; read quadratically, hours.
_LONG_WORD = "b'OFXHEADER:100\\r\\n' + b'A' * 1_000_000 + b'\\r\\n<OFX></OFX>'"
_HOSTILE = {
    "a header of one long word": f"cmi_ofx.read_sgml({_LONG_WORD})",
    "text before the first tag, no header": "cmi_ofx.read_sgml(b'A' * 1_000_000 + b'<OFX/>')",
    "an OFX 2 header begun a million times": (
        "cmi_ofx.parse_ofx(b'<?OFX ' + b'<?OFX' * 200_000, customer_ref='c')"
    ),
    "cmi validate's path: a statement-sgml with a long header word": (
        f"Adapter().validate({_LONG_WORD})"
    ),
}
_SCRIPT = """
import cmi_ofx
from cmi_sdk import Adapter
try:
    {call}
    print("read")
except Exception as exc:
    print(type(exc).__name__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_HOSTILE))
def test_a_hostile_header_is_read_in_time_proportional_to_its_size(name: str) -> None:
    try:
        done = subprocess.run(
            [sys.executable, "-c", _SCRIPT.format(call=_HOSTILE[name])],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: still reading after 60 s (quadratic backtracking)")
    assert done.returncode == 0, done.stderr
    # Read, or refused as input: never a crash of another kind.
    assert done.stdout.strip() in {
        "read",
        "MalformedXMLError",
        "DocumentTooLargeError",
        "DocumentValidationError",
    }, done.stdout + done.stderr


# -- character sets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("charset", "hidden"),
    [
        # Bytes an OFX reader shows as text, that these codecs decode to markup.
        (b"UTF-7", b"+ADw-BANKMSGSRSV1+AD4-+ADw-/BANKMSGSRSV1+AD4-"),
        (b"unicode_escape", b"\\x3cBANKMSGSRSV1\\x3e\\x3c/BANKMSGSRSV1\\x3e"),
        (b"raw_unicode_escape", b"\\u003cBANKMSGSRSV1\\u003e\\u003c/BANKMSGSRSV1\\u003e"),
        # Codecs that are no character set at all, or not one an OFX body is written in.
        (b"rot13", b""),
        (b"hex", b""),
        (b"base64", b""),
        (b"zlib", b""),
        (b"punycode", b""),
        (b"idna", b""),
        (b"UTF-16", b""),
        (b"UTF-32", b""),
        (b"cp037", b""),
    ],
)
def test_a_charset_that_turns_text_into_markup_or_is_none_is_refused(
    charset: bytes, hidden: bytes
) -> None:
    data = HEADER % charset + BODY % hidden
    with pytest.raises(MalformedXMLError, match="CHARSET"):
        cmi_ofx.read_sgml(data)
    with pytest.raises(XMLInputError):
        Adapter().validate(data)


@pytest.mark.parametrize("charset", [b"1252", b"ISO-8859-1", b"NONE", b"ISO-8859-15", b"CP1250"])
def test_the_charsets_ofx_files_are_written_in_are_read(charset: bytes) -> None:
    doc = cmi_ofx.read_sgml(HEADER % charset + BODY % b"<BANKMSGSRSV1></BANKMSGSRSV1>")
    assert [child.tag for child in doc.root] == ["SIGNONMSGSRSV1", "BANKMSGSRSV1"]


@pytest.mark.parametrize(
    "header",
    [
        HEADER % b"1252" + b"CHARSET:UTF-7\r\n",
        (HEADER % b"1252").replace(b"ENCODING:USASCII", b"ENCODING:USASCII ENCODING:UTF-8"),
        (HEADER % b"1252").replace(b"COMPRESSION:NONE", b"COMPRESSION:NONE\r\nCOMPRESSION:Z"),
    ],
    ids=["charset twice", "encoding twice", "compression twice"],
)
def test_a_header_field_given_twice_differently_is_refused(header: bytes) -> None:
    """Read one way here and another way by the customer's software: refused."""
    with pytest.raises(MalformedXMLError, match="twice"):
        cmi_ofx.read_sgml(header + BODY % b"")


# -- references and nesting ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "reference", [b"&#xD800;", b"&#55296;", b"&#x110000;", b"&#1114112;", b"&#x1;", b"&#0;"]
)
def test_a_reference_to_a_character_xml_cannot_carry_is_refused(reference: bytes) -> None:
    with pytest.raises(MalformedXMLError, match="character"):
        cmi_ofx.read_sgml(HEADER % b"1252" + BODY % (b"<MEMO>a" + reference + b"b"))


def test_a_reference_never_becomes_markup() -> None:
    doc = cmi_ofx.read_sgml(
        HEADER % b"1252" + BODY % b"<MEMO>&#60;/OFX&#62;&lt;STMTTRN&gt;&LT;x&GT;&xxe;&NBSP;"
    )
    memo = doc.root.find("MEMO")
    assert memo is not None
    assert memo.text == "</OFX><STMTTRN><x>&xxe; "
    assert [child.tag for child in doc.root] == ["SIGNONMSGSRSV1", "MEMO"]


def test_unclosed_aggregates_nest_no_deeper_than_the_limit() -> None:
    # Unknown tags with no text are aggregates, each one deeper: the limit stops them
    # before the tree grows.
    with pytest.raises(DocumentTooDeepError):
        cmi_ofx.read_sgml(HEADER % b"1252" + b"<OFX>" + b"<A>" * 200_000)
