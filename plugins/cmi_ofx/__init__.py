"""The ``ofx`` standard: bank transactions as Open Financial Exchange statements (OFX 2.2
XML, and OFX 1.0.2 SGML).

Rendering goes through the SDK (``adapter.render(tx, standard="ofx")``) or, for many
transactions in one statement, :func:`render_digest`. Reading goes back through the SDK
(``adapter.parse``, exact) or, for the files banks export (OFX 1 SGML or OFX 2 XML, quirks
and all), :func:`parse_ofx`.
"""

from __future__ import annotations

from cmi_ofx.plugin import (
    STANDARD,
    STANDARD_NAME,
    STATEMENT,
    STATEMENT_SGML,
    AccountType,
    OFXPlugin,
    OFXSettings,
    make_standard,
    parse_digest,
    read_sgml_statement,
    read_statement,
    render_digest,
    statement,
    transaction_id,
)
from cmi_ofx.reader import ParsedOFX, parse_ofx, read_ofx
from cmi_ofx.sgml import MAX_OFX_BYTES, MAX_OFX_DEPTH, SGMLDocument, read_sgml
from cmi_ofx.values import (
    format_ofx_amount,
    format_ofx_datetime,
    parse_ofx_amount,
    parse_ofx_datetime,
)

__all__ = [
    "MAX_OFX_BYTES",
    "MAX_OFX_DEPTH",
    "STANDARD",
    "STANDARD_NAME",
    "STATEMENT",
    "STATEMENT_SGML",
    "AccountType",
    "OFXPlugin",
    "OFXSettings",
    "ParsedOFX",
    "SGMLDocument",
    "format_ofx_amount",
    "format_ofx_datetime",
    "make_standard",
    "parse_digest",
    "parse_ofx",
    "parse_ofx_amount",
    "parse_ofx_datetime",
    "read_ofx",
    "read_sgml",
    "read_sgml_statement",
    "read_statement",
    "render_digest",
    "statement",
    "transaction_id",
]
