"""Helpers for plugin authors' tests, shipped as a pytest plugin.

Installed with cmi-sdk, this module is registered under pytest's ``pytest11`` entry point,
so its fixtures are there in any test suite without an import:

- ``cmi_adapter``: a factory of adapters with only the plugins given (and the SDK's own
  defaults), so a test sees exactly the standard it is about;
- ``cmi_round_trip``: asserts that a model rendered as a document type validates and
  parses back to the same model;
- ``cmi_schema_valid``: asserts that bytes are a valid document of a given type.

:func:`link_customer` links an account to an intermediary as a customer would (a link
code, redeemed), for tests of what an intermediary receives.

The same checks are plain functions (:func:`assert_round_trip`,
:func:`assert_schema_valid`) for tests that do not use pytest fixtures::

    def test_my_statement_round_trips(cmi_adapter, cmi_round_trip):
        adapter = cmi_adapter(my_plugin)
        cmi_round_trip(adapter, my_transaction, standard="my-standard")
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from cmi_sdk._adapter import Adapter, ValidatedDocument
from cmi_sdk._exceptions import DocumentValidationError
from cmi_sdk._models import Link

__all__ = [
    "assert_round_trip",
    "assert_schema_valid",
    "cmi_adapter",
    "cmi_round_trip",
    "cmi_schema_valid",
    "link_customer",
    "make_adapter",
]


def make_adapter(*plugins: object, **options: Any) -> Adapter:
    """An adapter with the SDK's default plugins and ``plugins``, and no installed
    (entry-point) plugin: what a test of one plugin wants to see.

    ``options`` go to :class:`~cmi_sdk.Adapter` (``block=``, ``signer=``, ...).
    """
    options.setdefault("entry_points", False)
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


@pytest.fixture
def cmi_adapter() -> Iterator[Callable[..., Adapter]]:
    """A factory: ``cmi_adapter(plugin, ...)`` makes an adapter with only those plugins
    (and the SDK's defaults); every adapter made is closed after the test."""
    made: list[Adapter] = []

    def factory(*plugins: object, **options: Any) -> Adapter:
        adapter = make_adapter(*plugins, **options)
        made.append(adapter)
        return adapter

    yield factory
    for adapter in made:
        adapter.close()


@pytest.fixture
def cmi_round_trip() -> Callable[..., bytes]:
    """:func:`assert_round_trip` as a fixture."""
    return assert_round_trip


@pytest.fixture
def cmi_schema_valid() -> Callable[..., ValidatedDocument]:
    """:func:`assert_schema_valid` as a fixture."""
    return assert_schema_valid
