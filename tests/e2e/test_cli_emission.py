"""The ``cmi`` emission commands end to end: terms, emit, deliver, outbox, listen.

Every command runs as a firm's operator would run it: in a temporary working folder,
configured through ``CMI_*`` variables (or a ``cmi.toml``), with a real ``cmi listen`` as the
customer's store on a loopback port. Commands that end run in this process through
:func:`cmi_sdk.cli.main` (a new interpreter per command would only add its start-up time);
the servers (``cmi listen``, ``cmi serve``) and one whole loop run as real processes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from lxml import etree

from cmi_sdk import Adapter, Request, Transaction, load_model
from cmi_sdk.cli import EXIT_INVALID, EXIT_OK, EXIT_USAGE, main
from cmi_sdk.client import CMIClient, signed_headers
from cmi_sdk.signing import DocumentSigner, generate_development_keys
from cmi_sdk.webhooks import WebhookSigner, generate_secret

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TICKET_JSON = EXAMPLES / "ticket.json"
CUSTOMER = "cust-7f3a9c"  # the customer_ref of examples/ticket.json
TICKET_NS = "urn:cmi:ticket:1.0"
COMMAND_TIMEOUT = 60.0  # seconds; a command normally takes well under one
LISTEN_TIMEOUT = 10.0
REFUSED_PORT = "http://127.0.0.1:9/x"  # the discard port: nobody listens there


class Result(NamedTuple):
    code: int
    out: str
    err: str


@dataclass
class Project:
    """A firm's working folder and the environment its ``cmi`` commands run in."""

    root: Path
    env: dict[str, str]
    secret: str = field(default_factory=generate_secret)
    in_process: bool = True

    def run(self, *argv: str, env: Mapping[str, str | None] | None = None) -> Result:
        """Run ``cmi argv...`` here; ``env`` sets (or, with None, removes) variables."""
        environ = dict(self.env)
        for name, value in (env or {}).items():
            if value is None:
                environ.pop(name, None)
            else:
                environ[name] = value
        if self.in_process:
            return run_in_process(argv, cwd=self.root, environ=environ)
        done = subprocess.run(
            [sys.executable, "-m", "cmi_sdk.cli", *argv],
            cwd=self.root,
            env=environ,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        return Result(done.returncode, done.stdout, done.stderr)

    def secret_file(self, secret: str | None = None) -> str:
        """A file here holding ``secret`` (the project's by default), for --secret-file."""
        text = self.secret if secret is None else secret
        path = self.root / f"secret-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
        path.write_text(text + "\n", encoding="utf-8")
        path.chmod(0o600)
        return str(path)

    def ok(self, *argv: str, env: Mapping[str, str | None] | None = None) -> str:
        """Run a command that must succeed; its standard output."""
        result = self.run(*argv, env=env)
        assert result.code == EXIT_OK, result
        return result.out

    def terms(self, destination: str, *options: str, customer: str = CUSTOMER) -> str:
        """Register terms (cmi-ticket unless options say otherwise); their id."""
        out = self.ok(
            "terms", "add", "--customer", customer, "--destination", destination,
            "--secret-file", self.secret_file(), "--standard", "cmi-ticket", *options,
        )  # fmt: skip
        assert re.fullmatch(r"terms_\w+\n", out), out
        return out.strip()

    def transaction(self, name: str = "ticket.json", **changes: object) -> Path:
        """examples/ticket.json with top-level fields changed, written here."""
        data = json.loads(TICKET_JSON.read_text(encoding="utf-8"))
        data.update(changes)
        path = self.root / name
        path.write_text(json.dumps(data), encoding="utf-8")
        return path

    def emit(self, path: Path) -> list[str]:
        """Emit a transaction; the msg ids printed, one per document."""
        out = self.ok("emit", path.name)
        ids = [line.split()[0] for line in out.splitlines()]
        assert all(re.fullmatch(r"msg_[0-9a-f]{32}", i) for i in ids), out
        return ids


def run_in_process(argv: Sequence[str], *, cwd: Path, environ: Mapping[str, str]) -> Result:
    """``cmi argv...`` through :func:`cmi_sdk.cli.main`, in ``cwd`` with exactly ``environ``
    as its environment, its output captured; the process's own state is restored after."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    saved = dict(os.environ)
    sigterm = signal.getsignal(signal.SIGTERM)
    os.environ.clear()
    os.environ.update(environ)
    try:
        with (
            contextlib.chdir(cwd),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            try:
                code = main(list(argv))
            except SystemExit as exc:  # argparse's usage errors and --help
                code = exc.code if isinstance(exc.code, int) else EXIT_USAGE
    finally:
        os.environ.clear()
        os.environ.update(saved)
        signal.signal(signal.SIGTERM, sigterm)
    return Result(code, _text(out), _text(err))


def _text(stream: io.TextIOWrapper) -> str:
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    return buffer.getvalue().decode("utf-8")


def base_env() -> dict[str, str]:
    """This environment without PYTHONPATH and without any CMI_* setting of the caller's."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CMI_") and k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One development key pair for the module (made with ``cmi keys generate``)."""
    directory = tmp_path_factory.mktemp("keys")
    done = run_in_process(
        ["keys", "generate", str(directory / "keys")], cwd=directory, environ=base_env()
    )
    assert done.code == EXIT_OK, done.err
    return directory / "keys"


def make_project(root: Path, keys: Path) -> Project:
    """A project signing with ``keys``, its database in ``root``, loopback allowed."""
    env = base_env() | {
        "CMI_SIGNING_KEY": str(keys / "key.pem"),
        "CMI_SIGNING_CERT": str(keys / "cert.pem"),
        "CMI_ALLOW_LOOPBACK": "1",
        "CMI_DATABASE_URL": f"sqlite:///{root / 'cmi.db'}",
    }
    return Project(root, env)


@pytest.fixture
def project(tmp_path: Path, keys: Path) -> Project:
    return make_project(tmp_path, keys)


class Listener:
    """A running ``cmi listen``: its URL and the lines it prints."""

    def __init__(self, process: subprocess.Popen[str], store: Path) -> None:
        self.process = process
        self.store = store
        self.lines: list[str] = []
        self.url = ""
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float = LISTEN_TIMEOUT) -> list[str]:
        """The first ``count`` lines, waiting for them at most ``timeout`` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: len(self.lines) >= count or self._eof, timeout)
            assert len(self.lines) >= count, f"cmi listen printed only {self.lines}"
            return self.lines[:count]

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL), and wait for its output to end."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=LISTEN_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=LISTEN_TIMEOUT)
        self._reader.join(LISTEN_TIMEOUT)


@contextlib.contextmanager
def listening(
    project: Project, store: str = "store", *, port: int = 0, cert: Path | None = None
) -> Iterator[Listener]:
    """Run ``cmi listen`` with the project's secret; stopped when the block ends."""
    argv = ["listen", "--port", str(port), "--store", store, "--secret-file", project.secret_file()]
    if cert is not None:
        argv += ["--cert", str(cert)]
    errors = project.root / f"listen-{store}.err"
    with (
        errors.open("wb") as stderr,
        subprocess.Popen(
            [sys.executable, "-m", "cmi_sdk.cli", *argv],
            cwd=project.root,
            env=project.env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        ) as process,
    ):
        listener = Listener(process, project.root / store)
        try:
            try:
                first = listener.wait_for(1)[0]
            except AssertionError:
                pytest.fail(f"cmi listen did not start: {errors.read_text()}")
            found = re.fullmatch(r"listening on (http://127\.0\.0\.1:(\d+)/) storing in .+", first)
            assert found is not None, first
            assert port in (0, int(found[2]))
            listener.url = found[1]
            yield listener
        finally:
            listener.stop()


def free_port() -> int:
    """A port nobody listens on now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stored(store: Path) -> list[str]:
    """The names of the files in a customer's store folder."""
    return sorted(p.name for p in store.iterdir()) if store.exists() else []


def counts(project: Project) -> dict[str, int]:
    """``cmi outbox status``: rows by state."""
    data: dict[str, int] = json.loads(project.ok("outbox", "status", "--json"))["counts"]
    return data


# -- the whole loop -------------------------------------------------------------------------


@pytest.mark.slow
def test_keys_listen_terms_emit_deliver_verify(tmp_path: Path) -> None:
    env = base_env() | {
        "CMI_ALLOW_LOOPBACK": "1",
        "CMI_DATABASE_URL": f"sqlite:///{tmp_path / 'cmi.db'}",
    }
    # Every command a process of its own here, as an operator runs them.
    project = Project(tmp_path, env, in_process=False)
    out = project.ok("keys", "generate", "keys")
    assert out.splitlines() == ["keys/key.pem", "keys/cert.pem"]
    assert (tmp_path / "keys" / "key.pem").is_file()
    cert = tmp_path / "keys" / "cert.pem"
    assert cert.is_file()
    project.env |= {"CMI_SIGNING_KEY": "keys/key.pem", "CMI_SIGNING_CERT": "keys/cert.pem"}

    with listening(project, cert=cert) as listener:
        terms_id = project.terms(listener.url + "inbox")
        ticket = project.transaction()
        out = project.ok("emit", ticket.name)
        [line] = out.splitlines()
        msg_id, *rest = line.split()
        assert rest == [terms_id, "cmi-ticket", "ticket", "pending"]

        assert project.ok("deliver", "--once") == "delivered 1, retry later 0, dead 0\n"
        [printed] = listener.wait_for(2)[1:]
        assert re.fullmatch(rf"stored {msg_id} \d+ bytes signature verified", printed)

        assert stored(listener.store) == [f"{msg_id}.json", f"{msg_id}.xml"]
        metadata = json.loads((listener.store / f"{msg_id}.json").read_text())
        assert metadata["webhook-id"] == msg_id
        assert metadata["signature_verified"] is True
        document = f"store/{msg_id}.xml"
        assert project.ok("verify", document, "--cert", "keys/cert.pem") == (
            f"{document}: signature verified\n"
        )
        assert project.ok("validate", document) == f"{document}: valid cmi-ticket ticket\n"
        assert "delivered  1" in project.ok("outbox", "status").splitlines()

        assert project.ok("deliver", "--once") == "delivered 0, retry later 0, dead 0\n"
        # The same transaction again is the same message: stored once, never sent again.
        assert project.emit(ticket) == [msg_id]
        assert project.ok("deliver", "--once") == "delivered 0, retry later 0, dead 0\n"
        listener.stop()
        assert len(listener.lines) == 2
    assert stored(tmp_path / "store") == [f"{msg_id}.json", f"{msg_id}.xml"]


class Minimized(NamedTuple):
    project: Project
    emitted: str
    document: Path


@pytest.fixture(scope="module")
def minimized(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Minimized:
    """A ticket emitted and delivered under terms that share four fields (made once)."""
    project = make_project(tmp_path_factory.mktemp("minimized"), keys)
    with listening(project, cert=keys / "cert.pem") as listener:
        project.terms(listener.url + "inbox", "--fields", "origin,destination,date,total")
        emitted = project.ok("emit", project.transaction().name)
        [msg_id] = [line.split()[0] for line in emitted.splitlines()]
        assert project.ok("deliver", "--once") == "delivered 1, retry later 0, dead 0\n"
        listener.wait_for(2)
    assert stored(listener.store) == [f"{msg_id}.json", f"{msg_id}.xml"]
    return Minimized(project, emitted, listener.store / f"{msg_id}.xml")


def test_fields_withhold_the_rest_and_the_document_still_verifies(
    minimized: Minimized, keys: Path
) -> None:
    assert minimized.emitted.rstrip("\n").endswith("withheld=airline,fare_class,flight,row,seat")
    root = etree.fromstring(minimized.document.read_bytes())
    names = {etree.QName(e).localname for e in root.iter() if etree.QName(e).namespace == TICKET_NS}
    assert names.isdisjoint({"seat", "row", "airline", "flight", "class"})
    assert {"origin", "destination", "date", "price"} <= names
    assert root.get("withheld") == "airline fare_class flight row seat"
    result = minimized.project.run(
        "verify", str(minimized.document), "--cert", str(keys / "cert.pem")
    )
    assert result.code == EXIT_OK, result


def test_validate_accepts_a_minimized_document(minimized: Minimized) -> None:
    document = minimized.document
    result = minimized.project.run("validate", str(document))
    withheld = "airline, fare_class, flight, row, seat"
    expected = f"{document}: valid cmi-ticket ticket (withheld: {withheld})\n"
    assert result == Result(EXIT_OK, expected, ""), result


# -- links ---------------------------------------------------------------------------------


def test_links_create_list_and_revoke(project: Project) -> None:
    from cmi_sdk.outbox.sqlite import SQLiteStore

    made = json.loads(project.ok("links", "create", "--account", CUSTOMER, "--json"))
    assert set(made) == {"code", "account", "expires_at"}
    plain = project.ok("links", "create", "--account", CUSTOMER, "--ttl", "5").splitlines()
    assert plain[0].startswith("lc_")
    assert plain[1].startswith("expires ")
    # The intermediary redeems the first code (what POST /cmi/links does).
    firm = Adapter(store=SQLiteStore(project.root / "cmi.db"))
    link = firm.redeem_link_code(made["code"], intermediary="relay")
    firm.store.close()
    listed = project.ok("links", "list", "--account", CUSTOMER).split()
    assert listed == [link.id, CUSTOMER, "relay", link.customer_ref, "active"]
    assert project.ok("links", "list", "--intermediary", "nobody") == ""
    out = project.ok("links", "revoke", link.id)
    assert out.startswith(f"{link.id} revoked; terms revoked: 0")
    assert project.ok("links", "list") == ""
    (shown,) = json.loads(project.ok("links", "list", "--all", "--json"))
    assert shown["revoked_at"] is not None
    assert project.run("links", "revoke", link.id).code == EXIT_INVALID
    assert project.run("links", "revoke", "link_nope").code != EXIT_OK
    assert project.run("links", "create", "--account", CUSTOMER, "--ttl", "0").code == EXIT_USAGE
    assert project.run("links", "create", "--account", "a b").code == EXIT_INVALID


# -- nothing emitted, revoked, dead ---------------------------------------------------------


def test_emit_without_terms_emits_nothing(project: Project) -> None:
    nobody = project.transaction("nobody.json", customer_ref="cust-nobody1")
    result = project.run("emit", nobody.name)
    assert result.code == EXIT_OK
    assert result.out == ""
    assert "no active sharing terms for cust-nobody1" in result.err
    assert not any(counts(project).values())


def test_revoke_cancels_what_has_not_gone_out(project: Project) -> None:
    project.env["CMI_RETRY_SCHEDULE"] = "3600"  # one retry, an hour away
    terms_id = project.terms(REFUSED_PORT)
    [msg_id] = project.emit(project.transaction())
    first, why = project.ok("deliver", "--once").splitlines()
    assert first == "delivered 0, retry later 1, dead 0"
    assert why.startswith("  retry: 1 x ")  # why the row waits: the refused connection
    assert "Connect" in why

    out = project.ok("terms", "revoke", terms_id)
    assert re.fullmatch(rf"{terms_id} revoked; consent record consent_\w+\n", out)
    assert project.ok("deliver", "--once") == "delivered 0, retry later 0, dead 0\n"
    [row] = project.ok("outbox", "list", "--state", "cancelled").splitlines()
    assert row.startswith(f"{msg_id}  cancelled ")
    assert project.ok("terms", "list") == ""
    [listed] = project.ok("terms", "list", "--all").splitlines()
    assert listed.split()[:3] == [terms_id, CUSTOMER, "revoked"]

    again = project.run("terms", "revoke", terms_id)
    assert again.code == EXIT_INVALID
    assert "already revoked" in again.err
    unknown = project.run("terms", "revoke", "terms_nosuchterms")
    assert unknown.code == EXIT_INVALID
    assert "terms_nosuchterms" in unknown.err


def test_dead_letters_are_redriven(project: Project, keys: Path) -> None:
    project.env["CMI_RETRY_SCHEDULE"] = ""  # no retries: the first failure is final
    port = free_port()
    project.terms(f"http://127.0.0.1:{port}/inbox")
    [first] = project.emit(project.transaction())
    [second] = project.emit(project.transaction("second.json", id="DL-12524058"))
    assert project.ok("deliver", "--once") == "delivered 0, retry later 0, dead 2\n"
    dead = project.ok("outbox", "list", "--state", "dead").splitlines()
    assert sorted(line.split()[0] for line in dead) == sorted([first, second])
    assert all("last_error=ConnectError" in line for line in dead), dead

    with listening(project, port=port, cert=keys / "cert.pem") as listener:
        assert project.ok("outbox", "redrive", first) == "redriven 1\n"
        assert project.ok("outbox", "redrive", first) == "redriven 0\n"  # pending, not dead
        assert project.ok("deliver", "--once") == "delivered 1, retry later 0, dead 0\n"
        assert listener.wait_for(2)[1].startswith(f"stored {first} ")

        assert project.ok("outbox", "redrive", "--since", "2000-01-01T00:00:00Z") == "redriven 1\n"
        assert project.ok("deliver", "--once") == "delivered 1, retry later 0, dead 0\n"
        assert listener.wait_for(3)[2].startswith(f"stored {second} ")
    assert stored(listener.store) == sorted(
        f"{m}.{ext}" for m in (first, second) for ext in ("json", "xml")
    )
    status = counts(project)
    assert (status["delivered"], status["dead"]) == (2, 0)


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--since", "2000-01-01T00:00:00"], EXIT_USAGE, "timezone"),
        (["--since", "yesterday"], EXIT_USAGE, "ISO 8601"),
        ([], EXIT_USAGE, "an ID or --since"),
        (["msg_x", "--since", "2000-01-01T00:00:00Z"], EXIT_USAGE, "an ID or --since"),
        (["msg_nosuchmessage"], EXIT_INVALID, "msg_nosuchmessage"),
    ],
)
def test_redrive_refuses(project: Project, argv: list[str], code: int, message: str) -> None:
    result = project.run("outbox", "redrive", *argv)
    assert result.code == code, result
    assert result.out == ""
    assert message in result.err
    assert "Traceback" not in result.err


# -- configuration --------------------------------------------------------------------------


def test_egress_guard_refuses_destinations(project: Project) -> None:
    for destination, loopback, message in [
        ("http://127.0.0.1:9/x", None, "loopback"),
        ("https://127.0.0.1/x", None, "loopback"),
        ("https://10.0.0.1/", None, "private"),
        ("https://10.0.0.1/", "1", "private"),
        ("http://93.184.215.14/x", "1", "https"),  # public, but plain http
    ]:
        result = project.run(
            "terms", "add", "--customer", CUSTOMER, "--destination", destination,
            "--secret-file", project.secret_file(), env={"CMI_ALLOW_LOOPBACK": loopback},
        )  # fmt: skip
        case = (destination, loopback, result)
        assert result.code == EXIT_INVALID, case
        assert result.out == "", case
        assert message in result.err, case
    assert project.ok("terms", "list", "--all") == ""


def test_emitting_commands_need_a_signing_key(project: Project) -> None:
    project.transaction()
    terms = ["terms", "add", "--customer", CUSTOMER, "--destination", REFUSED_PORT]
    for argv in (["emit", "ticket.json"], [*terms, "--secret-file", project.secret_file()]):
        result = project.run(*argv, env={"CMI_SIGNING_KEY": None, "CMI_SIGNING_CERT": None})
        assert result.code == EXIT_USAGE, (argv, result)
        assert result.out == "", (argv, result)
        assert "cmi keys generate" in result.err, (argv, result)
    assert project.ok("terms", "list", "--all") == ""


def test_emit_with_only_a_certificate_names_keys_generate(project: Project) -> None:
    project.transaction()
    result = project.run("emit", "ticket.json", env={"CMI_SIGNING_KEY": None})
    assert result.code == EXIT_USAGE, result
    assert "cmi keys generate" in result.err


def test_settings_from_cmi_toml(tmp_path: Path, keys: Path) -> None:
    project = Project(tmp_path, base_env())
    (tmp_path / "cmi.toml").write_text(
        'database_url = "sqlite:///./firm.db"\n'
        "allow_loopback = true\n"
        f"signing_key = {json.dumps(str(keys / 'key.pem'))}\n"
        f"signing_cert = {json.dumps(str(keys / 'cert.pem'))}\n",
        encoding="utf-8",
    )
    terms_id = project.terms(REFUSED_PORT)  # loopback over http: allowed by the file
    [msg_id] = project.emit(project.transaction())
    assert (tmp_path / "firm.db").is_file()
    assert not (tmp_path / "cmi.db").exists()
    [row] = project.ok("outbox", "list").splitlines()
    assert row.startswith(f"{msg_id}  pending ")
    assert project.ok("terms", "list").startswith(terms_id)

    # The environment wins over the file.
    result = project.run(
        "terms", "add", "--customer", CUSTOMER, "--destination", REFUSED_PORT,
        "--secret-file", project.secret_file(), env={"CMI_ALLOW_LOOPBACK": "0"},
    )  # fmt: skip
    assert result.code == EXIT_INVALID
    assert "loopback" in result.err


# -- bad input ------------------------------------------------------------------------------


def test_emit_refuses_a_malformed_transaction(project: Project) -> None:
    project.terms(REFUSED_PORT)
    for changes, message in [
        ({"total": {"amount": 451.89, "currency": "USD"}}, "total.amount: floats are refused"),
        ({"customer_ref": "jane@example.com"}, "customer_ref: must be a pseudonymous token"),
        ({"customer_ref": None}, "customer_ref"),
    ]:
        bad = project.transaction("bad.json", **changes)
        result = project.run("emit", bad.name)
        assert result.code == EXIT_INVALID, (changes, result)
        assert result.out == "", (changes, result)
        assert message in result.err, (changes, result)
    assert project.ok("outbox", "list") == ""


def test_emit_refuses_what_is_not_json(project: Project) -> None:
    (project.root / "bad.json").write_text("{not json", encoding="utf-8")
    result = project.run("emit", "bad.json")
    assert result.code == EXIT_INVALID, result
    assert result.err.startswith("bad.json: invalid Transaction")
    assert "Traceback" not in result.err


def test_terms_add_refuses_bad_terms(project: Project) -> None:
    argv = ["terms", "add", "--customer", CUSTOMER, "--destination", REFUSED_PORT]
    argv += ["--standard", "cmi-ticket"]
    for options, message in [
        (
            ["--secret-file", project.secret_file("not-a-secret")],
            "secret: must be a Standard Webhooks secret",
        ),
        (["--secret-file", project.secret_file("whsec_c2hvcnQ=")], "secret: must be"),  # 5 bytes
        (["--when", "digest:0h"], "when: must be"),
        (["--when", "daily"], "when: must be"),
        (["--fields", "origin,nope"], "no field nope"),
        (["--until", "2001-01-01"], "until is in the past"),
        (["--when", "pull"], "pull-only terms have no destination"),
    ]:
        secret = [] if options[0] == "--secret-file" else ["--secret-file", project.secret_file()]
        result = project.run(*argv, *secret, *options)
        assert result.code == EXIT_INVALID, (options, result)
        assert result.out == "", (options, result)
        assert message in result.err, (options, result)
    assert project.ok("terms", "list", "--all") == ""


@pytest.mark.parametrize(
    "names", [["--standard", "no-such-standard"], ["--standard", "cmi-ticket", "--type", "nope"]]
)
def test_terms_add_unknown_standard_is_a_usage_error(project: Project, names: list[str]) -> None:
    argv = ["terms", "add", "--customer", CUSTOMER, "--destination", REFUSED_PORT]
    result = project.run(*argv, "--secret-file", project.secret_file(), *names)
    assert result.code == EXIT_USAGE, result


# -- the customer's store and intermediaries -----------------------------------------------


def test_listen_verifies_both_signatures_and_dedups(project: Project, keys: Path) -> None:
    xml = Adapter().render(load_model(Transaction, TICKET_JSON.read_text()), standard="cmi-ticket")
    firm = DocumentSigner.from_pem(
        (keys / "key.pem").read_bytes(), (keys / "cert.pem").read_bytes()
    )
    other_key, other_cert = generate_development_keys(project.root / "other-keys")
    forger = DocumentSigner.from_pem(other_key.read_bytes(), other_cert.read_bytes())
    with (
        listening(project, cert=keys / "cert.pem") as listener,
        httpx.Client(trust_env=False) as client,
    ):

        def post(secret: str, body: bytes, msg_id: str = "msg_test1") -> httpx.Response:
            headers = WebhookSigner(secret=secret).headers(msg_id, body)
            headers["content-type"] = "application/xml"
            return client.post(listener.url + "inbox", content=body, headers=headers)

        for response, status, problem in [
            (post(generate_secret(), firm.sign(xml)), 401, "unauthorized"),
            (post(project.secret, forger.sign(xml)), 422, "document-signature"),
            (post(project.secret, xml), 422, "document-signature"),  # unsigned
        ]:
            assert response.status_code == status
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["type"] == f"urn:cmi:problem:{problem}"
        assert stored(listener.store) == []

        signed = firm.sign(xml)
        assert post(project.secret, signed).json()["status"] == "stored"
        assert post(project.secret, signed).json()["status"] == "duplicate"
        listener.stop()
    assert listener.lines[1:] == [
        f"stored msg_test1 {len(signed)} bytes signature verified",
        "duplicate msg_test1 (already stored)",
    ]
    assert stored(listener.store) == ["msg_test1.json", "msg_test1.xml"]
    assert (listener.store / "msg_test1.xml").read_bytes() == signed


def test_intermediaries_add(project: Project) -> None:
    assert (
        project.ok("intermediaries", "add", "acme", "--secret-file", project.secret_file())
        == "acme\n"
    )
    # Again: a rotation, not an error.
    assert (
        project.ok(
            "intermediaries", "add", "acme", "--secret-file", project.secret_file(generate_secret())
        )
        == "acme\n"
    )
    for secret in ("whsec_bad", "not-a-secret", "whsec_c2hvcnQ="):
        result = project.run(
            "intermediaries", "add", "acme", "--secret-file", project.secret_file(secret)
        )
        assert result.code == EXIT_INVALID, (secret, result)
        assert result.out == ""
        assert "secret" in result.err


# -- serving --------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.slow
def test_serve_answers_requests_from_one_or_several_processes(
    project: Project, workers: int
) -> None:
    project.ok("intermediaries", "add", "relay", "--secret-file", project.secret_file())
    port = free_port()
    argv = ["serve", "--reference-firms", "--port", str(port), "--workers", str(workers)]
    errors = project.root / "serve.err"
    with (
        errors.open("wb") as stderr,
        subprocess.Popen(
            [sys.executable, "-m", "cmi_sdk.cli", *argv],
            cwd=project.root,
            env=project.env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        ) as server,
    ):
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(base + "/.well-known/cmi", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None, errors.read_text()
                assert time.monotonic() < deadline, errors.read_text()
                time.sleep(0.1)
            if workers > 1 and Path("/proc").is_dir():
                assert _worker_processes(server.pid) == workers
            day = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).date()
            request = load_model(
                Request,
                {
                    "id": "req-serve-1",
                    "kind": "flight",
                    "customer_ref": CUSTOMER,
                    "reply_to": "relay-1",
                    "created_at": dt.datetime.now(dt.UTC),
                    "wanted": {"origin": "ATL", "destination": "CDG", "date": day},
                },
            )
            xml = Adapter().render(request, standard="cmi", document_type="request")
            # Several requests, so that with two workers both are likely to answer some.
            with CMIClient(base, secret=project.secret, intermediary="relay") as client:
                for _ in range(6):
                    response = client.post_request(xml)
                    assert response.status_code == 200, response.text
                    assert b"<offer " in response.content
            # A message replayed on new connections (so possibly to another worker): the
            # replay cache is the store's, shared by the workers.
            headers = signed_headers(
                secret=project.secret,
                method="POST",
                target="/cmi/requests",
                body=xml,
                intermediary="relay",
                msg_id="msg_once",
            )
            headers["content-type"] = "application/xml"
            answers = [
                httpx.post(base + "/cmi/requests", content=xml, headers=headers, timeout=10)
                for _ in range(4)
            ]
            assert [a.status_code for a in answers] == [200, 401, 401, 401]
            assert answers[1].json()["type"] == "urn:cmi:problem:replayed"
        finally:
            server.terminate()
            server.wait(timeout=30)
    assert "serving on" in errors.read_text()


def _worker_processes(pid: int) -> int:
    """How many of ``pid``'s children are multiprocessing workers (not its helpers, such as
    the resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    found = 0
    for child in children:
        with contextlib.suppress(OSError):
            if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes():
                found += 1
    return found
