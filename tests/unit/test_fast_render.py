"""The hand-written renderers of ``offer`` and ``offers`` write what their templates do.

The templates are the reference: every test renders a model both ways, through
``render_text`` (which takes the document type's ``render``) and through the template
(``render_context`` with the mapping), and requires the same text, byte for byte.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cmi_core import plugin as core
from cmi_core._render import render_offer, render_offers
from cmi_sdk import (
    Advice,
    DocumentType,
    FlightDetails,
    LineItem,
    LoanDetails,
    MappingError,
    Money,
    Offer,
    OfferSet,
    RenderError,
    Reward,
)
from cmi_sdk._currencies import MINOR_UNITS
from cmi_sdk._standards import render_context, render_text
from cmi_sdk.testing import assert_schema_valid, make_adapter
from tests import strategies as s

STANDARD = core.STANDARD
OFFER = STANDARD.document_type("offer")
OFFERS = STANDARD.document_type("offers")
ADAPTER = make_adapter()


def _by_template(doc_type: DocumentType[Any], model: Any) -> str:
    return render_context(STANDARD, doc_type, doc_type.to_context(model))


# -- what tests/strategies.py does not draw ------------------------------------------------


@st.composite
def _fractional_items(draw: st.DrawFn, currency: str) -> LineItem:
    # quarters of a unit price in fours: the amount has no more places than the price
    quantity = Decimal(draw(st.integers(1, 4000))) / 4
    whole = Decimal(4 * draw(st.integers(0, 10**6)))
    unit = Money(amount=whole, currency=currency)
    return LineItem(
        description=draw(s.text(max_size=256)),
        quantity=quantity,
        unit_price=unit,
        amount=Money(amount=quantity * whole, currency=currency),
        sku=draw(st.none() | s.identifiers),
    )


@st.composite
def _varied_offers(draw: st.DrawFn) -> Offer:
    """An offer of ``s.offers()``, sometimes with a transaction's product details (the
    template ignores them), fractional quantities, and rewards and advice in number."""
    base = draw(s.offers())
    data = dict(base)
    if draw(st.booleans()):
        details = s.flight_details() if base.kind == "flight" else s.loan_details()
        data["product"] = draw(details)
    currency = base.price.currency
    if draw(st.booleans()):
        items = draw(st.lists(_fractional_items(currency), min_size=1, max_size=3))
        data["items"] = tuple(items)
        total = sum((i.amount.amount for i in items), Decimal(0))
        data["price"] = Money(amount=total, currency=currency)
    if draw(st.booleans()):
        data["rewards"] = tuple(
            Reward(
                code=f"R{n}", description=text, amount=Money(amount=Decimal(n), currency=currency)
            )
            for n, text in enumerate(draw(st.lists(s.text(max_size=256), max_size=4)))
        )
        data["advice"] = tuple(
            Advice(code=f"A{n}", text=text)
            for n, text in enumerate(draw(st.lists(s.text(max_size=256), max_size=4)))
        )
    return Offer.model_validate(data)


@st.composite
def _varied_offer_sets(draw: st.DrawFn) -> OfferSet:
    """``s.offer_sets()``, and answers of up to four varied offers."""
    if draw(st.booleans()):
        return draw(s.offer_sets())
    request_id = draw(s.identifiers)
    drawn = draw(st.lists(_varied_offers(), max_size=4))
    return OfferSet(
        request_id=request_id,
        firm=draw(s.identifiers),
        reply_to=draw(s.identifiers),
        answered_at=draw(s.utc_datetimes),
        offers=tuple(o.model_copy(update={"request_id": request_id}) for o in drawn),
        declined=None if drawn else draw(st.none() | s.text(max_size=256)),
    )


# -- byte identity with the templates -------------------------------------------------------


@given(_varied_offers())
def test_offer_renders_as_its_template(offer: Offer) -> None:
    assert render_text(STANDARD, OFFER, offer) == _by_template(OFFER, offer)


@given(_varied_offer_sets())
def test_offers_render_as_their_template(answer: OfferSet) -> None:
    assert render_text(STANDARD, OFFERS, answer) == _by_template(OFFERS, answer)


def _hostile_offer() -> Offer:
    """One offer with every markup character and whitespace the escaping must match."""
    hostile = "a&b<c>d'e\"f ]]> &amp; \t\r\n é 🛫"
    unit = Money(amount=Decimal("520.00"), currency="USD")
    created = dt.datetime(2026, 11, 24, 4, 18, 42, 183565, tzinfo=dt.UTC)
    return Offer(
        id="off-1",
        request_id="req-1",
        kind="loan",
        firm="bank.example",
        customer_ref="cust-7f3a9c",
        reply_to="relay-1",
        created_at=created,
        valid_from=created,
        valid_until=created + dt.timedelta(minutes=10),
        product=LoanDetails(
            principal=Money(amount=Decimal("10000.00"), currency="USD"),
            term_months=36,
            apr=Decimal("6.9500"),
            account="acct-1",
        ),
        items=(
            LineItem(description=hostile, unit_price=unit, amount=unit),
            LineItem(
                description="x",
                quantity=Decimal("0.5"),
                unit_price=unit,
                amount=Money(amount=Decimal("260.00"), currency="USD"),
                sku="SKU-1",
            ),
        ),
        price=Money(amount=Decimal("780.00"), currency="USD"),
        rewards=(Reward(code="r1", description=hostile, amount=unit),),
        advice=(Advice(code="a1", text=hostile),),
    )


def test_escaping_matches_the_templates() -> None:
    offer = _hostile_offer()
    text = render_text(STANDARD, OFFER, offer)
    assert text == _by_template(OFFER, offer)
    assert "a&amp;b&lt;c&gt;d&#39;e&#34;f ]]&gt; &amp;amp; \t&#13;\n é 🛫" in text
    declined = OfferSet(
        request_id="req-1",
        firm="f",
        reply_to="r",
        answered_at=offer.created_at,
        declined="<sold out> & 'full'",
    )
    assert render_text(STANDARD, OFFERS, declined) == _by_template(OFFERS, declined)


def test_a_flight_with_ticket_details_renders_only_the_product() -> None:
    details = FlightDetails(
        origin="ATL",
        destination="CDG",
        date=dt.date(2026, 12, 24),
        airline="Delta & co",
        flight="2231",
        fare_class="Q",
        ticket_number="0062345678901",
        row=32,
        seat="A",
    )
    offer = _hostile_offer().model_copy(update={"kind": "flight", "product": details})
    text = render_text(STANDARD, OFFER, offer)
    assert text == _by_template(OFFER, offer)
    assert "<airline>Delta &amp; co</airline>" in text
    assert "ticketNumber" not in text


# -- the documents are valid -------------------------------------------------------------


@given(_varied_offers())
def test_rendered_offers_are_schema_valid(offer: Offer) -> None:
    xml = render_text(STANDARD, OFFER, offer).encode()
    assert_schema_valid(ADAPTER, xml, standard="cmi", document_type="offer")


@given(_varied_offer_sets())
def test_rendered_answers_are_schema_valid(answer: OfferSet) -> None:
    xml = render_text(STANDARD, OFFERS, answer).encode()
    assert_schema_valid(ADAPTER, xml, standard="cmi", document_type="offers")


# -- what render_text still does around the renderer ------------------------------------


def test_the_core_standard_renders_offers_by_hand() -> None:
    assert OFFER.render is render_offer
    assert OFFERS.render is render_offers


def test_render_text_uses_the_renderer_when_set() -> None:
    calls: list[Offer] = []

    def render(offer: Offer) -> str:
        calls.append(offer)
        return "<offer>\r</offer>"

    doc_type = dataclasses.replace(OFFER, render=render)
    offer = _hostile_offer()
    # the bare-CR rule applies to the renderer's text as to a template's
    assert render_text(STANDARD, doc_type, offer) == "<offer>&#13;</offer>"
    assert calls == [offer]


def test_render_text_still_checks_the_model_type() -> None:
    with pytest.raises(MappingError, match="made from a OfferSet, not a Offer"):
        render_text(STANDARD, OFFERS, _hostile_offer())


@pytest.mark.parametrize("char", ["\x00", "\x0b", "\ufffe"])
def test_a_character_xml_cannot_carry_names_its_field(char: str) -> None:
    offer = _hostile_offer()
    item = offer.items[1].model_copy(update={"description": f"x{char}y"})
    bad = OfferSet(
        request_id=offer.request_id,
        firm="f",
        reply_to="r",
        answered_at=offer.created_at,
        offers=(offer.model_copy(update={"items": (offer.items[0], item)}),),
    )
    field = "offers[0].items[1].description"
    with pytest.raises(RenderError, match=rf"U\+{ord(char):04X} in {re.escape(field)}") as fast:
        render_text(STANDARD, OFFERS, bad)
    assert fast.value.field == field
    assert fast.value.character == char
    # the same error the template path raises
    with pytest.raises(RenderError) as slow:
        _by_template(OFFERS, bad)
    assert str(slow.value) == str(fast.value)
    assert slow.value.field == fast.value.field


def test_every_currency_renders_as_its_template() -> None:
    offer = _hostile_offer()
    for currency, digits in MINOR_UNITS.items():
        unit = Money(amount=Decimal(10**18 - 1).scaleb(-digits), currency=currency)
        item = LineItem(description="max", unit_price=unit, amount=unit)
        priced = offer.model_copy(
            update={"items": (item,), "price": unit, "rewards": (), "advice": ()}
        )
        assert render_text(STANDARD, OFFER, priced) == _by_template(OFFER, priced)
