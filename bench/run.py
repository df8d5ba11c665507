"""cmi-sdk benchmarks: each target is a ratio against a baseline measured in the same run.

Usage::

    python bench/run.py            # full run; exit 1 if a target is missed
    python bench/run.py --quick    # a short smoke run (CI): figures printed, targets not judged

Each target prints one line, ``<name>: <value> <unit> (target <goal>)``; the figures behind
it print first. Rounds of the SDK and of the baseline alternate, and the best round of each
counts, so a busy machine slows both rather than one.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from lxml import etree

from cmi_sdk import Adapter, FlightDetails, Money, Transaction
from cmi_sdk.mapping import xml_datetime


@dataclass(frozen=True)
class Figure:
    """One measured figure; with a target when it is judged."""

    name: str
    value: float
    unit: str
    target: float | None = None  # the least acceptable value

    @property
    def met(self) -> bool:
        return self.target is None or self.value >= self.target

    def line(self) -> str:
        shown = f"{self.value:.2f}" if self.value < 100 else f"{self.value:,.0f}"
        goal = f" (target >= {self.target:g})" if self.target is not None else ""
        return f"{self.name}: {shown} {self.unit}{goal}"


def best_rate(funcs: Sequence[Callable[[], int]], rounds: int) -> list[float]:
    """Run each function ``rounds`` times, interleaved; return each one's best items/s."""
    best = [0.0] * len(funcs)
    for _ in range(rounds):
        for i, func in enumerate(funcs):
            gc.collect()
            start = time.perf_counter()
            count = func()
            elapsed = time.perf_counter() - start
            best[i] = max(best[i], count / elapsed)
    return best


def tickets(count: int) -> list[Transaction]:
    """Distinct flight transactions shaped like the seed's ticket."""
    base = Transaction.model_validate(
        {
            "id": "DL-0",
            "kind": "flight",
            "occurred_at": "2003-06-02T14:05:00Z",
            "firm": "delta.com",
            "customer_ref": "cust-7f3a9c",
            "total": {"amount": "451.89", "currency": "USD"},
            "details": {
                "ticket_number": "12524057",
                "origin": "ATL",
                "destination": "CDG",
                "date": "2003-07-01",
                "airline": "Delta & Partners",
                "flight": "2231",
                "row": 27,
                "seat": "E",
                "fare_class": "B",
            },
        }
    )
    return [
        base.model_copy(
            update={
                "id": f"DL-{i}",
                "total": Money(amount=f"{400 + i % 100}.{i % 100:02d}", currency="USD"),
            }
        )
        for i in range(count)
    ]


def baseline_ticket(tx: Transaction) -> bytes:
    """The same ticket XML as the SDK's template, by f-string, every text value escaped."""
    d = tx.details
    assert isinstance(d, FlightDetails)
    row = f"\n  <row>{d.row}</row>" if d.row is not None else ""
    seat = f"\n  <seat>{escape(d.seat)}</seat>" if d.seat is not None else ""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<ticket xmlns="urn:cmi:ticket:1.0" id={quoteattr(tx.id)} '
        f"issued={quoteattr(xml_datetime(tx.occurred_at))} firm={quoteattr(tx.firm)} "
        f"customer={quoteattr(tx.customer_ref)}>\n"
        f"  <ticketnumber>{escape(d.ticket_number)}</ticketnumber>\n"
        f"  <origin>{escape(d.origin)}</origin>\n"
        f"  <destination>{escape(d.destination)}</destination>\n"
        f"  <date>{d.date.isoformat()}</date>\n"
        f"  <airline>{escape(d.airline)}</airline>\n"
        f"  <flight>{escape(d.flight)}</flight>{row}{seat}\n"
        f"  <class>{escape(d.fare_class)}</class>\n"
        f"  <currency>{tx.total.currency}</currency>\n"
        f"  <price>{tx.total.amount:f}</price>\n"
        f"</ticket>\n"
    ).encode()


def bench_render_validate(quick: bool) -> list[Figure]:
    """Render + validate a ticket through the SDK, against f-string + lxml validation."""
    adapter = Adapter()
    txs = tickets(500 if quick else 2000)
    schema = adapter.standards.get("cmi-ticket").document_type("ticket").lxml_schema
    parser = etree.XMLParser(resolve_entities=False, no_network=True)

    # Same work, same output: check before timing anything.
    for tx in txs[:50]:
        sdk_xml = adapter.render(tx, standard="cmi-ticket")
        if sdk_xml != baseline_ticket(tx):
            raise SystemExit("baseline and SDK disagree on the ticket XML")

    def sdk() -> int:
        for tx in txs:
            adapter.render(tx, standard="cmi-ticket")
        return len(txs)

    def baseline() -> int:
        for tx in txs:
            if not schema.validate(etree.fromstring(baseline_ticket(tx), parser)):
                raise SystemExit("baseline produced an invalid ticket")
        return len(txs)

    sdk_rate, base_rate = best_rate([sdk, baseline], rounds=3 if quick else 7)
    return [
        Figure("baseline_fstring_lxml_validate", base_rate, "docs/s"),
        Figure("sdk_render_validate", sdk_rate, "docs/s"),
        Figure("sdk_render_validate_per_doc", 1e6 / sdk_rate, "us"),
        Figure("render_validate_ratio", sdk_rate / base_rate, "x baseline", target=0.4),
    ]


BENCHMARKS: dict[str, Callable[[bool], list[Figure]]] = {
    "render_validate": bench_render_validate,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short smoke run; targets not judged")
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], metavar="NAME")
    args = parser.parse_args(argv)
    missed = []
    for name in args.names or list(BENCHMARKS):
        for figure in BENCHMARKS[name](args.quick):
            print(figure.line(), flush=True)
            if not figure.met:
                missed.append(figure.name)
    if missed and not args.quick:
        print(f"missed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
