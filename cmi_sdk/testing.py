"""Helpers for tests of plugins and of a firm's hooks, and what the pytest plugin's fixtures
are made of.

Installed with cmi-sdk, the pytest plugin :mod:`cmi_sdk_pytest` is registered under
pytest's ``pytest11`` entry point, so its fixtures are there in any test suite without an
import (and nothing of the SDK is imported until a test asks for one):

- ``cmi_adapter``: a factory of adapters with only the plugins given (and the SDK's own
  defaults), their store in a temporary folder, so a test sees exactly the standard or
  the hooks it is about;
- ``cmi_round_trip``: asserts that a model rendered as a document type validates and
  parses back to the same model;
- ``cmi_schema_valid``: asserts that bytes are a valid document of a given type;
- ``cmi_endpoint``: a factory: ``cmi_endpoint(adapter)`` serves the adapter's endpoint on
  loopback for the test (an :class:`Endpoint`);
- ``cmi_intermediary``: a factory: ``cmi_intermediary(adapter, "relay")`` is a
  :class:`~cmi_sdk.client.CMIClient` signed as a freshly registered intermediary;
- ``cmi_customer_store``: a customer's store on loopback that records what it receives
  (a :class:`RecordingStore`).

A firm's hooks, tested end to end in a few lines::

    def test_my_pricing(cmi_adapter, cmi_intermediary, cmi_customer_store):
        adapter = cmi_adapter(MyAirline())
        client = cmi_intermediary(adapter, "relay")
        answer = client.post_request(request_xml)
        assert answer.status_code == 200

:func:`link_customer` links an account to an intermediary as a customer would (a link
code, redeemed), for tests of what an intermediary receives.

The checks are plain functions too (:func:`assert_round_trip`,
:func:`assert_schema_valid`) for tests that do not use pytest fixtures::

    def test_my_statement_round_trips(cmi_adapter, cmi_round_trip):
        adapter = cmi_adapter(my_plugin)
        cmi_round_trip(adapter, my_transaction, standard="my-standard")
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from cmi_sdk._adapter import Adapter, ValidatedDocument
from cmi_sdk._exceptions import DocumentValidationError
from cmi_sdk._models import Link, SharingTerms, TermsProposal
from cmi_sdk._serving import serving
from cmi_sdk.client import CMIClient
from cmi_sdk.egress import EgressGuard
from cmi_sdk.receiver import CustomerStore, StoredDocument, running
from cmi_sdk.webhooks import generate_secret

__all__ = [
    "Endpoint",
    "RecordingStore",
    "adapter_factory",
    "assert_round_trip",
    "assert_schema_valid",
    "endpoint_factory",
    "link_customer",
    "make_adapter",
    "recording_store",
]


def make_adapter(*plugins: object, **options: Any) -> Adapter:
    """An adapter with the SDK's default plugins and ``plugins``, and no installed
    (entry-point) plugin: what a test of one plugin wants to see.

    ``options`` go to :class:`~cmi_sdk.Adapter` (``block=``, ``signer=``, ...). Its
    egress guard allows loopback destinations (a test's customer store is on loopback),
    unless ``egress`` says otherwise.
    """
    options.setdefault("entry_points", False)
    options.setdefault("egress", EgressGuard(allow_loopback=True))
    return Adapter(plugins=plugins, **options)


def assert_schema_valid(
    adapter: Adapter,
    xml: bytes,
    *,
    standard: str | None = None,
    document_type: str | None = None,
) -> ValidatedDocument:
    """Assert that ``xml`` passes the hardened parser and its document type's XSD.

    :return: the validated document (its ``standard`` and ``document_type`` say which).
    :raises AssertionError: with every located issue, one a line.
    """
    try:
        return adapter.validate(xml, standard=standard, document_type=document_type)
    except DocumentValidationError as exc:
        issues = "\n".join(f"  {issue}" for issue in exc.issues)
        raise AssertionError(f"not a valid {exc.standard} {exc.document_type}:\n{issues}") from None


def assert_round_trip(
    adapter: Adapter,
    model: BaseModel,
    *,
    standard: str,
    document_type: str | None = None,
) -> bytes:
    """Render ``model``, validate the result, parse it back, and assert it is ``model``.

    :return: the rendered document, for further checks.
    :raises AssertionError: the document is invalid, or parses to another model (the
        message names the fields that differ).
    """
    xml = adapter.render(model, standard=standard, document_type=document_type, validate=False)
    doc = assert_schema_valid(adapter, xml, standard=standard, document_type=document_type)
    back = doc.to_model()
    if back != model:
        before, after = model.model_dump(mode="json"), back.model_dump(mode="json")
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        raise AssertionError(
            f"{standard} {doc.document_type.name} does not round-trip; fields that differ: "
            + ", ".join(f"{k} ({before.get(k)!r} became {after.get(k)!r})" for k in changed)
        )
    return xml


def link_customer(adapter: Adapter, account: str, intermediary: str) -> Link:
    """Link the firm's ``account`` to ``intermediary`` the way a customer does: the firm
    makes a link code, the intermediary redeems it. The link's ``customer_ref`` is the
    intermediary's reference for the account; terms it registers for that reference get
    the documents the firm emits for the account."""
    code = adapter.create_link_code(account)
    return adapter.redeem_link_code(code.code, intermediary=intermediary)


def adapter_factory(directory: Path) -> Iterator[Callable[..., Adapter]]:
    """The ``cmi_adapter`` fixture: yields a factory of :func:`make_adapter` adapters whose
    store is a new SQLite file in ``directory`` (unless ``database_url`` or ``store`` is
    given), and closes every one made when resumed."""
    made: list[Adapter] = []

    def factory(*plugins: object, **options: Any) -> Adapter:
        if "store" not in options:
            options.setdefault("database_url", f"sqlite:///{directory}/firm-{len(made)}.db")
        adapter = make_adapter(*plugins, **options)
        made.append(adapter)
        return adapter

    yield factory
    for adapter in made:
        adapter.close()


class Endpoint:
    """A firm's endpoint served on loopback for a test (the ``cmi_endpoint`` fixture).

    :ivar adapter: the adapter it serves.
    :ivar url: its base URL, ``http://127.0.0.1:PORT`` (no trailing slash).
    :ivar http: an unsigned HTTP client of it (for ``/.well-known/cmi``, and for attacks).
    """

    def __init__(self, adapter: Adapter, url: str) -> None:
        self.adapter = adapter
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)
        self._clients: dict[str, CMIClient] = {}

    def intermediary(self, name: str = "relay") -> CMIClient:
        """A client signed as intermediary ``name``, registered with a fresh secret the
        first time it is asked for."""
        if name not in self._clients:
            secret = generate_secret()
            self.adapter.add_intermediary(name, secret)
            self._clients[name] = CMIClient(self.url, secret=secret, intermediary=name)
        return self._clients[name]

    def close(self) -> None:
        """Close the clients (the server is stopped by whoever started it)."""
        for client in self._clients.values():
            client.close()
        self.http.close()


def endpoint_factory() -> Iterator[Callable[..., Endpoint]]:
    """The ``cmi_endpoint`` fixture: yields a factory serving an adapter's endpoint (once
    per adapter), and stops every server when resumed."""
    with contextlib.ExitStack() as stack:
        served: dict[int, Endpoint] = {}

        def factory(adapter: Adapter, **app_options: Any) -> Endpoint:
            if id(adapter) not in served:
                url = stack.enter_context(serving(adapter.asgi_app(**app_options)))
                endpoint = Endpoint(adapter, url)
                stack.callback(endpoint.close)
                served[id(adapter)] = endpoint
            return served[id(adapter)]

        yield factory


class RecordingStore:
    """A customer's store on loopback that records each document it receives (the
    ``cmi_customer_store`` fixture): deliveries are verified and stored as a real store
    does (:class:`~cmi_sdk.receiver.CustomerStore`).

    :ivar url: the URL to give as the terms' destination.
    :ivar secret: the ``whsec_`` secret deliveries must be signed with.
    :ivar directory: where the documents are stored.
    :ivar documents: what arrived, in order (duplicates included, marked as such).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.secret = generate_secret()
        self.documents: list[StoredDocument] = []
        self.url = ""
        self._arrived = threading.Condition()
        self.store = CustomerStore(
            directory=directory, secrets=[self.secret], on_document=self._record
        )

    def _record(self, document: StoredDocument) -> None:
        with self._arrived:
            self.documents.append(document)
            self._arrived.notify_all()

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[StoredDocument]:
        """The documents, once at least ``count`` have arrived.

        :raises AssertionError: fewer arrived within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.documents) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{len(self.documents)} of {count} documents arrived in {timeout} s"
                        " (is a delivery worker running? adapter.delivery_worker().start())"
                    )
                self._arrived.wait(left)
            return list(self.documents)

    def register_terms(
        self,
        adapter: Adapter,
        customer_ref: str,
        *,
        standard: str = "cmi",
        intermediary: str | None = None,
        **fields: Any,
    ) -> SharingTerms:
        """Register terms that send ``customer_ref``'s documents here (``fields`` are the
        other fields of :class:`~cmi_sdk.TermsProposal`).

        :raises AssertionError: the firm's policy did not accept them as proposed."""
        data: dict[str, Any] = {
            "customer_ref": customer_ref,
            "destination": self.url,
            "secret": self.secret,
            "standard": standard,
            "purpose": {"code": "records", "text": "Keep my records"},
            **fields,
        }
        decision = adapter.propose_terms(
            TermsProposal.model_validate(data), intermediary=intermediary
        )
        if decision.outcome != "accepted" or decision.terms is None:
            raise AssertionError(f"the terms were {decision.outcome}: {decision.reason}")
        return decision.terms


@contextlib.contextmanager
def recording_store(directory: Path) -> Iterator[RecordingStore]:
    """A :class:`RecordingStore` in ``directory``, running on loopback for the block."""
    store = RecordingStore(directory)
    with running(store.store) as url:
        store.url = f"{url}inbox"
        yield store
