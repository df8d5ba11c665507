"""What keeps the documented commands from expiring: dates relative to now, and what a
request file leaves out filled in at send time."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import pytest

from cmi_sdk import Request, load_model
from cmi_sdk.cli import EXIT_OK, main
from cmi_sdk.cli._common import InputError, UsageError, _until
from cmi_sdk.cli.requests import _filled_in, travel_date

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = (ROOT / "examples" / "request.json").read_bytes()


def test_travel_dates_are_dates_or_days_from_today() -> None:
    today = dt.date(2031, 2, 27)
    assert travel_date("+30d", today=today) == dt.date(2031, 3, 29)
    assert travel_date("+1", today=today) == dt.date(2031, 2, 28)
    assert travel_date("2031-05-01", today=today) == dt.date(2031, 5, 1)
    for bad in ("30d", "-3d", "+d", "tomorrow", "2031-02-30"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a date"):
            travel_date(bad, today=today)


def test_the_example_request_has_no_deadline_to_pass() -> None:
    assert "respond_by" not in json.loads(EXAMPLE)


def test_a_request_file_may_leave_out_its_id_and_time() -> None:
    data = json.loads(EXAMPLE)
    del data["id"], data["created_at"]
    before = dt.datetime.now(dt.UTC)
    first = load_model(Request, _filled_in("r.json", json.dumps(data).encode(), None))
    second = load_model(Request, _filled_in("r.json", json.dumps(data).encode(), None))
    assert first.id != second.id  # each send a new request
    assert first.created_at >= before - dt.timedelta(seconds=1)


def test_a_request_file_keeps_what_it_gives() -> None:
    # Sent again, the same file is the same request (a retry), but for --date.
    filled = _filled_in("r.json", EXAMPLE, dt.date(2031, 3, 29))
    original = json.loads(EXAMPLE)
    assert filled["id"] == original["id"]
    assert filled["created_at"] == original["created_at"]
    assert filled["wanted"] == {**original["wanted"], "date": "2031-03-29"}


def test_date_applies_only_to_flights() -> None:
    loan = {"kind": "loan", "wanted": {"principal": {"amount": "1", "currency": "USD"}}}
    with pytest.raises(UsageError, match="flight request"):
        _filled_in("r.json", json.dumps(loan).encode(), dt.date(2031, 1, 1))


def test_a_request_file_that_is_not_json_is_refused() -> None:
    with pytest.raises(InputError, match=r"r\.json: not JSON"):
        _filled_in("r.json", b"{nope", None)
    with pytest.raises(InputError, match="JSON object"):
        _filled_in("r.json", b"[1]", None)


def test_terms_may_lapse_days_from_now() -> None:
    until = _until("+365d")
    assert until is not None
    lapse = dt.datetime.fromisoformat(until)
    assert dt.timedelta(days=364) < lapse - dt.datetime.now(dt.UTC) <= dt.timedelta(days=365)
    assert _until("2031-12-31") == "2031-12-31T00:00:00+00:00"


def test_render_signs_with_the_configured_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["keys", "generate", "k"]) == EXIT_OK
    monkeypatch.setenv("CMI_SIGNING_KEY", "k/key.pem")
    monkeypatch.setenv("CMI_SIGNING_CERT", "k/cert.pem")
    ticket = str(ROOT / "examples" / "ticket.json")
    assert main(["render", "--sign", "-s", "cmi-ticket", ticket, "-o", "t.xml"]) == EXIT_OK
    assert main(["verify", "t.xml", "--cert", "k/cert.pem"]) == EXIT_OK
    assert main(["render", "-s", "cmi-ticket", ticket, "-o", "plain.xml"]) == EXIT_OK
    assert b"Signature" in (tmp_path / "t.xml").read_bytes()
    assert b"Signature" not in (tmp_path / "plain.xml").read_bytes()
    capsys.readouterr()
