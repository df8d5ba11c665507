"""The core vocabulary cannot be blocked, and the reference firms are found as plugins.

The SDK speaks the ``cmi`` standard itself (requests, offers, acceptances, terms): an adapter
built with ``block=["cmi"]`` used to construct and then fail at the first request, deep in a
hook call. It is refused at construction, with the reason. The reference airline and lender
are found through the ``cmi_sdk.reference_firms`` entry-point group, not imported by name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cmi_sdk import Adapter, ConfigurationError
from cmi_sdk._reference import REFERENCE_FIRMS_GROUP, reference_firms

PACKAGE = Path(__file__).resolve().parents[2] / "cmi_sdk"


@pytest.mark.parametrize("block", [["cmi"], ["cmi-ticket", "cmi"]])
def test_blocking_the_core_vocabulary_is_refused_at_construction(block: list[str]) -> None:
    with pytest.raises(ConfigurationError, match=r"'cmi'.*cannot be blocked"):
        Adapter(block=block, entry_points=False)


def test_the_command_line_refuses_it_too(capsys: pytest.CaptureFixture[str]) -> None:
    from cmi_sdk.cli import EXIT_INVALID, main

    assert main(["--block", "cmi", "standards"]) == EXIT_INVALID
    assert "cannot be blocked" in capsys.readouterr().err


def test_other_default_plugins_stay_blockable() -> None:
    adapter = Adapter(block=["cmi-defaults", "cmi-ticket"])
    assert adapter.plugin_manager.get_plugin("cmi-defaults") is None
    assert "cmi" in adapter.standards
    assert "cmi-ticket" not in adapter.standards


def test_no_core_module_imports_a_reference_firm() -> None:
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            importers.extend(
                f"{path.relative_to(PACKAGE.parent)}: {name}"
                for name in names
                if name.split(".")[0] in {"cmi_airline", "cmi_lender"}
            )
    assert importers == []


def test_reference_firms_come_from_the_entry_point_group(tmp_path: Path) -> None:
    firms = reference_firms(tmp_path, firm="firm.example")
    assert set(firms) >= {"airline", "lender"}
    assert type(firms["airline"]).__module__.startswith("cmi_airline")
    assert type(firms["lender"]).__module__.startswith("cmi_lender")
    assert (tmp_path / "airline.db").exists()
    assert REFERENCE_FIRMS_GROUP == "cmi_sdk.reference_firms"


def test_a_missing_reference_firm_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"no reference firm 'bank'"):
        reference_firms(tmp_path, firm="firm.example", names=("airline", "bank"))
