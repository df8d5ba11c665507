"""Hand-written renderers for the ``offer`` and ``offers`` documents.

An answer to a request is rendered once per request on the request-to-offer path, where
jinja2's macro calls and escaping cost several times what the rest of the answer does.
These functions write the same text directly. The templates ``offer.xml.j2`` and
``offers.xml.j2`` (with ``_macros.xml.j2``) stay the reference: each function below mirrors
one macro or template, line for line, and the tests render every kind of valid model both
ways and require identical output, byte for byte.

What they share with the templates, so that the two cannot drift apart:

- the value formats, through the same helpers the mapping uses (``xml_decimal``,
  ``xml_date``, ``xml_datetime``, ``str`` for counts);
- the escaping of jinja2's autoescape (markupsafe's): ``& < > ' "`` become ``&amp; &lt;
  &gt; &#39; &#34;``, applied to every string that comes from the model;
- the layout the templates produce under ``trim_blocks`` and ``lstrip_blocks``.

The checks that follow rendering (characters XML cannot carry, bare carriage returns) are
the SDK's, applied to this output as to a template's.
"""

from __future__ import annotations

import functools
import re
from typing import Final

from cmi_sdk import (
    Advice,
    FlightProduct,
    LineItem,
    LoanProduct,
    Money,
    Offer,
    OfferSet,
    Reward,
)
from cmi_sdk.mapping import xml_date, xml_datetime, xml_decimal

__all__ = ["render_offer", "render_offers"]

_PROLOG: Final = '<?xml version="1.0" encoding="UTF-8"?>\n'
# The templates write the namespace literally too; the tests hold the two together.
_XMLNS: Final = ' xmlns="urn:cmi:core:1.0"'

_MARKUP: Final = re.compile("[&<>'\"]")

# Writing a time is the costliest step here, and an answer's times repeat (answered, made
# and valid from the same instant). Equal instants always write the same text, whatever
# their timezone, so a small cache keyed on the instant is exact.
_datetime: Final = functools.lru_cache(maxsize=64)(xml_datetime)


def _esc(text: str) -> str:
    """``text`` escaped exactly as markupsafe escapes it for jinja2's autoescape."""
    # Almost every value is an identifier or plain words: one search answers for those,
    # and only text with markup characters pays for the replacements. '&' goes first so
    # the entities the later replacements add are not escaped again.
    if _MARKUP.search(text) is None:
        return text
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("'", "&#39;")
        .replace('"', "&#34;")
    )


def _money(tag: str, money: Money) -> str:
    # the macro ``money``: an amount and its currency, on the caller's line
    return f'<{tag} currency="{_esc(money.currency)}">{xml_decimal(money.amount)}</{tag}>'


def _item(item: LineItem) -> str:
    # the macro ``line_item``: an optional sku (the template tests it for truth)
    sku = f"    <sku>{_esc(item.sku)}</sku>\n" if item.sku else ""
    return (
        "  <item>\n"
        f"    <description>{_esc(item.description)}</description>\n"
        f"    <quantity>{xml_decimal(item.quantity)}</quantity>\n"
        f"    {_money('unitPrice', item.unit_price)}\n"
        f"    {_money('amount', item.amount)}\n"
        f"{sku}"
        "  </item>\n"
    )


def _flight(product: FlightProduct) -> str:
    # the macro ``flight_product`` inside the template's <flight> lines; a flight
    # transaction's own details (ticket, seat) are not part of an offer
    return (
        "   <flight>\n"
        f"    <origin>{_esc(product.origin)}</origin>\n"
        f"    <destination>{_esc(product.destination)}</destination>\n"
        f"    <date>{xml_date(product.date)}</date>\n"
        f"    <airline>{_esc(product.airline)}</airline>\n"
        f"    <flightNumber>{_esc(product.flight)}</flightNumber>\n"
        f"    <fareClass>{_esc(product.fare_class)}</fareClass>\n"
        "   </flight>\n"
    )


def _loan(product: LoanProduct) -> str:
    # the macro ``loan_product`` inside the template's <loan> lines
    return (
        "   <loan>\n"
        f"    {_money('principal', product.principal)}\n"
        f"    <termMonths>{product.term_months}</termMonths>\n"
        f"    <apr>{xml_decimal(product.apr)}</apr>\n"
        "   </loan>\n"
    )


def _reward(reward: Reward) -> str:
    return (
        "  <reward>\n"
        f"    <code>{_esc(reward.code)}</code>\n"
        f"    <description>{_esc(reward.description)}</description>\n"
        f"    {_money('amount', reward.amount)}\n"
        "  </reward>\n"
    )


def _advice(advice: Advice) -> str:
    return (
        "  <advice>\n"
        f"    <code>{_esc(advice.code)}</code>\n"
        f"    <text>{_esc(advice.text)}</text>\n"
        "  </advice>\n"
    )


def _offer_head(offer: Offer, xmlns: str) -> str:
    # ``xmlns`` is the namespace declaration of a standalone offer, or '' inside <offers>
    return (
        f'<offer{xmlns} id="{_esc(offer.id)}" kind="{_esc(offer.kind)}">\n'
        f"  <requestId>{_esc(offer.request_id)}</requestId>\n"
        f"  <firm>{_esc(offer.firm)}</firm>\n"
        f"  <customerRef>{_esc(offer.customer_ref)}</customerRef>\n"
        f"  <replyTo>{_esc(offer.reply_to)}</replyTo>\n"
        f"  <createdAt>{_datetime(offer.created_at)}</createdAt>\n"
        f"  <validFrom>{_datetime(offer.valid_from)}</validFrom>\n"
        f"  <validUntil>{_datetime(offer.valid_until)}</validUntil>\n"
    )


def _offer(offer: Offer, xmlns: str) -> str:
    # the macro ``offer_element``, which ends without a newline
    product = offer.product
    parts = [
        _offer_head(offer, xmlns),
        "  <product>\n",
        _flight(product) if isinstance(product, FlightProduct) else _loan(product),
        "  </product>\n",
    ]
    parts.extend(_item(item) for item in offer.items)
    parts.append(f"  {_money('price', offer.price)}\n")
    parts.extend(_reward(reward) for reward in offer.rewards)
    parts.extend(_advice(advice) for advice in offer.advice)
    parts.append("</offer>")
    return "".join(parts)


def render_offer(offer: Offer) -> str:
    """The ``offer`` document of ``offer``: exactly what ``offer.xml.j2`` renders."""
    return f"{_PROLOG}{_offer(offer, _XMLNS)}\n"


def render_offers(answer: OfferSet) -> str:
    """The ``offers`` document of ``answer``: exactly what ``offers.xml.j2`` renders."""
    parts = [
        _PROLOG,
        f'<offers{_XMLNS} requestId="{_esc(answer.request_id)}">\n',
        f"  <firm>{_esc(answer.firm)}</firm>\n",
        f"  <replyTo>{_esc(answer.reply_to)}</replyTo>\n",
        f"  <answeredAt>{_datetime(answer.answered_at)}</answeredAt>\n",
    ]
    for offer in answer.offers:
        parts.append(_offer(offer, ""))
        parts.append("\n")
    if answer.declined:
        parts.append(f"  <declined>{_esc(answer.declined)}</declined>\n")
    parts.append("</offers>\n")
    return "".join(parts)
