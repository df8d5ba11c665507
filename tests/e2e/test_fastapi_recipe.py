"""The FastAPI recipe of docs/integrate.md, run as written: the endpoint mounted under
/partners answers a signed request, the lifespan's delivery worker delivers what the firm
emits to a customer's store, and shutting the app down stops the worker and closes the
adapter."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cmi_sdk import Adapter, Request, Transaction, load_model
from cmi_sdk._serving import serving
from cmi_sdk.client import CMIClient
from cmi_sdk.receiver import CustomerStore, running
from cmi_sdk.signing import generate_development_keys
from cmi_sdk.webhooks import generate_secret
from tests.support import register

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "integrate.md"


def _recipe() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture
def recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The page's code run in a firm's folder, configured by CMI_* variables."""
    monkeypatch.chdir(tmp_path)
    key, cert = generate_development_keys(tmp_path / "keys", common_name="firm.example")
    for name in list(os.environ):
        if name.startswith("CMI_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CMI_DATABASE_URL", f"sqlite:///{tmp_path}/firm.db")
    monkeypatch.setenv("CMI_SIGNING_KEY", str(key))
    monkeypatch.setenv("CMI_SIGNING_CERT", str(cert))
    monkeypatch.setenv("CMI_ALLOW_LOOPBACK", "1")
    fastapi_block, _ = _recipe()
    namespace: dict[str, Any] = {"__name__": "firm_app"}
    exec(compile(fastapi_block, str(PAGE), "exec"), namespace)  # noqa: S102  (the docs' code)
    yield namespace
    namespace["adapter"].close()


def _delivery_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cmi-delivery-")]


@pytest.mark.slow
def test_the_fastapi_recipe_serves_delivers_and_shuts_down(
    recipe: dict[str, Any], tmp_path: Path
) -> None:
    adapter: Adapter = recipe["adapter"]
    secret = generate_secret()
    adapter.add_intermediary("relay", secret)
    store_secret = generate_secret()
    inbox = CustomerStore(directory=tmp_path / "inbox", secrets=[store_secret])
    before = len(_delivery_threads())
    with running(inbox) as inbox_url, serving(recipe["app"], lifespan=True) as base:
        assert len(_delivery_threads()) == before + 1  # started with the app
        assert httpx.get(f"{base}/health", timeout=5).json()["status"] == "ok"
        well_known = httpx.get(f"{base}/partners/.well-known/cmi", timeout=5).json()
        assert well_known["capabilities"]["requests"] == "/partners/cmi/requests"
        # An intermediary's signed request, through the mount.
        request = (ROOT / "examples" / "request.json").read_bytes()
        xml = adapter.render(load_model(Request, request), standard="cmi", document_type="request")
        with CMIClient(f"{base}/partners", secret=secret, intermediary="relay") as client:
            answer = client.post_request(xml)
        assert answer.status_code == 200, answer.text
        offers = adapter.parse(answer.content).offers
        assert str(offers[0].price) == "451.89 USD"
        # What the firm emits is delivered by the lifespan's worker.
        register(
            adapter,
            destination=inbox_url + "inbox",
            secret=store_secret,
            fields=["origin", "destination", "date", "total"],
        )
        ticket = load_model(Transaction, (ROOT / "examples" / "ticket.json").read_text())
        adapter.emit(ticket)
        deadline = time.monotonic() + 15
        while not list((tmp_path / "inbox").glob("*.xml")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list((tmp_path / "inbox").glob("*.xml")), "the worker delivered nothing"
    assert len(_delivery_threads()) == before  # stopped with the app


def test_the_starlette_variant_builds_the_same_app(recipe: dict[str, Any]) -> None:
    _, starlette_block = _recipe()
    exec(compile(starlette_block, str(PAGE), "exec"), recipe)  # noqa: S102
    app = recipe["app"]
    assert type(app).__name__ == "Starlette"
    assert app.router.lifespan_context is not None


def test_a_firm_answering_requests_without_pricing_is_told_at_once(tmp_path: Path) -> None:
    from cmi_sdk import Availability, ConfigurationError, hookimpl

    class CapacityOnly:
        @hookimpl
        def cmi_check_capacity(self) -> Availability | None:
            return None

    with pytest.raises(ConfigurationError) as info:
        Adapter(plugins=[CapacityOnly()], database_url=f"sqlite:///{tmp_path}/f.db")
    message = str(info.value)
    assert "cmi_revenue_decision or cmi_price" in message
    assert "no-revenue-decision, no-price" in message
    # An adapter that only emits documents needs neither.
    emitting = Adapter(database_url=f"sqlite:///{tmp_path}/e.db")
    assert emitting.missing_hooks() == []
    # A plugin registered later is checked on request.
    emitting.plugin_manager.register(CapacityOnly())
    assert emitting.missing_hooks() == ["cmi_revenue_decision", "cmi_price"]
    emitting.close()
