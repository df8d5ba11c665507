"""The parser never opens anything: no file, device, FIFO or URL named by a document.

A DOCTYPE can name an external subset (SYSTEM or PUBLIC) or declare external entities and
parameter entities; libxml2 opens what they name unless the parser is built not to. Every
entry point that reads outside XML is attacked here (the hardened parser, ``cmi validate``,
``cmi parse``, ``cmi verify``, ``cmi listen --cert`` on loopback, ``POST /cmi/requests``),
with the DOCTYPE behind a comment holding ``<``, a processing instruction, a UTF-8 BOM, or
in UTF-16, pointing at a FIFO, ``/dev/zero``, an existing file and a missing one.

Two watchers tell an opening apart from a refusal: the FIFO is polled from the writing end
(an open for reading blocks until a writer comes, so a reader is seen, then released with
an end of file, never left hanging), and inotify reports any open of the existing file.
Each refusal must also read the same whatever the file is and whether it exists.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from lxml import etree

from cmi_sdk import (
    Adapter,
    ForbiddenXMLError,
    HardenedParser,
    Request,
    Transaction,
    load_model,
)
from cmi_sdk._xml import DOCTYPE_REFUSED, new_lxml_parser
from cmi_sdk.cli import main
from cmi_sdk.client import signed_headers
from cmi_sdk.signing import verify_document
from cmi_sdk.webhooks import WebhookSigner, generate_secret
from tests.security.watch import Watch
from tests.support import ROOT, emitting_adapter, serve_app, signer, ticket

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="FIFOs and inotify"),
    # A regression can block in open(2) or read /dev/zero holding the GIL, where a signal
    # never gets through: the thread method ends the run instead of hanging it.
    pytest.mark.timeout(120, method="thread"),
]

#: What every refused DOCTYPE reads as, wherever it points (pinned: a change is deliberate).
REFUSED = "documents with a DOCTYPE (DTD) are refused"
assert DOCTYPE_REFUSED == REFUSED


@pytest.fixture
def targets(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """What the DOCTYPEs point at; the FIFO is removed afterwards."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    existing = tmp_path / "existing.dtd"
    existing.write_text('<!ENTITY leak "found">\n')
    try:
        yield {
            "fifo": fifo,
            "/dev/zero": Path("/dev/zero"),
            "existing": existing,
            "missing": tmp_path / "missing.dtd",
        }
    finally:
        fifo.unlink(missing_ok=True)


@pytest.fixture
def watch(targets: dict[str, Path]) -> Iterator[Watch]:
    with Watch(targets["fifo"], targets["existing"]).active() as active:
        yield active
    assert active.opened == [], f"the parser opened {sorted(set(active.opened))}"


# How a DOCTYPE can make libxml2 fetch something, for a path. The body of the document is a
# signed ticket, so it would be valid, and verify, without the DOCTYPE.
FORMS: dict[str, Callable[[Path], str]] = {
    "external subset, SYSTEM": lambda p: f'<!DOCTYPE ticket SYSTEM "file://{p}">',
    "external subset, PUBLIC": lambda p: f'<!DOCTYPE ticket PUBLIC "-//CMI//X//EN" "{p}">',
    "parameter entity, SYSTEM": lambda p: f'<!DOCTYPE t [<!ENTITY % p SYSTEM "{p}"> %p;]>',
    "parameter entity, PUBLIC": (
        lambda p: f'<!DOCTYPE t [<!ENTITY % p PUBLIC "-//CMI//X//EN" "file://{p}"> %p;]>'
    ),
    "nested parameter entity": (
        lambda p: f"<!DOCTYPE t [<!ENTITY % a \"<!ENTITY &#37; b SYSTEM '{p}'>\"> %a; %b;]>"
    ),
    "external general entity": lambda p: f'<!DOCTYPE t [<!ENTITY e SYSTEM "{p}">]>',
}

# What stands before the DOCTYPE, and how the document is encoded.
PREFIXES = ("comment", "processing instruction", "BOM", "UTF-16")


@pytest.fixture(scope="module")
def signed_ticket() -> bytes:
    return signer().sign(Adapter().render(ticket(), standard="cmi-ticket"))


def hostile(signed: bytes, form: str, prefix: str, target: Path) -> bytes:
    """``signed`` with the DOCTYPE ``form`` naming ``target``, behind ``prefix``."""
    head, body = signed.decode().split("?>", 1)
    doctype = FORMS[form](target)
    if form == "external general entity":
        body = body.replace("<origin>ATL</origin>", "<origin>&e;</origin>", 1)
    if prefix == "comment":
        return f"{head}?><!-- a <ticket> in a comment -->{doctype}{body}".encode()
    if prefix == "processing instruction":
        return f"{head}?><?note <ticket?>{doctype}{body}".encode()
    if prefix == "BOM":
        return codecs.BOM_UTF8 + f"{head}?><!-- <x -->{doctype}{body}".encode()
    assert prefix == "UTF-16"
    return f'<?xml version="1.0" encoding="UTF-16"?><!-- <x -->{doctype}{body}'.encode("utf-16")


def cases() -> list[tuple[str, str]]:
    return [(form, prefix) for form in FORMS for prefix in PREFIXES]


def _refusal(text: str) -> str:
    """A CLI's refusal without the file name it starts with."""
    return text.strip().split(": ", 1)[1]


# -- the parser itself ---------------------------------------------------------------------


@pytest.mark.parametrize(("form", "prefix"), cases())
def test_the_hardened_parser_refuses_every_doctype_and_opens_nothing(
    form: str, prefix: str, targets: dict[str, Path], watch: Watch, signed_ticket: bytes
) -> None:
    for lossless in (False, True):
        messages = set()
        for target in targets.values():
            data = hostile(signed_ticket, form, prefix, target)
            with pytest.raises(ForbiddenXMLError) as caught:
                HardenedParser().parse(data, lossless=lossless)
            messages.add(str(caught.value))
        assert messages == {REFUSED}


@pytest.mark.parametrize(("form", "prefix"), cases())
def test_verify_document_refuses_every_doctype_and_opens_nothing(
    form: str, prefix: str, targets: dict[str, Path], watch: Watch, signed_ticket: bytes
) -> None:
    messages = set()
    for target in targets.values():
        with pytest.raises(ForbiddenXMLError) as caught:
            verify_document(hostile(signed_ticket, form, prefix, target), signer().certificate)
        messages.add(str(caught.value))
    assert messages == {REFUSED}


@pytest.mark.parametrize("prefix", ["comment", "processing instruction", "BOM"])
def test_the_ofx_and_ubl_readers_refuse_every_doctype_and_open_nothing(
    prefix: str, targets: dict[str, Path], watch: Watch
) -> None:
    from cmi_ofx import read_ofx
    from cmi_ubl import read

    transaction = load_model(Transaction, (ROOT / "examples" / "bank-transaction.json").read_text())
    statement = Adapter().render(transaction, standard="ofx")
    invoice = Adapter().render(ticket(), standard="ubl", document_type="Invoice")
    for form in FORMS:
        for target in targets.values():
            for reader, document in ((read_ofx, statement), (read, invoice)):
                with pytest.raises(ForbiddenXMLError, match=f"^{re.escape(REFUSED)}$"):
                    reader(hostile(document, form, prefix, target))


def test_a_doctype_that_breaks_the_parse_later_is_still_the_one_refusal(
    targets: dict[str, Path], watch: Watch
) -> None:
    broken = [
        b'<!-- < --><!DOCTYPE r [<!ENTITY e SYSTEM "/x">]><r a="&e;"/>',
        b"<!-- < --><!DOCTYPE r [ nonsense ]><r/>",
        b"<?x <y?><!DOCTYPE r [<!ENTITY % p 'x'> %p;]><r/>",
        b"<!DOCTYPE r><r><unclosed></r>",
        b'<!DOCTYPE r SYSTEM "' + bytes(targets["fifo"]) + b'"><r>&undefined;</r>',
    ]
    for data in broken:
        with pytest.raises(ForbiddenXMLError, match=f"^{re.escape(REFUSED)}$"):
            HardenedParser().parse(data)


def test_no_location_hint_or_include_is_followed(
    targets: dict[str, Path], watch: Watch, default_adapter: Adapter
) -> None:
    """XInclude, xsi:schemaLocation and xml-stylesheet are not DTDs: the document may carry
    them, and nothing they name is read, even when the document fails its schema."""
    fifo = targets["fifo"]
    data = (
        f'<?xml-stylesheet href="file://{fifo}"?>'
        '<ticket xmlns="urn:cmi:ticket:1.0" xmlns:xi="http://www.w3.org/2001/XInclude"'
        ' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
        f' xsi:schemaLocation="urn:cmi:ticket:1.0 file://{fifo}"'
        f' xsi:noNamespaceSchemaLocation="{fifo}">'
        f'<xi:include href="{fifo}" parse="text"/></ticket>'
    )
    with pytest.raises(Exception, match="ticket"):
        default_adapter.parse(data.encode())


def test_the_refusing_resolver_holds_even_if_the_options_would_load(
    targets: dict[str, Path], watch: Watch
) -> None:
    """Options that tell libxml2 to load DTDs still open nothing: the SDK's resolver refuses
    every external reference itself, so a regression in the options is caught twice."""
    parser = new_lxml_parser(load_dtd=True, collect_ids=False, attribute_defaults=True)
    for target in targets.values():
        for form in FORMS.values():
            data = f"{form(target)}<t>&e;</t>".encode()
            # Refused or not (a parse error, or the resolver's own exception), what
            # counts is that the watch saw nothing opened.
            with contextlib.suppress(Exception):
                etree.fromstring(data, parser)


def test_comments_and_processing_instructions_leave_the_value_tree() -> None:
    tree = HardenedParser().parse(b"<?a b?><r><!--c--><x>5<!---->20<?p q?>.00</x><?z?></r><!--e-->")
    root = tree.getroot()
    assert [child.tag for child in root] == ["x"]
    assert root[0].text == "520.00"
    assert len(root[0]) == 0
    assert root.getnext() is None
    # The prolog's processing instruction (the OFX header) stays for whoever writes the
    # document out again; it holds no value.
    assert isinstance(root.getprevious(), etree._ProcessingInstruction)


# -- the command line ----------------------------------------------------------------------


def _write_all(folder: Path, signed: bytes, targets: dict[str, Path]) -> list[Path]:
    files = []
    for n, (form, prefix) in enumerate(cases()):
        for name, target in targets.items():
            path = folder / f"{n}-{name.strip('/').replace('/', '-')}.xml"
            path.write_bytes(hostile(signed, form, prefix, target))
            files.append(path)
    return files


def test_cmi_validate_refuses_them_all_the_same_way(
    tmp_path: Path,
    targets: dict[str, Path],
    watch: Watch,
    signed_ticket: bytes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    files = _write_all(tmp_path, signed_ticket, targets)
    assert main(["validate", *map(str, files)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(files)
    assert {_refusal(line) for line in lines} == {REFUSED}


@pytest.mark.parametrize("command", ["parse", "verify"])
@pytest.mark.slow
def test_cmi_parse_and_verify_refuse_them_all_the_same_way(  # noqa: PLR0917 (fixtures)
    command: str,
    tmp_path: Path,
    targets: dict[str, Path],
    watch: Watch,
    signed_ticket: bytes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_bytes(signer().certificate.public_bytes(serialization.Encoding.PEM))
    extra = ["--cert", str(cert)] if command == "verify" else []
    for path in _write_all(tmp_path, signed_ticket, targets):
        assert main([command, str(path), *extra]) == 1
        err = capsys.readouterr().err
        assert _refusal(err) == REFUSED, err


@pytest.mark.parametrize("command", ["validate", "parse", "verify"])
@pytest.mark.slow
def test_the_reported_hang_in_a_real_process(
    command: str, tmp_path: Path, targets: dict[str, Path], watch: Watch, signed_ticket: bytes
) -> None:
    """The reproduction as reported: a FIFO behind a comment that holds '<'."""
    document = tmp_path / "doc.xml"
    document.write_bytes(
        hostile(signed_ticket, "parameter entity, SYSTEM", "comment", targets["fifo"])
    )
    cert = tmp_path / "cert.pem"
    cert.write_bytes(signer().certificate.public_bytes(serialization.Encoding.PEM))
    extra = ["--cert", str(cert)] if command == "verify" else []
    done = subprocess.run(
        [sys.executable, "-m", "cmi_sdk.cli", command, str(document), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 1
    assert _refusal(done.stderr) == REFUSED


# -- the receiver and the endpoint --------------------------------------------------------


@contextlib.contextmanager
def _listening(store: Path, cert: Path, secret: str) -> Iterator[str]:
    secret_file = store.parent / "secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "cmi_sdk.cli", "listen", "--port", "0"),
            *("--store", str(store), "--cert", str(cert), "--secret-file", str(secret_file)),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert found, line
        yield found.group()
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)


def test_cmi_listen_refuses_them_all_the_same_way(
    tmp_path: Path, targets: dict[str, Path], watch: Watch, signed_ticket: bytes
) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_bytes(signer().certificate.public_bytes(serialization.Encoding.PEM))
    secret = generate_secret()
    inbox = tmp_path / "inbox"
    details = set()
    with (
        _listening(inbox, cert, secret) as url,
        httpx.Client(trust_env=False, timeout=30) as client,
    ):
        for n, (form, prefix) in enumerate(cases()):
            for target in targets.values():
                body = hostile(signed_ticket, form, prefix, target)
                headers = WebhookSigner(secret=secret).headers(f"msg_{n}", body)
                headers["content-type"] = "application/xml"
                response = client.post(url, content=body, headers=headers)
                assert response.status_code == 422, response.text
                assert response.json()["type"] == "urn:cmi:problem:refused-xml"
                details.add(response.json()["detail"])
        # Still answering, and what it should take it takes.
        headers = WebhookSigner(secret=secret).headers("msg_ok", signed_ticket)
        headers["content-type"] = "application/xml"
        assert client.post(url, content=signed_ticket, headers=headers).status_code == 200
    assert details == {REFUSED}
    assert sorted(p.name for p in inbox.iterdir()) == ["msg_ok.json", "msg_ok.xml"]


def test_post_cmi_requests_refuses_them_all_the_same_way(
    tmp_path: Path, targets: dict[str, Path], watch: Watch
) -> None:
    adapter = emitting_adapter(tmp_path)
    secret = generate_secret()
    adapter.store.add_intermediary("acme", secret, at=time.time())
    request = (ROOT / "examples" / "request.json").read_text()
    xml = adapter.render(load_model(Request, request), standard="cmi", document_type="request")
    details = set()
    with serve_app(adapter.asgi_app()) as url, httpx.Client(trust_env=False, timeout=30) as c:
        for form, prefix in cases():
            for target in targets.values():
                body = hostile(xml, form, prefix, target)
                headers = signed_headers(
                    secret=secret,
                    method="POST",
                    target="/cmi/requests",
                    body=body,
                    intermediary="acme",
                )
                headers["content-type"] = "application/xml"
                response = c.post(url + "cmi/requests", content=body, headers=headers)
                assert response.status_code == 400, response.text
                assert response.json()["type"] == "urn:cmi:problem:forbidden-xml"
                details.add(response.json()["detail"])
        # The server still answers.
        assert c.get(url + ".well-known/cmi").status_code == 200
    assert details == {REFUSED}
    adapter.close()
