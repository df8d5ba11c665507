"""Secrets: owner-only files, no secret on a command line, encryption at rest, and
intermediaries revoked and rotated.

The attacks: another user of the firm's machine reads the database (or its WAL), a key, a
customer's stored documents, or a secret from ``ps`` and the shell's history; someone who
reads a database dump (or a backup) gets working webhook and intermediary secrets; someone
who can write to the database moves a sealed secret to the row of terms they control; an
intermediary whose secret leaked, or that the firm stopped trusting, keeps signing requests
until a cache expires.

The PostgreSQL cases run with ``CMI_TEST_POSTGRES_DSN`` set.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import logging
import os
import re
import secrets
import shlex
import sqlite3
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from cmi_sdk import (
    Adapter,
    ConfigurationError,
    IntermediaryNotFoundError,
    SecretsKeyring,
    load_model,
)
from cmi_sdk._secrets import generate_secrets_key
from cmi_sdk.cli import EXIT_OK, EXIT_USAGE, build_parser, main
from cmi_sdk.client import signed_headers
from cmi_sdk.outbox import OutboxStore
from cmi_sdk.outbox.sqlite import SQLiteStore
from cmi_sdk.receiver import CustomerStore
from cmi_sdk.webhooks import WebhookSigner, generate_secret
from tests.contract.legacy import as_legacy_sqlite
from tests.fakes import Clock
from tests.support import ROOT, emitting_adapter, register, signer

with warnings.catch_warnings():
    # Starlette 1.x would rather its test client ran on httpx2; the SDK depends on httpx.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

DSN = os.environ.get("CMI_TEST_POSTGRES_DSN", "")
CUSTOMER = "cust-7f3a9c"
SECRET_RE = re.compile(r"whsec_[A-Za-z0-9+/=]{16,}")


@contextlib.contextmanager
def permissive_umask() -> Iterator[None]:
    """A umask that takes nothing away: what the SDK creates must be private anyway."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# -- files readable by their owner only ------------------------------------------------------


def test_sqlite_store_and_its_wal_are_private_whatever_the_umask(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "firm"
    with permissive_umask():
        adapter = emitting_adapter(tmp_path, store=SQLiteStore(folder / "cmi.db"))
        register(adapter)  # a webhook secret in the file, and a write through the WAL
        database = folder / "cmi.db"
        try:
            for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
                assert path.exists(), path
                assert mode(path) == 0o600, (path, oct(mode(path)))
            assert mode(folder) == 0o700
            assert mode(folder.parent) == 0o700
        finally:
            adapter.close()


def test_a_firms_existing_database_open_to_others_is_warned_about_not_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    database = tmp_path / "firm.db"
    with permissive_umask():
        sqlite3.connect(database).close()  # the firm's own file, rw-r--r-- as SQLite makes it
    assert mode(database) == 0o644
    with caplog.at_level(logging.WARNING, logger="cmi_sdk.files"):
        store = SQLiteStore(database)
        store.close()
    assert mode(database) == 0o644  # not the SDK's to change
    assert any(
        str(database) in r.getMessage() and "other users" in r.getMessage() for r in caplog.records
    ), caplog.text


def test_keys_generate_writes_a_private_key_in_a_private_folder(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    with permissive_umask():
        assert main(["keys", "generate", str(folder)]) == EXIT_OK
    assert mode(folder) == 0o700
    assert mode(folder / "key.pem") == 0o600


def test_a_customers_store_keeps_documents_private(tmp_path: Path) -> None:
    secret = generate_secret()
    folder = tmp_path / "inbox"
    adapter = Adapter()
    from cmi_sdk import Transaction

    ticket = load_model(Transaction, (ROOT / "examples" / "ticket.json").read_text())
    body = signer().sign(adapter.render(ticket, standard="cmi-ticket"))
    with permissive_umask():
        store = CustomerStore(directory=folder, secrets=[secret])
        headers = WebhookSigner(secret=secret).headers("msg_private1", body)
        headers["content-type"] = "application/xml"
        with TestClient(store.app) as client:
            assert client.post("/inbox", content=body, headers=headers).status_code == 200
    assert mode(folder) == 0o700
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == ["msg_private1.json", "msg_private1.xml"]
    assert all(mode(f) == 0o600 for f in files), [oct(mode(f)) for f in files]


def test_secrets_generate_prints_a_fresh_secret_or_writes_a_private_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["secrets", "generate"]) == EXIT_OK
    first = capsys.readouterr().out.strip()
    assert main(["secret", "generate"]) == EXIT_OK
    second = capsys.readouterr().out.strip()
    assert first != second
    for text in (first, second):
        assert re.fullmatch(r"whsec_[A-Za-z0-9+/]{43}=", text), text
    out = tmp_path / "relay.secret"
    with permissive_umask():
        assert main(["secrets", "generate", "--out", str(out)]) == EXIT_OK
    assert capsys.readouterr().out == ""  # the secret is in the file only
    assert mode(out) == 0o600
    assert SECRET_RE.fullmatch(out.read_text().strip())
    before = out.read_text()
    assert main(["secrets", "generate", "--out", str(out)]) != EXIT_OK  # never overwritten
    assert out.read_text() == before


# -- no secret on a command line -------------------------------------------------------------

SECRET_COMMANDS = [
    (["terms", "add", "--customer", CUSTOMER], "CMI_DESTINATION_SECRET"),
    (["listen", "--port", "0", "--store", "inbox"], "CMI_DESTINATION_SECRET"),
    (["intermediaries", "add", "relay"], "CMI_INTERMEDIARY_SECRET"),
    (
        ["request", "r.json", "--to", "http://127.0.0.1:9", "--intermediary", "relay"],
        "CMI_INTERMEDIARY_SECRET",
    ),
    (
        [
            *["accept", "off_1", "--customer", CUSTOMER],
            *["--to", "http://127.0.0.1:9", "--intermediary", "relay"],
        ],
        "CMI_INTERMEDIARY_SECRET",
    ),
]


@pytest.mark.parametrize(("argv", "env"), SECRET_COMMANDS)
def test_a_secret_on_the_command_line_is_refused_with_the_reason(
    argv: list[str], env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = generate_secret()
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--secret", secret])
    assert exited.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "ps" in err
    assert "history" in err
    assert "--secret-file" in err
    assert env in err
    assert secret not in err


def _options(parser: argparse.ArgumentParser, path: str = "cmi") -> Iterator[tuple[str, Any]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _options(child, f"{path} {name}")
        else:
            yield path, action


def test_no_option_of_any_command_takes_a_secret_value() -> None:
    seen = set()
    for command, action in _options(build_parser()):
        text = " ".join([action.dest, *action.option_strings, str(action.metavar or "")])
        if not re.search(r"secret|whsec|cmisk|password|token", text, flags=re.IGNORECASE):
            continue
        seen.add(command)
        assert action.dest in {"secret_file", "secret"}, (command, text)
        if action.dest == "secret":  # there only to be refused with the reason
            assert type(action).__name__ == "_RefusedSecret", command
    assert {
        f"cmi {' '.join(argv[:2]) if argv[0] in {'terms', 'intermediaries'} else argv[0]}"
        for argv, _ in SECRET_COMMANDS
    } <= seen


@dataclass
class Firm:
    """A firm's working folder with a signing key, configured through CMI_* variables."""

    root: Path
    monkeypatch: pytest.MonkeyPatch

    def adapter(self) -> Adapter:
        from cmi_sdk.config import Settings

        return Settings.load().adapter()


@pytest.fixture
def firm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Firm:
    for name in list(os.environ):
        if name.startswith("CMI_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    assert main(["keys", "generate", "keys"]) == EXIT_OK
    monkeypatch.setenv("CMI_SIGNING_KEY", "keys/key.pem")
    monkeypatch.setenv("CMI_SIGNING_CERT", "keys/cert.pem")
    monkeypatch.setenv("CMI_ALLOW_LOOPBACK", "1")
    monkeypatch.setenv("CMI_DATABASE_URL", f"sqlite:///{tmp_path / 'cmi.db'}")
    return Firm(tmp_path, monkeypatch)


def test_terms_add_takes_its_secret_from_a_file_stdin_or_the_environment(
    firm: Firm, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["terms", "add", "--customer", CUSTOMER, "--destination", "http://127.0.0.1:9/x"]
    argv += ["--standard", "cmi-ticket"]
    given = {}
    # From a file
    secret = generate_secret()
    path = firm.root / "destination.secret"
    path.write_text(secret + "\n")
    assert main([*argv, "--secret-file", str(path)]) == EXIT_OK
    given[capsys.readouterr().out.strip()] = secret
    # From standard input
    secret = generate_secret()
    firm.monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(secret.encode())))
    assert main([*argv, "--secret-file", "-"]) == EXIT_OK
    given[capsys.readouterr().out.strip()] = secret
    # From the environment
    secret = generate_secret()
    firm.monkeypatch.setenv("CMI_DESTINATION_SECRET", secret)
    assert main(argv) == EXIT_OK
    given[capsys.readouterr().out.strip()] = secret
    firm.monkeypatch.delenv("CMI_DESTINATION_SECRET")
    # None of them: a usage error that says where a secret comes from
    assert main(argv) == EXIT_USAGE
    assert "--secret-file" in capsys.readouterr().err
    adapter = firm.adapter()
    assert {t.id: t.secret for t in adapter.list_terms()} == given


def test_docs_never_put_a_secret_on_a_command_line() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"--secret[ =](?!-?file)", text), page
        assert not SECRET_RE.search(text), page  # no real-looking example secret either


def _readme_commands() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", readme, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and words[-1] in {"&", "&&"}:
                words.pop()
            if words[:1] == ["cmi"]:
                commands.append(words[1:])
    return commands


def test_the_readmes_commands_are_commands_cmi_takes() -> None:
    commands = _readme_commands()
    assert any(c[:2] == ["secrets", "generate"] for c in commands)
    assert any(c[:2] == ["terms", "add"] and "--secret-file" in c for c in commands)
    for argv in commands:
        build_parser().parse_args(argv)  # exits (failing the test) on a wrong option


# -- encryption at rest ------------------------------------------------------------------------


@dataclass
class Backend:
    """A store's database, opened with whatever keyring a test gives."""

    name: str
    open: Callable[[SecretsKeyring | None], OutboxStore]
    raw: Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]
    terms_table: str
    intermediaries_table: str


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    opened: list[Any] = []
    if request.param == "sqlite":
        path = tmp_path / "cmi.db"

        def open_sqlite(keyring: SecretsKeyring | None) -> OutboxStore:
            store = SQLiteStore(path, keyring=keyring)
            opened.append(store)
            return store

        def raw_sqlite(sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
            with contextlib.closing(sqlite3.connect(path)) as conn, conn:
                return conn.execute(sql, params).fetchall()

        yield Backend("sqlite", open_sqlite, raw_sqlite, "cmi_terms", "cmi_intermediaries")
    else:
        if not DSN:
            pytest.skip("CMI_TEST_POSTGRES_DSN is not set")
        import psycopg

        from cmi_sdk.outbox.postgres import PostgresStore

        schema = f"cmi_secrets_{secrets.token_hex(4)}"

        def open_postgres(keyring: SecretsKeyring | None) -> OutboxStore:
            store = PostgresStore(DSN, schema=schema, keyring=keyring)
            opened.append(store)
            return store

        def raw_postgres(sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
            with psycopg.connect(DSN, autocommit=True) as conn:
                cur = conn.execute(sql.replace("?", "%s"), params)
                return cur.fetchall() if cur.description else []

        try:
            yield Backend(
                "postgres",
                open_postgres,
                raw_postgres,
                f'"{schema}".terms',
                f'"{schema}".intermediaries',
            )
        finally:
            for store in opened:
                store.close()  # type: ignore[attr-defined]
            with psycopg.connect(DSN, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        return
    for store in opened:
        store.close()  # type: ignore[attr-defined]


def adapter_on(tmp_path: Path, store: OutboxStore, **options: Any) -> Adapter:
    return emitting_adapter(tmp_path, store=store, **options)


def stored_text(backend: Backend) -> str:
    """Every secret column as the database holds it."""
    terms = backend.raw(f"SELECT secret FROM {backend.terms_table}", ())  # noqa: S608
    inter = backend.raw(
        f"SELECT secrets FROM {backend.intermediaries_table}",  # noqa: S608
        (),
    )
    return json.dumps([list(r) for r in terms + inter], default=str)


def test_secrets_are_sealed_at_rest_and_read_back(tmp_path: Path, backend: Backend) -> None:
    keyring = SecretsKeyring([generate_secrets_key()])
    adapter = adapter_on(tmp_path, backend.open(keyring))
    terms = register(adapter)
    relay = generate_secret()
    adapter.add_intermediary("relay", relay)
    text = stored_text(backend)
    assert "whsec_" not in text
    assert terms.secret.removeprefix("whsec_") not in text
    assert relay.removeprefix("whsec_") not in text
    assert text.count("enc:v1:") == 2
    # A fresh store with the key reads them, and the endpoint takes the relay's requests.
    again = adapter_on(tmp_path, backend.open(keyring))
    assert again.get_terms(terms.id).secret == terms.secret
    assert again.store.intermediary_secrets("relay") == (relay,)
    with TestClient(again.asgi_app()) as client:
        assert _get_terms(client, "relay", relay).status_code == 200


def test_a_sealed_secret_moved_to_another_row_does_not_open(
    tmp_path: Path, backend: Backend
) -> None:
    keyring = SecretsKeyring([generate_secrets_key()])
    adapter = adapter_on(tmp_path, backend.open(keyring))
    victim = register(adapter)
    mine = register(adapter)
    (sealed,) = backend.raw(
        f"SELECT secret FROM {backend.terms_table} WHERE id = ?",  # noqa: S608
        (victim.id,),
    )[0]
    backend.raw(
        f"UPDATE {backend.terms_table} SET secret = ? WHERE id = ?",  # noqa: S608
        (sealed, mine.id),
    )
    with pytest.raises(ConfigurationError, match="another row"):
        adapter.get_terms(mine.id)
    assert adapter.get_terms(victim.id).secret == victim.secret


def test_a_missing_or_wrong_key_is_a_configuration_error(tmp_path: Path, backend: Backend) -> None:
    keyring = SecretsKeyring([generate_secrets_key()])
    adapter = adapter_on(tmp_path, backend.open(keyring))
    terms = register(adapter)
    adapter.add_intermediary("relay", generate_secret())
    without = adapter_on(tmp_path, backend.open(None))
    with pytest.raises(ConfigurationError, match="CMI_SECRETS_KEY"):
        without.get_terms(terms.id)
    with pytest.raises(ConfigurationError, match="CMI_SECRETS_KEY"):
        without.store.intermediary_secrets("relay")
    wrong = adapter_on(tmp_path, backend.open(SecretsKeyring([generate_secrets_key()])))
    with pytest.raises(ConfigurationError, match="not among the configured keys"):
        wrong.get_terms(terms.id)
    with pytest.raises(ConfigurationError, match="not among the configured keys"):
        wrong.list_terms()


def test_encryption_switched_on_later_then_the_key_rotated(
    tmp_path: Path, backend: Backend
) -> None:
    plain = adapter_on(tmp_path, backend.open(None))
    terms = register(plain)
    relay = generate_secret()
    plain.add_intermediary("relay", relay)
    assert terms.secret in stored_text(backend)
    first = generate_secrets_key()
    sealed = adapter_on(tmp_path, backend.open(SecretsKeyring([first])))
    assert sealed.get_terms(terms.id).secret == terms.secret  # plain rows read as they are
    assert sealed.reseal_secrets() == 2
    assert sealed.reseal_secrets() == 0
    first_id = SecretsKeyring([first]).key_ids[0]
    assert stored_text(backend).count(f"enc:v1:{first_id}:") == 2
    assert "whsec_" not in stored_text(backend)
    second = generate_secrets_key()
    rotated = adapter_on(tmp_path, backend.open(SecretsKeyring([second, first])))
    assert rotated.get_terms(terms.id).secret == terms.secret  # the old key still opens
    assert rotated.reseal_secrets() == 2
    only_new = adapter_on(tmp_path, backend.open(SecretsKeyring([second])))
    assert only_new.get_terms(terms.id).secret == terms.secret
    assert only_new.store.intermediary_secrets("relay") == (relay,)


def test_cmi_secrets_encrypt_seals_an_existing_store(
    firm: Firm, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = generate_secret()
    firm.monkeypatch.setenv("CMI_INTERMEDIARY_SECRET", secret)
    assert main(["intermediaries", "add", "relay"]) == EXIT_OK
    assert main(["secrets", "encrypt"]) == EXIT_USAGE  # no key configured
    key = firm.root / "secrets.key"
    assert main(["secrets", "generate-key", "--out", str(key)]) == EXIT_OK
    assert mode(key) == 0o600
    firm.monkeypatch.setenv("CMI_SECRETS_KEY_FILE", str(key))
    capsys.readouterr()
    assert main(["secrets", "encrypt"]) == EXIT_OK
    assert capsys.readouterr().out.startswith("sealed 1 row(s) with secrets key ")
    for name in ("cmi.db", "cmi.db-wal"):  # not even in freed space or an old page
        path = firm.root / name
        assert not path.exists() or secret.encode() not in path.read_bytes(), name
    assert firm.adapter().store.intermediary_secrets("relay") == (secret,)


# -- revocation and rotation ---------------------------------------------------------------


def _get_terms(client: TestClient, name: str, secret: str) -> Any:
    headers = signed_headers(secret=secret, method="GET", target="/cmi/terms", intermediary=name)
    return client.get("/cmi/terms", headers=headers)


def test_a_revoked_intermediary_is_refused_at_once(tmp_path: Path, backend: Backend) -> None:
    serving = adapter_on(tmp_path, backend.open(None))
    relay = generate_secret()
    serving.add_intermediary("relay", relay)
    with TestClient(serving.asgi_app()) as client:
        assert _get_terms(client, "relay", relay).status_code == 200  # its verifier is kept
        operator = adapter_on(tmp_path, backend.open(None))  # another process: the CLI
        assert operator.revoke_intermediary("relay") is True
        refused = _get_terms(client, "relay", relay)
        assert refused.status_code == 401, refused.text
        assert operator.revoke_intermediary("relay") is False
        # Registered again, with a new secret: the old one stays dead.
        fresh = generate_secret()
        operator.add_intermediary("relay", fresh)
        assert _get_terms(client, "relay", relay).status_code == 401
        assert _get_terms(client, "relay", fresh).status_code == 200
    assert serving.store.intermediary_secrets("relay") == (fresh,)


def test_a_rotation_keeps_the_old_secret_for_the_grace_window_only(
    tmp_path: Path, backend: Backend
) -> None:
    clock = Clock(dt.datetime.now(dt.UTC).timestamp())
    serving = adapter_on(tmp_path, backend.open(None), clock=clock)
    old = generate_secret()
    serving.add_intermediary("relay", old)
    with TestClient(serving.asgi_app()) as client:

        def status(secret: str) -> int:
            headers = signed_headers(
                secret=secret,
                method="GET",
                target="/cmi/terms",
                intermediary="relay",
                timestamp=int(clock.now),
            )
            return client.get("/cmi/terms", headers=headers).status_code

        assert status(old) == 200
        operator = adapter_on(tmp_path, backend.open(None), clock=clock)
        new = operator.rotate_intermediary("relay", grace=dt.timedelta(hours=1))
        assert new != old
        assert SECRET_RE.fullmatch(new)
        assert (status(old), status(new)) == (200, 200)
        clock.now += 3599
        assert (status(old), status(new)) == (200, 200)
        clock.now += 2  # the grace is over: only the new secret
        assert (status(old), status(new)) == (401, 200)
        # A rotation without grace ends the other secrets at once.
        newest = operator.rotate_intermediary("relay", grace=dt.timedelta(0))
        assert (status(new), status(newest)) == (401, 200)
    [listed] = operator.intermediaries()
    assert [s.expires_at for s in listed.secrets] == [None]
    assert "whsec_" not in repr(listed)


def test_rotation_and_revocation_of_what_is_not_there(tmp_path: Path, backend: Backend) -> None:
    adapter = adapter_on(tmp_path, backend.open(None))
    with pytest.raises(IntermediaryNotFoundError):
        adapter.rotate_intermediary("nobody")
    with pytest.raises(IntermediaryNotFoundError):
        adapter.revoke_intermediary("nobody")
    adapter.add_intermediary("relay", generate_secret())
    assert adapter.revoke_intermediary("relay")
    with pytest.raises(IntermediaryNotFoundError, match="revoked"):
        adapter.rotate_intermediary("relay")
    with pytest.raises(ConfigurationError):
        adapter.add_intermediary("relay", "not-a-secret")
    [listed] = adapter.intermediaries()
    assert listed.revoked_at is not None
    assert listed.secrets == ()


def test_cmi_intermediaries_rotate_revoke_and_list(
    firm: Firm, capsys: pytest.CaptureFixture[str]
) -> None:
    old = generate_secret()
    firm.monkeypatch.setenv("CMI_INTERMEDIARY_SECRET", old)
    assert main(["intermediaries", "add", "relay"]) == EXIT_OK
    capsys.readouterr()
    out = firm.root / "relay.secret"
    with permissive_umask():
        assert main(["intermediaries", "rotate", "relay", "--grace", "2h", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out == ""
    assert "not shown again" in printed.err
    assert mode(out) == 0o600
    new = out.read_text().strip()
    assert firm.adapter().store.intermediary_secrets("relay") == (old, new)
    assert main(["intermediaries", "list"]) == EXIT_OK
    listing = capsys.readouterr().out
    assert re.fullmatch(r"relay  active  2 secret\(s\): until \S+Z, no end\n", listing), listing
    assert "whsec_" not in listing
    assert main(["intermediaries", "revoke", "relay"]) == EXIT_OK
    assert capsys.readouterr().out == "relay revoked\n"
    assert main(["intermediaries", "list", "--json"]) == EXIT_OK
    [item] = json.loads(capsys.readouterr().out)
    assert item["revoked_at"] is not None
    assert item["secrets"] == []
    assert firm.adapter().store.intermediary_secrets("relay") == ()
    assert main(["intermediaries", "rotate", "nobody"]) != EXIT_OK
    assert "no intermediary named 'nobody'" in capsys.readouterr().err


# -- stores made by earlier versions ----------------------------------------------------------


def test_an_sqlite_store_of_version_4_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "cmi.db"
    SQLiteStore(path).close()
    secret = generate_secret()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:  # as version 4 left it
        conn.execute("ALTER TABLE cmi_intermediaries DROP COLUMN revoked_at")
        conn.execute("ALTER TABLE cmi_intermediaries DROP COLUMN generation")
        as_legacy_sqlite(conn, 4)
        conn.execute(
            "INSERT INTO cmi_intermediaries VALUES ('relay', ?, 1.0)", (json.dumps([secret]),)
        )
    store = SQLiteStore(path)
    try:
        assert store.intermediary_secrets("relay") == (secret,)
        assert store.revoke_intermediary("relay", at=2.0)
        assert store.intermediary_secrets("relay") == ()
    finally:
        store.close()


def test_a_postgres_store_of_version_3_is_upgraded_in_place() -> None:
    if not DSN:
        pytest.skip("CMI_TEST_POSTGRES_DSN is not set")
    import psycopg

    from cmi_sdk.outbox.postgres import PostgresStore

    schema = f"cmi_secrets_{secrets.token_hex(4)}"
    secret = generate_secret()
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'CREATE TABLE "{schema}".meta (key text PRIMARY KEY, value text NOT NULL)')
        conn.execute(
            f'CREATE TABLE "{schema}".intermediaries (name text PRIMARY KEY,'
            " secrets jsonb NOT NULL, created_at double precision NOT NULL)"
        )
        conn.execute(f"INSERT INTO \"{schema}\".meta VALUES ('schema_version', '3')")  # noqa: S608
        conn.execute(
            f"INSERT INTO \"{schema}\".intermediaries VALUES ('relay', %s::jsonb, 1.0)",  # noqa: S608
            (json.dumps([secret]),),
        )
    store = PostgresStore(DSN, schema=schema)
    try:
        assert store.intermediary_secrets("relay") == (secret,)
        store.rotate_intermediary("relay", generate_secret(), at=2.0, grace_until=2.0)
        assert secret not in store.intermediary_secrets("relay", now=3.0)
    finally:
        store.close()
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_a_secret_file_others_may_read_is_warned_about(
    firm: Firm, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    path = firm.root / "relay.secret"
    path.write_text(generate_secret() + "\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="cmi_sdk.files"):
        assert main(["intermediaries", "add", "relay", "--secret-file", str(path)]) == EXIT_OK
    assert any(str(path) in r.getMessage() for r in caplog.records), caplog.text
    assert mode(path) == 0o644  # the firm's file, told about, not changed
    capsys.readouterr()


def test_the_secrets_key_settings(tmp_path: Path) -> None:
    from cmi_sdk.config import Settings

    key = generate_secrets_key()
    keyring = Settings.load(environ={"CMI_SECRETS_KEY": key}, directory=tmp_path).secrets_keyring()
    assert keyring is not None
    assert keyring.key_ids == SecretsKeyring([key]).key_ids
    assert key not in repr(Settings.load(environ={"CMI_SECRETS_KEY": key}, directory=tmp_path))
    assert key not in repr(keyring)
    older = generate_secrets_key()
    path = tmp_path / "keys"
    path.write_text(f"{key}\n{older}\n")
    path.chmod(0o600)
    both = Settings.load(environ={"CMI_SECRETS_KEY_FILE": str(path)}, directory=tmp_path)
    assert both.secrets_keyring().key_ids == SecretsKeyring([key, older]).key_ids  # type: ignore[union-attr]
    for environ, message in [
        ({"CMI_SECRETS_KEY": key, "CMI_SECRETS_KEY_FILE": str(path)}, "not both"),
        ({"CMI_SECRETS_KEY": "whsec_" + key[6:]}, "not a cmisk_ key"),
        ({"CMI_SECRETS_KEY": "cmisk_c2hvcnQ="}, "32 bytes"),
        ({"CMI_SECRETS_KEY_FILE": str(tmp_path / "missing")}, "cannot read"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            Settings.load(environ=environ, directory=tmp_path).secrets_keyring()
    # The adapter the settings make seals what its store writes.
    settings = Settings.load(
        environ={"CMI_SECRETS_KEY": key, "CMI_DATABASE_URL": f"sqlite:///{tmp_path / 'k.db'}"},
        directory=tmp_path,
    )
    adapter = settings.adapter(signer=None)
    try:
        adapter.add_intermediary("relay", generate_secret())
        assert b"enc:v1:" in (tmp_path / "k.db").read_bytes() + _wal(tmp_path / "k.db")
    finally:
        adapter.close()


def _wal(database: Path) -> bytes:
    wal = Path(f"{database}-wal")
    return wal.read_bytes() if wal.exists() else b""
