"""The Adapter façade: its plugin manager, default plugins, entry points and blocking."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import pytest

from cmi_sdk import (
    DEFAULT_PLUGINS,
    Adapter,
    ConfigurationError,
    MappingError,
    PluginError,
    Standard,
    StandardNotFoundError,
    StandardRegistry,
    Transaction,
    hookimpl,
    load_model,
)
from cmi_ticket.plugin import STANDARD as TICKET_STANDARD
from cmi_ticket.plugin import TICKET


def _plugin(*standards: Standard) -> object:
    """A plugin object whose cmi_register_standards adds ``standards``."""

    class Plugin:
        @hookimpl
        def cmi_register_standards(self, register: StandardRegistry) -> None:
            for standard in standards:
                register.add(standard)

    return Plugin()


def _ticket_copy(name: str, root: str) -> Standard:
    doc_type = dataclasses.replace(TICKET, root=root)
    return dataclasses.replace(TICKET_STANDARD, name=name, document_types=(doc_type,))


def test_default_and_entry_point_plugins() -> None:
    adapter = Adapter()
    assert adapter.plugin_names()[: len(DEFAULT_PLUGINS)] == [n for n, _ in DEFAULT_PLUGINS]
    assert "cmi-ticket" in adapter.plugin_names()
    assert {s.name for s in adapter.standards} >= {"cmi", "cmi-ticket"}


def test_each_adapter_owns_its_plugin_manager() -> None:
    a, b = Adapter(), Adapter(block=["cmi-ticket"])
    assert a.plugin_manager is not b.plugin_manager
    assert "cmi-ticket" in a.standards
    assert "cmi-ticket" not in b.standards


def test_entry_points_can_be_skipped() -> None:
    adapter = Adapter(entry_points=False)
    assert adapter.plugin_names() == [n for n, _ in DEFAULT_PLUGINS]
    with pytest.raises(StandardNotFoundError, match=r"installed: cmi\)"):
        adapter.standards.get("cmi-ticket")


def test_default_plugins_can_be_blocked_apart_from_the_core_vocabulary() -> None:
    adapter = Adapter(block=["cmi-defaults"])
    assert adapter.plugin_manager.get_plugin("cmi-defaults") is None
    assert "cmi" in adapter.standards
    with pytest.raises(ConfigurationError, match="cannot be blocked"):
        Adapter(block=["cmi"])


def test_cmi_register_standards_from_a_given_plugin(examples_dir: Path) -> None:
    copy = _ticket_copy("my-ticket", "{urn:example:my-ticket}ticket")
    adapter = Adapter(plugins=[_plugin(copy)])
    assert adapter.standards.get("my-ticket") is copy
    assert adapter.standards.for_root("{urn:example:my-ticket}ticket") == (
        copy,
        copy.document_types[0],
    )


def test_a_module_can_be_a_plugin() -> None:
    module = types.ModuleType("my_standards")

    @hookimpl
    def cmi_register_standards(register: StandardRegistry) -> None:
        register.add(_ticket_copy("from-module", "{urn:example:m}ticket"))

    module.cmi_register_standards = cmi_register_standards  # type: ignore[attr-defined]
    assert "from-module" in Adapter(plugins=[module]).standards


def test_a_standard_name_registered_twice_fails() -> None:
    clash = _ticket_copy("cmi-ticket", "{urn:example:other}ticket")
    with pytest.raises(PluginError, match="two plugins register a standard named 'cmi-ticket'"):
        Adapter(plugins=[_plugin(clash)])


def test_a_root_element_registered_twice_fails() -> None:
    clash = _ticket_copy("another", TICKET.root)
    # Later plugins are called first, so the given plugin claims the root and the
    # entry-point plugin's registration is the one refused.
    with pytest.raises(PluginError, match="of 'cmi-ticket' is already used by 'another'") as info:
        Adapter(plugins=[_plugin(clash)])
    assert info.value.plugin == "cmi-ticket"


def test_register_takes_only_standards() -> None:
    with pytest.raises(PluginError, match="takes a Standard"):
        Adapter(plugins=[_plugin("not a standard")])  # type: ignore[arg-type]


def test_unknown_cmi_hook_fails_check_pending() -> None:
    class Typo:
        @hookimpl
        def cmi_register_standard(self, register: StandardRegistry) -> None:
            """Misspelt: there is no such hook."""

    with pytest.raises(PluginError, match="cmi_register_standard"):
        Adapter(plugins=[Typo()])


def test_the_same_plugin_twice_fails() -> None:
    plugin = _plugin()
    with pytest.raises(PluginError, match="cannot register"):
        Adapter(plugins=[plugin, plugin])


def test_a_standard_needs_document_types() -> None:
    with pytest.raises(PluginError, match="no document types"):
        dataclasses.replace(TICKET_STANDARD, document_types=())


def test_render_checks_the_model_type(default_adapter: Adapter, examples_dir: Path) -> None:
    from cmi_sdk import Request

    request = load_model(Request, (examples_dir / "request.json").read_text())
    with pytest.raises(MappingError, match="made from a Transaction, not a Request"):
        default_adapter.render(request, standard="cmi-ticket")


def test_render_refuses_what_a_ticket_cannot_carry(
    default_adapter: Adapter, examples_dir: Path
) -> None:
    data = (examples_dir / "ticket.json").read_text()
    tx = load_model(Transaction, data)
    purchase = tx.model_copy(update={"kind": "purchase", "details": None})
    with pytest.raises(MappingError, match="flight transaction"):
        default_adapter.render(purchase, standard="cmi-ticket")


def test_several_document_types_need_a_name(default_adapter: Adapter, examples_dir: Path) -> None:
    from cmi_sdk import DocumentTypeNotFoundError

    tx = load_model(Transaction, (examples_dir / "ticket.json").read_text())
    with pytest.raises(DocumentTypeNotFoundError, match="choose one of transaction, request"):
        default_adapter.render(tx, standard="cmi")
