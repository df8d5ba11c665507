"""cmi-sdk's pytest plugin, registered under pytest's ``pytest11`` entry point.

pytest loads it in every run in an environment where cmi-sdk is installed, whether the
tests use cmi-sdk or not, so it imports nothing of the SDK until a test asks for one of its
fixtures (the SDK takes longer to import than pytest itself). The fixtures and the helpers
behind them are documented in :mod:`cmi_sdk.testing`:

- ``cmi_adapter``: a factory of adapters with only the plugins given;
- ``cmi_round_trip``, ``cmi_schema_valid``: assertions on documents;
- ``cmi_endpoint``: a factory: the adapter's endpoint served on loopback for the test;
- ``cmi_intermediary``: a factory: a client signed as a registered intermediary;
- ``cmi_customer_store``: a customer's store on loopback that records what it receives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "cmi_adapter",
    "cmi_customer_store",
    "cmi_endpoint",
    "cmi_intermediary",
    "cmi_round_trip",
    "cmi_schema_valid",
]


@pytest.fixture
def cmi_adapter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Any]]:
    """A factory: ``cmi_adapter(plugin, ...)`` makes an adapter with only those plugins
    (and the SDK's defaults), its store in a temporary folder; each is closed after the
    test."""
    from cmi_sdk.testing import adapter_factory  # noqa: PLC0415  (lazy: see above)

    yield from adapter_factory(tmp_path_factory.mktemp("cmi"))


@pytest.fixture
def cmi_round_trip() -> Callable[..., bytes]:
    """:func:`cmi_sdk.testing.assert_round_trip` as a fixture."""
    from cmi_sdk.testing import assert_round_trip  # noqa: PLC0415

    return assert_round_trip


@pytest.fixture
def cmi_schema_valid() -> Callable[..., Any]:
    """:func:`cmi_sdk.testing.assert_schema_valid` as a fixture."""
    from cmi_sdk.testing import assert_schema_valid  # noqa: PLC0415

    return assert_schema_valid


@pytest.fixture
def cmi_endpoint() -> Iterator[Callable[..., Any]]:
    """A factory: ``cmi_endpoint(adapter)`` serves the adapter's endpoint on loopback for
    the test and returns a :class:`cmi_sdk.testing.Endpoint` (``url``, an ``http`` client,
    ``intermediary(name)`` for signed clients)."""
    from cmi_sdk.testing import endpoint_factory  # noqa: PLC0415

    yield from endpoint_factory()


@pytest.fixture
def cmi_intermediary(cmi_endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """A factory: ``cmi_intermediary(adapter, "relay")`` registers the intermediary with a
    fresh secret and returns a :class:`cmi_sdk.client.CMIClient` signed as it, to the
    adapter's endpoint (served for the test)."""

    def factory(adapter: Any, name: str = "relay") -> Any:
        return cmi_endpoint(adapter).intermediary(name)

    return factory


@pytest.fixture
def cmi_customer_store(tmp_path: Path) -> Iterator[Any]:
    """A customer's store on loopback that records each document it receives (a
    :class:`cmi_sdk.testing.RecordingStore`: ``url``, ``secret``, ``documents``,
    ``wait_for``, ``register_terms``)."""
    from cmi_sdk.testing import recording_store  # noqa: PLC0415

    with recording_store(tmp_path / "customer-store") as store:
        yield store
