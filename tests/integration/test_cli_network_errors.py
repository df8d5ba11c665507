"""``cmi request`` and ``cmi accept`` when the firm cannot be reached, or what answers is not
the firm's endpoint: exit 1, the URL, the cause, and a hint where one helps; never an
"internal error" of the SDK."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from cmi_sdk import Adapter
from cmi_sdk._serving import serving
from cmi_sdk.cli import EXIT_INVALID, EXIT_USAGE, main
from cmi_sdk.webhooks import generate_secret

ROOT = Path(__file__).resolve().parents[2]
REQUEST = str(ROOT / "examples" / "request.json")


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "relay.secret"
    path.write_text(generate_secret() + "\n")
    path.chmod(0o600)
    return str(path)


def _request(capsys: pytest.CaptureFixture[str], to: str, secret_file: str) -> tuple[int, str]:
    code = main(
        ["request", REQUEST, "--to", to, "--intermediary", "relay", "--secret-file", secret_file]
    )
    out = capsys.readouterr()
    return code, out.err


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: nothing listens there


@pytest.fixture
def firm_under_prefix(tmp_path: Path) -> Iterator[str]:
    """A firm's app with the CMI endpoint mounted under /partners; yields the host's base."""
    adapter = Adapter(database_url=f"sqlite:///{tmp_path}/firm.db")

    async def home(_: Request) -> Response:
        return PlainTextResponse("the firm's own app")

    app = Starlette(routes=[Route("/", home), Mount("/partners", app=adapter.asgi_app())])
    try:
        with serving(app) as base:
            yield base
    finally:
        adapter.close()


def test_nothing_listening_is_named_with_the_url(
    capsys: pytest.CaptureFixture[str], secret_file: str
) -> None:
    port = _closed_port()
    code, err = _request(capsys, f"http://127.0.0.1:{port}", secret_file)
    assert code == EXIT_INVALID
    assert f"cannot reach http://127.0.0.1:{port}/cmi/requests" in err
    assert "connection was refused" in err
    assert "internal error" not in err


def test_acceptance_to_nothing_listening_too(
    capsys: pytest.CaptureFixture[str], secret_file: str
) -> None:
    port = _closed_port()
    code = main(
        [
            "accept",
            "off_0123456789abcdef0123",
            "--customer",
            "cust-7f3a9c",
            "--to",
            f"http://127.0.0.1:{port}",
            "--intermediary",
            "relay",
            "--secret-file",
            secret_file,
        ]
    )
    err = capsys.readouterr().err
    assert code == EXIT_INVALID
    assert f"http://127.0.0.1:{port}/cmi/offers/off_0123456789abcdef0123/acceptance" in err


def test_a_tls_failure_is_named(
    capsys: pytest.CaptureFixture[str], secret_file: str, firm_under_prefix: str
) -> None:
    # https to a server that speaks plain http: the handshake fails.
    to = firm_under_prefix.replace("http://", "https://") + "/partners"
    code, err = _request(capsys, to, secret_file)
    assert code == EXIT_INVALID
    assert "TLS handshake failed" in err
    assert f"{to}/cmi/requests" in err


def test_a_missing_mount_prefix_gets_a_hint(
    capsys: pytest.CaptureFixture[str], secret_file: str, firm_under_prefix: str
) -> None:
    code, err = _request(capsys, firm_under_prefix, secret_file)
    assert code == EXIT_INVALID
    assert f"{firm_under_prefix}/cmi/requests answered 404 Not Found, not a CMI answer" in err
    assert "--to https://firm.example/partners" in err
    assert ": : Not Found" not in err


def test_a_wrong_prefix_at_the_endpoint_gets_the_hint_too(
    capsys: pytest.CaptureFixture[str], secret_file: str, firm_under_prefix: str
) -> None:
    code, err = _request(capsys, f"{firm_under_prefix}/partners/v2", secret_file)
    assert code == EXIT_INVALID
    assert "answered 404" in err
    assert "give it in --to" in err


def test_the_right_prefix_reaches_the_endpoint(
    capsys: pytest.CaptureFixture[str], secret_file: str, firm_under_prefix: str
) -> None:
    # The intermediary is not registered: the endpoint's own refusal, named as such.
    code, err = _request(capsys, f"{firm_under_prefix}/partners", secret_file)
    assert code == EXIT_INVALID
    assert "the firm answered 401 Unauthorized bad-signature" in err
    assert "--to" not in err


def test_not_a_url_is_a_usage_error(capsys: pytest.CaptureFixture[str], secret_file: str) -> None:
    code, err = _request(capsys, "firm.example", secret_file)
    assert code == EXIT_USAGE
    assert "is not an http(s) URL" in err
