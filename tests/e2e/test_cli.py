"""The ``cmi`` command: its outputs, exit codes and error reports."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cmi_sdk import Transaction, load_model
from cmi_sdk.cli import EXIT_INTERNAL, EXIT_INVALID, EXIT_OK, EXIT_USAGE, main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TICKET_JSON = EXAMPLES / "ticket.json"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def ticket_file(tmp_path: Path) -> Path:
    path = tmp_path / "ticket.xml"
    assert main(["render", "--standard", "cmi-ticket", str(TICKET_JSON), "-o", str(path)]) == 0
    return path


def test_standards_lists_ticket(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "standards")
    assert code == EXIT_OK
    assert "cmi-ticket 1.0" in out
    assert "{urn:cmi:ticket:1.0}ticket" in out


def test_standards_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "standards", "--json")
    assert code == EXIT_OK
    listing = {s["name"]: s for s in json.loads(out)}
    assert [d["name"] for d in listing["cmi-ticket"]["document_types"]] == ["ticket"]


def test_render_validate_parse_round_trip(
    capsys: pytest.CaptureFixture[str], ticket_file: Path
) -> None:
    xml = ticket_file.read_text(encoding="utf-8")
    assert "<ticketnumber>12524057</ticketnumber>" in xml
    assert "<price>451.89</price>" in xml
    code, out, err = run(capsys, "validate", str(ticket_file))
    assert (code, err) == (EXIT_OK, "")
    assert "valid cmi-ticket ticket" in out
    code, out, _ = run(capsys, "parse", str(ticket_file))
    assert code == EXIT_OK
    assert load_model(Transaction, out) == load_model(Transaction, TICKET_JSON.read_text())


def test_render_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "render", "--standard", "cmi-ticket", str(TICKET_JSON))
    assert (code, err) == (EXIT_OK, "")
    assert out.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<ticket xmlns="urn:cmi:ticket')


def test_output_file_has_ordinary_permissions(ticket_file: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    assert ticket_file.stat().st_mode & 0o777 == 0o666 & ~umask


def test_validate_reports_line_path_reason(
    capsys: pytest.CaptureFixture[str], ticket_file: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text(ticket_file.read_text().replace("ATL", "atl").replace("<class>B", "<class>BB"))
    code, out, err = run(capsys, "validate", str(bad))
    assert code == EXIT_INVALID
    assert out == ""
    lines = err.splitlines()
    assert any(line.startswith(f"{bad}:4: ") and "origin" in line for line in lines)
    assert any("/ticket/class" in line and "pattern" in line for line in lines)
    assert "Traceback" not in err


def test_validate_checks_currency_digits(
    capsys: pytest.CaptureFixture[str], ticket_file: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text(ticket_file.read_text().replace("451.89", "451.891"))
    code, _, err = run(capsys, "validate", str(bad))
    assert code == EXIT_INVALID
    assert "more decimal places than USD allows (2)" in err


def test_validate_several_files_fails_if_one_does(
    capsys: pytest.CaptureFixture[str], ticket_file: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_bytes(b"<ticket>")
    code, out, err = run(capsys, "validate", str(ticket_file), str(bad))
    assert code == EXIT_INVALID
    assert "valid cmi-ticket ticket" in out
    assert f"{bad}:1: not well-formed XML" in err


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b'<!DOCTYPE t [<!ENTITY a "b">]><t>&a;</t>', "DOCTYPE"),
        (b"<x xmlns='urn:unknown'/>", "no installed standard"),
        (b"not xml", "not well-formed"),
    ],
)
def test_validate_refuses_hostile_or_unknown(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, payload: bytes, message: str
) -> None:
    path = tmp_path / "in.xml"
    path.write_bytes(payload)
    code, _, err = run(capsys, "validate", str(path))
    assert code == EXIT_INVALID
    assert message in err


def test_render_invalid_json_names_fields(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = json.loads(TICKET_JSON.read_text())
    data["total"]["amount"] = 451.89  # a JSON number: a float
    data["customer_ref"] = "jane@example.com"
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    out_file = tmp_path / "out.xml"
    code, out, err = run(capsys, "render", "-s", "cmi-ticket", str(path), "-o", str(out_file))
    assert code == EXIT_INVALID
    assert out == ""
    assert "total.amount: floats are refused" in err
    assert "customer_ref: must be a pseudonymous token" in err
    assert not out_file.exists()
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_render_model_the_type_cannot_express(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = json.loads(TICKET_JSON.read_text())
    data["kind"] = "purchase"
    del data["details"]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    code, out, err = run(capsys, "render", "-s", "cmi-ticket", str(path))
    assert (code, out) == (EXIT_INVALID, "")
    assert "made from a flight transaction" in err


def test_unreadable_input_is_invalid_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "render", "-s", "cmi-ticket", str(tmp_path / "missing.json"))
    assert code == EXIT_INVALID
    assert "cannot read" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["render", "--standard", "no-such-standard", str(TICKET_JSON)],
        ["render", "--standard", "cmi-ticket", "--type", "nope", str(TICKET_JSON)],
        ["render", str(TICKET_JSON)],
        ["validate", "--type", "ticket", "x.xml"],
        ["frobnicate"],
        [],
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors exit directly
        code = int(exc.code or 0)
    assert code == EXIT_USAGE
    assert "Traceback" not in capsys.readouterr().err


def test_block_removes_a_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--block", "cmi-ticket", "standards")
    assert code == EXIT_OK
    assert "cmi-ticket" not in out


def test_internal_errors_are_reported_without_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_adapter(**kwargs: object) -> None:
        raise RuntimeError("plugin bug")

    monkeypatch.setattr("cmi_sdk.cli._common.Adapter", broken_adapter)
    code, _, err = run(capsys, "standards")
    assert code == EXIT_INTERNAL
    assert "internal error: RuntimeError: plugin bug" in err
    assert "Traceback" not in err
    with pytest.raises(RuntimeError, match="plugin bug"):
        main(["--debug", "standards"])


def test_help_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    # In process: `python -m cmi_sdk.cli` itself is run by the README's tests.
    for argv in (["--help"], ["render", "--help"], ["validate", "--help"], ["parse", "--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        out, err = capsys.readouterr()
        assert done.value.code == 0, err
        assert "usage: cmi" in out
