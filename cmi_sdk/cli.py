"""The ``cmi`` command.

Exit codes: 0 success, 1 invalid input (the input was refused, nothing was written),
2 usage error (bad arguments, unknown standard or document type), 3 internal error (a bug in
the SDK or a plugin; ``--debug`` shows the traceback).

Errors go to standard error, without a traceback unless ``--debug`` is given. Output goes to
standard output only once it is complete, and ``--output`` files are written atomically, so a
failure never leaves a partial file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from cmi_sdk import __version__
from cmi_sdk._adapter import Adapter
from cmi_sdk._exceptions import (
    CMIError,
    DocumentValidationError,
    MalformedXMLError,
    ModelValidationError,
    NotFoundError,
    ValidationIssue,
)
from cmi_sdk._files import warn_if_shared, write_private_file
from cmi_sdk._models import load_model
from cmi_sdk._standards import DocumentType
from cmi_sdk._xml import DEFAULT_MAX_BYTES

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["EXIT_INTERNAL", "EXIT_INVALID", "EXIT_OK", "EXIT_USAGE", "main", "serve_app"]

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


class UsageError(Exception):
    """Bad arguments: reported with exit code 2."""


class InputError(Exception):
    """Input that cannot be read: reported with exit code 1."""


def _read(path: str, limit: int | None = None) -> bytes:
    """Read ``path`` ('-' is standard input), at most ``limit`` + 1 bytes when limited."""
    size = -1 if limit is None else limit + 1
    try:
        if path == "-":
            return sys.stdin.buffer.read(size)
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _write(data: bytes, output: str | None) -> None:
    """Write ``data`` to ``output`` atomically, or to standard output in one piece."""
    if output is None or output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    target = Path(output)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent or Path("."), prefix=f".{target.name}.")
    except OSError as exc:
        raise InputError(f"{output}: cannot write: {exc.strerror or exc}") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as an ordinary new file would be, not mkstemp's 0600
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: Why no option takes a secret's value: shown in the help and in the refusal.
_WHY_NOT_ON_COMMAND_LINE = (
    "a secret on the command line can be read by every user of the machine (ps, /proc) and"
    " stays in the shell's history"
)


class _RefusedSecret(argparse.Action):
    """``--secret VALUE``: refused, with what to use instead."""

    def __init__(self, option_strings: list[str], dest: str, env: str, **kwargs: Any) -> None:
        self.env = env
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,  # noqa: ARG002  (nothing is stored)
        values: object,  # noqa: ARG002  (the secret, which is not used)
        option_string: str | None = None,
    ) -> None:
        parser.error(
            f"{option_string} is refused: {_WHY_NOT_ON_COMMAND_LINE}; give --secret-file PATH"
            f" ('-' reads standard input) or set {self.env}"
        )


def _secret_options(p: argparse.ArgumentParser, env: str, *, several: bool = False) -> None:
    """``--secret-file`` (and the environment variable ``env``) for a command that needs a
    secret; ``--secret`` is refused with the reason."""
    p.add_argument(
        "--secret-file",
        action="append" if several else "store",
        metavar="PATH",
        help=(
            f"read the whsec_ secret{'s (one a line; repeatable)' if several else ''} from PATH"
            f" ('-': standard input), or set {env}; never give a secret as an argument:"
            f" {_WHY_NOT_ON_COMMAND_LINE}"
        ),
    )
    p.add_argument("--secret", action=_RefusedSecret, env=env, nargs="?", help=argparse.SUPPRESS)
    p.set_defaults(secret_env=env)


def _read_secrets(args: argparse.Namespace) -> list[str]:
    """The secrets of ``--secret-file`` (files, or '-') or of the command's environment
    variable; separated by lines, spaces or commas."""
    files = args.secret_file
    paths = [] if files is None else [files] if isinstance(files, str) else list(files)
    texts: list[str] = []
    for path in paths:
        if path != "-":
            warn_if_shared(path, "the secret file")
        texts.append(_read(path, 1 << 16).decode("utf-8", errors="replace"))
    if not paths:
        value = os.environ.get(args.secret_env)
        if not value:
            raise UsageError(
                f"this command needs a secret: give --secret-file PATH ('-' reads standard"
                f" input) or set {args.secret_env}"
            )
        texts.append(value)
    secrets = [part for text in texts for part in re.split(r"[\s,]+", text) if part]
    if not secrets:
        raise InputError(f"no secret found in {', '.join(paths)}")
    return secrets


def _read_secret(args: argparse.Namespace) -> str:
    """The one secret of ``--secret-file`` or the command's environment variable."""
    secrets = _read_secrets(args)
    if len(secrets) > 1:
        raise InputError("expected one secret, found several")
    return secrets[0]


def _write_secret(text: str, out: str | None) -> None:
    """Print a new secret (or key), or write it to a new file readable by its owner only."""
    if out is None or out == "-":
        _write(f"{text}\n".encode(), None)
        return
    try:
        write_private_file(out, f"{text}\n".encode())
    except FileExistsError:
        raise InputError(f"{out} exists; not overwriting it") from None
    except OSError as exc:
        raise InputError(f"{out}: cannot write: {exc.strerror or exc}") from None
    print(f"cmi: wrote {out} (readable by its owner only)", file=sys.stderr)


def _duration(text: str) -> float:
    """``--grace``: seconds, or a number with s, m, h or d."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 30m, 24h, 7d")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * unit


def _adapter(args: argparse.Namespace) -> Adapter:
    return Adapter(block=args.block)


def _resolve_names(
    adapter: Adapter, standard: str | None, doc_type: str | None
) -> DocumentType[Any] | None:
    """Check names given on the command line, so a typo is a usage error (exit 2); return
    the named document type, if a standard was named."""
    if doc_type is not None and standard is None:
        raise UsageError("--type needs --standard")
    if standard is None:
        return None
    try:
        return adapter.standards.resolve(standard, doc_type)[1]
    except NotFoundError as exc:
        raise UsageError(str(exc)) from None


def cmd_standards(args: argparse.Namespace) -> int:
    """List installed standards and their document types."""
    adapter = _adapter(args)
    if args.json:
        listing = adapter.standards.describe()
        _write((json.dumps(listing, indent=2) + "\n").encode(), None)
        return EXIT_OK
    lines = []
    for std in adapter.standards:
        title = f"  {std.title}" if std.title else ""
        lines.append(f"{std.name} {std.version}{title}")
        lines.extend(
            f"  {d.name:<14} {d.root}  (from {d.model.__name__})" for d in std.document_types
        )
    _write(("\n".join(lines) + "\n").encode(), None)
    return EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    """Render a canonical JSON model as a document of a standard."""
    adapter = _adapter(args)
    doc_type = _resolve_names(adapter, args.standard, args.type)
    if doc_type is None:  # argparse requires --standard; kept for callers of cmd_render
        raise UsageError("render needs --standard")
    text = _read(args.input)
    try:
        model = load_model(doc_type.model, text)
    except ModelValidationError as exc:
        raise _located(args.input, exc) from None
    xml = adapter.render(model, standard=args.standard, document_type=args.type)
    _write(xml, args.output)
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate documents; report every error with its line, path and reason."""
    adapter = _adapter(args)
    _resolve_names(adapter, args.standard, args.type)
    status = EXIT_OK
    for path in args.files:
        data = _read(path, adapter.parser.max_bytes)
        try:
            doc = adapter.validate(data, standard=args.standard, document_type=args.type)
            # The rules an XSD cannot express (a currency's decimal places) are checked by
            # reading the model back; a minimized document has no complete model to read.
            if not doc.withheld:
                doc.to_model()
        except CMIError as exc:
            _report(path, exc)
            status = EXIT_INVALID
            continue
        if not args.quiet:
            note = f" (withheld: {', '.join(doc.withheld)})" if doc.withheld else ""
            line = f"{path}: valid {doc.standard.name} {doc.document_type.name}{note}\n"
            _write(line.encode(), None)
    return status


def cmd_parse(args: argparse.Namespace) -> int:
    """Parse a document back into its canonical model, printed as JSON."""
    adapter = _adapter(args)
    _resolve_names(adapter, args.standard, args.type)
    data = _read(args.file, adapter.parser.max_bytes)
    cert = _read(args.cert, 1 << 20) if args.cert else None
    try:
        if cert is not None:
            from cmi_sdk.signing import verify_document  # noqa: PLC0415

            # Values are read from what the signature covers, as the verifier saw it.
            data = verify_document(data, cert, max_bytes=adapter.parser.max_bytes)
        model = adapter.parse(data, standard=args.standard, document_type=args.type)
    except CMIError as exc:
        raise _located(args.file, exc) from None
    except ValueError as exc:  # not a certificate
        raise InputError(f"{args.cert}: not a PEM certificate: {exc}") from None
    _write((model.model_dump_json(indent=2) + "\n").encode(), args.output)
    return EXIT_OK


def _settings() -> Any:
    from cmi_sdk.config import Settings  # noqa: PLC0415

    return Settings.load()


def _emitting_adapter(args: argparse.Namespace, *, require_signer: bool = True) -> Adapter:
    """The adapter of the configured store and keys; refuses to produce unsigned documents."""
    return _configured_adapter(args.block, require_signer=require_signer)


def _configured_adapter(block: list[str], *, require_signer: bool) -> Adapter:
    settings = _settings()
    how = (
        "run `cmi keys generate keys` and set CMI_SIGNING_KEY=keys/key.pem and"
        " CMI_SIGNING_CERT=keys/cert.pem (or signing_key and signing_cert in cmi.toml)"
    )
    try:
        signer = settings.signer()
    except CMIError as exc:
        if require_signer:
            raise UsageError(f"{exc}; for a development pair, {how}") from None
        signer = None  # commands that sign nothing work without a usable key
    if require_signer and signer is None:
        raise UsageError(f"no signing key is configured: {how}")
    adapter: Adapter = settings.adapter(block=block, signer=signer)
    return adapter


def _print_json(data: object) -> None:
    _write((json.dumps(data, indent=2, default=str) + "\n").encode(), None)


def _until(text: str | None) -> str | None:
    """``--until``: a date (the terms lapse at its start, UTC) or an ISO 8601 time."""
    if text is None:
        return None
    import datetime as dt  # noqa: PLC0415

    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        return text  # a full time: the model checks it is timezone-aware
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).isoformat()


def cmd_terms_add(args: argparse.Namespace) -> int:
    """Register sharing terms for a customer, as the firm's policy answers them."""
    from cmi_sdk._models import TermsProposal  # noqa: PLC0415

    adapter = _emitting_adapter(args)
    try:  # a standard or document type the firm does not have is a usage error (exit 2)
        std = adapter.standards.get(args.standard)
        if args.type is not None:
            std.document_type(args.type)
    except NotFoundError as exc:
        raise UsageError(str(exc)) from None
    data: dict[str, Any] = {
        "customer_ref": args.customer,
        "destination": None if args.destination in (None, "pull") else args.destination,
        "secret": _read_secret(args),
        "standard": args.standard,
        "document_type": args.type,
        "fields": None if args.fields is None else [f for f in args.fields.split(",") if f],
        "when": args.when,
        "purpose": {"code": args.purpose_code, "text": args.purpose},
        "until": _until(args.until),
    }
    try:
        proposal = load_model(TermsProposal, data)
    except ModelValidationError as exc:
        raise _located("terms", exc) from None
    decision = adapter.propose_terms(proposal)
    if decision.outcome == "accepted" and decision.terms is not None:
        if decision.consent is not None:
            print(f"consent record {decision.consent.id} signed", file=sys.stderr)
        _write(f"{decision.terms.id}\n".encode(), None)
        return EXIT_OK
    if decision.outcome == "alternative" and decision.alternative is not None:
        alternative = json.dumps(decision.alternative.public_dict(), default=str)
        raise InputError(
            f"the firm's policy offers an alternative ({decision.reason}): {alternative}"
        )
    raise InputError(f"the firm's policy rejects these terms: {decision.reason}")


def cmd_terms_list(args: argparse.Namespace) -> int:
    """List sharing terms."""
    adapter = _emitting_adapter(args, require_signer=False)
    terms = adapter.list_terms(customer_ref=args.customer, include_revoked=args.all)
    if args.json:
        _print_json([t.public_dict() | {"id": t.id} for t in terms])
        return EXIT_OK
    lines = []
    for t in terms:
        state = "revoked" if t.revoked_at is not None else "active"
        where = t.destination or "(pull)"
        fields = ",".join(t.fields) if t.fields is not None else "*"
        lines.append(
            f"{t.id}  {t.customer_ref}  {state}  {t.standard}  {t.when}  {where}  fields={fields}"
        )
    _write(("\n".join(lines) + "\n").encode() if lines else b"", None)
    return EXIT_OK


def cmd_terms_revoke(args: argparse.Namespace) -> int:
    """Revoke sharing terms."""
    adapter = _emitting_adapter(args)
    consent = adapter.revoke_terms(args.id)
    _write(f"{args.id} revoked; consent record {consent.record.id}\n".encode(), None)
    return EXIT_OK


def cmd_links_create(args: argparse.Namespace) -> int:
    """Make a link code for a signed-in customer's account, to give their intermediary."""
    import datetime as dt  # noqa: PLC0415

    if not 1 <= args.ttl <= 24 * 60:
        raise UsageError("--ttl is 1 to 1440 minutes")
    adapter = _emitting_adapter(args, require_signer=False)
    code = adapter.create_link_code(args.account, ttl=dt.timedelta(minutes=args.ttl))
    expires = code.expires_at.isoformat().replace("+00:00", "Z")
    if args.json:
        _print_json({"code": code.code, "account": code.account, "expires_at": expires})
        return EXIT_OK
    _write(f"{code.code}\nexpires {expires}\n".encode(), None)
    return EXIT_OK


def cmd_links_list(args: argparse.Namespace) -> int:
    """List service links."""
    adapter = _emitting_adapter(args, require_signer=False)
    found = adapter.links(
        account=args.account, intermediary=args.intermediary, include_revoked=args.all
    )
    if args.json:
        _print_json([link.model_dump(mode="json") for link in found])
        return EXIT_OK
    lines = [
        f"{link.id}  {link.account}  {link.intermediary}  {link.customer_ref}  "
        f"{'active' if link.active else 'revoked'}"
        for link in found
    ]
    _write(("\n".join(lines) + "\n").encode() if lines else b"", None)
    return EXIT_OK


def cmd_links_revoke(args: argparse.Namespace) -> int:
    """Revoke a service link and every terms of its reference."""
    adapter = _emitting_adapter(args)
    revocation = adapter.revoke_link(args.id)
    records = ", ".join(c.record.id for c in revocation.consents) or "none"
    _write(
        f"{args.id} revoked; terms revoked: {len(revocation.consents)} (consent records:"
        f" {records}); undelivered documents cancelled: {revocation.cancelled}\n".encode(),
        None,
    )
    return EXIT_OK


def cmd_emit(args: argparse.Namespace) -> int:
    """Emit a canonical transaction to its customer under their terms."""
    from cmi_sdk._models import Transaction  # noqa: PLC0415

    adapter = _emitting_adapter(args)
    text = _read(args.file)
    try:
        tx = load_model(Transaction, text)
    except ModelValidationError as exc:
        raise _located(args.file, exc) from None
    emissions = adapter.emit(tx, customer_refs=args.customer or None)
    if not emissions:
        print(
            f"cmi: no active sharing terms for {', '.join(args.customer or [tx.customer_ref])}:"
            " nothing emitted",
            file=sys.stderr,
        )
    lines = [
        f"{e.msg_id}  {e.terms_id}  {e.standard} {e.document_type}  {e.state}"
        + (f"  withheld={','.join(e.withheld)}" if e.withheld else "")
        for e in emissions
    ]
    _write(("\n".join(lines) + "\n").encode() if lines else b"", None)
    return EXIT_OK


def cmd_deliver(args: argparse.Namespace) -> int:
    """Deliver the outbox: what is due now (--once), or until interrupted."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    settings = _settings()
    adapter = _emitting_adapter(args, require_signer=False)
    worker = adapter.delivery_worker(**settings.worker_options())
    try:
        if args.once:
            stats = worker.run_once()
            _write(
                f"delivered {stats.delivered}, retry later {stats.retried}, dead {stats.dead}"
                f"{f', skipped {stats.skipped}' if stats.skipped else ''}\n".encode(),
                None,
            )
            return EXIT_OK
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        print(f"cmi: delivering from {adapter.database_url} (Ctrl-C stops)", file=sys.stderr)
        try:
            worker.run(stop=stop, poll_interval=args.poll)
        except KeyboardInterrupt:
            stop.set()
        return EXIT_OK
    finally:
        worker.close()


def cmd_outbox(args: argparse.Namespace) -> int:
    """Inspect the outbox, or redrive dead rows."""
    import datetime as dt  # noqa: PLC0415

    adapter = _emitting_adapter(args, require_signer=False)
    store = adapter.store
    now = adapter.clock()
    if args.outbox_command == "status":
        status = store.status(now)
        data = {
            "counts": status.counts,
            "oldest_pending_age_seconds": status.oldest_pending_age,
            "disabled_destinations": list(status.disabled_destinations),
        }
        if args.json:
            _print_json(data)
        else:
            lines = [f"{state:<10} {count}" for state, count in status.counts.items()]
            if status.oldest_pending_age is not None:
                lines.append(f"oldest pending: {status.oldest_pending_age:.0f} s")
            lines.extend(f"disabled: {url}" for url in status.disabled_destinations)
            _write(("\n".join(lines) + "\n").encode(), None)
        return EXIT_OK
    if args.outbox_command == "list":
        rows = store.rows(state=args.state, limit=args.limit)
        if args.json:
            _print_json([r.summary() for r in rows])
        else:
            lines = [
                f"{r.msg_id}  {r.state:<9} attempts={r.attempts}  {r.destination or '(pull)'}"
                + (f"  last_error={r.last_error}" if r.last_error else "")
                for r in rows
            ]
            _write(("\n".join(lines) + "\n").encode() if lines else b"", None)
        return EXIT_OK
    # redrive
    if (args.id is None) == (args.since is None):
        raise UsageError("outbox redrive takes an ID or --since T")
    if args.id is not None:
        count = store.redrive(msg_id=args.id, now=now)
    else:
        try:
            since = dt.datetime.fromisoformat(args.since)
        except ValueError:
            raise UsageError(f"--since {args.since!r} is not an ISO 8601 time") from None
        if since.tzinfo is None:
            raise UsageError("--since needs a timezone (for example 2026-11-24T00:00:00Z)")
        count = store.redrive(since=since.timestamp(), now=now)
    _write(f"redriven {count}\n".encode(), None)
    return EXIT_OK


def cmd_db_migrate(args: argparse.Namespace) -> int:  # noqa: ARG001  (no options)
    """Create or upgrade the store's tables (SQLite or PostgreSQL); idempotent."""
    from cmi_sdk._adapter import open_store  # noqa: PLC0415

    url = _settings().database_url
    store = open_store(url)
    store.migrate()
    shown = url.rsplit("@", maxsplit=1)[-1]  # never a password
    _write(f"migrated {shown}\n".encode(), None)
    return EXIT_OK


def cmd_intermediaries_add(args: argparse.Namespace) -> int:
    """Register an intermediary and its Standard Webhooks secret."""
    secret = _read_secret(args)
    adapter = _emitting_adapter(args, require_signer=False)
    adapter.add_intermediary(args.name, secret)
    _write(f"{args.name}\n".encode(), None)
    return EXIT_OK


def cmd_intermediaries_rotate(args: argparse.Namespace) -> int:
    """Give an intermediary a new secret, shown once; the old ones work for --grace."""
    import datetime as dt  # noqa: PLC0415

    adapter = _emitting_adapter(args, require_signer=False)
    grace = dt.timedelta(seconds=args.grace)
    secret = adapter.rotate_intermediary(args.name, grace=grace)
    _write_secret(secret, args.out)
    until = dt.datetime.fromtimestamp(adapter.clock(), dt.UTC) + grace
    print(
        f"cmi: {args.name}'s other secrets work until {until:%Y-%m-%dT%H:%M:%SZ}; give the"
        " new one to the intermediary now (it is not shown again)",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_intermediaries_revoke(args: argparse.Namespace) -> int:
    """Revoke an intermediary: its requests are refused from now on, its links and terms
    revoked."""
    adapter = _emitting_adapter(args, require_signer=False)
    if adapter.revoke_intermediary(args.name):
        _write(f"{args.name} revoked\n".encode(), None)
    else:
        _write(f"{args.name} was revoked already\n".encode(), None)
    return EXIT_OK


def cmd_intermediaries_list(args: argparse.Namespace) -> int:
    """List intermediaries and their secrets' ends (never the secrets)."""
    import datetime as dt  # noqa: PLC0415

    adapter = _emitting_adapter(args, require_signer=False)
    found = adapter.intermediaries()
    if args.json:
        _print_json([i.public_dict() for i in found])
        return EXIT_OK

    def when(moment: float) -> str:
        return f"{dt.datetime.fromtimestamp(moment, dt.UTC):%Y-%m-%dT%H:%M:%SZ}"

    now = adapter.clock()
    lines = []
    for item in found:
        if item.revoked_at is not None:
            lines.append(f"{item.name}  revoked {when(item.revoked_at)}")
            continue
        valid = [s for s in item.secrets if s.valid_at(now)]
        ends = ", ".join(
            "no end" if s.expires_at is None else f"until {when(s.expires_at)}" for s in valid
        )
        lines.append(f"{item.name}  active  {len(valid)} secret(s): {ends}")
    _write(("\n".join(lines) + "\n").encode() if lines else b"", None)
    return EXIT_OK


def cmd_secrets_generate(args: argparse.Namespace) -> int:
    """Print (or write to a new 0600 file) a fresh Standard Webhooks secret."""
    from cmi_sdk.webhooks import generate_secret  # noqa: PLC0415

    _write_secret(generate_secret(), args.out)
    return EXIT_OK


def cmd_secrets_generate_key(args: argparse.Namespace) -> int:
    """Print (or write to a new 0600 file) a fresh key to seal stored secrets with."""
    from cmi_sdk._secrets import generate_secrets_key  # noqa: PLC0415

    _write_secret(generate_secrets_key(), args.out)
    return EXIT_OK


def cmd_secrets_encrypt(args: argparse.Namespace) -> int:
    """Seal every stored secret with the first configured secrets key."""
    settings = _settings()
    keyring = settings.secrets_keyring()
    if keyring is None:
        raise UsageError(
            "no secrets key is configured: set CMI_SECRETS_KEY or CMI_SECRETS_KEY_FILE (make"
            " a key with `cmi secrets generate-key --out FILE`)"
        )
    adapter = _emitting_adapter(args, require_signer=False)
    changed = adapter.reseal_secrets()
    _write(f"sealed {changed} row(s) with secrets key {keyring.key_ids[0]}\n".encode(), None)
    return EXIT_OK


def cmd_listen(args: argparse.Namespace) -> int:
    """Run a customer's store: verify, dedup and save every delivered document."""
    from cmi_sdk.receiver import CustomerStore, format_line, serve  # noqa: PLC0415

    cert = _read(args.cert, 1 << 20) if args.cert else None

    def show(doc: Any) -> None:
        print(format_line(doc), flush=True)

    settings = _server_settings(args)
    store = CustomerStore(
        directory=args.store,
        secrets=_read_secrets(args),
        certificate=cert,
        on_document=show,
        body_timeout=settings.body_timeout,
    )

    def ready(port: int) -> None:
        print(f"listening on http://{args.host}:{port}/ storing in {args.store}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        serve(store, host=args.host, port=args.port, ready=ready, limits=settings.server_limits())
    return EXIT_OK


def _server_settings(args: argparse.Namespace) -> Any:
    """The settings, with the server limits given on the command line over them."""
    settings = _settings()
    given = {
        name: getattr(args, name)
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout", "max_connections")
        if getattr(args, name, None) is not None
    }
    return dataclasses.replace(settings, **given) if given else settings


#: How ``cmi serve --workers N`` hands its options to the worker processes it starts.
_SERVE_OPTIONS = "CMI_SERVE_OPTIONS"


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the firm's CMI endpoint with uvicorn, in one process or ``--workers`` N."""
    from cmi_sdk._serving import run_server  # noqa: PLC0415

    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    # Built here whatever the number of workers: a missing key or a bad setting is told
    # before anything listens, and the reference firms' data is seeded once.
    settings = _server_settings(args)
    limits = settings.server_limits()
    adapter = _serving_adapter(block=args.block, reference_firms=args.reference_firms)
    workers = "" if args.workers == 1 else f" with {args.workers} worker processes"
    print(
        f"cmi: serving on http://{args.host}:{args.port}/{workers} (Ctrl-C stops)",
        file=sys.stderr,
    )
    if args.metrics:
        if settings.metrics_token is None:
            print(
                f"cmi: GET /metrics is open to whoever reaches {args.host}:{args.port};"
                " set CMI_METRICS_TOKEN to ask for a bearer token",
                file=sys.stderr,
            )
        else:
            print("cmi: GET /metrics asks for the CMI_METRICS_TOKEN bearer token", file=sys.stderr)
    options: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "log_level": "warning",
        "access_log": False,
        "ws": "none",  # the endpoint is HTTP only: no upgrade to another protocol's limits
    }
    app_options = {
        "metrics": args.metrics,
        "metrics_token": settings.metrics_token,
        "body_timeout": settings.body_timeout,
    }
    if args.workers == 1:
        run_server(adapter.asgi_app(**app_options), limits=limits, **options)
        return EXIT_OK
    # One Python process runs one request's code at a time (the GIL): N processes use N
    # cores. Each builds its own adapter from the same settings; the store (replay cache,
    # offers, acceptances) is what they share.
    adapter.close()
    # The token is not passed on: each worker reads it from the settings, as this did.
    os.environ[_SERVE_OPTIONS] = json.dumps(
        {
            "block": args.block,
            "reference_firms": args.reference_firms,
            "metrics": args.metrics,
            "body_timeout": settings.body_timeout,
        }
    )
    run_server(
        "cmi_sdk.cli:serve_app", factory=True, workers=args.workers, limits=limits, **options
    )
    return EXIT_OK


def serve_app() -> Starlette:
    """The endpoint of one worker process of ``cmi serve --workers N``: an adapter built
    from the settings, with the options the command passed in ``CMI_SERVE_OPTIONS``."""
    options = json.loads(os.environ.get(_SERVE_OPTIONS, "{}"))
    adapter = _serving_adapter(
        block=options.get("block", []), reference_firms=options.get("reference_firms", False)
    )
    settings = _settings()
    return adapter.asgi_app(
        metrics=options.get("metrics", False),
        metrics_token=settings.metrics_token,
        body_timeout=options.get("body_timeout", settings.body_timeout),
    )


def _serving_adapter(*, block: list[str], reference_firms: bool) -> Adapter:
    adapter = _configured_adapter(block, require_signer=False)
    if reference_firms:
        adapter = _with_reference_firms(block, adapter)
    return adapter


def _client(args: argparse.Namespace) -> Any:
    from cmi_sdk.client import CMIClient  # noqa: PLC0415

    return CMIClient(args.to, secret=_read_secret(args), intermediary=args.intermediary)


def _answer_problem(response: Any) -> InputError:
    try:
        data = response.json()
        detail = f"{data.get('type', '')}: {data.get('detail', '')}"
    except ValueError:
        detail = response.text[:500]
    return InputError(f"the firm answered {response.status_code}: {detail}")


def format_offers(answer: Any) -> list[str]:
    """Lines describing a firm's answer (an OfferSet) for people."""
    lines = [f"answer to {answer.request_id} from {answer.firm}:"]
    if answer.declined:
        lines.append(f"  no offer: {answer.declined}")
    for offer in answer.offers:
        product = offer.product
        if product.kind == "flight":
            what = (
                f"{product.airline} {product.flight} {product.origin}-{product.destination}"
                f" {product.date} class {product.fare_class}"
            )
        else:
            what = (
                f"loan of {product.principal} over {product.term_months} months"
                f" at {product.apr} % APR"
            )
        lines.append(f"  offer {offer.id}: {what}")
        lines.append(
            f"    price {offer.price}, valid until {offer.valid_until:%Y-%m-%d %H:%M:%S} UTC"
        )
        lines.extend(f"    reward {r.code}: -{r.amount}" for r in offer.rewards)
        lines.extend(f"    advice: {a.text}" for a in offer.advice)
    return lines


def cmd_request(args: argparse.Namespace) -> int:
    """Act as an intermediary: sign and post a request, print the offers."""
    from cmi_sdk._models import Request  # noqa: PLC0415

    adapter = _adapter(args)
    data = _read(args.file, adapter.parser.max_bytes)
    if data.lstrip()[:1] == b"<":
        xml = data
        adapter.validate(xml, standard="cmi", document_type="request")
    else:
        try:
            model = load_model(Request, data)
        except ModelValidationError as exc:
            raise _located(args.file, exc) from None
        xml = adapter.render(model, standard="cmi", document_type="request")
    with _client(args) as client:
        response = client.post_request(xml)
    if response.status_code != 200:
        raise _answer_problem(response)
    answer = adapter.parse(response.content, standard="cmi", document_type="offers")
    if args.xml:
        _write(response.content, args.output)
    else:
        _write(("\n".join(format_offers(answer)) + "\n").encode(), None)
    return EXIT_OK


def cmd_accept(args: argparse.Namespace) -> int:
    """Act as an intermediary: accept an offer for a customer; print the booking.

    Without ``--id``, the acceptance id is derived from the intermediary, the offer and
    the customer, so running the command again is a retry of the same acceptance: it gets
    the first answer and books nothing more."""
    import datetime as dt  # noqa: PLC0415

    from cmi_sdk._models import Acceptance  # noqa: PLC0415

    adapter = _adapter(args)
    identity = None
    if args.name or args.email:
        identity = {"name": args.name, "email": args.email}
    try:
        acceptance = load_model(
            Acceptance,
            {
                "id": args.id or _acceptance_id(args.intermediary, args.offer_id, args.customer),
                "offer_id": args.offer_id,
                "customer_ref": args.customer,
                "accepted_at": dt.datetime.now(dt.UTC).isoformat(),
                "identity": identity,
            },
        )
    except ModelValidationError as exc:
        raise _located("acceptance", exc) from None
    xml = adapter.render(acceptance, standard="cmi", document_type="acceptance")
    with _client(args) as client:
        response = client.accept(args.offer_id, xml)
    if response.status_code != 201:
        raise _answer_problem(response)
    result = response.json()
    documents = ", ".join(result.get("documents", [])) or "none"
    if result.get("replayed"):
        line = (
            f"already {result['outcome']}: offer {result['offer_id']} as"
            f" {result['transaction_id']} (acceptance {result['acceptance_id']}, accepted"
            f" before; nothing more was booked; documents: {documents})"
        )
    else:
        line = (
            f"{result['outcome']}: offer {result['offer_id']} as {result['transaction_id']}"
            f" (acceptance {result['acceptance_id']}; documents: {documents})"
        )
    _write(f"{line}\n".encode(), None)
    return EXIT_OK


def _acceptance_id(intermediary: str, offer_id: str, customer: str) -> str:
    """A stable acceptance id: the same command run again retries the same acceptance."""
    import hashlib  # noqa: PLC0415

    digest = hashlib.sha256("\x1f".join((intermediary, offer_id, customer)).encode())
    return f"acc_{digest.hexdigest()[:24]}"


def cmd_acceptances(args: argparse.Namespace) -> int:
    """Recover acceptances whose booking process died (their lease ran out)."""
    adapter = _serving_adapter(block=args.block, reference_firms=args.reference_firms)
    if not adapter.plugin_manager.hook.cmi_find_booking.get_hookimpls():
        # Without the firm's booking system, a booking made before the crash is invisible:
        # releasing its acceptance would let another acceptance book the offer again.
        if not args.assume_not_booked:
            raise UsageError(
                "no plugin implements cmi_find_booking, so a booking made before a crash"
                " cannot be seen: install the firm's plugin (or --reference-firms), or pass"
                " --assume-not-booked to release every stalled acceptance"
            )
        print(
            "cmi: no plugin implements cmi_find_booking: every stalled acceptance is taken"
            " as not booked (its hold released, a retry books afresh)",
            file=sys.stderr,
        )
    done = adapter.recover_acceptances(limit=args.limit)
    _write(f"booked {done['booked']}\nreleased {done['released']}\n".encode(), None)
    return EXIT_OK


def cmd_outbox_problems(args: argparse.Namespace) -> int:
    """List the documents that could not be made (emission problems), newest first."""
    import dataclasses  # noqa: PLC0415

    adapter = _emitting_adapter(args, require_signer=False)
    problems = adapter.store.emission_problems(limit=args.limit)
    if args.json:
        _print_json(
            [
                {k: v for k, v in dataclasses.asdict(p).items() if k != "transaction"}
                for p in problems
            ]
        )
        return EXIT_OK
    lines = [f"{p.transaction_id}  terms={p.terms_id}  {p.standard}: {p.reason}" for p in problems]
    _write(("\n".join(lines) + "\n").encode() if lines else b"", None)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:  # noqa: ARG001  (no options)
    """Run the whole loop on loopback: terms, requests, offers, acceptance, the ticket."""
    from cmi_sdk.demo import run_demo  # noqa: PLC0415

    def say(line: str) -> None:
        print(line, flush=True)

    return run_demo(say)


def _with_reference_firms(block: list[str], adapter: Adapter) -> Adapter:
    """The same adapter's settings, with the reference airline and lender plugged in:
    their SQLite files in the working directory, flights 30 days out seeded once."""
    from decimal import Decimal  # noqa: PLC0415

    from cmi_airline import ReferenceAirline  # noqa: PLC0415
    from cmi_lender import ReferenceLender  # noqa: PLC0415
    from cmi_sdk._models import Money  # noqa: PLC0415
    from cmi_sdk.demo import seed_flights  # noqa: PLC0415

    airline = ReferenceAirline(database="airline.db", firm=adapter.firm)
    seed_flights(airline, skip_existing=True)
    lender = ReferenceLender(
        database="lender.db",
        firm=adapter.firm,
        daily_limit=Money(amount=Decimal("1000000.00"), currency="USD"),
        default_band="B",
    )
    firm: Adapter = _settings().adapter(
        block=block, signer=adapter.signer, plugins=[airline, lender]
    )
    return firm


def cmd_keys_generate(args: argparse.Namespace) -> int:
    """Write a development key pair: DIR/key.pem and a self-signed DIR/cert.pem."""
    from cmi_sdk.signing import generate_development_keys  # noqa: PLC0415

    try:
        key, cert = generate_development_keys(args.dir, algorithm=args.algorithm)
    except FileExistsError as exc:
        raise InputError(str(exc)) from None
    except OSError as exc:
        raise InputError(f"{args.dir}: cannot write: {exc.strerror or exc}") from None
    _write(f"{key}\n{cert}\n".encode(), None)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify a document's XML-DSig signature against a pinned certificate."""
    from cmi_sdk.signing import verify_document  # noqa: PLC0415

    cert = _read(args.cert, 1 << 20)
    data = _read(args.file, DEFAULT_MAX_BYTES)
    try:
        verify_document(data, cert)
    except CMIError as exc:
        raise _located(args.file, exc) from None
    except ValueError as exc:  # not a certificate
        raise InputError(f"{args.cert}: not a PEM certificate: {exc}") from None
    if not args.quiet:
        _write(f"{args.file}: signature verified\n".encode(), None)
    return EXIT_OK


class _ReportedError(Exception):
    """An error already explained on standard error."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def _issue_line(source: str, issue: ValidationIssue) -> str:
    line = f"{issue.line}:" if issue.line is not None else ""
    where = f" {issue.path}:" if issue.path else ""
    return f"{source}:{line}{where} {issue.reason}"


def _located(source: str, exc: CMIError) -> _ReportedError:
    if isinstance(exc, DocumentValidationError | ModelValidationError):
        head = str(exc).splitlines()[0]
        return _ReportedError([f"{source}: {head}"] + [_issue_line(source, i) for i in exc.issues])
    if isinstance(exc, MalformedXMLError) and exc.line is not None:
        return _ReportedError([f"{source}:{exc.line}: {exc}"])
    return _ReportedError([f"{source}: {exc}"])


def _report(source: str, exc: CMIError) -> None:
    for line in _located(source, exc).lines:
        print(line, file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cmi`` command."""
    parser = _Parser(
        prog="cmi",
        description=(
            "Customer-managed interactions: standard XML documents under the customer's"
            " terms, signed and delivered reliably."
        ),
        epilog="Exit codes: 0 ok, 1 invalid input, 2 usage error, 3 internal error.",
    )
    parser.add_argument("--version", action="version", version=f"cmi-sdk {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks for errors (for bug reports)"
    )
    parser.add_argument(
        "--block",
        action="append",
        default=[],
        metavar="NAME",
        help="do not load the plugin NAME (repeatable)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("standards", help="list installed standards and their document types")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=cmd_standards)

    p = sub.add_parser(
        "render",
        help="render a canonical JSON model (a transaction, request, ...) as standard XML",
    )
    p.add_argument("input", metavar="INPUT.json", help="the canonical model as JSON ('-': stdin)")
    p.add_argument("--standard", "-s", required=True, help="the standard, such as cmi-ticket")
    p.add_argument("--type", "-t", metavar="DOCTYPE", help="the document type, if several")
    p.add_argument("--output", "-o", metavar="FILE", help="write here (atomically), not stdout")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("validate", help="validate XML documents against their schemas")
    p.add_argument("files", nargs="+", metavar="FILE", help="documents to validate ('-': stdin)")
    p.add_argument("--standard", "-s", help="the standard (default: from the root element)")
    p.add_argument("--type", "-t", metavar="DOCTYPE", help="the document type")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing for valid files")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("keys", help="manage signing keys")
    keys = p.add_subparsers(dest="keys_command", metavar="ACTION", parser_class=_Parser)
    keys.required = True
    k = keys.add_parser(
        "generate", help="write DIR/key.pem and a self-signed DIR/cert.pem (development)"
    )
    k.add_argument("dir", metavar="DIR", help="the folder to write into (created if needed)")
    k.add_argument("--algorithm", choices=["ec", "rsa"], default="ec", help="default: ec")
    k.set_defaults(func=cmd_keys_generate)

    p = sub.add_parser("verify", help="verify a signed document against a certificate")
    p.add_argument("file", metavar="FILE.xml", help="the signed document ('-': stdin)")
    p.add_argument("--cert", required=True, metavar="cert.pem", help="the signer's certificate")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("terms", help="register, list and revoke customers' sharing terms")
    terms = p.add_subparsers(dest="terms_command", metavar="ACTION", parser_class=_Parser)
    terms.required = True
    t = terms.add_parser("add", help="register terms (as the firm's policy answers them)")
    t.add_argument("--customer", required=True, metavar="REF", help="pseudonymous reference")
    t.add_argument("--destination", metavar="URL", help="where documents go ('pull': nowhere)")
    _secret_options(t, "CMI_DESTINATION_SECRET")
    t.add_argument("--standard", default="cmi", help="default: cmi")
    t.add_argument("--type", metavar="DOCTYPE", help="the document type, if several")
    t.add_argument("--fields", metavar="a,b,c", help="the fields that may be shared")
    t.add_argument("--when", default="now", metavar="now|digest:6h|pull", help="default: now")
    t.add_argument(
        "--purpose", default="Keep the customer's records of their transactions", metavar="TEXT"
    )
    t.add_argument("--purpose-code", default="records", metavar="CODE", help="default: records")
    t.add_argument("--until", metavar="DATE", help="when the terms lapse (date or ISO time)")
    t.set_defaults(func=cmd_terms_add)
    t = terms.add_parser("list", help="list terms")
    t.add_argument("--customer", metavar="REF")
    t.add_argument("--all", action="store_true", help="include revoked terms")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_terms_list)
    t = terms.add_parser("revoke", help="revoke terms: nothing more goes out under them")
    t.add_argument("id", metavar="ID")
    t.set_defaults(func=cmd_terms_revoke)

    p = sub.add_parser("links", help="customers' links to their intermediaries")
    links = p.add_subparsers(dest="links_command", metavar="ACTION", parser_class=_Parser)
    links.required = True
    lk = links.add_parser(
        "create", help="a single-use link code for a signed-in customer's account"
    )
    lk.add_argument("--account", required=True, metavar="ACCOUNT", help="the firm's account id")
    lk.add_argument("--ttl", type=int, default=10, metavar="MINUTES", help="default: 10")
    lk.add_argument("--json", action="store_true")
    lk.set_defaults(func=cmd_links_create)
    lk = links.add_parser("list", help="list links")
    lk.add_argument("--account", metavar="ACCOUNT")
    lk.add_argument("--intermediary", metavar="NAME")
    lk.add_argument("--all", action="store_true", help="include revoked links")
    lk.add_argument("--json", action="store_true")
    lk.set_defaults(func=cmd_links_list)
    lk = links.add_parser("revoke", help="revoke a link and every terms of its reference")
    lk.add_argument("id", metavar="ID")
    lk.set_defaults(func=cmd_links_revoke)

    p = sub.add_parser("emit", help="emit a canonical transaction under its customer's terms")
    p.add_argument("file", metavar="FILE.json", help="the transaction ('-': stdin)")
    p.add_argument(
        "--customer",
        action="append",
        metavar="REF",
        help="a customer the transaction concerns (repeatable; default: its customer_ref)",
    )
    p.set_defaults(func=cmd_emit)

    p = sub.add_parser("deliver", help="deliver the outbox to customers' destinations")
    p.add_argument("--once", action="store_true", help="deliver what is due now, then exit")
    p.add_argument("--poll", type=float, default=1.0, help="idle poll interval, seconds")
    p.set_defaults(func=cmd_deliver)

    p = sub.add_parser("outbox", help="inspect the outbox and redrive dead letters")
    outbox = p.add_subparsers(dest="outbox_command", metavar="ACTION", parser_class=_Parser)
    outbox.required = True
    o = outbox.add_parser("status", help="counts by state, oldest pending, disabled")
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=cmd_outbox)
    o = outbox.add_parser("list", help="rows, newest first")
    o.add_argument(
        "--state", choices=["pending", "leased", "retry", "delivered", "dead", "pull", "cancelled"]
    )
    o.add_argument("--limit", type=int, default=50)
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=cmd_outbox)
    o = outbox.add_parser("redrive", help="make a dead row (or all dead since T) pending")
    o.add_argument("id", nargs="?", metavar="ID")
    o.add_argument("--since", metavar="T", help="an ISO 8601 time with a timezone")
    o.set_defaults(func=cmd_outbox)
    o = outbox.add_parser(
        "problems", help="documents that could not be made for a customer's terms"
    )
    o.add_argument("--limit", type=int, default=50)
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=cmd_outbox_problems)

    p = sub.add_parser("acceptances", help="recover acceptances whose booking process died")
    acceptances = p.add_subparsers(
        dest="acceptances_command", metavar="ACTION", parser_class=_Parser
    )
    acceptances.required = True
    a = acceptances.add_parser(
        "recover", help="complete or release acceptances whose lease ran out"
    )
    a.add_argument("--limit", type=int, default=100)
    a.add_argument(
        "--reference-firms",
        action="store_true",
        help="with the reference airline and lender (as cmi serve --reference-firms)",
    )
    a.add_argument(
        "--assume-not-booked",
        action="store_true",
        help="release stalled acceptances even when no plugin can say whether they were"
        " booked (cmi_find_booking)",
    )
    a.set_defaults(func=cmd_acceptances)

    p = sub.add_parser("db", help="the store's database")
    db = p.add_subparsers(dest="db_command", metavar="ACTION", parser_class=_Parser)
    db.required = True
    d = db.add_parser("migrate", help="create or upgrade the tables (CMI_DATABASE_URL)")
    d.set_defaults(func=cmd_db_migrate)

    p = sub.add_parser("intermediaries", help="register, rotate and revoke intermediaries")
    inter = p.add_subparsers(dest="intermediaries_command", metavar="ACTION", parser_class=_Parser)
    inter.required = True
    i = inter.add_parser("add", help="register NAME with its secret (again: add a secret)")
    i.add_argument("name", metavar="NAME")
    _secret_options(i, "CMI_INTERMEDIARY_SECRET")
    i.set_defaults(func=cmd_intermediaries_add)
    i = inter.add_parser(
        "rotate", help="give NAME a new secret (shown once); the old ones work for --grace"
    )
    i.add_argument("name", metavar="NAME")
    i.add_argument(
        "--grace",
        type=_duration,
        default=86400.0,
        metavar="24h",
        help="how long the old secrets keep working (90s, 30m, 24h, 7d; 0: not at all)",
    )
    i.add_argument("--out", metavar="FILE", help="write the new secret to a new 0600 file")
    i.set_defaults(func=cmd_intermediaries_rotate)
    i = inter.add_parser(
        "revoke", help="refuse NAME's requests from now on; revoke its links and terms"
    )
    i.add_argument("name", metavar="NAME")
    i.set_defaults(func=cmd_intermediaries_revoke)
    i = inter.add_parser("list", help="intermediaries and when their secrets end")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_intermediaries_list)

    p = sub.add_parser(
        "secrets", aliases=["secret"], help="make secrets and keys; seal stored secrets"
    )
    sec = p.add_subparsers(dest="secrets_command", metavar="ACTION", parser_class=_Parser)
    sec.required = True
    x = sec.add_parser("generate", help="a fresh whsec_ secret (for terms or intermediaries)")
    x.add_argument("--out", metavar="FILE", help="write it to a new 0600 file, not stdout")
    x.set_defaults(func=cmd_secrets_generate)
    x = sec.add_parser("generate-key", help="a fresh cmisk_ key for CMI_SECRETS_KEY")
    x.add_argument("--out", metavar="FILE", help="write it to a new 0600 file, not stdout")
    x.set_defaults(func=cmd_secrets_generate_key)
    x = sec.add_parser(
        "encrypt", help="seal every stored secret with the first key of CMI_SECRETS_KEY"
    )
    x.set_defaults(func=cmd_secrets_encrypt)

    def server_limit_options(p: argparse.ArgumentParser) -> None:
        group = p.add_argument_group(
            "limits on clients",
            "each overrides its CMI_* setting (docs: Run at scale, Slow and idle clients)",
        )
        group.add_argument(
            "--header-timeout",
            type=float,
            metavar="S",
            help="close a connection whose request head is not in within S seconds"
            " (CMI_HEADER_TIMEOUT, default 10)",
        )
        group.add_argument(
            "--body-timeout",
            type=float,
            metavar="S",
            help="answer 408 and close when a body is not in within S seconds of its head"
            " (CMI_BODY_TIMEOUT, default 30)",
        )
        group.add_argument(
            "--keep-alive-timeout",
            type=float,
            metavar="S",
            help="close a connection idle for S seconds after a response"
            " (CMI_KEEP_ALIVE_TIMEOUT, default 5)",
        )
        group.add_argument(
            "--max-connections",
            type=int,
            metavar="N",
            help="keep at most N connections open; over it, the one that waited longest for"
            " its head is closed (CMI_MAX_CONNECTIONS, default 1000)",
        )

    p = sub.add_parser("listen", help="run a customer's store (tests and demos)")
    p.add_argument("--port", type=int, required=True, help="0 picks a free port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--store", required=True, metavar="DIR", help="where documents are saved")
    _secret_options(p, "CMI_DESTINATION_SECRET", several=True)
    p.add_argument("--cert", metavar="cert.pem", help="also verify the firm's XML-DSig")
    server_limit_options(p)
    p.set_defaults(func=cmd_listen)

    def intermediary_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--to", required=True, metavar="URL", help="the firm's endpoint base")
        p.add_argument("--intermediary", required=True, metavar="NAME")
        _secret_options(p, "CMI_INTERMEDIARY_SECRET")

    p = sub.add_parser("request", help="as an intermediary: post a request, print the offers")
    p.add_argument("file", metavar="FILE", help="a canonical request (JSON) or request XML")
    intermediary_options(p)
    p.add_argument("--xml", action="store_true", help="print the signed offers XML")
    p.add_argument("--output", "-o", metavar="FILE", help="with --xml: write it here")
    p.set_defaults(func=cmd_request)

    p = sub.add_parser("accept", help="as an intermediary: accept an offer for a customer")
    p.add_argument("offer_id", metavar="OFFER_ID")
    intermediary_options(p)
    p.add_argument("--customer", required=True, metavar="REF", help="the offer's customer")
    p.add_argument(
        "--id",
        metavar="ID",
        help="the acceptance id (idempotency key); by default derived from the intermediary,"
        " the offer and the customer, so running the command again books nothing more",
    )
    p.add_argument("--name", help="the customer's name, if they choose to give it")
    p.add_argument("--email", help="the customer's e-mail, if they choose to give it")
    p.set_defaults(func=cmd_accept)

    p = sub.add_parser("demo", help="run the whole loop on loopback, with nothing to set up")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="serve the firm's CMI endpoint")
    p.add_argument(
        "--metrics",
        action="store_true",
        help="serve GET /metrics (Prometheus text format), behind the CMI_METRICS_TOKEN"
        " bearer token if set, else open to whoever reaches the endpoint",
    )
    p.add_argument(
        "--reference-firms",
        action="store_true",
        help="plug in the reference airline and lender (their data in the working folder)",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="serve from N processes (one a core: a process runs one request's code at a time)",
    )
    server_limit_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("parse", help="parse an XML document back into canonical JSON")
    p.add_argument("file", metavar="FILE", help="the document ('-': stdin)")
    p.add_argument("--standard", "-s", help="the standard (default: from the root element)")
    p.add_argument("--type", "-t", metavar="DOCTYPE", help="the document type")
    p.add_argument("--output", "-o", metavar="FILE", help="write here (atomically), not stdout")
    p.add_argument(
        "--cert",
        metavar="cert.pem",
        help="verify the signature first, and parse only what it covers",
    )
    p.set_defaults(func=cmd_parse)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cmi`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"cmi: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except _ReportedError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return EXIT_INVALID
    except (InputError, CMIError) as exc:
        if args.debug:
            raise
        print(f"cmi: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"cmi: internal error: {type(exc).__name__}: {exc} (run with --debug and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
