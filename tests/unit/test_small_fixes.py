"""The small things a newcomer tripped over, each kept fixed."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

from cmi_sdk import (
    Adapter,
    DestinationNotAllowedError,
    DocumentValidationError,
    EgressGuard,
    TermsError,
    TermsProposal,
    Transaction,
    load_model,
)
from cmi_sdk.cli import EXIT_OK, main
from cmi_sdk.webhooks import generate_secret

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "cmi-standard-example"


def test_the_example_plugin_readme_names_only_files_it_has() -> None:
    readme = (EXAMPLE / "README.md").read_text(encoding="utf-8")
    for block in re.findall(r"```sh\n(.*?)```", readme, flags=re.S):
        for name in re.findall(r"[\w./-]+\.json", block):
            assert (EXAMPLE / name).is_file(), name


def test_the_example_purchase_renders_as_a_receipt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    import cmi_standard_example.plugin as receipt

    adapter = Adapter(plugins=[receipt], entry_points=False, database_url="sqlite:///:memory:")
    purchase = load_model(Transaction, (EXAMPLE / "purchase.json").read_text())
    xml = adapter.render(purchase, standard="example-receipt")
    assert adapter.parse(xml) == purchase
    sys.modules.pop("cmi_standard_example.plugin", None)
    sys.modules.pop("cmi_standard_example", None)


def test_standards_keep_their_columns(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["standards"]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    names = [line for line in lines if "  from " in line]
    # Every "from" starts in one column, however long a name (UBL's RequestForQuotation).
    assert len({line.index("  from ") for line in names}) == 1
    assert any("RequestForQuotation  from Request" in line for line in names)
    assert all(len(line) <= 100 for line in lines if "root " not in line)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8900/inbox", "https://localhost/inbox", "http://localhost/x"]
)
def test_a_refused_loopback_destination_names_the_setting(url: str) -> None:
    with pytest.raises(DestinationNotAllowedError) as info:
        EgressGuard().check_url(url)
    assert "CMI_ALLOW_LOOPBACK=1" in str(info.value)


def test_terms_for_a_standard_without_choosable_fields_say_so(tmp_path: Path) -> None:
    adapter = Adapter(database_url=f"sqlite:///{tmp_path}/f.db")
    proposal = TermsProposal.model_validate(
        {
            "customer_ref": "cust-7f3a9c",
            "destination": "https://store.example/inbox",
            "secret": generate_secret(),
            "standard": "ofx",
            "fields": ["total"],
            "purpose": {"code": "records", "text": "Keep my bank records"},
        }
    )
    with pytest.raises(TermsError) as info:
        adapter.propose_terms(proposal)
    message = str(info.value)
    assert "shared whole" in message
    assert "(fields: )" not in message
    adapter.close()


def test_a_too_precise_price_points_at_the_price_element(tmp_path: Path) -> None:
    adapter = Adapter(database_url=f"sqlite:///{tmp_path}/f.db")
    ticket = load_model(Transaction, (ROOT / "examples" / "ticket.json").read_text())
    xml = adapter.render(ticket, standard="cmi-ticket").replace(b"451.89", b"451.899")
    with pytest.raises(DocumentValidationError) as info:
        adapter.validate(xml).to_model()
    (issue,) = info.value.issues
    assert issue.path == "/ticket/price"
    assert issue.line == xml.decode().splitlines().index("  <price>451.899</price>") + 1
    assert "451.899" in issue.reason
    adapter.close()


def test_a_document_of_an_unknown_standard_is_not_a_missing_route(tmp_path: Path) -> None:
    import time

    import httpx

    from cmi_sdk._serving import serving
    from cmi_sdk.client import signed_headers

    adapter = Adapter(database_url=f"sqlite:///{tmp_path}/f.db")
    secret = generate_secret()
    adapter.store.add_intermediary("relay", secret, at=time.time())
    body = b'<?xml version="1.0"?><request xmlns="urn:example:unknown:1"/>'
    headers: dict[str, Any] = signed_headers(
        secret=secret, method="POST", target="/cmi/requests", body=body, intermediary="relay"
    )
    headers["content-type"] = "application/xml"
    with serving(adapter.asgi_app()) as base:
        answer = httpx.post(f"{base}/cmi/requests", content=body, headers=headers, timeout=10)
    adapter.close()
    assert answer.status_code == 422
    problem = answer.json()
    assert problem["type"] == "urn:cmi:problem:unsupported-standard"
    assert "urn:example:unknown:1" in problem["detail"]
    assert "/.well-known/cmi" in problem["detail"]
