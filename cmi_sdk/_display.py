"""Text for people: a firm's answer to a request, as the ``cmi request`` command and the
demo print it."""

from __future__ import annotations

from typing import Any

__all__ = ["format_offers"]


def format_offers(answer: Any) -> list[str]:
    """Lines describing a firm's answer (an OfferSet) for people."""
    lines = [f"answer to {answer.request_id} from {answer.firm}:"]
    if answer.declined:
        lines.append(f"  no offer: {answer.declined}")
    for offer in answer.offers:
        product = offer.product
        if product.kind == "flight":
            what = (
                f"{product.airline} {product.flight} {product.origin}-{product.destination}"
                f" {product.date} class {product.fare_class}"
            )
        else:
            what = (
                f"loan of {product.principal} over {product.term_months} months"
                f" at {product.apr} % APR"
            )
        lines.append(f"  offer {offer.id}: {what}")
        lines.append(
            f"    price {offer.price}, valid until {offer.valid_until:%Y-%m-%d %H:%M:%S} UTC"
        )
        lines.extend(f"    reward {r.code}: -{r.amount}" for r in offer.rewards)
        lines.extend(f"    advice: {a.text}" for a in offer.advice)
    return lines
