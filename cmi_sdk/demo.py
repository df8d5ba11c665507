"""``cmi demo``: the whole loop on loopback, with nothing to set up and nothing left behind.

A firm's endpoint (the reference airline and lender), a customer's store and an
intermediary run in this process, on loopback ports, in a temporary folder::

    firm (customer signed in) ──link code──▶ customer ──▶ intermediary
    intermediary ──redeem the code──▶ firm  (its own pairwise reference for the customer)
    intermediary ──terms──▶ firm           (consent record back, signed)
    intermediary ──request (flight)──▶ firm ──▶ signed offers
    intermediary ──request (loan)──▶ firm   ──▶ signed offers
    intermediary ──acceptance──▶ firm ──▶ booking ──▶ outbox ──▶ customer's store
    the stored ticket's signature is verified against the firm's certificate
"""

from __future__ import annotations

import datetime as dt
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from cmi_sdk._adapter import Adapter
from cmi_sdk._display import format_offers
from cmi_sdk._models import Acceptance, Offer, OfferSet, Request
from cmi_sdk._reference import reference_firms
from cmi_sdk._serving import serving
from cmi_sdk.client import CMIClient
from cmi_sdk.egress import EgressGuard
from cmi_sdk.receiver import CustomerStore, running
from cmi_sdk.signing import DocumentSigner, generate_development_keys, verify_document
from cmi_sdk.webhooks import generate_secret

__all__ = ["run_demo"]

ACCOUNT = "acct-7f3a9c"
"""The firm's own account id for the customer: it never leaves the firm."""
FIRM = "cmi-demo.example"

#: Talluri & van Ryzin's four-class example: fares and demand forecasts (mean, sd).
LADDER = (
    ("Y", Decimal("1050.00"), 17.3, 5.8),
    ("B", Decimal("567.00"), 45.1, 15.0),
    ("M", Decimal("534.00"), 39.6, 13.2),
    ("Q", Decimal("520.00"), 34.0, 11.3),
)


def seed_flights(airline: Any, *, skip_existing: bool = False) -> dt.date:
    """Add DL2231 ATL-CDG, 100 seats at the T&vR fares, 29 to 31 days from today; return
    the middle day. ``skip_existing`` leaves flights an earlier run added."""
    travel_day = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).date()
    for offset in (-1, 0, 1):
        try:
            airline.add_flight(
                origin="ATL",
                destination="CDG",
                date=travel_day + dt.timedelta(days=offset),
                flight="2231",
                capacity=100,
                fares=LADDER,
            )
        except ValueError:
            if not skip_existing:
                raise
    return travel_day


def run_demo(say: Callable[[str], None] = print) -> int:
    """Run the demo, telling each step through ``say``; return 0 when the loop closed."""
    with tempfile.TemporaryDirectory(prefix="cmi-demo-") as tmp:
        work = Path(tmp)
        key_path, cert_path = generate_development_keys(work / "keys", common_name=FIRM)
        signer = DocumentSigner.from_pem(key_path.read_bytes(), cert_path.read_bytes())
        certificate = cert_path.read_bytes()
        firms = reference_firms(work, firm=FIRM)
        travel_day = seed_flights(firms["airline"])
        adapter = Adapter(
            database_url=f"sqlite:///{work / 'firm.db'}",
            signer=signer,
            firm=FIRM,
            egress=EgressGuard(allow_loopback=True),  # the customer's store is on loopback
            plugins=list(firms.values()),
        )
        relay_secret = generate_secret()
        adapter.store.add_intermediary("relay", relay_secret, at=time.time())
        customer_secret = generate_secret()
        stored: list[str] = []
        store = CustomerStore(
            directory=work / "customer-store",
            secrets=[customer_secret],
            certificate=certificate,
            on_document=lambda doc: stored.append(doc.webhook_id),
        )
        try:
            with (
                running(store) as store_url,
                serving(adapter.asgi_app()) as firm_url,
                CMIClient(firm_url, secret=relay_secret, intermediary="relay") as client,
            ):
                say(f"firm endpoint      {firm_url}  (reference airline and lender)")
                say(f"customer's store   {store_url}")
                say("intermediary       'relay', signing with Standard Webhooks")
                say("")
                demo = _Demo(
                    adapter=adapter,
                    client=client,
                    store=store,
                    store_url=store_url,
                    customer_secret=customer_secret,
                    travel_day=travel_day,
                    certificate=certificate,
                    stored=stored,
                    say=say,
                )
                return demo.run()
        finally:
            adapter.close()
            for firm in firms.values():
                firm.close()


@dataclass
class _Demo:
    """The demo's parties, and its steps in order."""

    adapter: Adapter
    client: CMIClient
    store: CustomerStore
    store_url: str
    customer_secret: str
    travel_day: dt.date
    certificate: bytes
    stored: list[str]
    say: Callable[[str], None]
    customer_ref: str = ""
    """The intermediary's reference for the customer, issued when the link is made."""

    def run(self) -> int:
        self.link()
        self.terms()
        offers = [self.request(3, self.flight()), self.request(4, self.loan())]
        if any(answer is None for answer in offers):
            return 1
        flight = offers[0]
        if flight is None or not flight.offers:
            self.say("no flight offer to accept")
            return 1
        if not self.accept(flight.offers[0]):
            return 1
        return self.deliver()

    def link(self) -> None:
        self.say("1. the customer, signed in at the firm, links the intermediary")
        code = self.adapter.create_link_code(ACCOUNT)
        self.say(f"   the firm shows a single-use code, valid until {code.expires_at:%H:%M:%S} UTC")
        response = self.client.redeem_link(code.code)
        response.raise_for_status()
        self.customer_ref = response.json()["customer_ref"]
        self.say("   the intermediary redeems it: its reference for the customer is")
        self.say(f"   {self.customer_ref} (random, its own: the account id stays at the firm)")
        self.say("")

    def terms(self) -> None:
        self.say("2. the intermediary registers the customer's terms")
        response = self.client.propose_terms(
            {
                "customer_ref": self.customer_ref,
                "destination": self.store_url + "inbox",
                "secret": self.customer_secret,
                "standard": "cmi-ticket",
                "purpose": {"code": "records", "text": "Keep my travel records"},
            }
        )
        response.raise_for_status()
        answer = response.json()
        self.say(f"   {answer['outcome']}: terms {answer['terms']['id']}, tickets to the store")
        self.say(f"   signed consent record {answer['consent']['id']} returned to the customer")
        self.say("")

    def _request(self, kind: str, wanted: dict[str, Any], **extra: Any) -> Request:
        now = dt.datetime.now(dt.UTC)
        return Request.model_validate(
            {
                "id": f"req-{secrets.token_hex(4)}",
                "kind": kind,
                "customer_ref": self.customer_ref,
                "reply_to": "relay-8841",
                "created_at": now,
                "respond_by": now + dt.timedelta(seconds=30),
                "wanted": wanted,
                **extra,
            }
        )

    def flight(self) -> Request:
        return self._request(
            "flight",
            {"origin": "ATL", "destination": "CDG", "date": self.travel_day},
            constraints={"max_price": {"amount": "600.00", "currency": "USD"}},
        )

    def loan(self) -> Request:
        amount = {"amount": "30000.00", "currency": "USD"}
        return self._request("loan", {"amount": amount, "term_months": 60})

    def request(self, number: int, request: Request) -> OfferSet | None:
        what = (
            f"a seat ATL-CDG on {self.travel_day}, at most 600.00 USD"
            if request.kind == "flight"
            else "a 30,000.00 USD loan over 60 months"
        )
        self.say(f"{number}. the intermediary posts a request for {what}")
        xml = self.adapter.render(request, standard="cmi", document_type="request")
        response = self.client.post_request(xml)
        if response.status_code != 200:
            self.say(f"   the firm answered {response.status_code}: {response.text}")
            return None
        # Read from what the signature covers, as the verifier saw it.
        signed = verify_document(response.content, self.certificate)
        answer = self.adapter.parse(signed, standard="cmi", document_type="offers")
        if not isinstance(answer, OfferSet):
            return None
        for line in format_offers(answer):
            self.say("   " + line)
        self.say("   (the answer is signed by the firm: verified)")
        self.say("")
        return answer

    def accept(self, offer: Offer) -> bool:
        self.say(f"5. the customer accepts {offer.id} ({offer.price}); the intermediary relays it")
        acceptance = Acceptance(
            id=f"acc-{secrets.token_hex(6)}",
            offer_id=offer.id,
            customer_ref=self.customer_ref,
            accepted_at=dt.datetime.now(dt.UTC),
        )
        xml = self.adapter.render(acceptance, standard="cmi", document_type="acceptance")
        response = self.client.accept(offer.id, xml)
        if response.status_code != 201:
            self.say(f"   the firm answered {response.status_code}: {response.text}")
            return False
        booked = response.json()
        documents = ", ".join(booked["documents"])
        self.say(f"   booked as {booked['transaction_id']}; documents: {documents}")
        self.say("")
        return True

    def deliver(self) -> int:
        self.say("6. the firm delivers the ticket to the customer's store")
        with self.adapter.delivery_worker() as worker:
            stats = worker.run_once()
        self.say(f"   delivered {stats.delivered}, retried {stats.retried}, dead {stats.dead}")
        if not self.stored:
            self.say("   nothing arrived at the customer's store")
            return 1
        document = (self.store.directory / f"{self.stored[0]}.xml").read_bytes()
        verify_document(document, self.certificate)
        self.say(f"   {self.stored[0]}.xml arrived; its XML-DSig signature verifies against")
        self.say("   the firm's certificate. The ticket, as the customer keeps it:")
        self.say("")
        text = document[: document.index(b"<Signature")].decode().rstrip()
        for line in text.splitlines():
            self.say("   " + line)
        self.say("   <Signature ...>...</Signature></ticket>")
        self.say("")
        self.say("done: a request came in, offers went out, one was accepted, and the signed")
        self.say("ticket landed in the customer's store and verified.")
        return 0
