"""The endpoint describes itself where it is mounted: ``/.well-known/cmi`` links carry the
mount prefix, and ``/cmi/openapi.json`` is a valid OpenAPI 3.1 document of every route."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from cmi_sdk import Adapter
from cmi_sdk._serving import serving
from tests.support import signer


@pytest.fixture
def adapter(tmp_path: Path) -> Iterator[Adapter]:
    made = Adapter(database_url=f"sqlite:///{tmp_path}/firm.db", signer=signer())
    yield made
    made.close()


def _get(base: str, path: str) -> Any:
    response = httpx.get(base + path, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_mounted_under_a_prefix_every_link_carries_it(adapter: Adapter) -> None:
    host = Starlette(routes=[Mount("/partners", app=adapter.asgi_app())])
    with serving(host) as base:
        well_known = _get(base, "/partners/.well-known/cmi")
        links = {k: v for k, v in well_known["capabilities"].items() if k != "timings"}
        assert links["requests"] == "/partners/cmi/requests"
        assert links["openapi"] == "/partners/cmi/openapi.json"
        assert all(v.startswith("/partners/cmi/") for v in links.values()), links
        spec = _get(base, links["openapi"])
    assert spec["servers"] == [{"url": "/partners"}]
    validate(spec)  # a real OpenAPI 3.1 validator, with the JSON Schema of every part


def test_served_alone_the_links_have_no_prefix(adapter: Adapter) -> None:
    with serving(adapter.asgi_app()) as base:
        well_known = _get(base, "/.well-known/cmi")
        assert well_known["capabilities"]["terms"] == "/cmi/terms"
        spec = _get(base, "/cmi/openapi.json")
    assert spec["openapi"] == "3.1.0"
    assert spec["servers"] == [{"url": "/"}]
    validate(spec)


@pytest.mark.parametrize("metrics", [False, True])
@pytest.mark.slow
def test_every_route_and_method_is_described(adapter: Adapter, metrics: bool) -> None:
    app = adapter.asgi_app(metrics=metrics)
    served = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    with serving(app) as base:
        spec = _get(base, "/cmi/openapi.json")
    described = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert described == served
    validate(spec)
    # Each signed route says how it is signed, and every refusal is a known problem type.
    problem_types = set(spec["components"]["schemas"]["Problem"]["properties"]["type"]["enum"])
    assert "urn:cmi:problem:request-conflict" in problem_types
    signed = spec["paths"]["/cmi/requests"]["post"]
    assert signed["security"] == [{"webhookSignature": []}]
    assert "409" in signed["responses"]


def test_an_invalid_description_would_be_caught() -> None:
    """The validator refuses what is not OpenAPI 3.1: the test above can fail."""
    from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

    with pytest.raises(OpenAPIValidationError):
        validate({"openapi": "3.1.0", "info": {"title": "x"}, "paths": {}})
