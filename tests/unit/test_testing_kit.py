"""The pytest plugin for plugin authors: fixtures and assertions that can fail."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import cmi_ticket.plugin
from cmi_sdk import Adapter, Transaction, load_model
from cmi_sdk.testing import assert_round_trip, assert_schema_valid, make_adapter

ROOT = Path(__file__).resolve().parents[2]
TICKET = load_model(Transaction, (ROOT / "examples" / "ticket.json").read_text())

pytest_plugins = ["pytester"]


def test_make_adapter_sees_only_the_plugins_given() -> None:
    bare = make_adapter()
    assert "cmi-ticket" not in bare.standards  # installed, but not asked for
    assert "cmi" in bare.standards  # the SDK's own defaults are there
    assert "cmi-ticket" in make_adapter(cmi_ticket.plugin).standards


def test_round_trip_passes_and_returns_the_document() -> None:
    xml = assert_round_trip(make_adapter(cmi_ticket.plugin), TICKET, standard="cmi-ticket")
    assert b"<ticketnumber>12524057</ticketnumber>" in xml


def test_round_trip_fails_and_names_the_field() -> None:
    class Lossy:
        """A standard whose parser drops the seat: the kind of bug the kit catches."""

        from cmi_sdk import hookimpl

        @hookimpl
        def cmi_register_standards(self, register: object) -> None:
            import dataclasses

            from cmi_ticket.plugin import STANDARD, TICKET, ticket_from_xml

            def lossy(root: object) -> Transaction:
                tx = ticket_from_xml(root)  # type: ignore[arg-type]
                details = tx.details.model_copy(update={"seat": None})  # type: ignore[union-attr]
                return tx.model_copy(update={"details": details})

            doc = dataclasses.replace(TICKET, from_xml=lossy)
            std = dataclasses.replace(STANDARD, name="lossy", document_types=(doc,))
            register.add(std)  # type: ignore[attr-defined]

    adapter = make_adapter(Lossy())
    with pytest.raises(AssertionError, match="fields that differ: details"):
        # the lossy standard's XSD is the ticket's, so the document itself validates
        assert_round_trip(adapter, TICKET, standard="lossy")


def test_schema_valid_fails_with_located_issues() -> None:
    adapter = make_adapter(cmi_ticket.plugin)
    good = adapter.render(TICKET, standard="cmi-ticket")
    assert assert_schema_valid(adapter, good).document_type.name == "ticket"
    bad = good.replace(b"<origin>ATL", b"<origin>atl")
    with pytest.raises(AssertionError, match=r"not a valid cmi-ticket ticket:\n  line 4: .*origin"):
        assert_schema_valid(adapter, bad)


@pytest.mark.slow
def test_the_fixtures_are_there_without_an_import(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import cmi_ticket.plugin

        def test_uses_fixtures(cmi_adapter, cmi_round_trip, cmi_schema_valid):
            from pathlib import Path
            from cmi_sdk import Transaction, load_model
            adapter = cmi_adapter(cmi_ticket.plugin)
            tx = load_model(Transaction, Path({!r}).read_text())
            xml = cmi_round_trip(adapter, tx, standard="cmi-ticket")
            assert cmi_schema_valid(adapter, xml).standard.name == "cmi-ticket"
        """.format(str(ROOT / "examples" / "ticket.json"))
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_fixture_factory_type(cmi_adapter: Callable[..., Adapter]) -> None:
    assert isinstance(cmi_adapter(), Adapter)
