"""The customer's store: real deliveries over loopback HTTP, every refusal, dedup, durability."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cmi_sdk import ConfigurationError
from cmi_sdk.receiver import CustomerStore, StoredDocument, format_line, running, serve
from cmi_sdk.signing import DocumentSigner, self_signed_certificate
from cmi_sdk.webhooks import WebhookSigner, generate_secret

ROOT = Path(__file__).resolve().parents[2]
XML = b'<?xml version="1.0" encoding="UTF-8"?>\n<note>hello</note>\n'


def _signer() -> DocumentSigner:
    key = ec.generate_private_key(ec.SECP256R1())
    return DocumentSigner(key=key, certificate=self_signed_certificate(key))


def _pem(signer: DocumentSigner) -> bytes:
    return signer.certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def firm() -> DocumentSigner:
    return _signer()


@dataclass
class Harness:
    """One test's client, secret, inbox and record of on_document calls."""

    client: httpx.Client
    secret: str
    inbox: Path
    seen: list[StoredDocument] = field(default_factory=list)

    def store(self, **options: Any) -> CustomerStore:
        return CustomerStore(
            directory=self.inbox, secrets=[self.secret], on_document=self.seen.append, **options
        )

    def deliver(
        self,
        url: str,
        body: bytes = XML,
        *,
        msg_id: str = "msg_1",
        content_type: str = "application/xml",
        timestamp: int | None = None,
        secret: str | None = None,
    ) -> httpx.Response:
        signer = WebhookSigner(secret=secret or self.secret)
        headers = signer.headers(msg_id, body, timestamp=timestamp)
        if content_type:
            headers["content-type"] = content_type
        return self.client.post(url, content=body, headers=headers)

    def files(self) -> list[str]:
        return _files(self.inbox)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    # The inbox is not created here: the store makes it. Anything else appearing in
    # tmp_path would be a file written outside it.
    # trust_env=False: a proxy set in the environment must not see loopback traffic.
    with httpx.Client(trust_env=False, timeout=10) as client:
        yield Harness(client=client, secret=generate_secret(), inbox=tmp_path / "inbox")


@pytest.fixture
def url(h: Harness) -> Iterator[str]:
    with running(h.store()) as base:
        yield base


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def _assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, object]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, object] = response.json()
    assert problem["type"] == f"urn:cmi:problem:{slug}"
    assert problem["status"] == status
    assert problem["title"]
    assert problem["detail"]
    return problem


# --- accepted deliveries ---------------------------------------------------------------


def test_a_valid_delivery_is_stored_byte_for_byte_with_its_metadata(h: Harness, url: str) -> None:
    before = datetime.datetime.now(datetime.UTC)
    response = h.deliver(url + "inbox", msg_id="msg_abc")
    assert response.status_code == 200
    assert response.json() == {"status": "stored", "webhook_id": "msg_abc", "size": len(XML)}
    assert h.files() == ["msg_abc.json", "msg_abc.xml"]
    assert (h.inbox / "msg_abc.xml").read_bytes() == XML
    meta = json.loads((h.inbox / "msg_abc.json").read_text())
    assert set(meta) == {
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "content-type",
        "received_at",
        "size",
        "signature_verified",
    }
    assert meta["webhook-id"] == "msg_abc"
    assert meta["webhook-timestamp"] == response.request.headers["webhook-timestamp"]
    assert meta["webhook-signature"] == response.request.headers["webhook-signature"]
    assert meta["content-type"] == "application/xml"
    assert meta["size"] == len(XML)
    assert meta["signature_verified"] is None
    assert meta["received_at"].endswith("Z")
    received = datetime.datetime.fromisoformat(meta["received_at"])
    assert before <= received <= datetime.datetime.now(datetime.UTC)
    assert h.seen == [
        StoredDocument(
            webhook_id="msg_abc",
            path=h.inbox / "msg_abc.xml",
            size=len(XML),
            received_at=received,
            signature_verified=None,
            duplicate=False,
        )
    ]
    assert format_line(h.seen[0]) == f"stored msg_abc {len(XML)} bytes signature not checked"


def test_any_of_the_rotated_secrets_is_accepted(h: Harness) -> None:
    old = generate_secret()
    store = CustomerStore(directory=h.inbox, secrets=[old, h.secret])
    with running(store) as url:
        assert h.deliver(url, msg_id="a", secret=old).status_code == 200
        assert h.deliver(url, msg_id="b").status_code == 200
    assert store.documents() == ["a", "b"]


@pytest.mark.parametrize("content_type", ["application/xml; charset=utf-8", "Application/XML"])
def test_content_type_parameters_and_case_do_not_matter(
    h: Harness, url: str, content_type: str
) -> None:
    assert h.deliver(url, content_type=content_type).status_code == 200
    assert json.loads((h.inbox / "msg_1.json").read_text())["content-type"] == content_type


def test_a_body_of_exactly_max_bytes_is_accepted(h: Harness) -> None:
    with running(h.store(max_bytes=len(XML))) as url:
        assert h.deliver(url).status_code == 200


# --- duplicates ------------------------------------------------------------------------


def _snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {
        name: ((directory / name).stat().st_mtime_ns, (directory / name).read_bytes())
        for name in _files(directory)
    }


def test_a_duplicate_is_answered_200_and_never_rewritten(h: Harness, url: str) -> None:
    assert h.deliver(url).status_code == 200
    before = _snapshot(h.inbox)
    # Even a different body under the same id: the id names the message.
    response = h.deliver(url, b"<note>changed</note>")
    assert response.status_code == 200
    assert response.json()["status"] == "duplicate"
    assert _snapshot(h.inbox) == before
    assert [doc.duplicate for doc in h.seen] == [False, True]
    assert h.seen[1].path == h.inbox / "msg_1.xml"
    assert format_line(h.seen[1]) == "duplicate msg_1 (already stored)"


def test_concurrent_deliveries_of_one_id_store_it_once(h: Harness, url: str) -> None:
    workers = 8
    barrier = threading.Barrier(workers, timeout=10)
    headers = WebhookSigner(secret=h.secret).headers("msg_race", XML)
    headers["content-type"] = "application/xml"

    def post(_: int) -> httpx.Response:
        barrier.wait()
        return h.client.post(url, content=XML, headers=headers)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        responses = list(pool.map(post, range(workers)))
    assert [r.status_code for r in responses] == [200] * workers
    assert sorted(r.json()["status"] for r in responses) == ["duplicate"] * 7 + ["stored"]
    assert h.files() == ["msg_race.json", "msg_race.xml"]
    assert (h.inbox / "msg_race.xml").read_bytes() == XML
    assert sorted(doc.duplicate for doc in h.seen) == [False] + [True] * 7


def test_a_json_left_without_its_xml_is_replaced_by_the_retry(h: Harness, url: str) -> None:
    # What a crash between the two renames leaves behind: the retry must store the document.
    (h.inbox / "msg_1.json").write_text("{}")
    assert h.deliver(url).json()["status"] == "stored"
    assert (h.inbox / "msg_1.xml").read_bytes() == XML
    assert json.loads((h.inbox / "msg_1.json").read_text())["webhook-id"] == "msg_1"


# --- refusals --------------------------------------------------------------------------


def test_a_wrong_secret_is_401_and_nothing_is_written(h: Harness, url: str) -> None:
    response = h.deliver(url, secret=generate_secret())
    problem = _assert_problem(response, 401, "unauthorized")
    assert problem["detail"] == "no valid signature"
    assert h.secret.removeprefix("whsec_") not in response.text
    assert h.files() == []
    assert h.seen == []


def test_a_body_changed_after_signing_is_401(h: Harness, url: str) -> None:
    headers = WebhookSigner(secret=h.secret).headers("msg_1", XML)
    headers["content-type"] = "application/xml"
    response = h.client.post(url, content=XML.replace(b"hello", b"HELLO"), headers=headers)
    _assert_problem(response, 401, "unauthorized")
    assert h.files() == []


def test_missing_webhook_headers_are_401(h: Harness, url: str) -> None:
    response = h.client.post(url, content=XML, headers={"content-type": "application/xml"})
    problem = _assert_problem(response, 401, "unauthorized")
    assert "missing" in str(problem["detail"])
    assert h.files() == []


def test_a_webhook_header_sent_twice_is_401(h: Harness, url: str) -> None:
    signer = WebhookSigner(secret=h.secret)
    headers = [*signer.headers("msg_1", XML).items(), ("content-type", "application/xml")]
    headers.append(("webhook-id", "msg_2"))
    problem = _assert_problem(h.client.post(url, content=XML, headers=headers), 401, "unauthorized")
    assert "once" in str(problem["detail"])
    assert h.files() == []


def test_a_stale_timestamp_is_401(h: Harness, url: str) -> None:
    response = h.deliver(url, timestamp=int(time.time()) - 3600)
    problem = _assert_problem(response, 401, "unauthorized")
    assert "clock" in str(problem["detail"])
    assert h.files() == []


@pytest.mark.parametrize("msg_id", ["a/b", "/etc/passwd", "a\\b", "a%2Fb", "é", "x" * 129])
def test_an_id_that_cannot_be_a_file_name_is_400_and_nothing_is_written(
    h: Harness, url: str, tmp_path: Path, msg_id: str
) -> None:
    # Validly signed, so it is the id rule that refuses it, not the signature check.
    headers = WebhookSigner(secret=h.secret).headers(msg_id, XML)
    headers["content-type"] = "application/xml"
    # As bytes: httpx refuses non-ASCII str headers; Starlette decodes them as latin-1.
    encoded = {k.encode(): v.encode("latin-1") for k, v in headers.items()}
    response = h.client.post(url, content=XML, headers=encoded)
    _assert_problem(response, 400, "invalid-webhook-id")
    assert _files(tmp_path) == ["inbox"]
    assert h.seen == []


def test_a_dotted_traversal_id_is_refused_before_it_can_be_used(
    h: Harness, url: str, tmp_path: Path
) -> None:
    # WebhookSigner will not sign "../x", so sign it by hand: the scheme's own id rule
    # refuses it, and nothing is written anywhere.
    msg_id, timestamp = "../x", int(time.time())
    key = base64.b64decode(h.secret.removeprefix("whsec_"))
    content = f"{msg_id}.{timestamp}.".encode() + XML
    signature = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": f"v1,{signature}",
        "content-type": "application/xml",
    }
    _assert_problem(h.client.post(url, content=XML, headers=headers), 401, "unauthorized")
    assert _files(tmp_path) == ["inbox"]


def test_a_body_over_max_bytes_is_413(h: Harness) -> None:
    with running(h.store(max_bytes=len(XML) - 1)) as url:
        _assert_problem(h.deliver(url), 413, "too-large")
    assert h.files() == []


def test_a_chunked_body_is_counted_as_it_streams(h: Harness) -> None:
    body = b"<a>" + b"x" * 2000 + b"</a>"
    headers = WebhookSigner(secret=h.secret).headers("msg_1", body)
    headers["content-type"] = "application/xml"

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 200):
            yield body[start : start + 200]

    with running(h.store(max_bytes=1024)) as url:
        response = h.client.post(url, content=chunks(), headers=headers)
    assert "content-length" not in response.request.headers
    _assert_problem(response, 413, "too-large")
    assert h.files() == []


def test_a_declared_length_over_max_bytes_is_413_before_the_body_is_sent(h: Harness) -> None:
    with running(h.store(max_bytes=1024)) as url:
        port = httpx.URL(url).port
        assert port is not None
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"POST / HTTP/1.1\r\nHost: store\r\nContent-Type: application/xml\r\n"
                b"Content-Length: 1000000000\r\n\r\n"
            )
            received = b""
            for _ in range(100):
                chunk = sock.recv(4096)
                received += chunk
                if not chunk or b"\r\n\r\n" in received:
                    break
    assert received.startswith(b"HTTP/1.1 413 ")
    assert h.files() == []


@pytest.mark.parametrize("content_type", ["application/json", "text/xml", "xml", ""])
def test_another_content_type_is_415(h: Harness, url: str, content_type: str) -> None:
    _assert_problem(h.deliver(url, content_type=content_type), 415, "unsupported-media-type")
    assert h.files() == []


def test_only_post_delivers(h: Harness, url: str) -> None:
    response = h.client.get(url)
    _assert_problem(response, 405, "method-not-allowed")
    assert "POST" in response.headers["allow"]


# --- XML-DSig --------------------------------------------------------------------------


@pytest.fixture
def signed_url(h: Harness, firm: DocumentSigner) -> Iterator[str]:
    with running(h.store(certificate=_pem(firm))) as base:
        yield base


def test_a_signed_document_is_verified_against_the_pinned_certificate(
    h: Harness, signed_url: str, firm: DocumentSigner, ticket_xml: bytes
) -> None:
    signed = firm.sign(ticket_xml)
    assert h.deliver(signed_url, signed).status_code == 200
    assert (h.inbox / "msg_1.xml").read_bytes() == signed
    assert json.loads((h.inbox / "msg_1.json").read_text())["signature_verified"] is True
    assert h.seen[0].signature_verified is True
    assert format_line(h.seen[0]) == f"stored msg_1 {len(signed)} bytes signature verified"


def test_a_tampered_document_is_422_and_nothing_is_written(
    h: Harness, signed_url: str, firm: DocumentSigner, ticket_xml: bytes
) -> None:
    signed = firm.sign(ticket_xml)
    tampered = signed.replace(b"12524057", b"12524058")
    assert tampered != signed
    # The delivery itself is authentic: the sender signed the tampered bytes.
    _assert_problem(h.deliver(signed_url, tampered), 422, "document-signature")
    assert h.files() == []
    assert h.seen == []


@pytest.mark.parametrize("case", ["unsigned", "another signer"])
def test_a_document_not_signed_by_the_firm_is_422(
    h: Harness, signed_url: str, ticket_xml: bytes, case: str
) -> None:
    body = ticket_xml if case == "unsigned" else _signer().sign(ticket_xml)
    _assert_problem(h.deliver(signed_url, body), 422, "document-signature")
    assert h.files() == []


@pytest.mark.parametrize(
    "body", [b"<a>", b'<!DOCTYPE a [<!ENTITY e "x">]><a>&e;</a>'], ids=["malformed", "dtd"]
)
def test_xml_the_hardened_parser_refuses_is_422(h: Harness, signed_url: str, body: bytes) -> None:
    _assert_problem(h.deliver(signed_url, body), 422, "refused-xml")
    assert h.files() == []


# --- health, listing, callback ---------------------------------------------------------


def test_health_counts_the_stored_documents(h: Harness, url: str) -> None:
    assert h.client.get(url + "health").json() == {"status": "ok", "documents": 0}
    for msg_id in ("b", "a", "a"):
        assert h.deliver(url, msg_id=msg_id).status_code == 200
    response = h.client.get(url + "health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "documents": 2}


def test_documents_are_sorted_by_name_and_skip_other_files(h: Harness) -> None:
    store = h.store()
    for name in ("b.xml", "a.xml", ".a.xml.x1y2.tmp", "notes.txt", "with space.xml", "a.json"):
        (store.directory / name).write_bytes(b"")
    (store.directory / "folder.xml").mkdir()
    assert store.documents() == ["a", "b"]


def test_a_failing_callback_does_not_fail_the_stored_delivery(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(_: StoredDocument) -> None:
        raise RuntimeError("printer on fire")

    store = CustomerStore(directory=h.inbox, secrets=[h.secret], on_document=explode)
    with caplog.at_level(logging.ERROR, logger="cmi_sdk.receiver"), running(store) as url:
        assert h.deliver(url).status_code == 200
    assert (h.inbox / "msg_1.xml").read_bytes() == XML
    assert "on_document failed for msg_1" in caplog.text


@pytest.mark.parametrize(
    ("verified", "duplicate", "line"),
    [
        (True, False, "stored m 5 bytes signature verified"),
        (None, False, "stored m 5 bytes signature not checked"),
        (False, False, "stored m 5 bytes signature NOT verified"),
        (True, True, "duplicate m (already stored)"),
    ],
)
def test_format_line(verified: bool | None, duplicate: bool, line: str) -> None:
    doc = StoredDocument(
        webhook_id="m",
        path=Path("m.xml"),
        size=5,
        received_at=datetime.datetime.now(datetime.UTC),
        signature_verified=verified,
        duplicate=duplicate,
    )
    assert format_line(doc) == line


# --- configuration ---------------------------------------------------------------------


def test_configuration_errors_are_caught_at_construction(tmp_path: Path) -> None:
    secret = generate_secret()
    with pytest.raises(ConfigurationError, match="not one string"):
        CustomerStore(directory=tmp_path, secrets=secret)
    with pytest.raises(ConfigurationError, match="whsec_"):
        CustomerStore(directory=tmp_path, secrets=["nope"])
    with pytest.raises(ConfigurationError):
        CustomerStore(directory=tmp_path, secrets=[])
    with pytest.raises(ConfigurationError, match="positive"):
        CustomerStore(directory=tmp_path, secrets=[secret], max_bytes=0)
    with pytest.raises(ConfigurationError, match="PEM certificate"):
        CustomerStore(directory=tmp_path, secrets=[secret], certificate=b"not a certificate")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigurationError, match="cannot create"):
        CustomerStore(directory=tmp_path / "file", secrets=[secret])


# --- serving ---------------------------------------------------------------------------


def test_running_stops_the_server_on_exit(h: Harness) -> None:
    with running(h.store()) as url:
        assert url.startswith("http://127.0.0.1:")
        assert url.endswith("/")
        assert h.client.get(url + "health").status_code == 200
    with pytest.raises(httpx.ConnectError):
        h.client.get(url + "health")


def test_serve_refuses_a_port_in_use(h: Harness) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"cannot listen on 127.0.0.1 port {port}"):
            serve(h.store(), port=port)


_SERVE_SCRIPT = textwrap.dedent(
    """
    import sys
    from cmi_sdk.receiver import CustomerStore, format_line, serve

    store = CustomerStore(
        directory=sys.argv[1],
        secrets=[sys.argv[2]],
        on_document=lambda doc: print(format_line(doc), flush=True),
    )
    try:
        serve(store, ready=lambda port: print(port, flush=True))
    except KeyboardInterrupt:
        print("stopped", flush=True)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
@pytest.mark.timeout(60)
def test_serve_reports_its_port_and_stops_on_ctrl_c(h: Harness) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE_SCRIPT, str(h.inbox), h.secret],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        assert h.deliver(f"http://127.0.0.1:{port}/").status_code == 200
        line = proc.stdout.readline().strip()
        assert line == f"stored msg_1 {len(XML)} bytes signature not checked"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert out.strip() == "stopped"
    assert proc.returncode == 0
    assert (h.inbox / "msg_1.xml").read_bytes() == XML
