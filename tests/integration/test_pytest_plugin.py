"""The pytest plugin: loaded in every pytest run of the environment, it imports nothing of
the SDK until a test asks for a fixture; its fixtures test a firm's hooks end to end."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]

_LOAD = """
import importlib.metadata, sys, time
(ep,) = [e for e in importlib.metadata.entry_points(group="pytest11") if e.name == "cmi_sdk"]
import pytest
start = time.perf_counter()
ep.load()
took = time.perf_counter() - start
print(ep.value, sorted(m for m in sys.modules if m.split(".")[0] == "cmi_sdk"), took)
"""


def test_loading_the_plugin_imports_nothing_of_the_sdk() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _LOAD], capture_output=True, text=True, check=True
    ).stdout.split(" ", 1)
    assert out[0] == "cmi_sdk_pytest"
    assert out[1].startswith("[] "), out[1]


def test_the_fixtures_test_a_firms_hooks_end_to_end(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        textwrap.dedent(
            """
            import datetime as dt
            from pathlib import Path

            from cmi_sdk import (
                Availability, FlightProduct, LineItem, Money, Quote, Request,
                RevenueDecision, Transaction, hookimpl, load_model,
            )
            from cmi_sdk.signing import DocumentSigner, generate_development_keys

            TICKET = "@TICKET@"

            class MyAirline:
                @hookimpl
                def cmi_check_capacity(self, request):
                    w = request.wanted
                    return Availability(available=5, product=FlightProduct(
                        origin=w.origin, destination=w.destination, date=w.date,
                        airline="Delta", flight="2231", fare_class="B"))

                @hookimpl
                def cmi_revenue_decision(self):
                    return RevenueDecision(accept=True)

                @hookimpl
                def cmi_price(self):
                    fare = Money(amount="451.89", currency="USD")
                    return Quote(items=(LineItem(description="Seat", unit_price=fare,
                                                 amount=fare),))

            def test_offer_and_delivery(cmi_adapter, cmi_intermediary, cmi_customer_store,
                                        cmi_endpoint, tmp_path):
                key, cert = generate_development_keys(tmp_path / "keys")
                signer = DocumentSigner.from_pem(key.read_bytes(), cert.read_bytes())
                adapter = cmi_adapter(MyAirline(), signer=signer)
                client = cmi_intermediary(adapter, "relay")
                request = load_model(Request, {
                    "id": "req-1", "kind": "flight", "customer_ref": "cust-1",
                    "reply_to": "relay-1", "created_at": dt.datetime.now(dt.UTC).isoformat(),
                    "wanted": {"origin": "ATL", "destination": "CDG", "date": "2031-03-01"}})
                xml = adapter.render(request, standard="cmi", document_type="request")
                answer = client.post_request(xml)
                assert answer.status_code == 200, answer.text
                assert str(adapter.parse(answer.content).offers[0].price) == "451.89 USD"
                assert cmi_endpoint(adapter).http.get("/.well-known/cmi").status_code == 200

                ticket = load_model(Transaction, Path(TICKET).read_text())
                cmi_customer_store.register_terms(adapter, ticket.customer_ref, standard="cmi")
                adapter.emit(ticket)
                worker = adapter.delivery_worker().start(poll_interval=0.05)
                try:
                    (arrived,) = cmi_customer_store.wait_for(1, timeout=10)
                finally:
                    worker.stop()
                assert b"12524057" in arrived.path.read_bytes()

            def test_nothing_arrives_without_a_worker(cmi_customer_store):
                import pytest
                with pytest.raises(AssertionError, match="0 of 1 documents arrived"):
                    cmi_customer_store.wait_for(1, timeout=0.2)
            """
        ).replace("@TICKET@", str(ROOT / "examples" / "ticket.json"))
    )
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
